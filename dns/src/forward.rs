//! Forwarding: names outside the zones this server is the authority for go to
//! the configured upstreams. Answers are cached for their TTL (negative answers
//! for the SOA's negative TTL, RFC 2308); a dead upstream yields SERVFAIL after
//! a short timeout, never a hang; forwarded UDP answers are rate-limited per
//! client network so the server cannot be used as an amplifier.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::net::UdpSocket;

use crate::wire::{Query, rcode, rtype};

/// Longest time an answer is cached.
const MAX_CACHE_TTL: u32 = 3600;

struct Cached {
    response: Vec<u8>,
    stored: Instant,
    expires: Instant,
}

/// The forwarder: upstreams, cache, rate limit.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<FxHashMap<(Vec<u8>, u16), Cached>>,
    max_entries: usize,
    rate: Mutex<FxHashMap<u64, (u64, u32)>>,
    per_second: u32,
    epoch: Instant,
    ids: AtomicU64,
    seed: RandomState,
}

/// Walks past a (possibly compressed) name starting at `i`; returns the offset
/// after it. Bounded: at most 128 labels or pointers.
fn skip_name(p: &[u8], mut i: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *p.get(i)?;
        match len & 0xc0 {
            0xc0 => return Some(i + 2).filter(|e| *e <= p.len()),
            0 if len == 0 => return Some(i + 1),
            0 => i += usize::from(len) + 1,
            _ => return None,
        }
    }
    None
}

fn u16_at(p: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]))
}

fn u32_at(p: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *p.get(i)?,
        *p.get(i + 1)?,
        *p.get(i + 2)?,
        *p.get(i + 3)?,
    ]))
}

/// How long a response may be cached: the smallest TTL among its answers, or
/// for a negative answer the SOA's min(TTL, MINIMUM). None: do not cache.
pub fn cache_ttl(p: &[u8]) -> Option<u32> {
    let rc = *p.get(3)? & 0x0f;
    if rc != rcode::NOERROR && rc != rcode::NXDOMAIN {
        return None;
    }
    let (qd, an, ns) = (u16_at(p, 4)?, u16_at(p, 6)?, u16_at(p, 8)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(p, i)? + 4;
    }
    let mut min: Option<u32> = None;
    for n in 0..(u32::from(an) + u32::from(ns)) {
        i = skip_name(p, i)?;
        let t = u16_at(p, i)?;
        let ttl = u32_at(p, i + 4)?;
        let rdlen = usize::from(u16_at(p, i + 8)?);
        let rdata_end = i + 10 + rdlen;
        if rdata_end > p.len() {
            return None;
        }
        let answer = n < u32::from(an);
        let ttl = if !answer && t == rtype::SOA && an == 0 {
            ttl.min(u32_at(p, rdata_end - 4)?)
        } else if answer {
            ttl
        } else {
            i = rdata_end;
            continue;
        };
        min = Some(min.map_or(ttl, |m| m.min(ttl)));
        i = rdata_end;
    }
    min.map(|t| t.min(MAX_CACHE_TTL)).filter(|t| *t > 0)
}

/// Lowers every TTL in the answer and authority sections by `age` seconds (a
/// cached answer must not promise more time than it has left).
pub fn age_ttls(p: &mut [u8], age: u32) -> Option<()> {
    let (qd, an, ns) = (u16_at(p, 4)?, u16_at(p, 6)?, u16_at(p, 8)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(p, i)? + 4;
    }
    for _ in 0..(u32::from(an) + u32::from(ns)) {
        i = skip_name(p, i)?;
        let ttl = u32_at(p, i + 4)?;
        p.get_mut(i + 4..i + 8)?
            .copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        i += 10 + usize::from(u16_at(p, i + 8)?);
    }
    Some(())
}

