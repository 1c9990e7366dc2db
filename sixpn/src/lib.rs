//! 6PN: the private IPv6 addresses of skein's machines.
//!
//! ```text
//! fdaa | net (32) | host (32) | machine (32) | 16 bits free
//! fdaa:0:18:a7b:7d:f066:b83b:2   -> net 0:18, host a7b:7d, machine f066:b83b
//! ```
//!
//! - `fdaa:<net>::/48` is an organization network; a machine owns its `/112`.
//! - `fdaa::3` is the resolver every machine is given (net 0, host 0).
//! - Host ids 0 and 1 are reserved; host id 1 in a network marks a flycast address
//!   (`fdaa:<net>:0:1::<n>`), served by the proxy on the asker's own host.
//! - Between hosts, packets carry the *host-first* form: the net and host fields
//!   swapped, so that one WireGuard AllowedIPs entry (`fdaa:<host>::/48`) covers every
//!   network a host carries. The swap moves whole 16-bit words, so the address's
//!   one's-complement sum, and with it every TCP/UDP checksum, is unchanged.
//!
//! This crate is `no_std` and allocation-free: the eBPF programs use the same
//! functions as the catalog, so the arithmetic is tested once, here, on the host.
#![no_std]

pub mod policy;

use core::fmt;
use core::net::Ipv6Addr;

/// The first 16 bits of every 6PN address.
pub const PREFIX: u16 = 0xfdaa;
/// The resolver every machine is given: `fdaa::3`.
pub const RESOLVER: Ipv6Addr = Ipv6Addr::new(PREFIX, 0, 0, 0, 0, 0, 0, 3);
/// Prefix length of an organization network (`fdaa:<net>::/48`).
pub const NETWORK_PREFIX_LEN: u8 = 48;
/// Prefix length a machine owns (`fdaa:<net>:<host>:<machine>::/112`).
pub const MACHINE_PREFIX_LEN: u8 = 112;
/// Host id that marks a flycast address inside a network.
pub const FLYCAST_HOST: u32 = 1;
/// The lowest host id that may be given to a real host (0 and 1 are reserved).
pub const FIRST_HOST_ID: u32 = 2;

/// An organization network id (32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetId(pub u32);

/// A host id (32 bits). 0 and 1 are reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub u32);

/// The machine field of an address (32 bits), unique per host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineSlot(pub u32);

/// Error from parsing an address or a 32-bit field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The text is not an IPv6 address.
    NotIpv6,
    /// The address does not start with `fdaa`.
    NotSixPn,
    /// A 32-bit field is not `hi:lo` or plain hex, or is out of range.
    BadField,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::NotIpv6 => "not an IPv6 address",
            ParseError::NotSixPn => "not a 6PN address (must start with fdaa)",
            ParseError::BadField => "not a 32-bit id (hex, optionally written as hi:lo)",
        })
    }
}

/// Formats a 32-bit id the way it appears in an address: `hi:lo` in hex,
/// `lo` alone when `hi` is zero (`0:18` is written `0:18`, as in the address).
fn fmt_field(v: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{:x}:{:x}", v >> 16, v & 0xffff)
}

/// Parses a 32-bit id written `hi:lo` (hex words) or as one hex number.
pub fn parse_field(s: &str) -> Result<u32, ParseError> {
    let word = |w: &str| -> Result<u32, ParseError> {
        if w.is_empty() || w.len() > 4 {
            return Err(ParseError::BadField);
        }
        u32::from_str_radix(w, 16).map_err(|_| ParseError::BadField)
    };
    match s.split_once(':') {
        Some((hi, lo)) => Ok((word(hi)? << 16) | word(lo)?),
        None if !s.is_empty() && s.len() <= 8 => {
            u32::from_str_radix(s, 16).map_err(|_| ParseError::BadField)
        }
        None => Err(ParseError::BadField),
    }
}

impl fmt::Display for NetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_field(self.0, f)
    }
}
impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_field(self.0, f)
    }
}
impl fmt::Display for MachineSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_field(self.0, f)
    }
}

/// A 6PN address in its canonical (net-first) form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SixPn([u8; 16]);

impl SixPn {
    /// Builds the address of machine `machine` of network `net` on host `host`;
    /// the 16 free bits are zero.
    pub const fn new(net: NetId, host: HostId, machine: MachineSlot) -> Self {
        let n = net.0.to_be_bytes();
        let h = host.0.to_be_bytes();
        let m = machine.0.to_be_bytes();
        SixPn([
            0xfd, 0xaa, n[0], n[1], n[2], n[3], h[0], h[1], h[2], h[3], m[0], m[1], m[2], m[3], 0,
            0,
        ])
    }

    /// Flycast address `n` of a network: `fdaa:<net>:0:1::<n>` (n is 48 bits; higher
    /// bits are dropped).
    pub const fn flycast(net: NetId, n: u64) -> Self {
        let mut a = Self::new(net, HostId(FLYCAST_HOST), MachineSlot(0)).0;
        let b = n.to_be_bytes();
        let mut i = 0;
        while i < 6 {
            a[10 + i] = b[2 + i];
            i += 1;
        }
        SixPn(a)
    }

