//! The userspace side of skein's eBPF programs: load the embedded object, attach the
//! programs to interfaces, keep the maps in step, read the counters.
//!
//! The programs themselves live in `ebpf/programs` (aya-ebpf, nightly,
//! `bpfel-unknown-none`); `cargo xtask build-ebpf` builds them and this crate's build
//! script embeds the object. A plain `cargo build` on stable embeds an empty object
//! instead, and [`Datapath::load`] answers [`Error::NotBuilt`]. The decisions the
//! programs make are `skein_sixpn::policy`, tested on the host.
//!
//! Attachments use TCX links (Linux 6.6 and later) owned by this process: when the
//! [`Datapath`] is dropped, or the process dies, every program is gone with it and no
//! qdisc or filter is left behind. On older kernels aya falls back to netlink
//! `cls_bpf` filters, which [`Datapath`] removes on detach and on drop.

use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId},
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

/// The loaded programs and their maps. One per daemon.
pub struct Datapath {
    bpf: Ebpf,
    guards: HashMap<MapData, u32, [u8; 20]>,
    flycast: HashMap<MapData, [u8; 20], u8>,
    local: HashMap<MapData, [u8; 16], u32>,
    counters: PerCpuArray<MapData, u64>,
    links: BTreeMap<(String, Attach), (u32, SchedClassifierLinkId)>,
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
        self.links.insert((iface.to_owned(), a), (index, link));
        Ok(())
    }

    fn detach(&mut self, iface: &str, a: Attach) {
        let Some((_, link)) = self.links.remove(&(iface.to_owned(), a)) else {
            return;
        };
        if let Some(p) = self.bpf.program_mut(a.program())
            && let Ok(p) = <&mut SchedClassifier>::try_from(p)
        {
            // An error means the interface (and the link with it) is already gone.
            let _ = p.detach(link);
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

    /// What is attached where: `(interface, program)`.
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        self.links
            .keys()
            .map(|(i, a)| (i.clone(), a.program()))
            .collect()
    }

    /// Detaches everything (also done on drop).
    pub fn detach_all(&mut self) {
        let keys: Vec<_> = self.links.keys().cloned().collect();
        for (iface, a) in keys {
            if a == Attach::Guard {
                self.detach_guard(&iface);
            } else {
                self.detach(&iface, a);
            }
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}
