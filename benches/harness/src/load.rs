//! The HTTP load generator.
//!
//! Open loop: request `i` is due at `start + i / rate` and is sent then,
//! whether or not earlier ones were answered; its latency counts from when it
//! was due, not from when it could be sent, so a target that stalls shows the
//! stall in every request that waited on it (no coordinated omission). The
//! first [`TIMER_SLACK`] of lateness is not counted: tokio's timer wakes on
//! whole milliseconds, and counting from `due` added up to a millisecond of
//! the generator's own to every request (at the wire, the e2e proxied path
//! answered in 0.43 ms at the median while the report said 1.98).
//! Closed loop: `connections` clients send back to back.
//!
//! Each request draws its hostname (Zipf), how it travels (a kept
//! connection, a new one with a full TLS handshake, a new one resuming a
//! session) and its protocol (HTTP/1.1 or h2 by ALPN).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::sample::{OpenLoop, Rng, Weighted, Zipf};
use crate::scenario::Scenario;

/// How a request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Over a kept connection.
    Keepalive,
    /// A new connection, full TLS handshake.
    NewTls,
    /// A new connection resuming a TLS session.
    ResumedTls,
}

/// The protocol of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    /// HTTP/1.1.
    H1,
    /// h2.
    H2,
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its name in the report (`skein`, `nginx`…).
    pub name: String,
    /// Address to connect to (every hostname is served there).
    pub addr: SocketAddr,
    /// TLS (else plain HTTP/1.1).
    pub tls: bool,
    /// A DNS server (`udp://`), for DNS scenarios.
    pub udp: bool,
    /// Its processes, whose CPU time per answered request is reported.
    pub pids: Vec<u32>,
    /// Its admin API, for scenarios with churn.
    pub admin: Option<crate::churn::Admin>,
}

/// Resident memory of processes, KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The machine's CPU counters (`/proc/stat`, all CPUs): time stolen by the
/// hypervisor and the total, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuStat {
    steal: u64,
    total: u64,
}

impl CpuStat {
    /// Now; None where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuStat> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user and nice)
        Some(CpuStat {
            steal: *f.get(7)?,
            total: f.iter().take(8).sum(),
        })
    }

    /// The share of CPU time stolen since `self`, in percent: the noise of a
    /// run on a shared VM (a run with much steal is not to be trusted).
    pub fn steal_since(&self) -> Option<f64> {
        let now = CpuStat::now()?;
        let total = now.total.checked_sub(self.total)?;
        (total > 0).then(|| now.steal.saturating_sub(self.steal) as f64 * 100.0 / total as f64)
    }
}

/// CPU time (user + system) of processes, in microseconds, from
/// `/proc/<pid>/stat`; processes that are gone count 0.
pub fn cpu_us(pids: &[u32]) -> u64 {
    // Linux reports these in clock ticks of 1/100 s (USER_HZ) on every
    // architecture skein runs on.
    const TICK_US: u64 = 10_000;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is
            // field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: u64 = f.get(11)?.parse().ok()?;
            let st: u64 = f.get(12)?.parse().ok()?;
            Some((ut + st) * TICK_US)
        })
        .sum()
}