    /// Accepts any address that starts with `fdaa`.
    pub const fn from_octets(o: [u8; 16]) -> Result<Self, ParseError> {
        if o[0] == 0xfd && o[1] == 0xaa {
            Ok(SixPn(o))
        } else {
            Err(ParseError::NotSixPn)
        }
    }

    /// The address as 16 bytes in network order.
    pub const fn octets(&self) -> [u8; 16] {
        self.0
    }

    /// The organization network.
    pub const fn net(&self) -> NetId {
        NetId(u32::from_be_bytes([
            self.0[2], self.0[3], self.0[4], self.0[5],
        ]))
    }

    /// The host.
    pub const fn host(&self) -> HostId {
        HostId(u32::from_be_bytes([
            self.0[6], self.0[7], self.0[8], self.0[9],
        ]))
    }

    /// The machine field.
    pub const fn machine(&self) -> MachineSlot {
        MachineSlot(u32::from_be_bytes([
            self.0[10], self.0[11], self.0[12], self.0[13],
        ]))
    }

    /// The 16 free bits at the end.
    pub const fn free(&self) -> u16 {
        u16::from_be_bytes([self.0[14], self.0[15]])
    }

    /// True for a flycast address (host id 1).
    pub const fn is_flycast(&self) -> bool {
        self.host().0 == FLYCAST_HOST
    }

    /// The host-first form used between hosts (net and host swapped).
    pub const fn to_host_first(&self) -> [u8; 16] {
        let mut o = self.0;
        swap_net_host(&mut o);
        o
    }

    /// Back from the host-first form.
    pub const fn from_host_first(mut o: [u8; 16]) -> Result<Self, ParseError> {
        swap_net_host(&mut o);
        Self::from_octets(o)
    }

    /// True if `other` lies in this address's organization network (`/48`).
    pub const fn same_network(&self, other: &SixPn) -> bool {
        self.net().0 == other.net().0
    }

    /// True if `other` lies in the `/112` this machine owns.
    pub const fn same_machine(&self, other: &SixPn) -> bool {
        let mut i = 0;
        while i < 14 {
            if self.0[i] != other.0[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The first address of this address's network (`fdaa:<net>::`).
    pub const fn network_base(net: NetId) -> SixPn {
        SixPn::new(net, HostId(0), MachineSlot(0))
    }

    /// A host's own address on the mesh: network 0, the host, machine 0, `::1`
    /// (`fdaa:0:0:<host>:0:0:1`). Hosts reach each other there (the mesh
    /// agent puts it on the WireGuard device; the edge proxies' backhaul
    /// listens on it). No machine can send to it: network 0 is nobody's.
    pub const fn host_address(host: HostId) -> SixPn {
        SixPn::gateway(NetId(0), host)
    }

    /// A host's own address inside network `net` (machine slot 0, which no
    /// machine gets, `::1`): the source of what the host sends to its machines
    /// of that network, so their replies stay inside their network and pass
    /// the guard. Only local: the mesh delivers nothing to slot 0.
    pub const fn gateway(net: NetId, host: HostId) -> SixPn {
        let mut a = SixPn::new(net, host, MachineSlot(0)).0;
        a[15] = 1;
        SixPn(a)
    }
}

impl From<SixPn> for Ipv6Addr {
    fn from(a: SixPn) -> Ipv6Addr {
        Ipv6Addr::from(a.0)
    }
}

impl TryFrom<Ipv6Addr> for SixPn {
    type Error = ParseError;
    fn try_from(a: Ipv6Addr) -> Result<Self, ParseError> {
        SixPn::from_octets(a.octets())
    }
}

impl core::str::FromStr for SixPn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let a: Ipv6Addr = s.parse().map_err(|_| ParseError::NotIpv6)?;
        SixPn::try_from(a)
    }
}

impl fmt::Display for SixPn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Ipv6Addr::from(self.0), f)
    }
}

/// Swaps the net field (bytes 2..6) and the host field (bytes 6..10) in place. Its
/// own inverse. Works on any 16-byte address, so the eBPF programs call it on raw
/// packet bytes.
#[inline(always)]
pub const fn swap_net_host(o: &mut [u8; 16]) {
    let mut i = 0;
    while i < 4 {
        let t = o[2 + i];
        o[2 + i] = o[6 + i];
        o[6 + i] = t;
        i += 1;
    }
}

