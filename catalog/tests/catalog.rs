//! The catalog as its users see it: documents in, validated snapshots out, errors
//! with paths, the file source, the admin API over a real socket, SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use skein_catalog::error::parse_toml;
use skein_catalog::model::*;
use skein_catalog::sixpn::{HostId, NetId, SixPn};
use skein_catalog::sources::api::{Api, router};
use skein_catalog::sources::client::{Client, Endpoint};
use skein_catalog::sources::file::FileSource;
use skein_catalog::sources::sqlite::Persist;
use skein_catalog::{Changes, Document, Invalid, Kind, Source, Store};

const BASIC: &str = include_str!("fixtures/basic.toml");

fn basic() -> Document {
    parse_toml(BASIC).unwrap()
}

fn paths(e: &Invalid) -> Vec<String> {
    e.problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_valid_document_becomes_a_snapshot() {
    let store = Store::new();
    let w = store.replace(Source::File, basic()).unwrap();
    assert!(w.changed);
    let snap = store.snapshot();
    assert_eq!(snap.version, 1);
    let cat = &snap.catalog;
    assert_eq!(cat.apps.len(), 1);
    assert_eq!(cat.rtt_ms("iad", "ams"), Some(80));
    // m1 keeps its explicit address; m2 gets the lowest free slot on its host.
    assert_eq!(
        cat.machines["m1"].address.unwrap().to_string(),
        "fdaa:0:18:a7b:7d:f066:b83b:0"
    );
    let m2 = cat.machines["m2"].address.unwrap();
    assert_eq!(
        (m2.net(), m2.host(), m2.machine().0),
        (NetId(0x18), HostId(0x0a7b_007e), 1)
    );
    assert_eq!(cat.owners[&(Kind::Apps, "web".to_string())], Source::File);
    // The same document again is no new version.
    assert!(!store.replace(Source::File, basic()).unwrap().changed);
    assert_eq!(store.snapshot().version, 1);
}

#[test]
fn invalid_documents_are_rejected_whole_with_paths_and_the_old_catalog_stays() {
    let store = Store::new();
    store.replace(Source::File, basic()).unwrap();

    let bad = BASIC.replace(
        "soft_limit = 20, hard_limit = 25",
        "soft_limit = 20, hard_limit = 5",
    );
    let err = store
        .replace(Source::File, parse_toml(&bad).unwrap())
        .unwrap_err();
    assert_eq!(
        paths(&err),
        ["apps[0].services[0].concurrency.hard_limit: 5 is below soft_limit 20"]
    );

    // Unknown references, duplicates and addresses outside their network, all at once.
    let mut doc = basic();
    doc.machines.push(Machine {
        id: "m3".into(),
        app: "nope".into(),
        ..doc.machines[0].clone()
    });
    doc.machines.push(doc.machines[0].clone());
    doc.apps[0].flycast = Some("fdaa:0:19:0:1::5".parse().unwrap());
    doc.apps[0].flycast_from = vec!["nowhere".into()];
    doc.machines[1].address = Some("fdaa:0:99:a7b:7e:0:7:0".parse().unwrap());
    doc.networks.push(Network {
        id: NetId(0x18),
        name: "other".into(),
        org: None,
    });
    let err = store.replace(Source::File, doc).unwrap_err();
    let got = paths(&err);
    let expect = [
        "networks[1].id: 0:18 is also the id of networks[0]",
        "apps[0].flycast: fdaa:0:19:0:1::5 is outside network \"acme\" (fdaa:0:18::/48)",
        "apps[0].flycast_from[0]: unknown network \"nowhere\"",
        "machines[2].app: unknown app \"nope\"",
        "machines[3]: duplicate machine \"m1\", first at machines[0]",
        "machines[1].address: fdaa:0:99:a7b:7e:0:7:0 is outside the app's network fdaa:0:18::/48",
    ];
    for e in expect {
        assert!(got.iter().any(|g| g == e), "missing {e:?} in {got:#?}");
    }
    // Nothing of it was applied.
    let snap = store.snapshot();
    assert_eq!(snap.version, 1);
    assert_eq!(
        snap.catalog.apps["web"].services[0].concurrency.hard_limit,
        25
    );
    assert!(!snap.catalog.machines.contains_key("m3"));
}

#[test]
fn parse_errors_name_the_field() {
    let bad = BASIC.replace("internal_port = 8080", "internal_port = \"http\"");
    let err = parse_toml::<Document>(&bad).unwrap_err();
    assert_eq!(err.problems[0].path, "apps[0].services[0].internal_port");
    let bad = BASIC.replace("name = \"acme\"", "name = \"acme\"\ncolour = \"blue\"");
    let err = parse_toml::<Document>(&bad).unwrap_err();
    assert_eq!(err.problems[0].path, "networks[0].colour");
    assert!(err.problems[0].message.contains("colour"), "{err}");
    let bad = BASIC.replace("id = \"a7b:7d\"", "id = \"xyz:1\"");
    let err = parse_toml::<Document>(&bad).unwrap_err();
    assert_eq!(err.problems[0].path, "hosts[0].id");
}

#[test]
fn handler_and_check_combinations_are_checked() {
    let bad = BASIC
        .replace(
            "handlers = [\"tls\", \"http\"]",
            "handlers = [\"http\", \"tls\"]",
        )
        .replace("timeout = \"2s\"", "timeout = \"20s\"");
    let err = Store::new()
        .replace(Source::File, parse_toml(&bad).unwrap())
        .unwrap_err();
    let got = paths(&err);
    assert!(
        got.contains(
            &"apps[0].services[0].ports[0].handlers: tls must come before http".to_string()
        ),
        "{got:#?}"
    );
    assert!(
        got.contains(
            &"apps[0].services[0].checks[0].timeout: 20s is not shorter than interval 10s"
                .to_string()
        ),
        "{got:#?}"
    );
}

#[test]
fn a_machine_keeps_its_allocated_address_across_changes() {
    let store = Store::new();
    store.replace(Source::File, basic()).unwrap();
    let before = store.snapshot().catalog.machines["m2"].address.unwrap();
    // A new machine on the same host, listed first, does not take m2's slot.
    let mut doc = basic();
    let mut m0 = doc.machines[1].clone();
    m0.id = "a0".into();
    doc.machines.insert(0, m0);
    store.replace(Source::File, doc).unwrap();
    let cat = &store.snapshot().catalog;
    assert_eq!(cat.machines["m2"].address.unwrap(), before);
    assert_ne!(cat.machines["a0"].address.unwrap(), before);
}

#[test]
fn changes_between_versions() {
    let store = Store::new();
    store.replace(Source::File, basic()).unwrap();
    let v1 = store.snapshot();
    let mut doc = basic();
    doc.machines[0].state = MachineState::Stopped;
    doc.machines.remove(1);
    doc.k8s_services.clear();
    doc.apps.push(App {
        name: "api".into(),
        ..doc.apps[0].clone()
    });
    doc.apps[1].hostnames.clear();
    doc.apps[1].flycast = None;
    store.replace(Source::File, doc).unwrap();
    let v2 = store.snapshot();
    let c = Changes::between(&v1, &v2);
    assert_eq!((c.from, c.to), (1, 2));
    assert_eq!(c.kinds[&Kind::Machines].changed, ["m1"]);
    assert_eq!(c.kinds[&Kind::Machines].removed, ["m2"]);
    assert_eq!(c.kinds[&Kind::Apps].added, ["api"]);
    assert_eq!(c.kinds[&Kind::K8sServices].removed, ["default/web"]);
    assert!(!c.kinds.contains_key(&Kind::Hosts));
    // Unchanged records are shared between snapshots, not copied.
    assert!(Arc::ptr_eq(
        &v1.catalog.hosts.values().next().unwrap().clone(),
        v2.catalog.hosts.values().next().unwrap()
    ));
}

#[tokio::test]
async fn subscribers_are_told_of_new_versions() {
    let store = Arc::new(Store::new());
    let mut rx = store.subscribe();
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.replace(Source::File, basic()).unwrap());
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.borrow_and_update().version, 1);
}

