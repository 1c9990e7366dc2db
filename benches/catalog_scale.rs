//! The catalog at platform scale, through a real etcd: 100,000 machines in
//! 10,000 apps on 100 workers.
//!
//! `cargo bench --bench catalog_scale [-- --machines N --apps N --changes N]`
//! (needs `etcd` from Debian's etcd-server). It measures:
//!
//! 1. the time for a host to read the whole prefix from etcd and build its
//!    catalog, and the memory that takes;
//! 2. the time for the proxy and DNS to build their tables from that catalog;
//! 3. the time from one write to etcd (a machine's health flips) to the proxy
//!    serving a route table that has it, on this "other host": median and p99.
//!
//! Prints a table and writes `target/bench/catalog_scale.json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use skein_catalog::model::Health;
use skein_catalog::sources::etcd::follow::Follower;
use skein_catalog::sources::etcd::wire::{PutRequest, RequestOp, TxnRequest};
use skein_catalog::sources::etcd::{self, EtcdConfig, Status, TXN_OPS};
use skein_catalog::{Kind, Store};
use skein_testkit::etcd::Cluster;

// The daemon's allocator, so that the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

const REGIONS: [&str; 10] = [
    "ams", "iad", "sjc", "nrt", "syd", "gru", "fra", "sin", "ord", "lhr",
];
const HOSTS: usize = 100;
const NETWORKS: usize = 100;

fn machine_json(i: usize, apps: usize, health: &str) -> (String, Vec<u8>) {
    let host = i % HOSTS;
    let region = REGIONS[host % REGIONS.len()];
    let v = json!({
        "id": format!("m{i}"),
        "app": format!("app{}", i % apps),
        "region": region,
        "host": format!("{:x}", 0x100 + host),
        "state": "started",
        "health": health,
        "interface": format!("vm{i}"),
    });
    (format!("h{host}"), serde_json::to_vec(&v).unwrap())
}

