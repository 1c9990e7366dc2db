//! The DNS load mode: lookups as pods make them.
//!
//! A pod's resolv.conf has `search <ns>.svc.<zone> svc.<zone> <zone>` and
//! `options ndots:5`, so a name with fewer than five dots is tried with each
//! search suffix first, and the resolver sends A and AAAA for each try. A
//! lookup of Service `web` in another namespace `shop` (`web.shop`) costs
//! `web.shop.<own ns>.svc.<zone>` (NXDOMAIN) then `web.shop.svc.<zone>`
//! (answer), twice (A and AAAA). This mode draws lookups of that shape and
//! sends the queries a stub resolver would, in order, each pair (A, AAAA) at
//! once, stopping at the first try that answers; a lookup's latency is from
//! when it was due to its last answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;

use crate::load::{CpuStat, Percentiles, Point, cpu_us, histogram};
use crate::sample::{OpenLoop, Rng, Weighted, Zipf};

/// `[dns]` in a scenario: what the pods look up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsMix {
    /// Services `svc-<i>` in namespaces `ns-<i % namespaces>`.
    #[serde(default = "default_services")]
    pub services: usize,
    /// How many namespaces they spread over.
    #[serde(default = "default_namespaces")]
    pub namespaces: usize,
    /// The cluster's zone.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Share of lookups of a Service in the asking pod's own namespace by
    /// its short name (`svc-3`: answered by the first search suffix).
    #[serde(default = "default_same_ns")]
    pub same_namespace: f64,
    /// Share of lookups as `svc-3.ns-3` (answered by the second suffix).
    #[serde(default = "default_other_ns")]
    pub other_namespace: f64,
    /// Share of lookups of a Service that does not exist (every try NXDOMAIN).
    #[serde(default = "default_missing")]
    pub missing: f64,
    /// Share of fully qualified lookups (`svc-3.ns-3.svc.cluster.local.`: one try).
    #[serde(default = "default_fqdn")]
    pub fqdn: f64,
    /// Time to wait for an answer before counting a query lost.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_services() -> usize {
    10_000
}
fn default_namespaces() -> usize {
    50
}
fn default_zone() -> String {
    "cluster.local".into()
}
fn default_same_ns() -> f64 {
    0.5
}
fn default_other_ns() -> f64 {
    0.3
}
fn default_missing() -> f64 {
    0.1
}
fn default_fqdn() -> f64 {
    0.1
}
fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

/// The shape of one lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Form {
    /// `svc-N` from a pod in its namespace.
    SameNamespace,
    /// `svc-N.ns-M` from a pod elsewhere.
    OtherNamespace,
    /// A Service that does not exist.
    Missing,
    /// Fully qualified.
    Fqdn,
}

/// The names a pod's resolver tries for one lookup, in order.
pub fn tries(mix: &DnsMix, form: Form, svc: usize, pod_ns: usize) -> Vec<String> {
    let z = &mix.zone;
    let ns = svc % mix.namespaces.max(1);
    let search = |name: &str| {
        vec![
            format!("{name}.ns-{pod_ns}.svc.{z}."),
            format!("{name}.svc.{z}."),
            format!("{name}.{z}."),
            format!("{name}."),
        ]
    };
    match form {
        Form::SameNamespace => search(&format!("svc-{svc}")),
        Form::OtherNamespace => search(&format!("svc-{svc}.ns-{ns}")),
        Form::Missing => search(&format!("nosuch-{svc}.ns-{ns}")),
        Form::Fqdn => vec![format!("svc-{svc}.ns-{ns}.svc.{z}.")],
    }
}

/// A DNS query for `name`, type `qtype` (1 A, 28 AAAA), with `id`.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// (id, rcode, answers) of a response.
fn header(resp: &[u8]) -> Option<(u16, u8, u16)> {
    if resp.len() < 12 || resp[2] & 0x80 == 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([resp[0], resp[1]]),
        resp[3] & 0x0f,
        u16::from_be_bytes([resp[6], resp[7]]),
    ))
}

