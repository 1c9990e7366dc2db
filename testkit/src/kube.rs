//! A stand-in for the Kubernetes API server: list and watch (streamed watch
//! events with resource versions) over HTTP, with real Kubernetes JSON, and a
//! history that can be compacted under open watches to force 410 Gone. No
//! Kubernetes API server can run on this machine; this is what the
//! Kubernetes source is tested against.

// Test support: a broken fixture should stop the test where it broke.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// What the fake API server holds.
#[derive(Default)]
pub struct Objects {
    /// The current resource version.
    pub rv: u64,
    /// Watches from before this resource version get 410 Gone.
    pub compacted: u64,
    /// By (resource, namespace, name).
    pub items: BTreeMap<(String, String, String), Value>,
    /// (resource, resource version, watch event).
    pub history: Vec<(String, u64, Value)>,
}

/// The server: Services, Pods and EndpointSlices, cluster-wide.
#[derive(Clone)]
pub struct Fake {
    objects: Arc<Mutex<Objects>>,
    events: broadcast::Sender<(String, Value)>,
    cut: broadcast::Sender<()>,
}

impl Fake {
    /// An empty cluster.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Fake {
        Fake {
            objects: Arc::default(),
            events: broadcast::channel(1024).0,
            cut: broadcast::channel(4).0,
        }
    }

    fn key(res: &str, v: &Value) -> (String, String, String) {
        let m = &v["metadata"];
        (
            res.to_string(),
            m["namespace"].as_str().unwrap_or("").to_string(),
            m["name"].as_str().unwrap().to_string(),
        )
    }

    /// Creates or replaces an object; watchers see ADDED or MODIFIED.
    pub fn put(&self, res: &str, obj: impl serde::Serialize) {
        let mut v = serde_json::to_value(obj).unwrap();
        let mut o = self.objects.lock().unwrap();
        o.rv += 1;
        v["metadata"]["resourceVersion"] = json!(o.rv.to_string());
        let k = Fake::key(res, &v);
        let kind = if o.items.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        o.items.insert(k, v.clone());
        let ev = json!({"type": kind, "object": v});
        let rv = o.rv;
        o.history.push((res.to_string(), rv, ev.clone()));
        let _ = self.events.send((res.to_string(), ev));
    }

    /// Deletes an object; watchers see DELETED.
    pub fn delete(&self, res: &str, ns: &str, name: &str) {
        let mut o = self.objects.lock().unwrap();
        let Some(mut v) = o.items.remove(&(res.into(), ns.into(), name.into())) else {
            return;
        };
        o.rv += 1;
        v["metadata"]["resourceVersion"] = json!(o.rv.to_string());
        let ev = json!({"type": "DELETED", "object": v});
        let rv = o.rv;
        o.history.push((res.to_string(), rv, ev.clone()));
        let _ = self.events.send((res.to_string(), ev));
    }

    /// The history is compacted and every open watch is ended: a watcher that
    /// comes back with its last resource version gets 410 Gone. `then` runs
    /// in the gap, with no event for anyone to see.
    pub fn compact_and_cut(&self, then: impl FnOnce(&mut Objects)) {
        let mut o = self.objects.lock().unwrap();
        then(&mut o);
        o.rv += 1;
        o.compacted = o.rv;
        o.history.clear();
        let _ = self.cut.send(());
    }

    /// Serves on a loopback port until the runtime ends.
    pub async fn serve(self) -> SocketAddr {
        let app = Router::new()
            .route(
                "/api/v1/services",
                get(|s, q| handle(s, q, "services", "v1", "ServiceList")),
            )
            .route(
                "/api/v1/pods",
                get(|s, q| handle(s, q, "pods", "v1", "PodList")),
            )
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(|s, q| {
                    handle(
                        s,
                        q,
                        "endpointslices",
                        "discovery.k8s.io/v1",
                        "EndpointSliceList",
                    )
                }),
            )
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
}

/// `GET` on a collection: a list, or with `watch=true` a stream of events.
async fn handle(
    State(fake): State<Fake>,
    Query(q): Query<HashMap<String, String>>,
    res: &'static str,
    api_version: &'static str,
    list_kind: &'static str,
) -> axum::response::Response {
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        let o = fake.objects.lock().unwrap();
        let items: Vec<&Value> = o
            .items
            .iter()
            .filter(|((r, _, _), _)| r == res)
            .map(|(_, v)| v)
            .collect();
        let body = json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": o.rv.to_string()},
            "items": items,
        });
        return axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let line = |v: &Value| Ok(Bytes::from(format!("{v}\n")));
    {
        let o = fake.objects.lock().unwrap();
        if from < o.compacted {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", o.compacted),
            }});
            let _ = tx.try_send(line(&gone));
        } else {
            let mut events = fake.events.subscribe();
            let mut cut = fake.cut.subscribe();
            for (r, rv, ev) in &o.history {
                if r == res && *rv > from {
                    let _ = tx.try_send(line(ev));
                }
            }
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = cut.recv() => return,
                        ev = events.recv() => match ev {
                            Ok((r, ev)) if r == res => {
                                if tx.send(line(&ev)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        },
                    }
                }
            });
        }
    }
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}