/// Each update writes a document whose parts must agree: app `a<N>` with N
/// machines whose ids end in N. A reader that saw a half-applied change would
/// see them disagree, or a version going backwards.
#[test]
fn readers_never_see_a_torn_snapshot() {
    let store = Arc::new(Store::new());
    let base = basic();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut last, mut seen) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let snap = store.snapshot();
                    assert!(
                        snap.version >= last,
                        "version went back from {last} to {}",
                        snap.version
                    );
                    last = snap.version;
                    if snap.version == 0 {
                        continue;
                    }
                    let cat = &snap.catalog;
                    let app = cat
                        .apps
                        .keys()
                        .find(|k| k.starts_with('a'))
                        .expect("an app");
                    let n: usize = app[1..].parse().unwrap();
                    let ms: Vec<_> = cat.machines.values().filter(|m| &m.app == app).collect();
                    assert_eq!(ms.len(), n % 5 + 1, "snapshot {} torn", snap.version);
                    assert!(
                        ms.iter().all(|m| m.id.ends_with(&format!("x{n}"))),
                        "snapshot {} torn",
                        snap.version
                    );
                    assert_eq!(cat.machines.len(), ms.len());
                    seen += 1;
                }
                seen
            })
        })
        .collect();
    for n in 0..10_000usize {
        let mut doc = Document {
            regions: base.regions.clone(),
            hosts: base.hosts.clone(),
            networks: base.networks.clone(),
            ..Default::default()
        };
        let mut app = base.apps[0].clone();
        app.name = format!("a{n}");
        app.hostnames = vec![format!("a{n}.example.com")];
        doc.apps.push(app);
        for i in 0..=(n % 5) {
            let mut m = base.machines[1].clone();
            m.id = format!("m{i}x{n}");
            m.app = format!("a{n}");
            doc.machines.push(m);
        }
        store.replace(Source::File, doc).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let seen: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(store.snapshot().version, 10_000);
    assert!(seen > 0);
}