impl Forwarder {
    /// A forwarder to `upstreams` (tried in order within `timeout`).
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_entries: usize,
        per_second: u32,
    ) -> Self {
        Forwarder {
            upstreams,
            timeout,
            cache: Mutex::new(FxHashMap::default()),
            max_entries,
            rate: Mutex::new(FxHashMap::default()),
            per_second,
            epoch: Instant::now(),
            ids: AtomicU64::new(0),
            seed: RandomState::new(),
        }
    }

    /// True if any upstream is configured.
    pub fn enabled(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// Writes a cached answer to `q` (its id, its question bytes) into `out`.
    pub fn cached(&self, q: &Query, packet: &[u8], out: &mut Vec<u8>) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = cache.get(&(q.qname().to_vec(), q.qtype)) else {
            return false;
        };
        if c.expires <= Instant::now() || c.response.len() < q.question_end {
            return false;
        }
        out.clear();
        out.extend_from_slice(&c.response);
        let age = u32::try_from(c.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        if age > 0 {
            let _ = age_ttls(out, age);
        }
        out[..2].copy_from_slice(&q.id.to_be_bytes());
        // The asker's own spelling of the name.
        out[12..q.question_end].copy_from_slice(&packet[12..q.question_end]);
        metrics::counter!("skein_dns_forward_cache_hits_total").increment(1);
        true
    }

    /// False when `src`'s network has had its share of forwarded answers this
    /// second (IPv4 /24, IPv6 /56).
    pub fn admit(&self, src: IpAddr) -> bool {
        let key = match src {
            IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
            IpAddr::V6(v6) => (u128::from(v6) >> 72) as u64 | (1 << 63),
        };
        let now = self.epoch.elapsed().as_secs();
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        if rate.len() > 100_000 {
            rate.retain(|_, (sec, _)| *sec == now);
        }
        let slot = rate.entry(key).or_insert((now, 0));
        if slot.0 != now {
            *slot = (now, 0);
        }
        slot.1 += 1;
        let ok = slot.1 <= self.per_second;
        if !ok {
            metrics::counter!("skein_dns_forward_rate_limited_total").increment(1);
        }
        ok
    }

    fn next_id(&self) -> u16 {
        let mut h = self.seed.build_hasher();
        h.write_u64(self.ids.fetch_add(1, Ordering::Relaxed));
        h.finish() as u16
    }

    /// Asks the upstreams; returns the answer with the asker's id, or a SERVFAIL
    /// when none answered in time.
    pub async fn resolve(&self, q: &Query, packet: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + self.timeout;
        let id = self.next_id();
        let mut outgoing = packet.to_vec();
        outgoing[..2].copy_from_slice(&id.to_be_bytes());
        for up in &self.upstreams {
            let attempt = async {
                let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .ok()?;
                let sock = UdpSocket::bind(bind).await.ok()?;
                sock.connect(up).await.ok()?;
                sock.send(&outgoing).await.ok()?;
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = sock.recv(&mut buf).await.ok()?;
                    // Only the answer to what we asked (id and question).
                    if n >= q.question_end
                        && buf[..2] == id.to_be_bytes()
                        && buf[2] & 0x80 != 0
                        && buf[12..q.question_end].eq_ignore_ascii_case(&packet[12..q.question_end])
                    {
                        buf.truncate(n);
                        return Some(buf);
                    }
                }
            };
            match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(Some(mut resp)) => {
                    metrics::counter!("skein_dns_forwarded_total", "result" => "answered")
                        .increment(1);
                    // Not authoritative for it; recursion was available.
                    resp[2] &= !0x04;
                    resp[3] |= 0x80;
                    self.store(q, &resp);
                    resp[..2].copy_from_slice(&q.id.to_be_bytes());
                    resp[12..q.question_end].copy_from_slice(&packet[12..q.question_end]);
                    return resp;
                }
                Ok(None) => continue,
                Err(_) => break,
            }
        }
        metrics::counter!("skein_dns_forwarded_total", "result" => "servfail").increment(1);
        let mut out = Vec::new();
        crate::wire::write_response(
            &mut out,
            packet,
            q,
            rcode::SERVFAIL,
            false,
            crate::wire::Body::Empty,
            usize::MAX,
        );
        out
    }

    fn store(&self, q: &Query, resp: &[u8]) {
        let Some(ttl) = cache_ttl(resp) else { return };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.max_entries {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        cache.insert(
            (q.qname().to_vec(), q.qtype),
            Cached {
                response: resp.to_vec(),
                stored: Instant::now(),
                expires: Instant::now() + Duration::from_secs(u64::from(ttl)),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_name_is_bounded() {
        // A pointer loop is one pointer: skipping stops after it.
        assert_eq!(skip_name(&[0xc0, 0x00], 0), Some(2));
        assert_eq!(skip_name(&[3, b'a', b'b', b'c', 0], 0), Some(5));
        assert_eq!(skip_name(&[3, b'a'], 0), None);
        assert_eq!(skip_name(&[0x80], 0), None);
        assert!(cache_ttl(&[0; 3]).is_none());
    }
}
