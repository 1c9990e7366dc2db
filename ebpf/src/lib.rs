//! The userspace side of skein's eBPF programs: load the embedded object, attach the
//! programs to interfaces, keep the maps in step, read the counters.
//!
//! The programs themselves live in `ebpf/programs` (aya-ebpf, nightly,
//! `bpfel-unknown-none`); `cargo xtask build-ebpf` builds them and this crate's build
//! script embeds the object. A plain `cargo build` on stable embeds an empty object
//! instead, and [`Datapath::load`] answers [`Error::NotBuilt`]. The decisions the
//! programs make are `skein_sixpn::policy`, tested on the host.
//!
//! Attachments use TCX links (Linux 6.6 and later). [`Datapath::detach_all`] (an
//! orderly stop) detaches every program and leaves no qdisc or filter behind. With [`Datapath::pin_links`] the links are also pinned on a bpf
//! filesystem, so a daemon that dies without stopping (a crash, SIGKILL, OOM)
//! leaves its guards in force: the machines stay unable to spoof or to reach
//! another network until the next daemon replaces each link with its own (new
//! link first, then the old one goes: never a moment unguarded) and retires the
//! ones no machine wants any more ([`Datapath::retire_stale`]). It fails closed:
//! only [`Datapath::detach_all`], an orderly stop, takes pinned links away.
//! On older kernels aya falls back to netlink `cls_bpf` filters, which are not
//! pinned and which [`Datapath`] removes on detach and on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc,
        tc::SchedClassifierLink,
    },
};
use skein_sixpn::{
    SixPn,
    policy::{FlycastKey, MachineGuard, REASONS, Reason},
};

pub mod steer;

pub use steer::Steer;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skein-ebpf.o"));

/// True if this binary carries the eBPF programs.
pub fn embedded() -> bool {
    !OBJECT.is_empty()
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary was built without the programs.
    #[error(
        "this skein binary was built without its eBPF programs: run `cargo xtask build-ebpf` \
         (nightly + bpf-linker) before building it"
    )]
    NotBuilt,
    /// Loading the object into the kernel failed.
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program {program}: {source}")]
    Program {
        /// Which program.
        program: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// The object lacks a map or program this crate expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// This thread's network namespace could not be opened.
    #[error("opening the network namespace: {0}")]
    Netns(std::io::Error),
    /// The pin directory is not on a bpf filesystem, or pinning failed.
    #[error("pinning eBPF links in {dir}: {reason}")]
    Pin {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// An interface name that does not exist.
    #[error("interface {name}: {source}")]
    Interface {
        /// The name.
        name: String,
        /// Why.
        source: nix::Error,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Which of the programs an attachment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Attach {
    Guard,
    MeshOut,
    MeshIn,
}

impl Attach {
    fn program(self) -> &'static str {
        match self {
            Attach::Guard => "guard",
            Attach::MeshOut => "mesh_out",
            Attach::MeshIn => "mesh_in",
        }
    }
    fn direction(self) -> TcAttachType {
        match self {
            Attach::Guard | Attach::MeshIn => TcAttachType::Ingress,
            Attach::MeshOut => TcAttachType::Egress,
        }
    }
}

/// One attachment this process holds.
enum Held {
    /// Detached when dropped (a TCX link without pinning, or a netlink filter):
    /// held for its `Drop`.
    Owned(#[allow(dead_code)] SchedClassifierLink),
    /// Pinned: detached only by [`Datapath::detach`] (unpin, then drop).
    Pinned(PinnedLink),
}

impl Held {
    fn release(self) {
        if let Held::Pinned(p) = self {
            // Without its pin the link lives only in this fd, closed right here.
            let _ = p.unpin();
        }
    }
}

/// Where links are pinned, and the links an earlier daemon left there that
/// this one has not replaced yet (file name -> link).
struct Pins {
    dir: PathBuf,
    stale: BTreeMap<String, PinnedLink>,
}

/// The programs attached to `iface` by TCX, as `(direction, program name)` in
/// the kernel's order, whoever attached them (this process, a pinned link of
/// an earlier one, another tool): what an operator, or a test, asks to see
/// that an interface is guarded once, not twice or never.
pub fn tcx_programs(iface: &str) -> Result<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    for (direction, t) in [
        ("ingress", TcAttachType::Ingress),
        ("egress", TcAttachType::Egress),
    ] {
        let (_, programs) =
            SchedClassifier::query_tcx(iface, t).map_err(|source| Error::Program {
                program: "(query)",
                source,
            })?;
        for p in programs {
            let name = p.name_as_str().unwrap_or("?").to_owned();
            out.push((direction, name));
        }
    }
    Ok(out)
}

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// True if `path` is on a bpf filesystem.
fn on_bpffs(path: &Path) -> bool {
    #[allow(clippy::unnecessary_cast, clippy::cast_lossless)]
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// The loaded programs and their maps. One per daemon.
pub struct Datapath {
    bpf: Ebpf,
    guards: HashMap<MapData, u32, [u8; 20]>,
    flycast: HashMap<MapData, [u8; 20], u8>,
    local: HashMap<MapData, [u8; 16], u32>,
    counters: PerCpuArray<MapData, u64>,
    links: BTreeMap<(String, Attach), (u32, Held)>,
    pins: Option<Pins>,
    /// Held while the kernel times program runs.
    stats: Option<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attached", &self.attached())
            .finish()
    }
}

fn map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = bpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(m).map_err(|source| Error::Map { map: name, source })
}

fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|source| Error::Interface {
        name: name.to_owned(),
        source,
    })
}

