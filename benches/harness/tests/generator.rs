//! The generator's own correctness, against a real TLS server on loopback
//! (hyper + rustls) that counts what it receives: the Zipf and mix ratios of
//! a recorded run, the open-loop rate held while the server slows down, and
//! the report built from a saved JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skein_bench::sample::Zipf;
use skein_bench::{Report, Scenario, Target};

/// What the server saw.
#[derive(Default)]
struct Seen {
    hosts: Mutex<HashMap<String, u64>>,
    connections: AtomicU64,
    resumed: AtomicU64,
    h2_requests: AtomicU64,
    requests: AtomicU64,
}

/// A TLS server for any name, answering after `delay(elapsed)`.
async fn server(delay: fn(Duration) -> Duration) -> (SocketAddr, Arc<Seen>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let start = Instant::now();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.connections.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    seen.resumed.fetch_add(1, Ordering::Relaxed);
                }
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let host = req
                            .uri()
                            .host()
                            .map(str::to_string)
                            .or_else(|| {
                                req.headers()
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_string)
                            })
                            .unwrap_or_default();
                        *seen.hosts.lock().unwrap().entry(host).or_insert(0) += 1;
                        seen.requests.fetch_add(1, Ordering::Relaxed);
                        if req.version() == hyper::Version::HTTP_2 {
                            seen.h2_requests.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(delay(start.elapsed())).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn target(addr: SocketAddr) -> Target {
    // This test process is the server: its CPU per request is measured too.
    Target::parse(&format!("t=https://{addr}@{}", std::process::id())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_run_has_the_zipf_and_the_mix_it_was_asked_for() {
    let (addr, seen) = server(|_| Duration::ZERO).await;
    let s = Scenario::parse(
        "name = \"mix\"\nhostnames = 50\nzipf = 1.0\nconnections = 8\nduration = \"3s\"\nwarmup = \"0s\"\n[mix]\nkeepalive = 0.6\nnew_tls = 0.2\nresumed_tls = 0.2\nh2 = 0.5\n",
    )
    .unwrap();
    let r = skein_bench::run(&s, &target(addr)).await.unwrap();
    assert!(r.ok > 500, "only {} answered: {:?}", r.ok, r.errors);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        r.cpu_us_per_req.is_some_and(|c| c > 0.0),
        "{:?}",
        r.cpu_us_per_req
    );
    // What the server counted is what the generator says it sent.
    assert_eq!(seen.requests.load(Ordering::Relaxed), r.ok);
    let n = r.ok as f64;
    // The hostnames follow the Zipf law within sampling tolerance.
    let z = Zipf::new(50, 1.0);
    let hosts = seen.hosts.lock().unwrap().clone();
    for k in [0usize, 1, 4, 20] {
        let got = *hosts.get(&s.hostname(k)).unwrap_or(&0) as f64;
        let want = z.p(k) * n;
        let tol = 5.0 * (want * (1.0 - z.p(k))).sqrt() + 5.0;
        assert!(
            (got - want).abs() < tol,
            "h{k}: {got} requests, expected {want:.0} +- {tol:.0}"
        );
    }
    // The kinds and protocols as drawn...
    // Five standard deviations of a share of n draws.
    let tol = |p: f64| 5.0 * (p * (1.0 - p) / n).sqrt();
    let share = |k: &str| *r.drawn.get(k).unwrap_or(&0) as f64 / n;
    for (k, p) in [
        ("keepalive", 0.6),
        ("newtls", 0.2),
        ("resumedtls", 0.2),
        ("h2", 0.5),
    ] {
        assert!(
            (share(k) - p).abs() < tol(p),
            "{k}: {} of {n}: {:?}",
            share(k),
            r.drawn
        );
    }
    // ...and as the server saw them: h2 requests, and new connections for
    // every new and resumed request (plus the kept ones), of which the
    // resumed ones resumed.
    let h2 = seen.h2_requests.load(Ordering::Relaxed) as f64 / n;
    assert!((h2 - 0.5).abs() < tol(0.5), "server saw {h2} h2");
    let fresh = r.drawn["newtls"] + r.drawn["resumedtls"];
    let conns = seen.connections.load(Ordering::Relaxed);
    assert!(
        conns >= fresh && conns < fresh + 500,
        "{conns} connections for {fresh} new ones"
    );
    let resumed = seen.resumed.load(Ordering::Relaxed);
    assert_eq!(resumed, r.resumed_handshakes);
    // A name's first connection per protocol cannot resume (it has no
    // session yet), and with 50 names x 2 protocols in a short run that is
    // a good part of them; most of the rest resume.
    assert!(
        resumed as f64 > 0.4 * r.drawn["resumedtls"] as f64,
        "{resumed} resumed of {}",
        r.drawn["resumedtls"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_loop_holds_its_rate_while_the_target_slows_down() {
    // The server answers at once for a second, then takes 300 ms a request.
    let (addr, _) = server(|t| {
        if t < Duration::from_secs(1) {
            Duration::ZERO
        } else {
            Duration::from_millis(300)
        }
    })
    .await;
    let s = Scenario::parse(
        "name = \"open\"\nhostnames = 5\nrate = 200\nduration = \"3s\"\nwarmup = \"0s\"\n[mix]\nkeepalive = 1\n",
    )
    .unwrap();
    let r = skein_bench::run(&s, &target(addr)).await.unwrap();
    // Sent on schedule: 600 requests, about 200 in each second, though
    // answers slowed to 300 ms.
    assert!((590..=601).contains(&r.sent), "sent {}", r.sent);
    for p in &r.series {
        assert!(
            (170..=230).contains(&p.sent),
            "second {}: sent {}",
            p.t,
            p.sent
        );
    }
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // Latency shows the slowdown: fast first, 300 ms and more after.
    let first = &r.series[0];
    let last = &r.series[2];
    assert!(first.p50_us < 50_000, "{first:?}");
    assert!(last.p50_us >= 300_000, "{last:?}");
    // More connections were opened to keep to the rate (kept ones were busy).
    assert!(r.connections > 20, "{} connections", r.connections);
}

#[test]
fn the_report_builds_from_a_saved_run() {
    let json = include_str!("fixtures/run.json");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run-1.json");
    std::fs::write(&path, json).unwrap();
    let report = Report::load(&path).unwrap();
    let older = {
        let mut o = report.clone();
        o.started = "2026-11-30T10:00:00Z".into();
        o
    };
    let html = report.html(&[older]);
    assert!(html.starts_with("<!doctype html>"));
    for r in &report.results {
        assert!(
            html.contains(&format!("<h2>{}</h2>", r.scenario)),
            "{}",
            r.scenario
        );
        assert!(html.contains(&r.target));
    }
    // A chart per figure, history included, and nothing fetched.
    assert!(html.matches("<svg").count() >= 5, "{html}");
    assert!(html.contains("in the last runs"));
    assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"));
    let table = report.table();
    assert!(
        table.contains("skein") && table.contains("nginx"),
        "{table}"
    );
    // Repeats: the table and charts take the run with the median p99.
    let mut repeated = report.clone();
    for (rep, p99) in [(1u32, 9_000u64), (2, 1_000)] {
        let mut r = report.results[0].clone();
        r.repeat = rep;
        r.latency_us.p99 = p99;
        repeated.results.push(r);
    }
    let medians = repeated.medians();
    assert_eq!(medians.len(), report.results.len());
    let (skein, runs, (lo, hi)) = medians[0];
    assert_eq!((skein.target.as_str(), runs), ("skein", 3));
    assert_eq!(skein.latency_us.p99, report.results[0].latency_us.p99);
    assert_eq!((lo, hi), (1.0, 9.0));
    assert!(repeated.table().contains("1.0-9.0"), "{}", repeated.table());
    assert!(
        !repeated.table().contains("p99 vs"),
        "no baseline, no column"
    );

    // Against a baseline: each repeat is compared with the baseline's run of
    // the same repeat, and the median of those ratios is reported, not the
    // ratio of the medians (which would pair a calm minute with a noisy one).
    let mut paired = Report {
        baseline: Some("direct".into()),
        ..report.clone()
    };
    paired.results.clear();
    for (rep, (through, direct)) in [(3_000u64, 2_000u64), (2_000, 1_000), (1_000, 1_000)]
        .into_iter()
        .enumerate()
    {
        for (target, p99) in [("proxied", through), ("direct", direct)] {
            let mut r = report.results[0].clone();
            r.target = target.into();
            r.repeat = rep as u32;
            r.latency_us.p99 = p99;
            paired.results.push(r);
        }
    }
    let sc = paired.results[0].scenario.clone();
    // Per repeat +50%, +100%, +0%: the median is +50% (the medians' ratio
    // would be 2.0 / 1.0, +100%).
    assert_eq!(paired.over_baseline(&sc, "proxied"), Some(0.5));
    assert_eq!(paired.over_baseline(&sc, "direct"), None);
    assert_eq!(paired.over_baseline(&sc, "nobody"), None);
    let versus = paired.table();
    assert!(versus.contains("p99 vs direct"), "{versus}");
    let line = versus.lines().find(|l| l.contains("proxied")).unwrap();
    assert!(line.trim_end().ends_with("+50%"), "{versus}");
    // Saved and loaded, the baseline stays.
    let back: Report = serde_json::from_str(&serde_json::to_string(&paired).unwrap()).unwrap();
    assert_eq!(back.baseline.as_deref(), Some("direct"));
    assert!(
        table.contains("skein") && table.contains("nginx"),
        "{table}"
    );
    // save() writes the JSON and the page.
    let out = tempfile::tempdir().unwrap();
    let page = skein_bench::report::save(&report, out.path(), 5).unwrap();
    assert!(std::fs::read_to_string(page).unwrap().contains("<svg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_adds_and_removes_machines_and_rotates_a_certificate_at_its_rate() {
    // An HTTP server in the admin API's place, recording what it is asked.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls: Arc<Mutex<Vec<(String, String, bool)>>> = Arc::default();
    let c = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let authed = req
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v == "Bearer sekrit");
                        c.lock().unwrap().push((
                            req.method().to_string(),
                            req.uri().path().to_string(),
                            authed,
                        ));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"{}"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let churn = skein_bench::churn::Churn {
        rate: 10.0,
        apps: 3,
        cert_every: 5,
        backend: "127.0.0.1:1".into(),
    };
    let admin = skein_bench::churn::Admin {
        addr,
        token: "sekrit".into(),
    };
    let end = Instant::now() + Duration::from_secs(2);
    let r = skein_bench::churn::run(churn, admin, "h0.bench.test".into(), end).await;
    let calls = calls.lock().unwrap().clone();
    assert!(calls.iter().all(|(_, _, authed)| *authed));
    let puts: Vec<&str> = calls
        .iter()
        .filter(|(m, p, _)| m == "PUT" && p.starts_with("/v1/machines/"))
        .map(|(_, p, _)| p.as_str())
        .collect();
    // 10 a second for 2 s.
    assert!((19..=20).contains(&puts.len()), "{puts:?}");
    assert_eq!(puts[0], "/v1/machines/churn0");
    // Each machine is removed after the next one arrives; the last at the end.
    let deletes = calls
        .iter()
        .filter(|(m, p, _)| m == "DELETE" && p.starts_with("/v1/machines/"))
        .count();
    assert_eq!(deletes, puts.len());
    let certs = calls
        .iter()
        .filter(|(m, p, _)| m == "PUT" && p == "/v1/certificates/churn-cert")
        .count();
    assert_eq!(certs, puts.len().div_ceil(5));
    assert_eq!(r.certificates as usize, certs);
    assert_eq!(r.failed, 0);
    assert_eq!(
        calls.last().map(|(m, p, _)| (m.as_str(), p.as_str())),
        Some(("DELETE", "/v1/certificates/churn-cert"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_lookups_follow_a_pods_search_path_against_a_real_server() {
    if !skein_testkit::nsd::require_nsd("skein-bench dns mode") {
        return;
    }
    // 200 Services over 10 namespaces, as NSD (authoritative for
    // cluster.local only) serves them.
    let mut zone = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ IN SOA ns admin 1 60 60 600 5\n@ IN NS ns\nns IN A 127.0.0.1\n",
    );
    for i in 0..200 {
        zone.push_str(&format!(
            "svc-{i}.ns-{}.svc IN AAAA fd00::{i:x}\nsvc-{i}.ns-{}.svc IN A 10.0.{}.{}\n",
            i % 10,
            i % 10,
            i / 250,
            i % 250
        ));
    }
    let nsd = skein_testkit::nsd::Nsd::start(&[("cluster.local", zone)]);
    let s = Scenario::parse(
        "name = \"pods\"\nrate = 300\nduration = \"3s\"\nwarmup = \"0s\"\n[dns]\nservices = 200\nnamespaces = 10\n",
    )
    .unwrap();
    let t = Target::parse(&format!("nsd=udp://{}", nsd.addr)).unwrap();
    let r = skein_bench::run(&s, &t).await.unwrap();
    let d = r.dns.unwrap();
    assert_eq!(d.lost, 0, "{d:?}");
    assert_eq!(d.resolved, d.lookups);
    assert!((880..=901).contains(&d.lookups), "{} lookups", d.lookups);
    let n = d.lookups as f64;
    let form = |f: &str| *d.forms.get(f).unwrap_or(&0) as f64;
    for (f, p) in [
        ("SameNamespace", 0.5),
        ("OtherNamespace", 0.3),
        ("Missing", 0.1),
        ("Fqdn", 0.1),
    ] {
        let tol = 5.0 * (p * (1.0 - p) / n).sqrt();
        assert!((form(f) / n - p).abs() < tol, "{f}: {:?}", d.forms);
    }
    let rc = |c: &str| *d.rcodes.get(c).unwrap_or(&0) as f64;
    // Every existing Service ends on an answered try: A and AAAA, NOERROR.
    assert_eq!(
        rc("NOERROR"),
        2.0 * (form("SameNamespace") + form("OtherNamespace") + form("Fqdn")),
        "{:?}",
        d.rcodes
    );
    // A missing one is tried under every suffix: three NXDOMAIN pairs in the
    // zone, then the bare name, which NSD refuses (not its zone).
    assert_eq!(rc("REFUSED"), 2.0 * form("Missing"), "{:?}", d.rcodes);
    // Another namespace's Service is first tried under the pod's own.
    let other_nx = rc("NXDOMAIN") - 6.0 * form("Missing");
    assert!(
        other_nx <= 2.0 * form("OtherNamespace") && other_nx >= 1.7 * form("OtherNamespace"),
        "{:?} {:?}",
        d.rcodes,
        d.forms
    );
    assert_eq!(
        d.queries as f64,
        rc("NOERROR") + rc("NXDOMAIN") + rc("REFUSED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_and_the_targets_memory_per_connection_measured() {
    let (addr, seen) = server(|_| Duration::ZERO).await;
    let s = Scenario::parse(
        "name = \"idle\"\nhostnames = 20\nduration = \"3s\"\nwarmup = \"1s\"\n[idle]\nconnections = 300\nrequest_every = \"1s\"\n",
    )
    .unwrap();
    let r = skein_bench::run(&s, &target(addr)).await.unwrap();
    // 300 connections, opened once and kept: each sent one request a second.
    assert_eq!(seen.connections.load(Ordering::Relaxed), 300);
    assert_eq!(r.connections, 300);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // Three each in 3 s (a connection opened late under load may miss its
    // last one, never sends more).
    let total = seen.requests.load(Ordering::Relaxed);
    assert!((700..=900).contains(&total), "{total} requests");
    // The server is this process (so its client side counts too): holding
    // 300 TLS connections grew it.
    let kib = r.kib_per_conn.unwrap();
    assert!(kib > 1.0 && kib < 1024.0, "{kib} KiB per connection");
}
