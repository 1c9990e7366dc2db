//! The Kubernetes source against an API server that speaks list and watch over
//! HTTP with real Kubernetes JSON (k8s-openapi objects), including a watch the
//! server ends with 410 Gone: no Kubernetes API server can run on this machine,
//! so this local one stands in for it (see the README).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodIP, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use skein_catalog::error::parse_toml;
use skein_catalog::model::{ConcurrencyKind, Handler, K8sService, K8sServiceKind};
use skein_catalog::sources::kubernetes::{KubeConfig, KubeSource, KubeStatus};
use skein_catalog::{Source, Store};
use skein_testkit::kube::Fake;
use std::sync::Arc;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32, i32)]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: (cluster_ip != "None").then(|| vec![cluster_ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, t)| ServicePort {
                        name: Some(n.to_string()),
                        port: *p,
                        target_port: Some(IntOrString::Int(*t)),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn external(ns: &str, name: &str, target: &str) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(target.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A slice for `svc` with endpoints (pod, address, hostname, ready).
fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    eps: &[(&str, &str, Option<&str>, Option<bool>)],
) -> EndpointSlice {
    let mut m = meta(ns, name);
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_string(),
        svc.to_string(),
    )]));
    EndpointSlice {
        metadata: m,
        address_type: "IPv6".into(),
        endpoints: eps
            .iter()
            .map(|(pod, addr, host, ready)| Endpoint {
                addresses: vec![addr.to_string()],
                hostname: host.map(str::to_string),
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..Default::default()
                }),
                target_ref: (!pod.is_empty()).then(|| ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod.to_string()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: None,
    }
}