impl Datapath {
    /// Loads the embedded programs into the kernel (nothing is attached yet).
    pub fn load() -> Result<Self> {
        if !embedded() {
            return Err(Error::NotBuilt);
        }
        Self::load_object(OBJECT)
    }

    /// Loads programs from an object file's bytes (tests, or a custom build).
    pub fn load_object(object: &[u8]) -> Result<Self> {
        let mut bpf = EbpfLoader::new().load(object)?;
        for a in [Attach::Guard, Attach::MeshOut, Attach::MeshIn] {
            let p: &mut SchedClassifier = bpf
                .program_mut(a.program())
                .ok_or(Error::Missing(a.program()))?
                .try_into()
                .map_err(|source| Error::Program {
                    program: a.program(),
                    source,
                })?;
            p.load().map_err(|source| Error::Program {
                program: a.program(),
                source,
            })?;
        }
        Ok(Datapath {
            guards: map(&mut bpf, "GUARDS")?,
            flycast: map(&mut bpf, "FLYCAST")?,
            local: map(&mut bpf, "LOCAL")?,
            counters: map(&mut bpf, "COUNTERS")?,
            bpf,
            links: BTreeMap::new(),
            pins: None,
            stats: None,
        })
    }

    /// Pins every link attached from now on in `dir` (created if missing; it must
    /// be on a bpf filesystem), and adopts the links an earlier daemon pinned
    /// there: they stay in force until this one attaches the same program to the
    /// same interface (and so replaces them) or retires them
    /// ([`Datapath::retire_stale`]). Returns how many it adopted.
    pub fn pin_links(&mut self, dir: &Path) -> Result<usize> {
        let pin_err = |reason: String| Error::Pin {
            dir: dir.to_owned(),
            reason,
        };
        // The usual place, not mounted yet (no systemd here): mount it, as
        // systemd would.
        let usual = Path::new("/sys/fs/bpf");
        if dir.starts_with(usual) && !on_bpffs(usual) {
            nix::mount::mount(
                Some("bpf"),
                usual,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| {
                pin_err(format!(
                    "mounting a bpf filesystem on {}: {e}",
                    usual.display()
                ))
            })?;
        }
        std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
        if !on_bpffs(dir) {
            return Err(pin_err(
                "not on a bpf filesystem (mount -t bpf bpf <dir>)".into(),
            ));
        }
        let mut stale = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| pin_err(e.to_string()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => {
                    stale.insert(name, link);
                }
                // Not a link (or unreadable): nothing of ours; leave it.
                Err(_) => continue,
            }
        }
        let adopted = stale.len();
        self.pins = Some(Pins {
            dir: dir.to_owned(),
            stale,
        });
        Ok(adopted)
    }

    /// Detaches the links an earlier daemon pinned that this one has not
    /// replaced, except those on interfaces `keep` names (a machine this daemon
    /// wants but could not wire yet stays guarded by the old link). Returns the
    /// `(interface, program)` of each link retired.
    pub fn retire_stale(&mut self, keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let Some(pins) = &mut self.pins else {
            return Vec::new();
        };
        let names: Vec<String> = pins.stale.keys().cloned().collect();
        let mut retired = Vec::new();
        for name in names {
            let (program, iface) = name.split_once('@').unwrap_or((&name, ""));
            if keep(iface) {
                continue;
            }
            let (program, iface) = (program.to_owned(), iface.to_owned());
            if let Some(link) = pins.stale.remove(&name) {
                let _ = link.unpin();
                retired.push((iface, program));
            }
        }
        retired
    }

    /// How many links an earlier daemon pinned are still in force.
    pub fn stale_links(&self) -> usize {
        self.pins.as_ref().map_or(0, |p| p.stale.len())
    }

    /// Keeps `link` for `(iface, a)`: pinned when pinning is on and the link is a
    /// TCX link, after which the earlier daemon's link for the same pair (if
    /// any) is let go; the new one already runs, so the interface is never
    /// unguarded.
    fn hold(&mut self, iface: &str, a: Attach, link: SchedClassifierLink) -> Result<Held> {
        let Some(pins) = &mut self.pins else {
            return Ok(Held::Owned(link));
        };
        if <&FdLink>::try_from(&link).is_err() {
            return Ok(Held::Owned(link)); // a netlink filter cannot be pinned
        }
        let fd = FdLink::try_from(link).map_err(|e| Error::Pin {
            dir: pins.dir.clone(),
            reason: e.to_string(),
        })?;
        let name = format!("{}@{iface}", a.program());
        let path = pins.dir.join(&name);
        if let Some(old) = pins.stale.remove(&name) {
            let _ = old.unpin();
        } else if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
        fd.pin(&path).map(Held::Pinned).map_err(|e| Error::Pin {
            dir: pins.dir.clone(),
            reason: e.to_string(),
        })
    }

    fn attach(&mut self, iface: &str, a: Attach) -> Result<()> {
        let index = ifindex(iface)?;
        if let Some((old, _)) = self.links.get(&(iface.to_owned(), a)) {
            if *old == index {
                return Ok(());
            }
            // same name, new interface (it was recreated): the old link died with it
            self.detach(iface, a);
        }
        let p: &mut SchedClassifier = self
            .bpf
            .program_mut(a.program())
            .ok_or(Error::Missing(a.program()))?
            .try_into()
            .map_err(|source| Error::Program {
                program: a.program(),
                source,
            })?;
        let link = match p.attach(iface, a.direction()) {
            Ok(l) => l,
            Err(_) => {
                // older kernels: netlink cls_bpf needs the clsact qdisc
                let _ = tc::qdisc_add_clsact(iface);
                p.attach(iface, a.direction())
                    .map_err(|source| Error::Program {
                        program: a.program(),
                        source,
                    })?
            }
        };
        let link = p.take_link(link).map_err(|source| Error::Program {
            program: a.program(),
            source,
        })?;
        let held = self.hold(iface, a, link)?;
        self.links.insert((iface.to_owned(), a), (index, held));
        Ok(())
    }

    fn detach(&mut self, iface: &str, a: Attach) {
        // Dropping the link detaches it; an error there means the interface
        // (and the link with it) is already gone.
        if let Some((_, held)) = self.links.remove(&(iface.to_owned(), a)) {
            held.release();
        }
    }

    /// Guards the host side of `machine`'s interface `iface`: from now on, what the
    /// machine sends must come from its own `/112` and stay in its network.
    pub fn attach_guard(&mut self, iface: &str, machine: SixPn) -> Result<()> {
        let index = ifindex(iface)?;
        let value = MachineGuard {
            address: machine.octets(),
            flags: 0,
        }
        .to_bytes();
        self.guards
            .insert(index, value, 0)
            .map_err(|source| Error::Map {
                map: "GUARDS",
                source,
            })?;
        self.attach(iface, Attach::Guard)
    }

    /// Takes the guard off `iface` and forgets its machine.
    pub fn detach_guard(&mut self, iface: &str) {
        if let Some((index, _)) = self.links.get(&(iface.to_owned(), Attach::Guard)) {
            let _ = self.guards.remove(index);
        }
        self.detach(iface, Attach::Guard);
    }

    /// Attaches the net/host rewrite to the mesh device `iface` (both directions).
    pub fn attach_mesh(&mut self, iface: &str) -> Result<()> {
        self.attach(iface, Attach::MeshOut)?;
        self.attach(iface, Attach::MeshIn)
    }

    /// Takes the rewrite off the mesh device.
    pub fn detach_mesh(&mut self, iface: &str) {
        self.detach(iface, Attach::MeshOut);
        self.detach(iface, Attach::MeshIn);
    }

    /// Lets the mesh deliver to the `/112` of `address` (a machine on this host, or
    /// the host itself).
    pub fn add_local(&mut self, address: SixPn) -> Result<()> {
        let key = skein_sixpn::policy::machine_key(&address.octets());
        self.local
            .insert(key, address.net().0, 0)
            .map_err(|source| Error::Map {
                map: "LOCAL",
                source,
            })
    }

    /// Stops delivering to the `/112` of `address`.
    pub fn remove_local(&mut self, address: SixPn) {
        let key = skein_sixpn::policy::machine_key(&address.octets());
        let _ = self.local.remove(&key);
    }

    /// The `/112` keys the mesh delivers to now.
    pub fn locals(&self) -> Vec<SixPn> {
        self.local
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| SixPn::from_octets(k).ok())
            .collect()
    }

    /// Lets network `net` send to the flycast address `address` of another network.
    pub fn allow_flycast(&mut self, net: u32, address: SixPn) -> Result<()> {
        let key = FlycastKey {
            net,
            address: address.octets(),
        }
        .to_bytes();
        self.flycast.insert(key, 1, 0).map_err(|source| Error::Map {
            map: "FLYCAST",
            source,
        })
    }

    /// Withdraws [`Datapath::allow_flycast`].
    pub fn disallow_flycast(&mut self, net: u32, address: SixPn) {
        let key = FlycastKey {
            net,
            address: address.octets(),
        }
        .to_bytes();
        let _ = self.flycast.remove(&key);
    }

    /// Every counter, summed over CPUs, in [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>> {
        let mut out = Vec::with_capacity(REASONS as usize);
        for r in Reason::ALL {
            let per_cpu = self
                .counters
                .get(&(r as u32), 0)
                .map_err(|source| Error::Map {
                    map: "COUNTERS",
                    source,
                })?;
            out.push((r, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Asks the kernel to time every run of every program (`BPF_ENABLE_STATS`)
    /// for as long as this datapath lives; [`Datapath::run_stats`] reads them.
    /// Costs two clock reads per run: for measuring what the programs cost,
    /// not to leave on for ever.
    pub fn time_runs(&mut self) -> Result<()> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| Error::Program {
            program: "(stats)",
            source: ProgramError::SyscallError(e),
        })?;
        self.stats = Some(fd);
        Ok(())
    }

    /// Each program's total run time and number of runs so far, as the kernel
    /// counts them (zero unless [`Datapath::time_runs`] or
    /// `kernel.bpf_stats_enabled` turned the timing on).
    pub fn run_stats(&self) -> Vec<(&'static str, std::time::Duration, u64)> {
        [Attach::Guard, Attach::MeshOut, Attach::MeshIn]
            .into_iter()
            .filter_map(|a| {
                let info = self.bpf.program(a.program())?.info().ok()?;
                Some((a.program(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// What is attached where: `(interface, program)`.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.links
            .keys()
            .map(|(i, a)| (i.clone(), a.program()))
            .collect()
    }

    /// Detaches everything, unpins it and removes the pin directory: an
    /// orderly stop (on drop too, unless the links are pinned).
    pub fn detach_all(&mut self) {
        let keys: Vec<_> = self.links.keys().cloned().collect();
        for (iface, a) in keys {
            if a == Attach::Guard {
                self.detach_guard(&iface);
            } else {
                self.detach(&iface, a);
            }
        }
        // an earlier daemon's links too, and the pin directory (when empty)
        self.retire_stale(|_| false);
        if let Some(p) = &self.pins {
            let _ = std::fs::remove_dir(&p.dir);
        }
    }
}

impl Drop for Datapath {
    /// Without pinning, the links would go with the process anyway: they go
    /// now. With pinning, a datapath dropped without [`Datapath::detach_all`]
    /// (a start that failed halfway, a panic) leaves its pinned links in force,
    /// as a crash would: the machines stay guarded until the next daemon takes
    /// over. Only an orderly stop calls `detach_all`.
    fn drop(&mut self) {
        if self.pins.is_none() {
            self.detach_all();
        }
    }
}
