//! The DNS plane: an embedded authoritative server that replaces CoreDNS for
//! the platform's own names, answered from the live catalog.
//!
//! - [`wire`]: strict query parsing and response writing (no allocation per query).
//! - [`view`]: per-network views built from a catalog snapshot, answers
//!   pre-encoded; the asker's source address picks its view.
//! - [`names`]: a view's names frozen for answering (an index that stays in
//!   cache, one arena holding each name's key and records together).
//! - [`Dns`]: UDP served by one blocking thread per core on SO_REUSEPORT
//!   sockets (a query is a hash lookup and a copy), TCP on the async runtime.
//!
//! Served here: `.internal` (`<app>`, `global.<app>`, `<region>.<app>`,
//! `<id>.vm.<app>`, `<group>.process.<app>` AAAA; `_apps`, `vms.<app>`,
//! `regions.<app>`, `_instances` TXT), `<app>.flycast` AAAA, and Kubernetes
//! names (`<svc>.<ns>.svc.<zone>` AAAA for ClusterIP and headless services,
//! `<hostname>.<svc>…` for headless endpoints, CNAME for ExternalName, SRV for
//! named ports, `dns-version.<zone>` TXT). Other names go to the upstreams
//! ([`forward`]: cache, negative cache, SERVFAIL on timeout, rate limit), or are
//! refused when none are configured. PTR under `ip6.arpa` answers ClusterIPs
//! and machines (every pod is one); `top<N>.nearest.of.<app>.internal` the N
//! machines nearest the asker's region.

pub mod forward;
pub mod names;
pub mod view;
pub mod wire;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use skein_catalog::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::view::{Lookup, Views};
use crate::wire::{Body, ParseError, Query, parse_query, rcode, write_formerr, write_response};

/// `[dns]` in skein.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Run the DNS server.
    #[serde(default)]
    pub enabled: bool,
    /// Addresses to serve on (UDP and TCP); `[fdaa::3]:53` on a host.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// The network whose names askers outside any network (loopback, the host)
    /// see. None: they see no names.
    #[serde(default)]
    pub default_network: Option<String>,
    /// TTL of every answer, seconds.
    #[serde(default = "d_ttl")]
    pub ttl: u32,
    /// UDP threads (default: one per core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Most TCP connections at once.
    #[serde(default = "d_tcp_conns")]
    pub tcp_max_connections: usize,
    /// An idle TCP connection is closed after this.
    #[serde(default = "d_tcp_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Resolvers that answer every other name (none: such names are REFUSED).
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Time the upstreams have for one question before the asker gets SERVFAIL.
    #[serde(default = "d_fwd_timeout", with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// Most forwarded answers kept in the cache.
    #[serde(default = "d_cache")]
    pub cache_entries: usize,
    /// Forwarded UDP answers per second per client network (/24, /56).
    #[serde(default = "d_rate")]
    pub forward_rate_limit: u32,
}

fn d_fwd_timeout() -> Duration {
    Duration::from_secs(1)
}
fn d_cache() -> usize {
    10_000
}
fn d_rate() -> u32 {
    100
}

fn d_ttl() -> u32 {
    5
}
fn d_tcp_conns() -> usize {
    1_000
}
fn d_tcp_idle() -> Duration {
    Duration::from_secs(10)
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            listen: Vec::new(),
            default_network: None,
            ttl: d_ttl(),
            threads: None,
            tcp_max_connections: d_tcp_conns(),
            tcp_idle_timeout: d_tcp_idle(),
            upstreams: Vec::new(),
            forward_timeout: d_fwd_timeout(),
            cache_entries: d_cache(),
            forward_rate_limit: d_rate(),
        }
    }
}

/// Most UDP queries read (and answers sent) per system call.
const BATCH: usize = 32;