/// The platform: a network for the cluster, its pods as machines (m1 is pod
/// pg-0, m2 is reached by address only).
const PLATFORM: &str = r#"
regions = [{ code = "ams" }]
hosts = [{ id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" }]
networks = [{ id = "0:18", name = "k8s" }]
apps = [{ name = "pods", network = "k8s" }]
[[machines]]
id = "m1"
app = "pods"
region = "ams"
host = "0:2"
state = "started"
address = "fdaa:0:18:0:2:0:1:0"
metadata = { pod = "pg-0", namespace = "data" }
[[machines]]
id = "m2"
app = "pods"
region = "ams"
host = "0:2"
state = "started"
address = "fdaa:0:18:0:2:0:2:0"
"#;

async fn until(what: &str, store: &Store, f: impl Fn(&BTreeMap<String, K8sService>) -> bool) {
    let t = Instant::now();
    loop {
        let snap = store.snapshot();
        let services: BTreeMap<String, K8sService> = snap
            .catalog
            .k8s_services
            .iter()
            .map(|(k, v)| (k.to_string(), (**v).clone()))
            .collect();
        if f(&services) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: not after 20 s; services: {services:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoints_follow_the_cluster_through_410_gone() {
    let fake = Fake::new();
    fake.put(
        "services",
        service("default", "web", "fdaa:0:18:0:1::10", &[("http", 80, 8080)]),
    );
    fake.put(
        "services",
        service("data", "pg", "None", &[("pg", 5432, 5432)]),
    );
    fake.put("services", external("default", "ext", "example.org"));
    fake.put(
        "endpointslices",
        slice(
            "data",
            "pg-abc",
            "pg",
            &[
                ("pg-0", "fdaa:0:18:0:2:0:1:0", Some("pg-0"), Some(true)),
                ("", "fdaa:0:18:0:2:0:2:0", None, None),
                ("ghost", "fdaa:0:18:0:2:0:9:0", None, Some(true)),
            ],
        ),
    );
    let addr = fake.clone().serve().await;

    let store = Arc::new(Store::new());
    store
        .replace(Source::File, parse_toml(PLATFORM).unwrap())
        .unwrap();
    let cfg = KubeConfig {
        enabled: true,
        api: Some(format!("http://{addr}")),
        network: "k8s".into(),
        ..Default::default()
    };
    assert!(cfg.problems().is_empty());
    let status = Arc::new(KubeStatus::default());
    let source = KubeSource::new(
        cfg.client().await.unwrap(),
        cfg,
        store.clone(),
        status.clone(),
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(source.run(stop_rx));

    // The first list: every kind of service, endpoints mapped to machines by
    // pod and by address, the one with no machine left out.
    until("the first list", &store, |s| s.len() == 3).await;
    let snap = store.snapshot();
    let get = |k: &str| {
        snap.catalog
            .k8s_services
            .iter()
            .find(|(key, _)| key.to_string() == k)
            .map(|(_, v)| (**v).clone())
            .unwrap()
    };
    let web = get("default/web");
    assert_eq!(web.kind, K8sServiceKind::ClusterIp);
    assert_eq!(web.cluster_ip, Some("fdaa:0:18:0:1::10".parse().unwrap()));
    assert_eq!(web.network, "k8s");
    assert_eq!(web.ports[0].name.as_deref(), Some("http"));
    assert_eq!(web.ports[0].target_port, Some(8080));
    let pg = get("data/pg");
    assert_eq!(pg.kind, K8sServiceKind::Headless);
    let eps: Vec<(String, Option<String>, bool)> = pg
        .endpoints
        .iter()
        .map(|e| (e.machine.clone(), e.hostname.clone(), e.ready))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("m1".to_string(), Some("pg-0".to_string()), true),
            ("m2".to_string(), None, true),
        ]
    );
    assert_eq!(status.unmapped(), 1);
    let ext = get("default/ext");
    assert_eq!(ext.kind, K8sServiceKind::ExternalName);
    assert_eq!(ext.external_name.as_deref(), Some("example.org"));
    assert!(status.synced());

    // Watch events: a new service, an endpoint that stops being ready.
    fake.put(
        "services",
        service(
            "default",
            "api",
            "fdaa:0:18:0:1::11",
            &[("grpc", 9000, 9000)],
        ),
    );
    fake.put(
        "endpointslices",
        slice(
            "data",
            "pg-abc",
            "pg",
            &[
                ("pg-0", "fdaa:0:18:0:2:0:1:0", Some("pg-0"), Some(false)),
                ("", "fdaa:0:18:0:2:0:2:0", None, None),
            ],
        ),
    );
    until("watched changes", &store, |s| {
        s.contains_key("default/api")
            && s["data/pg"]
                .endpoints
                .iter()
                .any(|e| e.machine == "m1" && !e.ready)
    })
    .await;
    assert_eq!(status.relists(), 0);

    // The history is compacted while the watches are cut, and "ext" goes in
    // the gap: the watchers come back, get 410 Gone, list again, and the
    // catalog loses "ext" although no watch ever said so.
    fake.compact_and_cut(|o| {
        o.items
            .retain(|(r, ns, n), _| !(r == "services" && ns == "default" && n == "ext"));
    });
    until("a relist after 410 Gone", &store, |s| {
        !s.contains_key("default/ext")
    })
    .await;
    assert!(status.relists() >= 1, "{}", status.line());
    // And watching goes on from the new list.
    fake.delete("services", "default", "api");
    until("a watch after the relist", &store, |s| {
        !s.contains_key("default/api")
    })
    .await;

    // A service the catalog refuses (its ClusterIP is no flycast address of
    // the network) is held back alone.
    fake.put(
        "services",
        service("default", "bad", "fdaa:0:18:0:2::5", &[("http", 80, 80)]),
    );
    fake.put(
        "services",
        service("default", "good", "fdaa:0:18:0:1::12", &[("http", 80, 80)]),
    );
    until("the good service alone", &store, |s| {
        s.contains_key("default/good") && !s.contains_key("default/bad")
    })
    .await;
    let held = status.held();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        held[0].contains("default/bad") && held[0].contains("flycast"),
        "{held:?}"
    );
    assert!(status.line().contains("1 service(s) held back"));

    // A machine that arrives later is placed in the endpoints it is.
    let mut doc: skein_catalog::Document = parse_toml(PLATFORM).unwrap();
    let mut m3 = doc.machines[1].clone();
    m3.id = "m3".into();
    m3.address = Some("fdaa:0:18:0:2:0:9:0".parse().unwrap());
    doc.machines.push(m3);
    fake.put(
        "endpointslices",
        slice(
            "data",
            "pg-def",
            "pg",
            &[("ghost", "fdaa:0:18:0:2:0:9:0", None, Some(true))],
        ),
    );
    store.replace(Source::File, doc).unwrap();
    until("the late machine", &store, |s| {
        s["data/pg"].endpoints.iter().any(|e| e.machine == "m3")
    })
    .await;

    // Annotated Services are exposed through the proxy: an app whose machines
    // are the Service's endpoints. Wrong annotations are named; the Service
    // itself still answers in DNS.
    let annotated = |name: &str, ip: &str, port: (&str, i32, i32), ann: &[(&str, &str)]| {
        let mut s = service("default", name, ip, &[port]);
        s.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| (format!("service.skein.dev/{k}"), v.to_string()))
                .collect(),
        );
        s
    };
    fake.put(
        "services",
        annotated(
            "shop",
            "fdaa:0:18:0:1::13",
            ("https", 443, 8443),
            &[
                ("hostnames", "Shop.example.com, www.shop.example.com"),
                ("ports", "443:tls+http,80:http"),
                ("force-https", "true"),
                ("concurrency", "requests"),
                ("soft-limit", "5"),
                ("hard-limit", "10"),
            ],
        ),
    );
    fake.put(
        "services",
        annotated(
            "oops",
            "fdaa:0:18:0:1::14",
            ("http", 80, 80),
            &[("hostnames", "oops.example.com"), ("soft-limit", "lots")],
        ),
    );
    until("the annotated services", &store, |s| {
        s.contains_key("default/shop") && s.contains_key("default/oops")
    })
    .await;
    let t = Instant::now();
    while !store.snapshot().catalog.apps.contains_key("shop-default") || status.held().len() != 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", status.held());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = store.snapshot();
    let shop = &snap.catalog.apps["shop-default"];
    assert_eq!(shop.hostnames, ["shop.example.com", "www.shop.example.com"]);
    assert_eq!(shop.network, "k8s");
    assert_eq!(shop.k8s_service.as_deref(), Some("default/shop"));
    let svc = &shop.services[0];
    assert_eq!(svc.internal_port, 8443);
    assert_eq!(svc.concurrency.kind, ConcurrencyKind::Requests);
    assert_eq!(
        (svc.concurrency.soft_limit, svc.concurrency.hard_limit),
        (5, 10)
    );
    assert_eq!(svc.ports[0].handlers, [Handler::Tls, Handler::Http]);
    assert!(!svc.ports[0].force_https && svc.ports[1].force_https);
    assert!(!snap.catalog.apps.contains_key("oops-default"));
    let held = status.held();
    assert!(
        held.iter().any(|h| h.contains("default/oops")
            && h.contains("service.skein.dev/soft-limit")
            && h.contains("lots")),
        "{held:?}"
    );

    // An IPv4 slice: its endpoints find their machines through the Pods, by
    // the machine a Pod names or by the Pod's IPv6 address.
    let pod = |name: &str, ips: &[&str], machine: Option<&str>| {
        let mut m = meta("default", name);
        m.annotations = machine
            .map(|id| BTreeMap::from([("service.skein.dev/machine".to_string(), id.to_string())]));
        Pod {
            metadata: m,
            status: Some(PodStatus {
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    fake.put(
        "pods",
        pod("web-1", &["10.1.2.3", "fdaa:0:18:0:2:0:2:0"], None),
    );
    fake.put("pods", pod("job-1", &["10.1.2.4"], Some("m1")));
    fake.put(
        "services",
        service("default", "v4", "fdaa:0:18:0:1::15", &[("http", 80, 80)]),
    );
    let mut v4 = slice(
        "default",
        "v4-abc",
        "v4",
        &[
            ("web-1", "10.1.2.3", None, Some(true)),
            ("job-1", "10.1.2.4", None, Some(true)),
        ],
    );
    v4.address_type = "IPv4".into();
    fake.put("endpointslices", v4);
    until("endpoints found through their pods", &store, |s| {
        s.get("default/v4").is_some_and(|v| {
            v.endpoints
                .iter()
                .map(|e| e.machine.as_str())
                .collect::<Vec<_>>()
                == ["m1", "m2"]
        })
    })
    .await;

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