impl Target {
    /// Parses `name=https://ip:port` or `name=http://ip:port`, optionally
    /// followed by `@pid,pid…` (the target's processes, to measure its CPU).
    pub fn parse(s: &str) -> Result<Target, String> {
        let (s, pids) = match s.split_once('@') {
            Some((t, p)) => (
                t,
                p.split(',')
                    .map(|x| {
                        x.trim()
                            .parse::<u32>()
                            .map_err(|_| format!("{x:?} is not a pid"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => (s, Vec::new()),
        };
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected name=https://ip:port"))?;
        let (tls, udp, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, false, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, false, r)
        } else if let Some(r) = url.strip_prefix("udp://") {
            (false, true, r)
        } else {
            return Err(format!("{url:?}: expected https://, http:// or udp://"));
        };
        let addr = rest
            .trim_end_matches('/')
            .parse()
            .map_err(|_| format!("{rest:?}: expected ip:port"))?;
        Ok(Target {
            name: name.to_string(),
            addr,
            tls,
            udp,
            pids,
            admin: None,
        })
    }
}

/// One second of a run.
#[derive(Debug)]
struct Second {
    sent: u64,
    done: u64,
    errors: u64,
    latency: Histogram<u64>,
}

/// 1 us .. 100 s at 3 significant digits.
#[allow(clippy::expect_used)] // constant bounds that hdrhistogram accepts
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
struct Stats {
    start: Instant,
    total: Histogram<u64>,
    by_kind: BTreeMap<Kind, Histogram<u64>>,
    seconds: Vec<Second>,
    hosts: Vec<u64>,
    kinds: BTreeMap<Kind, u64>,
    protos: BTreeMap<Proto, u64>,
    resumed: u64,
    errors: BTreeMap<String, u64>,
    overflow: u64,
    connections: u64,
    /// Requests due after the warm-up.
    measured_sent: u64,
}

impl Stats {
    fn second(&mut self, at: Instant) -> &mut Second {
        let i = at.saturating_duration_since(self.start).as_secs() as usize;
        while self.seconds.len() <= i {
            self.seconds.push(Second {
                sent: 0,
                done: 0,
                errors: 0,
                latency: histogram(),
            });
        }
        &mut self.seconds[i]
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Answered requests.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the report.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Point {
    /// Seconds since the start.
    pub t: u64,
    /// Requests sent in that second.
    pub sent: u64,
    /// Requests answered (by when they were due).
    pub done: u64,
    /// Requests failed.
    pub errors: u64,
    /// Median latency of the requests due then, us.
    pub p50_us: u64,
    /// 99th percentile, us.
    pub p99_us: u64,
}

/// What one scenario against one target gave.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RunResult {
    /// The scenario.
    pub scenario: String,
    /// The target.
    pub target: String,
    /// Which repeat of the scenario against the target (0 for the first).
    #[serde(default)]
    pub repeat: u32,
    /// `open` or `closed`.
    pub mode: String,
    /// The configured rate (open loop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// How long it ran, seconds.
    pub seconds: f64,
    /// Requests sent after the warm-up.
    pub sent: u64,
    /// Answered with a 2xx.
    pub ok: u64,
    /// Failed (by reason).
    pub errors: BTreeMap<String, u64>,
    /// Not sent: too many in flight.
    pub overflow: u64,
    /// Sent per second.
    pub sent_per_second: f64,
    /// Answered per second.
    pub ok_per_second: f64,
    /// Latency of every answered request.
    pub latency_us: Percentiles,
    /// Latency by how the request travelled.
    pub by_kind: BTreeMap<String, Percentiles>,
    /// Requests by kind and protocol, as drawn.
    pub drawn: BTreeMap<String, u64>,
    /// New connections that resumed a TLS session.
    pub resumed_handshakes: u64,
    /// Connections opened.
    pub connections: u64,
    /// Requests per hostname index (the Zipf as sent).
    pub hosts: Vec<u64>,
    /// Second by second.
    pub series: Vec<Point>,
    /// The target's CPU microseconds per answered request, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_req: Option<f64>,
    /// The DNS figures, for a DNS scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsResult>,
    /// What the catalog churn did during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::churn::ChurnResult>,
    /// The target's memory per open connection, KiB, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kib_per_conn: Option<f64>,
    /// CPU time the hypervisor stole during the run, percent of all CPUs'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_pct: Option<f64>,
    /// Throughput, for an iperf3 run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gbit_per_s: Option<f64>,
}

/// Accepts any server certificate: bench targets serve throwaway ones, and
/// what is measured is the handshake's cost, not the PKI.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS client configs by (resumption, protocol).
struct Tls {
    full: [Arc<ClientConfig>; 2],
    resuming: [Arc<ClientConfig>; 2],
}

impl Tls {
    fn new() -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let sessions: Arc<dyn rustls::client::ClientSessionStore> =
            Arc::new(rustls::client::ClientSessionMemoryCache::new(100_000));
        let make = |alpn: &[u8], resume: bool| -> anyhow::Result<Arc<ClientConfig>> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider.clone())))
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = if resume {
                rustls::client::Resumption::store(sessions.clone())
            } else {
                rustls::client::Resumption::disabled()
            };
            Ok(Arc::new(c))
        };
        Ok(Tls {
            full: [make(b"http/1.1", false)?, make(b"h2", false)?],
            resuming: [make(b"http/1.1", true)?, make(b"h2", true)?],
        })
    }
}

type H1 = http1::SendRequest<Empty<Bytes>>;
type H2 = http2::SendRequest<Empty<Bytes>>;

/// Kept connections.
#[derive(Default)]
struct Pools {
    h1: Mutex<HashMap<usize, Vec<H1>>>,
    h2: Mutex<HashMap<usize, H2>>,
}

