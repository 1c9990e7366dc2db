//! The steering program (`sk_lookup`): one proxy socket per address family for
//! every address of the anycast prefixes on every port, the IPv6 one for every
//! flycast address too. The kernel
//! runs the program for each new TCP connection into the network namespace it is
//! attached to, before its own socket lookup; a match is handed to the socket in
//! the slot, and the socket's SO_REUSEPORT group spreads connections over the
//! proxy's threads as usual.
//!
//! The link belongs to this process: when [`Steer`] is dropped or the process
//! dies, steering stops and the kernel's ordinary lookup answers again (which
//! refuses the connection unless something listens on that address and port).

use std::os::fd::AsRawFd;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, SockMap, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{SkLookup, sk_lookup::SkLookupLinkId},
};
use ipnet::IpNet;
use skein_sixpn::policy::{STEERED, Slot, Steered};

use crate::{Error, OBJECT, Result, embedded, map};

/// The loaded steering program and its maps. One per daemon.
pub struct Steer {
    bpf: Ebpf,
    sockets: SockMap<MapData>,
    v4: LpmTrie<MapData, [u8; 4], u32>,
    v6: LpmTrie<MapData, [u8; 16], u32>,
    counts: PerCpuArray<MapData, u64>,
    link: Option<SkLookupLinkId>,
    prefixes: Vec<IpNet>,
}

impl std::fmt::Debug for Steer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steer")
            .field("attached", &self.link.is_some())
            .field("prefixes", &self.prefixes)
            .finish()
    }
}

const PROGRAM: &str = "steer";

fn program_err(source: aya::programs::ProgramError) -> Error {
    Error::Program {
        program: PROGRAM,
        source,
    }
}

impl Steer {
    /// Loads the embedded program (nothing is attached yet).
    pub fn load() -> Result<Self> {
        if !embedded() {
            return Err(Error::NotBuilt);
        }
        let mut bpf = EbpfLoader::new().load(OBJECT)?;
        let p: &mut SkLookup = bpf
            .program_mut(PROGRAM)
            .ok_or(Error::Missing(PROGRAM))?
            .try_into()
            .map_err(program_err)?;
        p.load().map_err(program_err)?;
        Ok(Steer {
            sockets: map(&mut bpf, "SOCKETS")?,
            v4: map(&mut bpf, "STEER4")?,
            v6: map(&mut bpf, "STEER6")?,
            counts: map(&mut bpf, "STEER_COUNTS")?,
            bpf,
            link: None,
            prefixes: Vec::new(),
        })
    }

    /// Attaches to the network namespace of the calling thread.
    pub fn attach(&mut self) -> Result<()> {
        if self.link.is_some() {
            return Ok(());
        }
        let ns = std::fs::File::open("/proc/thread-self/ns/net").map_err(Error::Netns)?;
        let p: &mut SkLookup = self
            .bpf
            .program_mut(PROGRAM)
            .ok_or(Error::Missing(PROGRAM))?
            .try_into()
            .map_err(program_err)?;
        self.link = Some(p.attach(ns).map_err(program_err)?);
        Ok(())
    }

    /// Puts the listening socket of `slot` in place (of the slot's address
    /// family; one socket of the proxy's SO_REUSEPORT group: the group spreads
    /// the connections).
    pub fn set_socket(&mut self, slot: Slot, socket: &impl AsRawFd) -> Result<()> {
        self.sockets
            .set(slot as u32, socket, 0)
            .map_err(|source| Error::Map {
                map: "SOCKETS",
                source,
            })
    }

    /// Empties `slot`: its connections fall through to the kernel's lookup.
    pub fn clear_socket(&mut self, slot: Slot) {
        let _ = self.sockets.clear_index(&(slot as u32));
    }

    /// Steers every address of `prefix`, on every TCP port, to the socket of
    /// its family.
    pub fn add_prefix(&mut self, prefix: IpNet) -> Result<()> {
        let err = |source| Error::Map {
            map: "STEER",
            source,
        };
        let len = u32::from(prefix.prefix_len());
        match prefix.trunc() {
            IpNet::V4(p) => self
                .v4
                .insert(&Key::new(len, p.addr().octets()), Slot::V4 as u32, 0)
                .map_err(err)?,
            IpNet::V6(p) => self
                .v6
                .insert(&Key::new(len, p.addr().octets()), Slot::V6 as u32, 0)
                .map_err(err)?,
        }
        if !self.prefixes.contains(&prefix.trunc()) {
            self.prefixes.push(prefix.trunc());
        }
        Ok(())
    }

    /// Stops steering `prefix`.
    pub fn remove_prefix(&mut self, prefix: IpNet) {
        let len = u32::from(prefix.prefix_len());
        let _ = match prefix.trunc() {
            IpNet::V4(p) => self.v4.remove(&Key::new(len, p.addr().octets())),
            IpNet::V6(p) => self.v6.remove(&Key::new(len, p.addr().octets())),
        };
        self.prefixes.retain(|p| *p != prefix.trunc());
    }

    /// The prefixes steered now.
    pub fn prefixes(&self) -> &[IpNet] {
        &self.prefixes
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Steered, u64)>> {
        let mut out = Vec::with_capacity(STEERED as usize);
        for s in Steered::ALL {
            let per_cpu = self
                .counts
                .get(&(s as u32), 0)
                .map_err(|source| Error::Map {
                    map: "STEER_COUNTS",
                    source,
                })?;
            out.push((s, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Detaches (also done on drop).
    pub fn detach(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        if let Some(p) = self.bpf.program_mut(PROGRAM)
            && let Ok(p) = <&mut SkLookup>::try_from(p)
        {
            let _ = p.detach(link);
        }
    }
}

impl Drop for Steer {
    fn drop(&mut self) {
        self.detach();
    }
}