fn operator_records(apps: usize) -> serde_json::Value {
    let regions: Vec<_> = REGIONS
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rtt: serde_json::Map<String, serde_json::Value> = REGIONS[i + 1..]
                .iter()
                .enumerate()
                .map(|(j, o)| (o.to_string(), json!(10 * (j + 1))))
                .collect();
            json!({"code": r, "rtt_ms": rtt})
        })
        .collect();
    let hosts: Vec<_> = (0..HOSTS)
        .map(|h| {
            json!({
                "id": format!("{:x}", 0x100 + h),
                "name": format!("h{h}"),
                "region": REGIONS[h % REGIONS.len()],
                "underlay": format!("10.1.{}.{}", h / 250, h % 250 + 1),
                "wireguard": {"public_key": skein_mesh::key::Key::generate().public().to_base64()},
            })
        })
        .collect();
    let networks: Vec<_> = (0..NETWORKS)
        .map(|n| json!({"name": format!("net{n}"), "id": format!("{:x}", 0x10 + n), "org": format!("org{n}")}))
        .collect();
    let apps: Vec<_> = (0..apps)
        .map(|a| {
            json!({
                "name": format!("app{a}"),
                "network": format!("net{}", a % NETWORKS),
                "hostnames": [format!("app{a}.example.com")],
                "services": [{
                    "internal_port": 8080,
                    "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25},
                    "ports": [{"port": 443, "handlers": ["tls", "http"]}, {"port": 80, "handlers": ["http"]}],
                }],
            })
        })
        .collect();
    json!({"regions": regions, "hosts": hosts, "networks": networks, "apps": apps})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let machines = arg("--machines", 100_000);
    let apps = arg("--apps", 10_000);
    let changes = arg("--changes", 200);
    if !skein_testkit::etcd::require_etcd("catalog_scale") {
        return;
    }
    let cluster = Cluster::start(1);
    let cfg = EtcdConfig {
        endpoints: cluster.endpoints(),
        request_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let layout = cfg.layout();
    let conn = cfg.client().connect().await.unwrap();

    // The platform: operators' records, then every worker's machines under
    // its own lease, as the publishers would write them.
    let t = Instant::now();
    let doc: skein_catalog::Document = serde_json::from_value(operator_records(apps)).unwrap();
    let recs = etcd::operator_records(&layout, &doc).unwrap();
    etcd::put_records(&conn, recs).await.unwrap();
    let mut leases = Vec::new();
    for _ in 0..HOSTS {
        leases.push(conn.grant(3600).await.unwrap().0);
    }
    let mut ops: Vec<RequestOp> = Vec::new();
    for i in 0..machines {
        let (host, value) = machine_json(i, apps, "passing");
        ops.push(
            PutRequest {
                key: layout.machine(&host, &format!("m{i}")).into_bytes(),
                value,
                lease: leases[i % HOSTS],
            }
            .into(),
        );
        if ops.len() == TXN_OPS || i + 1 == machines {
            conn.txn(TxnRequest {
                compare: vec![],
                success: std::mem::take(&mut ops),
                failure: vec![],
            })
            .await
            .unwrap();
        }
    }
    let loaded = t.elapsed();
    eprintln!("etcd loaded with {apps} apps and {machines} machines in {loaded:?}");

    // 1. A host that starts: read everything and build the catalog.
    let rss0 = rss_mib();
    let store = Arc::new(Store::new());
    let status = Arc::new(Status::default());
    let mut follower = Follower::new(
        cfg.client(),
        layout.clone(),
        store.clone(),
        None,
        status.clone(),
    );
    let t = Instant::now();
    let keys = follower.load().await.unwrap();
    let catalog_build = t.elapsed();
    let snap = store.snapshot();
    assert_eq!(
        snap.catalog.machines.len(),
        machines,
        "{:?}",
        status.quarantine()
    );
    let rss_catalog = rss_mib() - rss0;
    eprintln!("catalog built in {catalog_build:?}");

    // 2. The planes' tables.
    let proxy = skein_proxy::Proxy::new(skein_proxy::ProxyConfig::default(), "ams").unwrap();
    let t = Instant::now();
    proxy.apply(&snap);
    let proxy_build = t.elapsed();
    let rss_proxy = rss_mib() - rss0 - rss_catalog;
    let dns = skein_dns::Dns::new(skein_dns::DnsConfig::default());
    let t = Instant::now();
    dns.apply(&snap);
    let dns_build = t.elapsed();
    let rss_dns = rss_mib() - rss0 - rss_catalog - rss_proxy;
    // The mesh: what host h0 should hold (peers, its machines' routes).
    let own = skein_mesh::key::Key::generate();
    let t = Instant::now();
    let want = skein_mesh::agent::desired(
        &snap.catalog,
        skein_catalog::sixpn::HostId(0x100),
        &own,
        true,
    );
    let mesh_build = t.elapsed();
    let (mesh_peers, mesh_machines) = (want.peers.len(), want.machines.len());
    drop(want);
    drop(snap);
    eprintln!("tables built: proxy {proxy_build:?}, dns {dns_build:?}");

    // 3. Write to etcd -> a route table with the change, on this host.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(follower.run(stop_rx.clone()));
    tokio::spawn(proxy.clone().follow(store.subscribe(), stop_rx.clone()));
    tokio::spawn(dns.clone().follow(store.subscribe(), stop_rx));
    while !status.connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("following");
    let mut took = Vec::with_capacity(changes);
    for n in 0..changes {
        let i = (n * 7919) % machines;
        let id = format!("m{i}");
        let before = store.snapshot().catalog.machines[&id].health;
        let health = if before == Health::Passing {
            "critical"
        } else {
            "passing"
        };
        let (host, value) = machine_json(i, apps, health);
        let t = Instant::now();
        conn.put(
            layout.machine(&host, &id).as_bytes(),
            value,
            leases[i % HOSTS],
        )
        .await
        .unwrap();
        let version = loop {
            let s = store.snapshot();
            if s.catalog.machines[&id].health != before {
                break s.version;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "change {n} to {id} not seen: {} (health {:?})",
                status.line(),
                s.catalog.machines[&id].health
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        while proxy.routes.load().version < version {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        took.push(t.elapsed());
    }
    let _ = stop.send(true);
    took.sort();
    let (p50, p99, max) = (
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took.last().copied().unwrap_or_default(),
    );

    println!(
        "catalog at scale: {apps} apps, {machines} machines, {HOSTS} hosts, etcd 3.4 (1 member, loopback)"
    );
    println!("| step | time | memory (RSS growth) |");
    println!("|---|---|---|");
    println!(
        "| read {keys} keys from etcd and build the catalog | {:.0} ms | {rss_catalog:.0} MiB |",
        ms(catalog_build)
    );
    println!(
        "| proxy route table | {:.0} ms | {rss_proxy:.0} MiB |",
        ms(proxy_build)
    );
    println!("| DNS views | {:.0} ms | {rss_dns:.0} MiB |", ms(dns_build));
    println!(
        "| mesh desired state of one worker ({mesh_peers} peers, {mesh_machines} machines) | {:.1} ms | |",
        ms(mesh_build)
    );
    println!(
        "| etcd write -> proxy route, {changes} changes | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | |",
        ms(p50),
        ms(p99),
        ms(max)
    );
    let out = json!({
        "apps": apps, "machines": machines, "hosts": HOSTS, "keys": keys,
        "catalog_build_ms": ms(catalog_build), "catalog_rss_mib": rss_catalog,
        "proxy_build_ms": ms(proxy_build), "proxy_rss_mib": rss_proxy,
        "dns_build_ms": ms(dns_build), "dns_rss_mib": rss_dns,
        "mesh_build_ms": ms(mesh_build), "mesh_peers": mesh_peers, "mesh_machines": mesh_machines,
        "write_to_route_ms": {"p50": ms(p50), "p99": ms(p99), "max": ms(max), "n": changes},
        "kinds": Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("catalog_scale.json"),
        serde_json::to_vec_pretty(&out).unwrap(),
    );
}