struct Shared {
    scenario: Scenario,
    target: Target,
    tls: Tls,
    pools: Pools,
    stats: Mutex<Stats>,
    in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one request is.
#[derive(Clone, Copy, Debug)]
struct Draw {
    host: usize,
    kind: Kind,
    proto: Proto,
}

struct Drawer {
    rng: Rng,
    zipf: Zipf,
    kinds: Weighted<Kind>,
    h2: f64,
    tls: bool,
}

impl Drawer {
    fn new(s: &Scenario, tls: bool, stream: u64) -> Self {
        Drawer {
            rng: Rng::new(s.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            zipf: Zipf::new(s.hostnames, s.zipf),
            kinds: Weighted::new(&[
                (s.mix.keepalive, Kind::Keepalive),
                (s.mix.new_tls, Kind::NewTls),
                (s.mix.resumed_tls, Kind::ResumedTls),
            ]),
            h2: s.mix.h2,
            tls,
        }
    }

    fn draw(&mut self) -> Draw {
        let host = self.zipf.sample(&mut self.rng);
        let kind = self.kinds.sample(&mut self.rng).unwrap_or(Kind::Keepalive);
        let h2 = self.tls && self.rng.unit() < self.h2;
        Draw {
            host,
            kind,
            proto: if h2 { Proto::H2 } else { Proto::H1 },
        }
    }
}

enum Conn {
    H1(H1),
    H2(H2),
}

impl Shared {
    async fn connect(&self, d: Draw) -> Result<Conn, String> {
        let tcp = TcpStream::connect(self.target.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = tcp.set_nodelay(true);
        lock(&self.stats).connections += 1;
        if !self.target.tls {
            return h1(TokioIo::new(tcp)).await.map(Conn::H1);
        }
        let p = usize::from(d.proto == Proto::H2);
        let cfg = match d.kind {
            Kind::NewTls => self.tls.full[p].clone(),
            Kind::Keepalive | Kind::ResumedTls => self.tls.resuming[p].clone(),
        };
        let name = ServerName::try_from(self.scenario.hostname(d.host))
            .map_err(|_| "bad hostname".to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            lock(&self.stats).resumed += 1;
        }
        let io = TokioIo::new(tls);
        match d.proto {
            Proto::H1 => h1(io).await.map(Conn::H1),
            Proto::H2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::H2(send))
            }
        }
    }

    fn request(&self, d: Draw) -> Result<http::Request<Empty<Bytes>>, String> {
        let host = self.scenario.hostname(d.host);
        let b = http::Request::get(match d.proto {
            Proto::H1 => self.scenario.path.clone(),
            Proto::H2 => format!("https://{host}{}", self.scenario.path),
        });
        let b = match d.proto {
            Proto::H1 => b.header(http::header::HOST, host),
            Proto::H2 => b,
        };
        b.body(Empty::new()).map_err(|e| e.to_string())
    }

    /// Sends one request the way `d` says; Ok(()) on a 2xx with its body read.
    async fn send(&self, d: Draw) -> Result<(), String> {
        let req = self.request(d)?;
        let resp = match (d.kind, d.proto) {
            (Kind::Keepalive, Proto::H2) => {
                let pooled = lock(&self.pools.h2).get(&d.host).cloned();
                let mut send = match pooled {
                    Some(s) if !s.is_closed() => s,
                    _ => match self.connect(d).await? {
                        Conn::H2(s) => {
                            lock(&self.pools.h2).insert(d.host, s.clone());
                            s
                        }
                        Conn::H1(_) => return Err("no h2".into()),
                    },
                };
                send.ready().await.map_err(|e| format!("h2: {e}"))?;
                send.send_request(req)
                    .await
                    .map_err(|e| format!("h2: {e}"))?
            }
            (Kind::Keepalive, Proto::H1) => {
                let pooled = {
                    let mut pools = lock(&self.pools.h1);
                    let list = pools.entry(d.host).or_default();
                    let mut found = None;
                    while let Some(s) = list.pop() {
                        if s.is_ready() {
                            found = Some(s);
                            break;
                        }
                    }
                    found
                };
                let mut send = match pooled {
                    Some(s) => s,
                    None => match self.connect(d).await? {
                        Conn::H1(s) => s,
                        Conn::H2(_) => return Err("no h1".into()),
                    },
                };
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("h1: {e}"))?;
                let (parts, body) = resp.into_parts();
                let status = parts.status;
                body.collect().await.map_err(|e| format!("body: {e}"))?;
                if !status.is_success() {
                    return Err(format!("status {}", status.as_u16()));
                }
                lock(&self.pools.h1).entry(d.host).or_default().push(send);
                return Ok(());
            }
            (_, _) => match self.connect(d).await? {
                Conn::H1(mut s) => s.send_request(req).await.map_err(|e| format!("h1: {e}"))?,
                Conn::H2(mut s) => s.send_request(req).await.map_err(|e| format!("h2: {e}"))?,
            },
        };
        let (parts, body) = resp.into_parts();
        body.collect().await.map_err(|e| format!("body: {e}"))?;
        if !parts.status.is_success() {
            return Err(format!("status {}", parts.status.as_u16()));
        }
        Ok(())
    }