/// What a DNS run gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsResult {
    /// Lookups sent after the warm-up.
    pub lookups: u64,
    /// Lookups that ended with an answer or a final NXDOMAIN.
    pub resolved: u64,
    /// Queries sent (every try, A and AAAA).
    pub queries: u64,
    /// Queries per second.
    pub queries_per_second: f64,
    /// Answers by rcode name.
    pub rcodes: BTreeMap<String, u64>,
    /// Queries without an answer in time.
    pub lost: u64,
    /// Lookup latency.
    pub lookup_us: Percentiles,
    /// Query latency.
    pub query_us: Percentiles,
    /// Lookups by form.
    pub forms: BTreeMap<String, u64>,
    /// Second by second (lookups).
    pub series: Vec<Point>,
    /// The server's CPU per query, us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_query: Option<f64>,
    /// CPU time stolen by the hypervisor during the measured part, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_pct: Option<f64>,
}

struct Acc {
    start: Instant,
    warmup: Duration,
    lookups: u64,
    resolved: u64,
    queries: u64,
    rcodes: BTreeMap<String, u64>,
    lost: u64,
    lookup: Histogram<u64>,
    query: Histogram<u64>,
    forms: BTreeMap<String, u64>,
    seconds: Vec<(u64, u64, u64, Histogram<u64>)>,
}

fn rcode_name(r: u8) -> String {
    match r {
        0 => "NOERROR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        5 => "REFUSED".into(),
        1 => "FORMERR".into(),
        n => format!("RCODE{n}"),
    }
}

/// Sends one query and waits for its answer: (rcode, answers) or None.
async fn ask(
    sock: &UdpSocket,
    id: u16,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Option<(u8, u16)> {
    sock.send(&query(id, name, qtype)).await.ok()?;
    let mut buf = [0u8; 1500];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        if let Some((rid, rcode, an)) = header(&buf[..n])
            && rid == id
        {
            return Some((rcode, an));
        }
    }
}