/// Answers leave with the don't-fragment bit and ignore learned path MTUs
/// (`IP_PMTUDISC_PROBE`), as DNS Flag Day 2020 asks of servers: an answer
/// never exceeds [`wire::MAX_UDP`] (1232 bytes, inside IPv6's minimum MTU), so
/// it never needs fragments, a spoofed ICMP "fragmentation needed" cannot
/// make it fragment, and the kernel skips the IPv4 identification hash.
fn dont_fragment(s: &socket2::Socket, a: SocketAddr) -> std::io::Result<()> {
    use rustix::net::sockopt;
    match a {
        SocketAddr::V4(_) => sockopt::set_ip_mtu_discover(s, sockopt::Ipv4PathMtuDiscovery::PROBE)?,
        SocketAddr::V6(_) => {
            sockopt::set_ipv6_mtu_discover(s, sockopt::Ipv6PathMtuDiscovery::PROBE)?
        }
    }
    Ok(())
}

/// A nix socket address as a std one.
fn to_std(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::V4((*v4).into()))
        .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
}

/// Counters resolved once.
struct Counters {
    by_rcode: [metrics::Counter; 6],
    dropped: metrics::Counter,
}

/// What to do with a message.
pub enum Outcome {
    /// Send `out`.
    Reply,
    /// Send nothing.
    Drop,
    /// Ask the upstreams.
    Forward(Box<Query>),
}

/// A question on its way to the upstreams, from a UDP asker.
struct Job {
    query: Box<Query>,
    packet: Vec<u8>,
    src: SocketAddr,
    sock: Arc<UdpSocket>,
}

/// The DNS server's shared state.
pub struct Dns {
    views: ArcSwap<Views>,
    /// The snapshot the views in force were built from.
    last: std::sync::Mutex<Option<Arc<Snapshot>>>,
    cfg: DnsConfig,
    counters: Counters,
    forwarder: forward::Forwarder,
    jobs: tokio::sync::mpsc::Sender<Job>,
    job_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Job>>>,
}

/// Sockets bound for one listen address.
pub struct Bound {
    udp: Vec<UdpSocket>,
    tcp: std::net::TcpListener,
    /// The bound address.
    pub local: SocketAddr,
}

impl Dns {
    /// A server with empty views.
    pub fn new(cfg: DnsConfig) -> Arc<Dns> {
        let c =
            |code: &'static str| metrics::counter!("skein_dns_responses_total", "rcode" => code);
        let (jobs, job_rx) = tokio::sync::mpsc::channel(4096);
        Arc::new(Dns {
            views: ArcSwap::from_pointee(Views::default()),
            last: std::sync::Mutex::new(None),
            forwarder: forward::Forwarder::new(
                cfg.upstreams.clone(),
                cfg.forward_timeout,
                cfg.cache_entries,
                cfg.forward_rate_limit,
            ),
            jobs,
            job_rx: std::sync::Mutex::new(Some(job_rx)),
            cfg,
            counters: Counters {
                by_rcode: [
                    c("noerror"),
                    c("formerr"),
                    c("servfail"),
                    c("nxdomain"),
                    c("notimp"),
                    c("refused"),
                ],
                dropped: metrics::counter!("skein_dns_dropped_total"),
            },
        })
    }

    /// Builds and swaps in the views for a snapshot: only the networks the
    /// change since the last snapshot touched are rebuilt.
    pub fn apply(&self, snap: &Arc<Snapshot>) {
        let started = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let default = self.cfg.default_network.as_deref();
        let v = match last.as_ref() {
            Some(prev) => Views::update(&self.views.load(), prev, snap, default, self.cfg.ttl),
            None => Views::build(snap, default, self.cfg.ttl),
        };
        *last = Some(snap.clone());
        metrics::gauge!("skein_dns_view_version").set(snap.version as f64);
        metrics::histogram!("skein_dns_view_build_seconds").record(started.elapsed().as_secs_f64());
        self.views.store(Arc::new(v));
    }

    /// Applies every new snapshot until `stop`.
    pub async fn follow(
        self: Arc<Self>,
        rx: watch::Receiver<Arc<Snapshot>>,
        stop: watch::Receiver<bool>,
    ) {
        skein_catalog::store::follow(rx, stop, move |s| self.apply(s)).await
    }

