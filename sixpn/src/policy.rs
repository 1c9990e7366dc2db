//! The packet policy of the mesh, as pure functions over addresses.
//!
//! The eBPF programs in `ebpf/programs` read the two addresses out of a packet and
//! call these functions; the userspace side names the counters with [`Reason`]. Keeping
//! the decisions here means they are unit-tested on the host, and the kernel verifier
//! only ever sees straight-line byte comparisons.

use crate::{FLYCAST_HOST, PREFIX, RESOLVER, swap_net_host};

/// What happened to a packet; the index of its per-CPU counter. Passes are counted
/// too, so a counter dump shows the whole picture.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Guard: the packet stays in the machine's network (or goes to the resolver).
    GuardPass = 0,
    /// Guard: link-scope traffic (neighbour discovery, DAD, MLD); it never leaves the link.
    GuardLinkLocal = 1,
    /// Guard: to a flycast address the machine's network may use.
    GuardFlycast = 2,
    /// Guard drop: the source is not the machine's own `/112`.
    GuardSpoofedSource = 3,
    /// Guard drop: the destination is outside the machine's network.
    GuardForeignDestination = 4,
    /// Guard drop: not IPv6 (the private network is IPv6 only).
    GuardNotIpv6 = 5,
    /// Guard drop: too short to hold an IPv6 header.
    GuardMalformed = 6,
    /// Guard drop: the interface has no machine configured (fail closed).
    GuardUnknownInterface = 7,
    /// Mesh out: rewritten to the host-first form and handed to WireGuard.
    MeshOutPass = 8,
    /// Mesh out drop: an address that is not 6PN.
    MeshOutNot6pn = 9,
    /// Mesh in: rewritten back and delivered.
    MeshInPass = 10,
    /// Mesh in drop: an address that is not 6PN.
    MeshInNot6pn = 11,
    /// Mesh in drop: no such machine on this host.
    MeshInUnknownMachine = 12,
    /// Mesh in drop: source and destination are in different networks.
    MeshInCrossNetwork = 13,
    /// Mesh drop: not IPv6 or too short.
    MeshMalformed = 14,
}

/// How many counters there are.
pub const REASONS: u32 = 15;

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::GuardPass,
        Reason::GuardLinkLocal,
        Reason::GuardFlycast,
        Reason::GuardSpoofedSource,
        Reason::GuardForeignDestination,
        Reason::GuardNotIpv6,
        Reason::GuardMalformed,
        Reason::GuardUnknownInterface,
        Reason::MeshOutPass,
        Reason::MeshOutNot6pn,
        Reason::MeshInPass,
        Reason::MeshInNot6pn,
        Reason::MeshInUnknownMachine,
        Reason::MeshInCrossNetwork,
        Reason::MeshMalformed,
    ];

    /// The program that counts it: `guard`, `mesh_out` or `mesh_in`.
    pub const fn program(self) -> &'static str {
        match self as u32 {
            0..=7 => "guard",
            8 | 9 => "mesh_out",
            _ => "mesh_in",
        }
    }

    /// A short snake_case name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::GuardPass | Reason::MeshOutPass | Reason::MeshInPass => "pass",
            Reason::GuardLinkLocal => "link_local",
            Reason::GuardFlycast => "flycast",
            Reason::GuardSpoofedSource => "spoofed_source",
            Reason::GuardForeignDestination => "foreign_destination",
            Reason::GuardNotIpv6 => "not_ipv6",
            Reason::GuardMalformed | Reason::MeshMalformed => "malformed",
            Reason::GuardUnknownInterface => "unknown_interface",
            Reason::MeshOutNot6pn | Reason::MeshInNot6pn => "not_6pn",
            Reason::MeshInUnknownMachine => "unknown_machine",
            Reason::MeshInCrossNetwork => "cross_network",
        }
    }

    /// True if the packet was dropped.
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Reason::GuardPass
                | Reason::GuardLinkLocal
                | Reason::GuardFlycast
                | Reason::MeshOutPass
                | Reason::MeshInPass
        )
    }
}

/// What the guard knows about the machine behind one interface: the value of the
/// guard's per-interface map. `#[repr(C)]` because the kernel and userspace share it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineGuard {
    /// The machine's address; it owns the `/112` around it.
    pub address: [u8; 16],
    /// Reserved flag bits (0).
    pub flags: u32,
}

impl MachineGuard {
    /// The map value as the kernel lays it out (`u32` in native byte order).
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..16].copy_from_slice(&self.address);
        b[16..].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }
}

