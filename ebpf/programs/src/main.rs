//! skein's eBPF programs (TC classifiers). The decisions are
//! `skein_sixpn::policy`, tested on the host; this file only moves bytes between
//! the packet, the maps and those functions.
//!
//! - `guard`: ingress on the host side of a machine's interface (veth or tap, so an
//!   Ethernet header comes first): packets the machine sends.
//! - `mesh_out` / `mesh_in`: egress / ingress on the mesh device (WireGuard, an L3
//!   device: the IPv6 header comes first). They swap the net and host fields of both
//!   addresses; no checksum changes, because the swap keeps the one's-complement sum.
//! - `steer` (`sk_lookup`, attached to the host's network namespace): a TCP
//!   connection to an address of the anycast prefixes, on any port, goes to the
//!   proxy's anycast socket; one to a flycast address, to its flycast socket. One
//!   socket serves every address and port; nothing is bound per address.
#![no_std]
#![no_main]
#![allow(unsafe_code)]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT, sk_action::SK_PASS},
    macros::{classifier, map, sk_lookup},
    maps::{
        HashMap, LpmTrie, PerCpuArray, SockMap,
        lpm_trie::Key,
    },
    programs::{SkLookupContext, TcContext},
};
use skein_sixpn::policy::{
    self, FlycastKey, MachineGuard, REASONS, Reason, SLOTS, STEERED, Slot, Steered,
};

/// Host-side interface index -> the machine behind it.
#[map]
static GUARDS: HashMap<u32, MachineGuard> = HashMap::with_max_entries(8192, 0);

/// (network, flycast address) pairs a network may send to outside its own /48.
#[map]
static FLYCAST: HashMap<FlycastKey, u8> = HashMap::with_max_entries(65536, 0);

/// `/112` key of every machine on this host (and the host's own) -> its network.
#[map]
static LOCAL: HashMap<[u8; 16], u32> = HashMap::with_max_entries(65536, 0);

/// One counter per `Reason`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASONS, 0);

/// The proxy's steering sockets, by [`Slot`].
#[map]
static SOCKETS: SockMap = SockMap::with_max_entries(SLOTS, 0);

/// Anycast IPv4 prefixes (address bytes in network order) -> a [`Slot`].
#[map]
static STEER4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Anycast IPv6 prefixes -> a [`Slot`].
#[map]
static STEER6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// One counter per [`Steered`].
#[map]
static STEER_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STEERED, 0);

const ETH_P_IPV6: u16 = 0x86DD;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const ETH_HLEN: usize = 14;
const SRC: usize = 8;
const DST: usize = 24;

#[inline(always)]
fn count(r: Reason) -> i32 {
    if let Some(p) = COUNTERS.get_ptr_mut(r as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *p += 1 };
    }
    if r.is_drop() { TC_ACT_SHOT } else { TC_ACT_OK }
}

#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the skb the kernel hands us.
    let proto = unsafe { (*ctx.skb.skb).protocol };
    u16::from_be(proto as u16) == ETH_P_IPV6
}

#[inline(always)]
fn addresses(ctx: &TcContext, l3: usize) -> Option<([u8; 16], [u8; 16])> {
    let src: [u8; 16] = ctx.load(l3 + SRC).ok()?;
    let dst: [u8; 16] = ctx.load(l3 + DST).ok()?;
    Some((src, dst))
}

#[classifier]
pub fn guard(ctx: TcContext) -> i32 {
    // SAFETY: as above.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the map value is plain data; we copy it out at once.
    let Some(m) = (unsafe { GUARDS.get(ifindex) }).copied() else {
        return count(Reason::GuardUnknownInterface);
    };
    if !is_ipv6(&ctx) {
        return count(Reason::GuardNotIpv6);
    }
    let Some((src, dst)) = addresses(&ctx, ETH_HLEN) else {
        return count(Reason::GuardMalformed);
    };
    count(policy::guard(&m, &src, &dst, |k| {
        // SAFETY: presence check only.
        unsafe { FLYCAST.get(k) }.is_some()
    }))
}

#[classifier]
pub fn mesh_out(ctx: TcContext) -> i32 {
    if !is_ipv6(&ctx) {
        return count(Reason::MeshMalformed);
    }
    let Some((mut src, mut dst)) = addresses(&ctx, 0) else {
        return count(Reason::MeshMalformed);
    };
    let r = policy::mesh_out(&src, &dst);
    if r.is_drop() {
        return count(r);
    }
    policy::swap_both(&mut src, &mut dst);
    if ctx.store(SRC, &src, 0).is_err() || ctx.store(DST, &dst, 0).is_err() {
        return count(Reason::MeshMalformed);
    }
    count(r)
}

#[classifier]
pub fn mesh_in(ctx: TcContext) -> i32 {
    if !is_ipv6(&ctx) {
        return count(Reason::MeshMalformed);
    }
    let Some((mut src, mut dst)) = addresses(&ctx, 0) else {
        return count(Reason::MeshMalformed);
    };
    policy::swap_both(&mut src, &mut dst);
    // SAFETY: the value is a plain u32, copied out.
    let r = policy::mesh_in(&src, &dst, |k| unsafe { LOCAL.get(k) }.copied());
    if r.is_drop() {
        return count(r);
    }
    if ctx.store(SRC, &src, 0).is_err() || ctx.store(DST, &dst, 0).is_err() {
        return count(Reason::MeshMalformed);
    }
    count(r)
}

#[inline(always)]
fn steered(s: Steered) {
    if let Some(p) = STEER_COUNTS.get_ptr_mut(s as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *p += 1 };
    }
}

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid context for the program's run.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let mut flycast = false;
    let slot = if l.family == AF_INET {
        // local_ip4 holds the address in network order: its bytes as they lie.
        let key = Key::new(32, l.local_ip4.to_ne_bytes());
        STEER4.get(&key).copied()
    } else if l.family == AF_INET6 {
        let w = l.local_ip6;
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            a[i * 4] = b[0];
            a[i * 4 + 1] = b[1];
            a[i * 4 + 2] = b[2];
            a[i * 4 + 3] = b[3];
            i += 1;
        }
        if policy::is_flycast(&a) {
            flycast = true;
            Some(Slot::V6 as u32)
        } else {
            STEER6.get(&Key::new(128, a)).copied()
        }
    } else {
        None
    };
    let Some(slot) = slot else {
        return SK_PASS;
    };
    match SOCKETS.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) if flycast => steered(Steered::Flycast),
        Ok(()) => steered(Steered::Anycast),
        Err(_) => steered(Steered::NoSocket),
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