    /// The views in force.
    pub fn views(&self) -> Arc<Views> {
        self.views.load_full()
    }

    /// Answers one message into `out`, or says to drop it or forward it.
    pub fn handle(
        &self,
        views: &Views,
        src: IpAddr,
        packet: &[u8],
        out: &mut Vec<u8>,
        udp: bool,
    ) -> Outcome {
        let q = match parse_query(packet) {
            Ok(q) => q,
            Err(ParseError::Malformed) => {
                write_formerr(out, packet);
                self.counters.by_rcode[usize::from(rcode::FORMERR)].increment(1);
                return Outcome::Reply;
            }
            Err(_) => {
                self.counters.dropped.increment(1);
                return Outcome::Drop;
            }
        };
        let limit = if udp {
            q.udp_limit()
        } else {
            usize::from(u16::MAX)
        };
        let (code, aa, body) = if q.opcode != 0 || q.qclass != 1 || q.qtype == wire::rtype::ANY {
            (rcode::NOTIMP, false, Body::Empty)
        } else {
            let view = views.for_source(src);
            let nearest = match view::parse_nearest(q.qname()) {
                Some((n, app)) if q.qtype == wire::rtype::AAAA => {
                    view.nearest(app, views.region_of(src), n)
                }
                _ => None,
            };
            if let Some(r) = nearest {
                write_response(
                    out,
                    packet,
                    &q,
                    rcode::NOERROR,
                    true,
                    Body::Answer(r.answer()),
                    limit,
                );
                self.counters.by_rcode[usize::from(rcode::NOERROR)].increment(1);
                return Outcome::Reply;
            }
            match view.lookup(q.qname(), q.qtype) {
                Lookup::Answer(r) => (rcode::NOERROR, true, Body::Answer(r)),
                Lookup::NoData(z) => (
                    rcode::NOERROR,
                    true,
                    Body::Negative {
                        apex_len: z.apex.len(),
                        soa: &z.soa,
                    },
                ),
                Lookup::NxDomain(z) => (
                    rcode::NXDOMAIN,
                    true,
                    Body::Negative {
                        apex_len: z.apex.len(),
                        soa: &z.soa,
                    },
                ),
                Lookup::NotOurs if self.forwarder.enabled() => {
                    if udp && !self.forwarder.admit(src) {
                        return Outcome::Drop;
                    }
                    if self.forwarder.cached(&q, packet, out) {
                        if out.len() > limit {
                            write_response(out, packet, &q, rcode::NOERROR, false, Body::Empty, 0);
                        }
                        return Outcome::Reply;
                    }
                    return Outcome::Forward(Box::new(q));
                }
                Lookup::NotOurs => (rcode::REFUSED, false, Body::Empty),
            }
        };
        write_response(out, packet, &q, code, aa, body, limit);
        self.counters.by_rcode[usize::from(code).min(5)].increment(1);
        Outcome::Reply
    }

    /// Answers forwarded questions of UDP askers until the channel closes.
    async fn forward_jobs(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Job>) {
        while let Some(job) = rx.recv().await {
            let me = self.clone();
            tokio::spawn(async move {
                let mut resp = me.forwarder.resolve(&job.query, &job.packet).await;
                if resp.len() > job.query.udp_limit() {
                    // Too big for UDP: the asker comes back over TCP.
                    write_response(
                        &mut resp,
                        &job.packet,
                        &job.query,
                        rcode::NOERROR,
                        false,
                        Body::Empty,
                        0,
                    );
                }
                let _ = job.sock.send_to(&resp, job.src);
            });
        }
    }

    fn threads(&self) -> usize {
        skein_catalog::serving_threads(self.cfg.threads)
    }