/// The key of the flycast allow-list: network `net` may send to `address`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlycastKey {
    /// The sending machine's network id.
    pub net: u32,
    /// The flycast address.
    pub address: [u8; 16],
}

impl FlycastKey {
    /// The map key as the kernel lays it out (`u32` in native byte order).
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&self.net.to_ne_bytes());
        b[4..].copy_from_slice(&self.address);
        b
    }
}

#[inline(always)]
const fn is_sixpn(a: &[u8; 16]) -> bool {
    let p = PREFIX.to_be_bytes();
    a[0] == p[0] && a[1] == p[1]
}

#[inline(always)]
const fn eq_range(a: &[u8; 16], b: &[u8; 16], from: usize, to: usize) -> bool {
    let mut i = from;
    while i < to {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
const fn link_scope(a: &[u8; 16]) -> bool {
    // fe80::/10 or ff02::/16 (link-local unicast and link-scope multicast)
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || (a[0] == 0xff && a[1] & 0x0f == 0x02)
}

#[inline(always)]
const fn link_source(a: &[u8; 16]) -> bool {
    let mut zero = true;
    let mut i = 0;
    while i < 16 {
        if a[i] != 0 {
            zero = false;
        }
        i += 1;
    }
    zero || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
}

/// The guard's decision for a packet that a machine sent. `flycast_allowed` is asked
/// only for a flycast destination outside the machine's own network.
#[inline(always)]
pub fn guard(
    m: &MachineGuard,
    src: &[u8; 16],
    dst: &[u8; 16],
    flycast_allowed: impl FnOnce(&FlycastKey) -> bool,
) -> Reason {
    let own = eq_range(src, &m.address, 0, 14);
    if link_scope(dst) {
        // Link-scope packets are not forwarded; a machine may use its link-local or
        // unspecified source (DAD) as well as its own.
        return if own || link_source(src) {
            Reason::GuardLinkLocal
        } else {
            Reason::GuardSpoofedSource
        };
    }
    if !own {
        return Reason::GuardSpoofedSource;
    }
    if !is_sixpn(dst) {
        return Reason::GuardForeignDestination;
    }
    // own network: fdaa:<net>::/48
    if eq_range(dst, &m.address, 0, 6) {
        return Reason::GuardPass;
    }
    if eq_range(dst, &RESOLVER.octets(), 0, 16) {
        return Reason::GuardPass;
    }
    let host = u32::from_be_bytes([dst[6], dst[7], dst[8], dst[9]]);
    if host == FLYCAST_HOST {
        let key = FlycastKey {
            net: u32::from_be_bytes([m.address[2], m.address[3], m.address[4], m.address[5]]),
            address: *dst,
        };
        if flycast_allowed(&key) {
            return Reason::GuardFlycast;
        }
    }
    Reason::GuardForeignDestination
}

/// The `/112` key of a machine address (the 16 free bits cleared): how the mesh's
/// local-machine map is keyed.
#[inline(always)]
pub const fn machine_key(a: &[u8; 16]) -> [u8; 16] {
    let mut k = *a;
    k[14] = 0;
    k[15] = 0;
    k
}

/// On the way into the mesh device: both addresses must be 6PN; the caller then
/// rewrites them with [`swap_net_host`].
#[inline(always)]
pub const fn mesh_out(src: &[u8; 16], dst: &[u8; 16]) -> Reason {
    if is_sixpn(src) && is_sixpn(dst) {
        Reason::MeshOutPass
    } else {
        Reason::MeshOutNot6pn
    }
}

/// On the way out of the mesh device, after the caller swapped both addresses back
/// to net-first form: the destination must be a machine (or the host itself) here,
/// in the source's network. `local_net` answers the network of a local `/112` key.
#[inline(always)]
pub fn mesh_in(
    src: &[u8; 16],
    dst: &[u8; 16],
    local_net: impl FnOnce(&[u8; 16]) -> Option<u32>,
) -> Reason {
    if !is_sixpn(src) || !is_sixpn(dst) {
        return Reason::MeshInNot6pn;
    }
    if !eq_range(src, dst, 2, 6) {
        return Reason::MeshInCrossNetwork;
    }
    match local_net(&machine_key(dst)) {
        Some(net) if net == u32::from_be_bytes([dst[2], dst[3], dst[4], dst[5]]) => {
            Reason::MeshInPass
        }
        _ => Reason::MeshInUnknownMachine,
    }
}

/// Where the steering program (`sk_lookup`) sends a TCP connection: the slots
/// of its socket map, one per address family (a socket bound to one address
/// is single-family; the proxy tells flycast from anycast by the address the
/// connection came to).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The proxy's IPv4 socket: the IPv4 anycast prefixes.
    V4 = 0,
    /// The proxy's IPv6 socket: the IPv6 anycast prefixes and every flycast
    /// address.
    V6 = 1,
}

/// How many socket slots there are.
pub const SLOTS: u32 = 2;

/// What the steering program did, one per-CPU counter each.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steered {
    /// Handed to the anycast socket.
    Anycast = 0,
    /// Handed to the flycast socket.
    Flycast = 1,
    /// A slot matched but holds no socket (the proxy is not up): left to the
    /// kernel's own lookup, which refuses it unless something listens there.
    NoSocket = 2,
}