/// The 16-bit one's-complement sum of an address (as the TCP/UDP checksum sees it).
pub const fn ones_complement_sum(o: &[u8; 16]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 16 {
        sum += u16::from_be_bytes([o[i], o[i + 1]]) as u32;
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// True if `addr` lies in `prefix/len` (both 16-byte addresses).
pub const fn in_prefix(addr: &[u8; 16], prefix: &[u8; 16], len: u8) -> bool {
    let len = if len > 128 { 128 } else { len } as usize;
    let full = len / 8;
    let mut i = 0;
    while i < full {
        if addr[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    let rem = len % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    addr[full] & mask == prefix[full] & mask
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

    #[test]
    fn design_example_decodes() {
        let a: SixPn = "fdaa:0:18:a7b:7d:f066:b83b:2".parse().unwrap();
        assert_eq!(a.net(), NetId(0x18));
        assert_eq!(a.host(), HostId(0x0a7b_007d));
        assert_eq!(a.machine(), MachineSlot(0xf066_b83b));
        assert_eq!(a.free(), 2);
        assert_eq!(a.net().to_string(), "0:18");
        assert_eq!(a.host().to_string(), "a7b:7d");
        let hf = Ipv6Addr::from(a.to_host_first());
        assert_eq!(hf.to_string(), "fdaa:a7b:7d:0:18:f066:b83b:2");
    }

    #[test]
    fn resolver_and_flycast() {
        let r = SixPn::try_from(RESOLVER).unwrap();
        assert_eq!((r.net(), r.host()), (NetId(0), HostId(0)));
        let f = SixPn::flycast(NetId(0x18), 5);
        assert_eq!(f.to_string(), "fdaa:0:18:0:1::5");
        assert!(f.is_flycast());
        assert!("fd00::1".parse::<SixPn>().is_err());
        assert_eq!("zz".parse::<SixPn>(), Err(ParseError::NotIpv6));
    }

    #[test]
    fn fields_parse() {
        assert_eq!(parse_field("a7b:7d"), Ok(0x0a7b_007d));
        assert_eq!(parse_field("18"), Ok(0x18));
        assert_eq!(parse_field("deadbeef"), Ok(0xdead_beef));
        assert!(parse_field("12345:1").is_err());
        assert!(parse_field("").is_err());
        assert!(parse_field("1:").is_err());
        assert!(parse_field("123456789").is_err());
    }

    #[test]
    fn prefixes() {
        let a = SixPn::new(NetId(7), HostId(9), MachineSlot(3));
        let base = SixPn::network_base(NetId(7)).octets();
        assert!(in_prefix(&a.octets(), &base, NETWORK_PREFIX_LEN));
        let other = SixPn::network_base(NetId(8)).octets();
        assert!(!in_prefix(&a.octets(), &other, NETWORK_PREFIX_LEN));
        assert!(in_prefix(&a.octets(), &other, 44));
        assert!(in_prefix(&a.octets(), &other, 0));
    }

    proptest! {
        #[test]
        fn fields_round_trip(net: u32, host: u32, machine: u32) {
            let a = SixPn::new(NetId(net), HostId(host), MachineSlot(machine));
            prop_assert_eq!(a.net(), NetId(net));
            prop_assert_eq!(a.host(), HostId(host));
            prop_assert_eq!(a.machine(), MachineSlot(machine));
            let text = a.to_string();
            prop_assert_eq!(text.parse::<SixPn>(), Ok(a));
            prop_assert_eq!(SixPn::try_from(Ipv6Addr::from(a)), Ok(a));
            prop_assert_eq!(parse_field(&a.net().to_string()), Ok(net));
            prop_assert_eq!(parse_field(&a.host().to_string()), Ok(host));
        }

        #[test]
        fn swap_is_its_own_inverse(o: [u8; 16]) {
            let mut x = o;
            swap_net_host(&mut x);
            swap_net_host(&mut x);
            prop_assert_eq!(x, o);
        }

        #[test]
        fn host_first_round_trips(net: u32, host: u32, machine: u32, free: u16) {
            let mut o = SixPn::new(NetId(net), HostId(host), MachineSlot(machine)).octets();
            o[14..].copy_from_slice(&free.to_be_bytes());
            let a = SixPn::from_octets(o).unwrap();
            let hf = a.to_host_first();
            // host-first: the host sits where the net was
            prop_assert_eq!(u32::from_be_bytes([hf[2], hf[3], hf[4], hf[5]]), host);
            prop_assert_eq!(SixPn::from_host_first(hf), Ok(a));
        }

        #[test]
        fn swap_keeps_ones_complement_sum(o: [u8; 16]) {
            let mut x = o;
            swap_net_host(&mut x);
            prop_assert_eq!(ones_complement_sum(&x), ones_complement_sum(&o));
        }

        #[test]
        fn machine_owns_its_112(net: u32, host: u32, machine: u32, free: u16) {
            let a = SixPn::new(NetId(net), HostId(host), MachineSlot(machine));
            let mut o = a.octets();
            o[14..].copy_from_slice(&free.to_be_bytes());
            let b = SixPn::from_octets(o).unwrap();
            prop_assert!(a.same_machine(&b));
            prop_assert!(in_prefix(&o, &a.octets(), MACHINE_PREFIX_LEN));
        }
    }
}

#[cfg(feature = "serde")]
mod serde_impl {
    use core::fmt;

    use serde::de::{Error, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SixPn;

    impl Serialize for SixPn {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self)
        }
    }

    struct V;
    impl Visitor<'_> for V {
        type Value = SixPn;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a 6PN address (fdaa:...)")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<SixPn, E> {
            v.parse().map_err(|e| E::custom(format_args!("{v:?}: {e}")))
        }
    }

    impl<'de> Deserialize<'de> for SixPn {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SixPn, D::Error> {
            d.deserialize_str(V)
        }
    }
}