    /// Binds every listen address: one SO_REUSEPORT UDP socket per thread and
    /// a TCP listener on the same port.
    pub fn bind(&self) -> std::io::Result<Vec<Bound>> {
        use socket2::{Domain, Protocol, Socket, Type};
        let mut out = Vec::new();
        for addr in &self.cfg.listen {
            let udp_socket = |a: SocketAddr| -> std::io::Result<UdpSocket> {
                let s = Socket::new(Domain::for_address(a), Type::DGRAM, Some(Protocol::UDP))?;
                s.set_reuse_port(true)?;
                dont_fragment(&s, a)?;
                s.bind(&a.into())?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                Ok(s.into())
            };
            // With port 0 the kernel picks a UDP port whose TCP twin may be
            // taken: pick again.
            let mut attempt = 0;
            let (udp, t, local) = loop {
                attempt += 1;
                match Self::bind_pair(*addr, self.threads(), &udp_socket) {
                    Err(e)
                        if addr.port() == 0
                            && attempt < 16
                            && e.kind() == std::io::ErrorKind::AddrInUse => {}
                    r => break r?,
                }
            };
            out.push(Bound {
                udp,
                tcp: t.into(),
                local,
            });
        }
        Ok(out)
    }

    /// `threads` UDP sockets and a TCP listener on one address and port.
    fn bind_pair(
        addr: SocketAddr,
        threads: usize,
        udp_socket: &dyn Fn(SocketAddr) -> std::io::Result<UdpSocket>,
    ) -> std::io::Result<(Vec<UdpSocket>, socket2::Socket, SocketAddr)> {
        use socket2::{Domain, Protocol, Socket, Type};
        let first = udp_socket(addr)?;
        let local = first.local_addr()?;
        let mut udp = vec![first];
        for _ in 1..threads {
            udp.push(udp_socket(local)?);
        }
        let t = Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        t.set_reuse_address(true)?;
        t.bind(&local.into())?;
        t.listen(1024)?;
        t.set_nonblocking(true)?;
        Ok((udp, t, local))
    }