    /// Sends one request due at `due`, its latency counted from `from`.
    async fn one(&self, d: Draw, due: Instant, from: Instant) {
        let r = self.send(d).await;
        self.record(d, due, from, r);
    }

    fn record(&self, d: Draw, due: Instant, from: Instant, r: Result<(), String>) {
        let end = Instant::now();
        let us = end.saturating_duration_since(from).as_micros().max(1) as u64;
        let mut st = lock(&self.stats);
        *st.kinds.entry(d.kind).or_insert(0) += 1;
        *st.protos.entry(d.proto).or_insert(0) += 1;
        if let Some(h) = st.hosts.get_mut(d.host) {
            *h += 1;
        }
        let measured = due >= st.start + self.scenario.warmup;
        if measured {
            st.measured_sent += 1;
        }
        match r {
            Ok(()) => {
                if measured {
                    let _ = st.total.record(us);
                    let _ = st
                        .by_kind
                        .entry(d.kind)
                        .or_insert_with(histogram)
                        .record(us);
                }
                let s = st.second(due);
                s.done += 1;
                let _ = s.latency.record(us);
            }
            Err(e) => {
                *st.errors.entry(e).or_insert(0) += 1;
                st.second(due).errors += 1;
            }
        }
    }
}

/// Lateness of an open-loop request that is the timer's, not the target's.
pub const TIMER_SLACK: Duration = Duration::from_micros(1500);

/// Where an open-loop request's latency starts: when it was sent if that was
/// within [`TIMER_SLACK`] of when it was due, else that much after it was due
/// (a generator that fell behind, because the target stalled it or took its
/// CPU, still shows it).
pub fn latency_from(due: Instant, sent: Instant) -> Instant {
    sent.min(due + TIMER_SLACK)
}