#[test]
fn the_file_source_reloads_on_change_and_keeps_the_old_catalog_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, BASIC).unwrap();
    let store = Arc::new(Store::new());
    let src = FileSource::new(path.clone(), store.clone());
    assert!(src.reload(false).unwrap().is_some());
    assert!(
        src.reload(false).unwrap().is_none(),
        "unchanged file is not reapplied"
    );

    std::fs::write(&path, BASIC.replace("web.example.com", "www.example.com")).unwrap();
    src.reload(false).unwrap();
    assert_eq!(
        store.snapshot().catalog.apps["web"].hostnames,
        ["www.example.com"]
    );

    std::fs::write(
        &path,
        BASIC.replace(
            "network = \"acme\"\nhostnames",
            "network = \"nope\"\nhostnames",
        ),
    )
    .unwrap();
    let err = src.reload(false).unwrap_err();
    assert_eq!(paths(&err), ["apps[0].network: unknown network \"nope\""]);
    assert_eq!(
        store.snapshot().catalog.apps["web"].hostnames,
        ["www.example.com"]
    );
    assert_eq!(store.snapshot().version, 2);
}

#[tokio::test]
async fn the_file_watcher_picks_up_a_change_by_itself_and_on_hup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, BASIC).unwrap();
    let store = Arc::new(Store::new());
    let src = Arc::new(FileSource::new(path.clone(), store.clone()));
    let hup = Arc::new(tokio::sync::Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(src.clone().watch(
        Duration::from_millis(50),
        hup.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut rx = store.subscribe();
    let wait_for = |rx: &mut tokio::sync::watch::Receiver<Arc<skein_catalog::Snapshot>>,
                    host: &'static str| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|s| {
                    s.catalog
                        .apps
                        .get("web")
                        .is_some_and(|a| a.hostnames[0] == host)
                }),
            )
            .await
            .expect("reload in time")
            .unwrap();
        }
    };
    wait_for(&mut rx, "web.example.com").await;
    std::fs::write(&path, BASIC.replace("web.example.com", "new.example.com")).unwrap();
    wait_for(&mut rx, "new.example.com").await;
    hup.notify_one();
    let _ = stop_tx.send(());
    task.await.unwrap();
}