    /// Serves until `stop`.
    pub async fn serve(self: Arc<Self>, bound: Vec<Bound>, mut stop: watch::Receiver<bool>) {
        let halt = Arc::new(AtomicBool::new(false));
        let job_rx = self.job_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rx) = job_rx {
            tokio::spawn(self.clone().forward_jobs(rx));
        }
        let mut threads = Vec::new();
        let mut tcp = tokio::task::JoinSet::new();
        for b in bound {
            tracing::info!(addr = %b.local, "dns listening (udp, tcp)");
            for (i, sock) in b.udp.into_iter().enumerate() {
                let (me, halt) = (self.clone(), halt.clone());
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let spawned = std::thread::Builder::new()
                    .name(format!("skein-dns-{i}"))
                    .spawn(move || {
                        me.udp_loop(Arc::new(sock), &halt);
                        let _ = tx.send(());
                    });
                match spawned {
                    Ok(_) => threads.push(rx),
                    Err(e) => tracing::error!(error = %e, "cannot start a dns thread"),
                }
            }
            match tokio::net::TcpListener::from_std(b.tcp) {
                Ok(l) => {
                    tcp.spawn(self.clone().tcp_loop(l, stop.clone()));
                }
                Err(e) => tracing::error!(error = %e, "cannot register the dns tcp listener"),
            }
        }
        stopped(&mut stop).await;
        halt.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.await;
        }
        tcp.abort_all();
    }

    /// Serves one UDP socket: up to [`BATCH`] queries per `recvmmsg`, their
    /// answers in one `sendmmsg` (one pair of system calls per batch instead of
    /// per query, which is where a loaded server spends its time).
    fn udp_loop(&self, sock: Arc<UdpSocket>, halt: &AtomicBool) {
        use std::io::{IoSlice, IoSliceMut};
        use std::os::fd::AsRawFd;

        use nix::errno::Errno;
        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

        let fd = sock.as_raw_fd();
        let mut bufs = vec![[0u8; 4096]; BATCH];
        let mut outs: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| Vec::with_capacity(wire::MAX_UDP))
            .collect();
        let mut rx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut tx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
        let mut replies: Vec<(usize, SocketAddr)> = Vec::with_capacity(BATCH);
        let mut views = arc_swap::Cache::new(&self.views);
        while !halt.load(Ordering::Relaxed) {
            got.clear();
            {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(&mut b[..])])
                    .collect();
                match recvmmsg(fd, &mut rx, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                    Ok(msgs) => {
                        got.extend(msgs.map(|m| (m.bytes, m.address.and_then(|a| to_std(&a)))))
                    }
                    Err(Errno::EAGAIN | Errno::EINTR | Errno::ETIMEDOUT) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "dns recvmmsg failed");
                        continue;
                    }
                }
            }
            let v = views.load();
            replies.clear();
            for (i, (n, src)) in got.iter().enumerate() {
                let Some(src) = *src else { continue };
                let packet = &bufs[i][..*n];
                match self.handle(v, src.ip(), packet, &mut outs[i], true) {
                    Outcome::Reply => replies.push((i, src)),
                    Outcome::Drop => {}
                    Outcome::Forward(query) => {
                        let job = Job {
                            query,
                            packet: packet.to_vec(),
                            src,
                            sock: sock.clone(),
                        };
                        if self.jobs.try_send(job).is_err() {
                            metrics::counter!("skein_dns_forward_overflow_total").increment(1);
                        }
                    }
                }
            }
            if replies.is_empty() {
                continue;
            }
            let slices: Vec<[IoSlice<'_>; 1]> = replies
                .iter()
                .map(|(i, _)| [IoSlice::new(&outs[*i])])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = replies
                .iter()
                .map(|(_, a)| Some(SockaddrStorage::from(*a)))
                .collect();
            if let Err(e) = sendmmsg(fd, &mut tx, slices.iter(), addrs, [], MsgFlags::empty()) {
                tracing::debug!(error = %e, "dns sendmmsg failed");
            }
        }
    }

    async fn tcp_loop(
        self: Arc<Self>,
        l: tokio::net::TcpListener,
        mut stop: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.cfg.tcp_max_connections));
        loop {
            let permit = tokio::select! {
                _ = stopped(&mut stop) => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (mut s, peer) = tokio::select! {
                _ = stopped(&mut stop) => return,
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let idle = me.cfg.tcp_idle_timeout;
                let mut buf = vec![0u8; 65535];
                let mut out = Vec::new();
                loop {
                    let len = match tokio::time::timeout(idle, s.read_u16()).await {
                        Ok(Ok(n)) => usize::from(n),
                        _ => return,
                    };
                    if tokio::time::timeout(idle, s.read_exact(&mut buf[..len]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let views = me.views.load_full();
                    match me.handle(&views, peer.ip(), &buf[..len], &mut out, false) {
                        Outcome::Reply => {}
                        Outcome::Drop => return,
                        Outcome::Forward(q) => out = me.forwarder.resolve(&q, &buf[..len]).await,
                    }
                    let mut framed = Vec::with_capacity(out.len() + 2);
                    framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
                    framed.extend_from_slice(&out);
                    if s.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

use skein_catalog::store::stopped;

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;

    #[test]
    fn udp_answers_leave_unfragmented_on_both_families() {
        let dns = Dns::new(DnsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
            threads: Some(2),
            ..DnsConfig::default()
        });
        let bound = dns.bind().unwrap();
        assert_eq!(bound.len(), 2);
        for b in &bound {
            assert_eq!(b.udp.len(), 2, "one socket per thread");
            for s in &b.udp {
                match b.local {
                    SocketAddr::V4(_) => assert_eq!(
                        sockopt::ip_mtu_discover(s).unwrap(),
                        sockopt::Ipv4PathMtuDiscovery::PROBE
                    ),
                    SocketAddr::V6(_) => assert_eq!(
                        sockopt::ipv6_mtu_discover(s).unwrap(),
                        sockopt::Ipv6PathMtuDiscovery::PROBE
                    ),
                }
            }
        }
    }
}