async fn h1<I>(io: TokioIo<I>) -> Result<H1, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(io)
        .await
        .map_err(|e| format!("h1 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Runs `scenario` against `target` and returns what it measured.
pub async fn run(scenario: &Scenario, target: &Target) -> anyhow::Result<RunResult> {
    if let Some(mix) = &scenario.dns {
        return run_dns(scenario, mix, target).await;
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        scenario: scenario.clone(),
        target: target.clone(),
        tls: Tls::new()?,
        pools: Pools::default(),
        stats: Mutex::new(Stats {
            start,
            total: histogram(),
            by_kind: BTreeMap::new(),
            seconds: Vec::new(),
            hosts: vec![0; scenario.hostnames],
            kinds: BTreeMap::new(),
            protos: BTreeMap::new(),
            resumed: 0,
            errors: BTreeMap::new(),
            overflow: 0,
            connections: 0,
            measured_sent: 0,
        }),
        in_flight: AtomicUsize::new(0),
    });
    let end = start + scenario.duration;
    let cpu_before = cpu_us(&target.pids);
    let stat_before = CpuStat::now();
    let churn = match (&scenario.churn, &target.admin) {
        (Some(c), Some(admin)) => Some(tokio::spawn(crate::churn::run(
            c.clone(),
            admin.clone(),
            scenario.hostname(0),
            end,
        ))),
        _ => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let mut memory = None;
    match (scenario.rate, scenario.connections) {
        _ if scenario.idle.is_some() => {
            let idle = scenario.idle.clone().unwrap_or(crate::scenario::Idle {
                connections: 1,
                request_every: Duration::from_secs(1),
            });
            memory = Some(hold_idle(&shared, &idle, end, &mut tasks).await);
        }
        (Some(rate), _) => {
            let mut drawer = Drawer::new(scenario, target.tls, 0);
            let mut schedule = OpenLoop::new(start, rate, end);
            while let Some(due) = schedule.next().await {
                let d = drawer.draw();
                let now = Instant::now();
                if shared.in_flight.load(Ordering::Relaxed) >= scenario.max_in_flight {
                    let mut st = lock(&shared.stats);
                    st.overflow += 1;
                    st.second(due).errors += 1;
                    continue;
                }
                lock(&shared.stats).second(now).sent += 1;
                sent += 1;
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                let sh = shared.clone();
                let from = latency_from(due, now);
                tasks.spawn(async move {
                    sh.one(d, due, from).await;
                    sh.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
                // Reap finished tasks now and then, so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
        }
        (None, Some(n)) => {
            for c in 0..n {
                let sh = shared.clone();
                let mut drawer = Drawer::new(scenario, target.tls, c as u64 + 1);
                tasks.spawn(async move {
                    let mut mine = 0u64;
                    while Instant::now() < end {
                        let d = drawer.draw();
                        let due = Instant::now();
                        lock(&sh.stats).second(due).sent += 1;
                        mine += 1;
                        sh.one(d, due, due).await;
                    }
                    let _ = mine;
                });
            }
        }
        (None, None) => anyhow::bail!("the scenario has neither rate nor connections"),
    }
    // Answers still in flight at the end are waited for, a little.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let cpu = cpu_us(&target.pids).saturating_sub(cpu_before);
    let churn = match churn {
        Some(h) => h.await.ok(),
        None => None,
    };
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let st = lock(&shared.stats);
    let sent = if scenario.rate.is_some() {
        sent
    } else {
        st.seconds.iter().map(|s| s.sent).sum()
    };
    let ok = st.total.len();
    let mut drawn = BTreeMap::new();
    for (k, n) in &st.kinds {
        drawn.insert(format!("{k:?}").to_lowercase(), *n);
    }
    for (p, n) in &st.protos {
        drawn.insert(format!("{p:?}").to_lowercase(), *n);
    }
    // Summary figures cover the time after the warm-up.
    let secs = (scenario.duration.saturating_sub(scenario.warmup))
        .as_secs_f64()
        .max(1e-9);
    let sent = st.measured_sent.min(sent);
    Ok(RunResult {
        scenario: scenario.name.clone(),
        target: target.name.clone(),
        repeat: 0,
        mode: if scenario.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        rate: scenario.rate,
        seconds: elapsed,
        sent,
        ok,
        errors: {
            let mut e = st.errors.clone();
            if st.overflow > 0 {
                e.insert("overflow".into(), st.overflow);
            }
            e
        },
        overflow: st.overflow,
        sent_per_second: sent as f64 / secs,
        ok_per_second: ok as f64 / secs,
        latency_us: Percentiles::of(&st.total),
        by_kind: st
            .by_kind
            .iter()
            .map(|(k, h)| (format!("{k:?}").to_lowercase(), Percentiles::of(h)))
            .collect(),
        drawn,
        resumed_handshakes: st.resumed,
        connections: st.connections,
        hosts: st.hosts.clone(),
        series: st
            .seconds
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i as f64) < scenario.duration.as_secs_f64())
            .map(|(i, s)| Point {
                t: i as u64,
                sent: s.sent,
                done: s.done,
                errors: s.errors,
                p50_us: s.latency.value_at_quantile(0.5),
                p99_us: s.latency.value_at_quantile(0.99),
            })
            .collect(),
        cpu_us_per_req: (!target.pids.is_empty() && ok > 0).then(|| cpu as f64 / ok as f64),
        dns: None,
        churn,
        kib_per_conn: memory.filter(|_| !target.pids.is_empty()),
        steal_pct: stat_before.and_then(|s| s.steal_since()),
        gbit_per_s: None,
    })
}

async fn run_dns(
    scenario: &Scenario,
    mix: &crate::dns::DnsMix,
    target: &Target,
) -> anyhow::Result<RunResult> {
    if !target.udp {
        anyhow::bail!("{}: a DNS scenario needs a udp:// target", target.name);
    }
    let rate = scenario
        .rate
        .ok_or_else(|| anyhow::anyhow!("a DNS scenario needs rate"))?;
    let d = crate::dns::run(
        mix,
        rate,
        scenario.duration,
        scenario.warmup,
        scenario.seed,
        target.addr,
        &target.pids,
    )
    .await?;
    let secs = scenario
        .duration
        .saturating_sub(scenario.warmup)
        .as_secs_f64()
        .max(1e-9);
    let mut errors = BTreeMap::new();
    if d.lost > 0 {
        errors.insert("lost".to_string(), d.lost);
    }
    Ok(RunResult {
        scenario: scenario.name.clone(),
        target: target.name.clone(),
        repeat: 0,
        mode: "open".into(),
        rate: Some(rate),
        seconds: scenario.duration.as_secs_f64(),
        sent: d.lookups,
        ok: d.resolved,
        errors,
        overflow: 0,
        sent_per_second: d.queries_per_second,
        ok_per_second: d.resolved as f64 / secs,
        latency_us: d.lookup_us.clone(),
        by_kind: [("query".to_string(), d.query_us.clone())].into(),
        drawn: d.forms.clone(),
        resumed_handshakes: 0,
        connections: 0,
        hosts: Vec::new(),
        series: d.series.clone(),
        cpu_us_per_req: d.cpu_us_per_query,
        kib_per_conn: None,
        steal_pct: d.steal_pct,
        gbit_per_s: None,
        dns: Some(d),
        churn: None,
    })
}

/// Opens `idle.connections` connections (100 at a time), each sending a
/// request every `idle.request_every` until `end`; returns the target's
/// memory growth per connection (KiB), from its RSS before the first and
/// its highest RSS while all were open.
async fn hold_idle(
    shared: &Arc<Shared>,
    idle: &crate::scenario::Idle,
    end: Instant,
    tasks: &mut tokio::task::JoinSet<()>,
) -> f64 {
    let pids = shared.target.pids.clone();
    let before = rss_kib(&pids);
    let mut drawer = Drawer::new(&shared.scenario, shared.target.tls, 7);
    let opened = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    for i in 0..idle.connections {
        let mut d = drawer.draw();
        d.kind = Kind::Keepalive;
        d.proto = Proto::H1;
        let (sh, every, opened, gate) = (
            shared.clone(),
            idle.request_every,
            opened.clone(),
            gate.clone(),
        );
        // Spread the requests over the period.
        let phase = every.mul_f64(i as f64 / idle.connections.max(1) as f64);
        tasks.spawn(async move {
            let conn = {
                let _p = gate.acquire().await;
                sh.connect(d).await
            };
            let mut send = match conn {
                Ok(Conn::H1(s)) => s,
                Ok(Conn::H2(_)) | Err(_) => {
                    let mut st = lock(&sh.stats);
                    *st.errors.entry("connect".into()).or_insert(0) += 1;
                    return;
                }
            };
            opened.fetch_add(1, Ordering::Relaxed);
            let mut due = Instant::now() + phase;
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let from = latency_from(due, Instant::now());
                lock(&sh.stats).second(due).sent += 1;
                let r = match sh.request(d) {
                    Ok(req) => match send.send_request(req).await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            match resp.into_body().collect().await {
                                Ok(_) if ok => Ok(()),
                                Ok(_) => Err("status".to_string()),
                                Err(e) => Err(format!("body: {e}")),
                            }
                        }
                        Err(e) => Err(format!("h1: {e}")),
                    },
                    Err(e) => Err(e),
                };
                sh.record(d, due, from, r);
                due += every;
            }
        });
    }
    // The highest RSS while the connections are held.
    let mut peak = before;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_kib(&pids));
    }
    let n = opened.load(Ordering::Relaxed).max(1);
    peak.saturating_sub(before) as f64 / n as f64
}

#[cfg(test)]
mod cpu_tests {
    use super::CpuStat;

    #[test]
    fn steal_is_a_share_of_the_machines_time() {
        let before = CpuStat::now().expect("/proc/stat");
        // Burn a little CPU so the total moves.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let p = before.steal_since().expect("the total moved");
        assert!((0.0..=100.0).contains(&p), "{p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_latency_skips_only_the_timers_lateness() {
        let due = Instant::now();
        let ms = Duration::from_millis;
        // Woken on the next millisecond tick: counted from the send.
        let sent = due + Duration::from_micros(900);
        assert_eq!(latency_from(due, sent), sent);
        // Far behind (a stalled target, a starved generator): counted from
        // when it was due, less only the timer's share.
        let sent = due + ms(40);
        assert_eq!(latency_from(due, sent), due + TIMER_SLACK);
        assert_eq!(latency_from(due, due), due);
    }
}
