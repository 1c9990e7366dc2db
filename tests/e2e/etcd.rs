//! Daemons sharing the catalog through a real three-member etcd cluster: the
//! operator loads records with `skein etcd load`, a worker publishes its
//! machines, an edge sees them; a member stops; the worker's daemon is killed.

use std::path::Path;
use std::time::{Duration, Instant};

use skein_testkit::etcd::{Cluster, require_etcd};

use crate::support::*;

const BASIC: &str = include_str!("../../catalog/tests/fixtures/basic.toml");

/// The fixture without machines and Services: what operators keep in etcd.
fn operator_records() -> String {
    let cut = BASIC.find("[[machines]]").unwrap();
    BASIC[..cut].to_string()
}

/// The fixture's machine on host ams1 (a7b:7d), m1: what the worker runs.
fn worker_machines() -> String {
    let from = BASIC.find("[[machines]]").unwrap();
    let len = BASIC[from + 1..].find("[[machines]]").unwrap() + 1;
    BASIC[from..from + len].to_string()
}

fn setup(dir: &Path, port: u16, endpoints: &[String], name: Option<&str>, catalog: Option<&str>) {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let mut cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n[state]\ndir = \"{}\"\n[shutdown]\ndrain_timeout = \"1s\"\n[etcd]\nendpoints = [{}]\nlease_ttl = \"2s\"\nconnect_timeout = \"500ms\"\n",
        dir.join("state").display(),
        eps.join(", ")
    );
    if let Some(name) = name {
        cfg.push_str(&format!("[host]\nname = \"{name}\"\n"));
    }
    if let Some(doc) = catalog {
        std::fs::write(dir.join("catalog.toml"), doc).unwrap();
        cfg.push_str("[catalog]\nfile = \"catalog.toml\"\n");
    }
    std::fs::write(dir.join("skein.toml"), cfg).unwrap();
}

/// The machines a daemon's catalog has, each with the source that owns it.
fn machines(d: &Daemon) -> Vec<(String, String)> {
    let (st, v) = d.api("GET", "/v1/machines", None);
    assert_eq!(st, 200, "{v}");
    let ids: Vec<String> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<(String, String)> = ids
        .into_iter()
        .map(|id| {
            let (_, one) = d.api("GET", &format!("/v1/machines/{id}"), None);
            (id, one["source"].as_str().unwrap_or("").to_string())
        })
        .collect();
    out.sort();
    out
}

fn readyz(d: &Daemon) -> (u16, String) {
    http(&d.admin, "GET", "/readyz", None, None).unwrap()
}

fn within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ok() {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

#[test]
fn a_killed_workers_machines_leave_the_edge_within_the_lease_ttl() {
    if !require_etcd("a_killed_workers_machines_leave_the_edge_within_the_lease_ttl") {
        return;
    }
    let mut cluster = Cluster::start(3);
    let eps = cluster.endpoints();

    // The operator loads the shared records.
    let ops = tempfile::tempdir().unwrap();
    std::fs::write(ops.path().join("records.toml"), operator_records()).unwrap();
    let out = skein()
        .args(["etcd", "--endpoints", &eps.join(","), "load"])
        .arg(ops.path().join("records.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("records written"));
    // Machines are not the operator's to load.
    std::fs::write(ops.path().join("bad.toml"), BASIC).unwrap();
    let out = skein()
        .args(["etcd", "--endpoints", &eps.join(","), "load"])
        .arg(ops.path().join("bad.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("published by the worker"));

    let (wdir, edir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (wport, eport) = (
        skein_testkit::free_tcp_port(),
        skein_testkit::free_tcp_port(),
    );
    setup(
        wdir.path(),
        wport,
        &eps,
        Some("ams1"),
        Some(&worker_machines()),
    );
    setup(edir.path(), eport, &eps, None, None);
    let worker = Daemon::start(wdir.path(), wport);
    let edge = Daemon::start(edir.path(), eport);

    let from_etcd = |ids: &[&str]| -> Vec<(String, String)> {
        ids.iter()
            .map(|i| (i.to_string(), "etcd".to_string()))
            .collect()
    };
    within(
        "the edge sees the worker's machine",
        Duration::from_secs(10),
        || machines(&edge) == from_etcd(&["m1"]),
    );
    let (st, text) = readyz(&edge);
    assert_eq!(st, 200);
    assert!(text.contains("etcd: watching"), "{text}");

    // A member stops: a machine added on the worker still reaches the edge.
    cluster.stop(0);
    let (st, v) = worker.api(
        "PUT",
        "/v1/machines/m5",
        Some(r#"{"id":"m5","app":"web","region":"ams","host":"a7b:7d","state":"started"}"#),
    );
    assert_eq!(st, 200, "{v}");
    within(
        "the new machine reaches the edge",
        Duration::from_secs(10),
        || machines(&edge) == from_etcd(&["m1", "m5"]),
    );

    // The worker's daemon dies without a word.
    drop(worker);
    let took = within(
        "the dead worker's machines leave the edge",
        Duration::from_secs(2 * 2 + 3),
        || machines(&edge).is_empty(),
    );
    println!("machines gone from the edge {took:?} after SIGKILL (lease TTL 2s)");

    // etcd goes away entirely: the edge stays ready and says so.
    cluster.stop(1);
    cluster.stop(2);
    within("the edge notices", Duration::from_secs(15), || {
        readyz(&edge).1.contains("disconnected")
    });
    let (st, text) = readyz(&edge);
    assert_eq!(st, 200, "{text}");
    assert!(
        text.contains("serving the catalog as of revision"),
        "{text}"
    );
    let (_, v) = edge.api("GET", "/v1/apps/web", None);
    assert_eq!(v["source"], "etcd");
}