/// Runs the DNS mode: `rate` lookups a second for `duration` at `server`.
pub async fn run(
    mix: &DnsMix,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    seed: u64,
    server: SocketAddr,
    pids: &[u32],
) -> anyhow::Result<DnsResult> {
    let start = Instant::now();
    let acc = Arc::new(Mutex::new(Acc {
        start,
        warmup,
        lookups: 0,
        resolved: 0,
        queries: 0,
        rcodes: BTreeMap::new(),
        lost: 0,
        lookup: histogram(),
        query: histogram(),
        forms: BTreeMap::new(),
        seconds: Vec::new(),
    }));
    let forms = Weighted::new(&[
        (mix.same_namespace, Form::SameNamespace),
        (mix.other_namespace, Form::OtherNamespace),
        (mix.missing, Form::Missing),
        (mix.fqdn, Form::Fqdn),
    ]);
    let zipf = Zipf::new(mix.services.max(1), 1.0);
    let mut rng = Rng::new(seed);
    let mut cpu_before = None;
    let mut stat_before = None;
    let mut schedule = OpenLoop::new(start, rate, start + duration);
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(due) = schedule.next().await {
        if cpu_before.is_none() && due >= start + warmup {
            cpu_before = Some((cpu_us(pids), Instant::now()));
            stat_before = CpuStat::now();
        }
        let form = forms.sample(&mut rng).unwrap_or(Form::Fqdn);
        let svc = zipf.sample(&mut rng);
        // A pod asking for a Service of its own namespace lives there.
        let pod_ns = match form {
            Form::SameNamespace => svc % mix.namespaces.max(1),
            _ => (rng.next_u64() % mix.namespaces.max(1) as u64) as usize,
        };
        let names = tries(mix, form, svc, pod_ns);
        let (acc, timeout) = (acc.clone(), mix.timeout);
        let id = (rng.next_u64() & 0xffff) as u16;
        tasks.spawn(async move {
            let Ok(sock) = UdpSocket::bind(if server.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .await
            else {
                return;
            };
            if sock.connect(server).await.is_err() {
                return;
            }
            let sock = Arc::new(sock);
            let mut resolved = false;
            let mut sent = 0u64;
            let mut lost = 0u64;
            let mut rcodes: Vec<u8> = Vec::new();
            let mut qlat = Vec::new();
            for (t, name) in names.iter().enumerate() {
                // A and AAAA at once, as glibc does.
                let t0 = Instant::now();
                let idt = id.wrapping_add((t as u16) * 2);
                let (a, aaaa) = tokio::join!(ask(&sock, idt, name, 1, timeout), async {
                    // A second socket: answers to the two may cross.
                    let s2 = UdpSocket::bind(if server.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    })
                    .await
                    .ok()?;
                    s2.connect(server).await.ok()?;
                    ask(&s2, idt.wrapping_add(1), name, 28, timeout).await
                });
                sent += 2;
                let us = t0.elapsed().as_micros().max(1) as u64;
                let mut answered = false;
                let mut nx = true;
                for r in [a, aaaa] {
                    match r {
                        Some((rc, an)) => {
                            qlat.push(us);
                            rcodes.push(rc);
                            if rc == 0 {
                                nx = false;
                                if an > 0 {
                                    answered = true;
                                }
                            }
                        }
                        None => {
                            lost += 1;
                            nx = false;
                        }
                    }
                }
                // NOERROR for either type ends the search (the name exists).
                if answered || !nx {
                    resolved = lost == 0;
                    break;
                }
                if t == names.len() - 1 {
                    // Every try NXDOMAIN: resolved, to "no such name".
                    resolved = lost == 0;
                }
            }
            let done = Instant::now();
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            let measured = due >= a.start + a.warmup;
            let sec = done.saturating_duration_since(a.start).as_secs() as usize;
            let lat = done.saturating_duration_since(due).as_micros().max(1) as u64;
            while a.seconds.len() <= sec {
                a.seconds.push((0, 0, 0, histogram()));
            }
            let s = &mut a.seconds[sec];
            s.0 += 1;
            if resolved {
                s.1 += 1;
                let _ = s.3.record(lat);
            } else {
                s.2 += 1;
            }
            if measured {
                a.lookups += 1;
                a.queries += sent;
                a.lost += lost;
                *a.forms.entry(format!("{form:?}")).or_insert(0) += 1;
                for rc in rcodes {
                    *a.rcodes.entry(rcode_name(rc)).or_insert(0) += 1;
                }
                for q in qlat {
                    let _ = a.query.record(q);
                }
                if resolved {
                    a.resolved += 1;
                    let _ = a.lookup.record(lat);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(mix.timeout * 5, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let cpu = cpu_before.map(|(c, t)| (cpu_us(pids).saturating_sub(c), t.elapsed()));
    let a = acc.lock().unwrap_or_else(|e| e.into_inner());
    let secs = duration.saturating_sub(warmup).as_secs_f64().max(1e-9);
    Ok(DnsResult {
        lookups: a.lookups,
        resolved: a.resolved,
        queries: a.queries,
        queries_per_second: a.queries as f64 / secs,
        rcodes: a.rcodes.clone(),
        lost: a.lost,
        lookup_us: Percentiles::of(&a.lookup),
        query_us: Percentiles::of(&a.query),
        forms: a.forms.clone(),
        series: a
            .seconds
            .iter()
            .enumerate()
            .map(|(i, (sent, done, errors, h))| Point {
                t: i as u64,
                sent: *sent,
                done: *done,
                errors: *errors,
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
            })
            .collect(),
        cpu_us_per_query: match cpu {
            Some((c, _)) if !pids.is_empty() && a.queries > 0 => Some(c as f64 / a.queries as f64),
            _ => None,
        },
        steal_pct: stat_before.and_then(|s: CpuStat| s.steal_since()),
    })
}
