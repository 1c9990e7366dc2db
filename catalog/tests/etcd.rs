//! Hosts sharing one catalog through a real three-member etcd cluster on
//! loopback: workers publish their machines under leases, every host follows
//! the prefix, members stop, the network between a host and etcd is cut,
//! history is compacted, bad records arrive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use skein_catalog::error::parse_toml;
use skein_catalog::model::{App, Machine};
use skein_catalog::sources::etcd::follow::Follower;
use skein_catalog::sources::etcd::publish::Publisher;
use skein_catalog::sources::etcd::{self, EtcdConfig, Status};
use skein_catalog::{Document, Kind, Source, Store};
use skein_testkit::etcd::{Cluster, Gate, require_etcd};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const BASIC: &str = include_str!("fixtures/basic.toml");
const TTL: Duration = Duration::from_secs(2);

fn fixture() -> Document {
    parse_toml(BASIC).unwrap()
}

fn config(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        lease_ttl: TTL,
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

/// The operators' records of the fixture (everything but machines), in etcd.
async fn load_operator_records(cluster: &Cluster) {
    let mut doc = fixture();
    // The fixture's Service names machines that the workers publish; it has
    // a test of its own below.
    doc.machines.clear();
    doc.k8s_services.clear();
    let cfg = config(cluster.endpoints());
    let recs = etcd::operator_records(&cfg.layout(), &doc).unwrap();
    let conn = cfg.client().connect().await.unwrap();
    etcd::put_records(&conn, recs).await.unwrap();
}

fn machine(id: &str, host: &str) -> Machine {
    let mut m = fixture().machines[0].clone();
    m.id = id.into();
    m.address = None;
    if host == "iad1" {
        m.host = fixture().hosts[1].id;
        m.region = "iad".into();
    }
    m
}

fn app(name: &str) -> App {
    let mut a = fixture().apps[0].clone();
    a.name = name.into();
    a.hostnames = vec![format!("{name}.example.com")];
    a.flycast = None;
    a
}

/// One host: its store, fed by etcd, with machines of its own in its local
/// (API) layer that it publishes when it has a name.
struct Host {
    store: Arc<Store>,
    status: Arc<Status>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Host {
    async fn start(cfg: &EtcdConfig, name: Option<&str>, local: Vec<Machine>) -> Host {
        let store = Arc::new(Store::new());
        let status = Arc::new(Status::default());
        let mut follower = Follower::new(
            cfg.client(),
            cfg.layout(),
            store.clone(),
            name.map(String::from),
            status.clone(),
        );
        follower.load().await.unwrap();
        let doc = Document {
            machines: local,
            ..Default::default()
        };
        store.replace(Source::Api, doc).unwrap();
        let (stop, rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(follower.run(rx.clone()))];
        if let Some(name) = name {
            let p = Publisher::new(
                cfg.client(),
                cfg.layout(),
                store.clone(),
                name.into(),
                cfg.lease_ttl,
                status.clone(),
            );
            tasks.push(tokio::spawn(p.run(rx)));
        }
        Host {
            store,
            status,
            stop,
            tasks,
        }
    }

    fn machines(&self) -> Vec<String> {
        self.store
            .snapshot()
            .catalog
            .machines
            .keys()
            .cloned()
            .collect()
    }

    fn apps(&self) -> Vec<String> {
        self.store.snapshot().catalog.apps.keys().cloned().collect()
    }

    fn add_local(&self, m: Machine) {
        self.store
            .write::<()>(
                Source::Api,
                |d| {
                    d.machines.push(m);
                    Ok(())
                },
                |_, _| Ok(()),
            )
            .unwrap();
    }

    /// The process dies: no goodbye to etcd, connections just close.
    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Waits up to `limit` for `f`; panics naming `what`. Returns the time taken.
async fn until(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_cross_hosts_and_a_dead_workers_leave_within_the_ttl() {
    if !require_etcd("machines_cross_hosts_and_a_dead_workers_leave_within_the_ttl") {
        return;
    }
    let cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let cfg = config(cluster.endpoints());

    let ams = Host::start(
        &cfg,
        Some("ams1"),
        vec![machine("m1", "ams1"), machine("m2", "ams1")],
    )
    .await;
    let iad = Host::start(&cfg, Some("iad1"), vec![machine("m3", "iad1")]).await;
    let edge = Host::start(&cfg, None, vec![]).await;

    let all = ids(&["m1", "m2", "m3"]);
    until(
        "every host sees every machine",
        Duration::from_secs(10),
        || ams.machines() == all && iad.machines() == all && edge.machines() == all,
    )
    .await;
    // The address a worker's catalog gave its machine is the one everyone uses.
    let a = ams.store.snapshot().catalog.machines["m1"].address;
    assert!(a.is_some());
    assert_eq!(edge.store.snapshot().catalog.machines["m1"].address, a);
    assert_eq!(
        edge.store.snapshot().catalog.owners[&(Kind::Machines, "m1".to_string())],
        Source::Etcd
    );

    // A machine started on a worker reaches the others.
    iad.add_local(machine("m4", "iad1"));
    until(
        "a new machine reaches the edge",
        Duration::from_secs(5),
        || edge.machines().contains(&"m4".to_string()),
    )
    .await;

    // The ams worker dies. Its machines leave the others within the lease TTL
    // (plus the renewal it may just have made and the time to apply).
    ams.kill();
    let took = until(
        "a dead worker's machines leave",
        TTL * 2 + Duration::from_secs(3),
        || edge.machines() == ids(&["m3", "m4"]) && iad.machines() == ids(&["m3", "m4"]),
    )
    .await;
    println!("dead worker's machines gone after {took:?} (TTL {TTL:?})");

    // The live worker keeps renewing: its machines stay over several TTLs.
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(edge.machines(), ids(&["m3", "m4"]));
    assert!(iad.status.leased());
    assert!(edge.status.connected());
    assert!(
        edge.status.quarantine().is_empty(),
        "{:?}",
        edge.status.quarantine()
    );
    iad.stop().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_stopped_nothing_stops() {
    if !require_etcd("with_one_member_stopped_nothing_stops") {
        return;
    }
    let mut cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let cfg = config(cluster.endpoints());
    let ams = Host::start(&cfg, Some("ams1"), vec![machine("m1", "ams1")]).await;
    let edge = Host::start(&cfg, None, vec![]).await;
    until("the edge sees m1", Duration::from_secs(10), || {
        edge.machines() == ids(&["m1"])
    })
    .await;

    // Both are connected to the first member: stop it.
    cluster.stop(0);
    let put = cluster.ctl_at(
        &[cluster.endpoint(1)],
        &[
            "put",
            "/skein/records/apps/late",
            &serde_json::to_string(&app("late")).unwrap(),
        ],
    );
    assert!(put.status.success(), "{put:?}");
    until(
        "an operator's write reaches the edge",
        Duration::from_secs(10),
        || edge.apps().contains(&"late".to_string()),
    )
    .await;
    ams.add_local(machine("m2", "ams1"));
    until(
        "a worker's new machine reaches the edge",
        Duration::from_secs(10),
        || edge.machines() == ids(&["m1", "m2"]),
    )
    .await;
    // The worker's lease is renewed through another member.
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(edge.machines(), ids(&["m1", "m2"]));
    assert!(edge.status.connected());
    ams.stop().await;
    edge.stop().await;
}

/// Writes through `cluster` member 1: puts of five apps, a change, a delete.
/// Returns the revision of the last write.
async fn seven_writes(cfg: &EtcdConfig) -> i64 {
    let conn = cfg.client().connect().await.unwrap();
    let layout = cfg.layout();
    let mut rev = 0;
    for i in 0..5 {
        let name = format!("a{i}");
        rev = conn
            .put(
                layout.record(Kind::Apps, &name).as_bytes(),
                serde_json::to_vec(&app(&name)).unwrap(),
                0,
            )
            .await
            .unwrap();
    }
    let mut changed = app("a1");
    changed.hostnames = vec!["changed.example.com".into()];
    conn.put(
        layout.record(Kind::Apps, "a1").as_bytes(),
        serde_json::to_vec(&changed).unwrap(),
        0,
    )
    .await
    .unwrap();
    assert_eq!(
        conn.delete(layout.record(Kind::Apps, "a4").as_bytes(), false)
            .await
            .unwrap(),
        1
    );
    rev + 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_host_keeps_serving_and_resumes_without_missing_or_doubling() {
    if !require_etcd("a_cut_host_keeps_serving_and_resumes_without_missing_or_doubling") {
        return;
    }
    let cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let gate = Gate::new(cluster.endpoint(0).trim_start_matches("http://"));
    let host = Host::start(&config(vec![gate.endpoint()]), None, vec![]).await;
    until("watching", Duration::from_secs(5), || {
        host.status.connected()
    })
    .await;
    let before = host.store.snapshot();
    let events = host.status.events();

    gate.cut();
    until("the cut is noticed", Duration::from_secs(10), || {
        !host.status.connected()
    })
    .await;
    let direct = config(vec![cluster.endpoint(1)]);
    seven_writes(&direct).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still serving what it had, and saying why.
    assert_eq!(host.store.snapshot().version, before.version);
    assert_eq!(host.apps(), ids(&["web"]));
    assert!(
        host.status.line().contains("disconnected"),
        "{}",
        host.status.line()
    );

    gate.restore();
    // The status counts a batch after the catalog it made is published: wait
    // for both, or the count can be read between the two.
    until("caught up", Duration::from_secs(15), || {
        host.apps() == ids(&["a0", "a1", "a2", "a3", "web"]) && host.status.events() - events >= 7
    })
    .await;
    let snap = host.store.snapshot();
    assert_eq!(
        snap.catalog.apps["a1"].hostnames,
        vec!["changed.example.com".to_string()]
    );
    // Exactly the seven changes, each once; no full read was needed.
    assert_eq!(host.status.events() - events, 7);
    assert_eq!(host.status.resyncs(), 0);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_resume_point_forces_a_resync_that_converges() {
    if !require_etcd("compaction_past_the_resume_point_forces_a_resync_that_converges") {
        return;
    }
    let cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let gate = Gate::new(cluster.endpoint(0).trim_start_matches("http://"));
    let host = Host::start(&config(vec![gate.endpoint()]), None, vec![]).await;
    until("watching", Duration::from_secs(5), || {
        host.status.connected()
    })
    .await;

    gate.cut();
    until("the cut is noticed", Duration::from_secs(10), || {
        !host.status.connected()
    })
    .await;
    let direct = config(vec![cluster.endpoint(1)]);
    let last = seven_writes(&direct).await;
    // Also delete a record the host had: a resync must notice what vanished.
    let conn = direct.client().connect().await.unwrap();
    conn.delete(b"/skein/records/apps/web", false)
        .await
        .unwrap();
    conn.compact(last + 1).await.unwrap();

    gate.restore();
    until(
        "converged after the resync",
        Duration::from_secs(15),
        || host.apps() == ids(&["a0", "a1", "a2", "a3"]),
    )
    .await;
    assert_eq!(host.status.resyncs(), 1);
    assert!(host.status.connected());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_hosts_keep_serving_then_catch_up() {
    if !require_etcd("without_etcd_hosts_keep_serving_then_catch_up") {
        return;
    }
    let mut cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let cfg = config(cluster.endpoints());
    let ams = Host::start(&cfg, Some("ams1"), vec![machine("m1", "ams1")]).await;
    let edge = Host::start(&cfg, None, vec![]).await;
    until("the edge sees m1", Duration::from_secs(10), || {
        edge.machines() == ids(&["m1"])
    })
    .await;

    for i in 0..3 {
        cluster.stop(i);
    }
    until("the loss is noticed", Duration::from_secs(15), || {
        !edge.status.connected() && !ams.status.leased()
    })
    .await;
    // A machine started while etcd is away is published when it is back.
    ams.add_local(machine("m2", "ams1"));
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(
        edge.machines(),
        ids(&["m1"]),
        "the edge serves what it knew"
    );
    assert!(
        edge.status
            .line()
            .contains("serving the catalog as of revision")
    );

    cluster.start_stopped();
    until("both back", Duration::from_secs(20), || {
        edge.status.connected() && ams.status.leased()
    })
    .await;
    until(
        "the machine started meanwhile arrives",
        Duration::from_secs(10),
        || edge.machines() == ids(&["m1", "m2"]),
    )
    .await;
    ams.stop().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_records_are_held_back_alone_and_admitted_once_valid() {
    if !require_etcd("refused_records_are_held_back_alone_and_admitted_once_valid") {
        return;
    }
    let cluster = Cluster::start(3);
    load_operator_records(&cluster).await;
    let cfg = config(cluster.endpoints());
    let edge = Host::start(&cfg, None, vec![]).await;
    until("watching", Duration::from_secs(5), || {
        edge.status.connected()
    })
    .await;

    let conn = cfg.client().connect().await.unwrap();
    let layout = cfg.layout();
    // Not JSON; a machine of an app nobody defined yet; a good app.
    conn.put(
        layout.record(Kind::Apps, "junk").as_bytes(),
        b"{\"name\":".to_vec(),
        0,
    )
    .await
    .unwrap();
    let mut orphan = machine("m9", "iad1");
    orphan.app = "later".into();
    conn.put(
        layout.machine("iad1", "m9").as_bytes(),
        serde_json::to_vec(&orphan).unwrap(),
        0,
    )
    .await
    .unwrap();
    conn.put(
        layout.record(Kind::Apps, "good").as_bytes(),
        serde_json::to_vec(&app("good")).unwrap(),
        0,
    )
    .await
    .unwrap();
    until(
        "the good record applies alone",
        Duration::from_secs(5),
        || edge.apps() == ids(&["good", "web"]),
    )
    .await;
    let held = edge.status.quarantine();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held.iter()
            .any(|h| h.starts_with("/skein/records/apps/junk:")),
        "{held:?}"
    );
    assert!(
        held.iter()
            .any(|h| h.starts_with("/skein/machines/iad1/m9:") && h.contains("later")),
        "{held:?}"
    );
    assert!(edge.status.line().contains("2 record(s) held back"));

    // The app arrives: the machine is admitted.
    conn.put(
        layout.record(Kind::Apps, "later").as_bytes(),
        serde_json::to_vec(&app("later")).unwrap(),
        0,
    )
    .await
    .unwrap();
    // (the status is set just after the catalog is published)
    until("the orphan is admitted", Duration::from_secs(5), || {
        edge.machines() == ids(&["m9"]) && edge.status.quarantine().len() == 1
    })
    .await;
    assert!(edge.status.quarantine()[0].starts_with("/skein/records/apps/junk:"));
    edge.stop().await;
}