/// How many steering counters there are.
pub const STEERED: u32 = 3;

impl Steered {
    /// Every counter, in order.
    pub const ALL: [Steered; STEERED as usize] =
        [Steered::Anycast, Steered::Flycast, Steered::NoSocket];

    /// Its metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            Steered::Anycast => "anycast",
            Steered::Flycast => "flycast",
            Steered::NoSocket => "no_socket",
        }
    }
}

/// True for a flycast address: 6PN, host field [`FLYCAST_HOST`]. (The
/// steering program sends those to the flycast socket, in any network: the
/// guard has already decided which networks may send there.)
#[inline(always)]
pub const fn is_flycast(a: &[u8; 16]) -> bool {
    is_sixpn(a) && u32::from_be_bytes([a[6], a[7], a[8], a[9]]) == FLYCAST_HOST
}

/// Rewrites both addresses of a packet between the two forms (its own inverse).
#[inline(always)]
pub const fn swap_both(src: &mut [u8; 16], dst: &mut [u8; 16]) {
    swap_net_host(src);
    swap_net_host(dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostId, MachineSlot, NetId, SixPn};

    fn a(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    fn machine() -> MachineGuard {
        MachineGuard {
            address: SixPn::new(NetId(0x18), HostId(0x0a7b_007d), MachineSlot(7)).octets(),
            flags: 0,
        }
    }

    const NO: fn(&FlycastKey) -> bool = |_| false;

    #[test]
    fn guard_passes_own_network_and_resolver() {
        let m = machine();
        let src = a("fdaa:0:18:a7b:7d:0:7:1");
        assert_eq!(
            guard(&m, &src, &a("fdaa:0:18:99:1:0:3:0"), NO),
            Reason::GuardPass
        );
        assert_eq!(guard(&m, &src, &a("fdaa::3"), NO), Reason::GuardPass);
        // every address of the /112 is the machine's
        assert_eq!(
            guard(&m, &a("fdaa:0:18:a7b:7d:0:7:ffff"), &a("fdaa:0:18::1"), NO),
            Reason::GuardPass
        );
    }

    #[test]
    fn guard_drops_spoofs_and_foreign_destinations() {
        let m = machine();
        let own = a("fdaa:0:18:a7b:7d:0:7:0");
        // another machine's source, same network
        assert_eq!(
            guard(&m, &a("fdaa:0:18:a7b:7d:0:8:0"), &a("fdaa:0:18::1"), NO),
            Reason::GuardSpoofedSource
        );
        // a non-6PN source
        assert_eq!(
            guard(&m, &a("2001:db8::1"), &a("fdaa:0:18::1"), NO),
            Reason::GuardSpoofedSource
        );
        // another network
        assert_eq!(
            guard(&m, &own, &a("fdaa:0:19:a7b:7d:0:1:0"), NO),
            Reason::GuardForeignDestination
        );
        // the public internet
        assert_eq!(
            guard(&m, &own, &a("2001:db8::1"), NO),
            Reason::GuardForeignDestination
        );
        // fdaa::4 is net 0 but not the resolver
        assert_eq!(
            guard(&m, &own, &a("fdaa::4"), NO),
            Reason::GuardForeignDestination
        );
    }

    #[test]
    fn guard_link_scope() {
        let m = machine();
        // DAD from the unspecified address, NS from link-local
        assert_eq!(
            guard(&m, &a("::"), &a("ff02::1:ff00:1"), NO),
            Reason::GuardLinkLocal
        );
        assert_eq!(
            guard(&m, &a("fe80::2"), &a("fe80::1"), NO),
            Reason::GuardLinkLocal
        );
        // a link-local source may not reach beyond the link
        assert_eq!(
            guard(&m, &a("fe80::2"), &a("fdaa:0:18::1"), NO),
            Reason::GuardSpoofedSource
        );
        // a spoofed global source to a multicast group is still a spoof
        assert_eq!(
            guard(&m, &a("fdaa:0:18:a7b:7d:0:8:0"), &a("ff02::1"), NO),
            Reason::GuardSpoofedSource
        );
    }

    #[test]
    fn guard_flycast_needs_the_allow_list() {
        let m = machine();
        let own = a("fdaa:0:18:a7b:7d:0:7:0");
        // own network's flycast is inside the /48 anyway
        assert_eq!(
            guard(&m, &own, &a("fdaa:0:18:0:1::5"), NO),
            Reason::GuardPass
        );
        let other = a("fdaa:0:19:0:1::5");
        assert_eq!(guard(&m, &own, &other, NO), Reason::GuardForeignDestination);
        let allow = |k: &FlycastKey| k.net == 0x18 && k.address == a("fdaa:0:19:0:1::5");
        assert_eq!(guard(&m, &own, &other, allow), Reason::GuardFlycast);
        // the allow-list is not a way into the other network's machines
        assert_eq!(
            guard(&m, &own, &a("fdaa:0:19:a7b:7d:0:1:0"), allow),
            Reason::GuardForeignDestination
        );
    }

    #[test]
    fn mesh_round_trip() {
        let mut src = a("fdaa:0:18:a7b:7d:0:7:1");
        let mut dst = a("fdaa:0:18:0:2:0:9:0");
        assert_eq!(mesh_out(&src, &dst), Reason::MeshOutPass);
        swap_both(&mut src, &mut dst);
        assert_eq!(dst, a("fdaa:0:2:0:18:0:9:0"));
        swap_both(&mut src, &mut dst);
        let here = machine_key(&a("fdaa:0:18:0:2:0:9:0"));
        let local = |k: &[u8; 16]| (*k == here).then_some(0x18);
        assert_eq!(mesh_in(&src, &dst, local), Reason::MeshInPass);
        assert_eq!(
            mesh_in(&src, &a("fdaa:0:18:0:2:0:a:0"), local),
            Reason::MeshInUnknownMachine
        );
        assert_eq!(
            mesh_in(&a("fdaa:0:19:a7b:7d:0:7:1"), &dst, local),
            Reason::MeshInCrossNetwork
        );
        assert_eq!(mesh_out(&a("2001:db8::1"), &dst), Reason::MeshOutNot6pn);
        assert_eq!(
            mesh_in(&a("2001:db8::1"), &dst, local),
            Reason::MeshInNot6pn
        );
    }

    #[test]
    fn flycast_addresses_are_told_by_their_host_field() {
        assert!(is_flycast(&a("fdaa:0:18:0:1::10")));
        assert!(is_flycast(&a("fdaa:ffff:ffff:0:1:ffff:ffff:ffff")));
        assert!(!is_flycast(&a("fdaa:0:18:0:2::10")), "a host, not flycast");
        assert!(!is_flycast(&a("fdaa:0:18:1:1::10")), "host 1:1, not 0:1");
        assert!(!is_flycast(&a("fdab:0:18:0:1::10")), "not 6PN");
        assert!(is_flycast(&SixPn::flycast(NetId(0x18), 7).octets()));
    }

    #[test]
    fn map_layouts_match_the_kernel_structs() {
        assert_eq!(core::mem::size_of::<MachineGuard>(), 20);
        assert_eq!(core::mem::size_of::<FlycastKey>(), 20);
        let k = FlycastKey {
            net: 0x18,
            address: a("fdaa:0:19:0:1::5"),
        };
        let b = k.to_bytes();
        assert_eq!(&b[..4], &0x18u32.to_ne_bytes());
        assert_eq!(&b[4..], &k.address);
        let m = machine();
        assert_eq!(&m.to_bytes()[..16], &m.address);
    }

    #[test]
    fn reasons_are_in_counter_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert!(Reason::GuardSpoofedSource.is_drop());
        assert!(!Reason::GuardLinkLocal.is_drop());
        assert_eq!(Reason::MeshInCrossNetwork.program(), "mesh_in");
        assert_eq!(Reason::MeshOutNot6pn.program(), "mesh_out");
    }
}