async fn serve_api(
    store: Arc<Store>,
    persist: Option<Arc<Persist>>,
) -> (Client, tokio::task::JoinHandle<()>) {
    let api = Api {
        store,
        persist,
        token: Arc::from("s3cret"),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router(api, 1 << 20)).await.unwrap();
    });
    (Client::new(Endpoint::Tcp(addr.to_string()), "s3cret"), task)
}

fn body(v: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&v).unwrap())
}

#[tokio::test]
async fn the_admin_api_puts_gets_and_deletes_with_errors_that_name_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::new());
    store.replace(Source::File, basic()).unwrap();
    let persist = Arc::new(Persist::open(&dir.path().join("state.db")).unwrap());
    let (c, _task) = serve_api(store.clone(), Some(persist.clone())).await;

    // No token, no entry.
    let anon = Client::new(c.endpoint().clone(), "wrong");
    let (st, v) = anon.call(Method::GET, "/v1/apps", None).await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");

    // A new app and a machine of it; the machine comes back with its address.
    let app = json!({"name": "api", "network": "acme", "hostnames": ["api.example.com"],
        "services": [{"internal_port": 9000, "ports": [{"port": 443, "handlers": ["tls", "http"]}]}]});
    let (st, v) = c
        .call(Method::PUT, "/v1/apps/api", body(app))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    let m =
        json!({"id": "m9", "app": "api", "region": "ams", "host": "a7b:7d", "state": "started"});
    let (st, v) = c
        .call(Method::PUT, "/v1/machines/m9", body(m))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    let addr: SixPn = v["record"]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        (addr.net(), addr.host()),
        (NetId(0x18), HostId(0x0a7b_007d))
    );
    let (_, v) = c.call(Method::GET, "/v1/machines/m9", None).await.unwrap();
    assert_eq!(v["source"], "api");
    let (_, v) = c.call(Method::GET, "/v1/machines", None).await.unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 3);

    // Invalid: the same path as a file would get, and nothing changes.
    let version = store.snapshot().version;
    let bad = json!({"name": "api", "network": "acme",
        "services": [{"internal_port": 9000, "concurrency": {"soft_limit": 20, "hard_limit": 5}}]});
    let (st, v) = c
        .call(Method::PUT, "/v1/apps/api", body(bad))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        v["problems"][0]["path"],
        "apps[\"api\"].services[0].concurrency.hard_limit"
    );
    assert_eq!(v["problems"][0]["message"], "5 is below soft_limit 20");
    let (st, v) = c
        .call(
            Method::PUT,
            "/v1/apps/api",
            body(json!({"name": "api", "network": 7})),
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["problems"][0]["path"], "network");
    assert_eq!(store.snapshot().version, version);

    // A record of the file is not the API's to change.
    let (st, v) = c.call(Method::DELETE, "/v1/apps/web", None).await.unwrap();
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // Deleting what others refer to is refused with the referring path.
    let (st, v) = c.call(Method::DELETE, "/v1/apps/api", None).await.unwrap();
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["problems"][0]["message"], "unknown app \"api\"");
    let (st, _) = c
        .call(Method::DELETE, "/v1/machines/m9", None)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let (st, _) = c
        .call(Method::DELETE, "/v1/machines/m9", None)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = c.call(Method::GET, "/v1/widgets", None).await.unwrap();
    assert_eq!(st, StatusCode::NOT_FOUND);

    // What the API acknowledged is on disk.
    let stored = persist.load().unwrap();
    assert_eq!(
        stored
            .apps
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["api"]
    );
    assert!(stored.machines.is_empty());
}

#[tokio::test]
async fn kubernetes_services_are_keyed_by_namespace_and_name() {
    let store = Arc::new(Store::new());
    store.replace(Source::File, basic()).unwrap();
    let (c, _task) = serve_api(store.clone(), None).await;
    let svc = json!({"name": "db", "namespace": "prod", "network": "acme", "type": "headless",
        "ports": [{"name": "pg", "port": 5432}], "endpoints": [{"machine": "m1", "hostname": "db-0"}]});
    let (st, v) = c
        .call(Method::PUT, "/v1/k8s_services/prod/db", body(svc))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = c
        .call(Method::GET, "/v1/k8s_services/prod/db", None)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["record"]["endpoints"][0]["hostname"], "db-0");
}
