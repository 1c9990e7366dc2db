//! The daemon following a Kubernetes cluster (the local list/watch API server
//! of `skein_testkit::kube`: no real API server can run here): a Service
//! annotated `service.skein.dev/hostnames` is served by the proxy, from the
//! pod its EndpointSlice names, and leaves routing when the pod is not ready.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use skein_testkit::kube::Fake;

use crate::support::*;

/// `GET /` through the proxy for `host`: (status, body).
fn get(proxy: u16, host: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", proxy)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    response(&out)
}

fn slice(ready: bool) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "shop-abc",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "shop"},
        },
        "addressType": "IPv6",
        "endpoints": [{
            "addresses": ["fdaa:0:18:0:2:0:1:0"],
            "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": "shop-0", "namespace": "default"},
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

#[test]
fn an_annotated_service_is_served_by_the_proxy_from_its_ready_pods() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = Fake::new();
    let api = rt.block_on(fake.clone().serve());
    fake.put(
        "services",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "shop",
                "namespace": "default",
                "annotations": {
                    "service.skein.dev/hostnames": "shop.example.com",
                    "service.skein.dev/ports": "8080:http",
                },
            },
            "spec": {
                "clusterIP": "fdaa:0:18:0:1::10",
                "clusterIPs": ["fdaa:0:18:0:1::10"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }),
    );
    fake.put("endpointslices", slice(true));

    let pod = http_backend("shop-0 ok");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("catalog.toml"),
        format!(
            r#"
regions = [{{ code = "ams" }}]
hosts = [{{ id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" }}]
networks = [{{ id = "0:18", name = "k8s" }}]
apps = [{{ name = "pods", network = "k8s" }}]
[[machines]]
id = "p1"
app = "pods"
region = "ams"
host = "0:2"
state = "started"
endpoint = "127.0.0.1:{pod}"
metadata = {{ pod = "shop-0", namespace = "default" }}
"#
        ),
    )
    .unwrap();
    let (admin, proxy) = (
        skein_testkit::free_tcp_port(),
        skein_testkit::free_tcp_port(),
    );
    std::fs::write(
        dir.path().join("skein.toml"),
        format!(
            r#"
[admin]
listen = "127.0.0.1:{admin}"
[state]
dir = "{state}"
[catalog]
file = "catalog.toml"
[shutdown]
drain_timeout = "1s"
[host]
region = "ams"
[proxy]
enabled = true
threads = 1
listeners = [{{ bind = "127.0.0.1:{proxy}", port = 8080 }}]
[kubernetes]
enabled = true
api = "http://{api}"
network = "k8s"
"#,
            state = dir.path().join("state").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), admin);

    let waited = |what: &str, want: u16| {
        let t = std::time::Instant::now();
        loop {
            let (status, body) = get(proxy, "shop.example.com");
            if status == want {
                return body;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "{what}: got {status} {body:?}; log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let body = waited("the exposed service", 200);
    assert_eq!(body, "shop-0 ok");
    let (_, ready) = http(&d.admin, "GET", "/readyz", None, None).unwrap();
    assert!(ready.contains("kubernetes: synced"), "{ready}");

    // The pod stops being ready: the proxy has no machine for the app.
    fake.put("endpointslices", slice(false));
    waited("the pod leaving", 503);
    // And ready again.
    fake.put("endpointslices", slice(true));
    waited("the pod back", 200);
    drop(d);
    drop(rt);
}
