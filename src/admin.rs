//! The admin listener: the catalog API under `/v1` (bearer token), and the
//! unauthenticated `/metrics`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use skein_catalog::Store;
use skein_catalog::sources::api::{self, Api};

/// What `/readyz` answers from.
#[derive(Default)]
pub struct Readiness {
    /// The catalog was loaded at start.
    pub loaded: AtomicBool,
    /// A shutdown began: stop sending traffic here.
    pub draining: AtomicBool,
    /// How this host stands with etcd, when it uses etcd.
    pub etcd: std::sync::OnceLock<Arc<skein_catalog::sources::etcd::Status>>,
    /// How this host stands with Kubernetes, when it follows a cluster.
    pub kubernetes: std::sync::OnceLock<Arc<skein_catalog::sources::kubernetes::KubeStatus>>,
}

#[derive(Clone)]
struct Health {
    ready: Arc<Readiness>,
    store: Arc<Store>,
    prom: crate::telemetry::MetricsHandle,
}

/// The admin router.
pub fn router(
    api: Api,
    body_limit: usize,
    ready: Arc<Readiness>,
    prom: crate::telemetry::MetricsHandle,
    acme: Arc<skein_acme::AcmeStatus>,
) -> Router {
    let health = Health {
        ready,
        store: api.store.clone(),
        prom,
    };
    let open = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    // What the ACME client is doing, behind the same token as the catalog.
    let acme = Router::new()
        .route(
            "/v1/acme",
            get(move || {
                let acme = acme.clone();
                async move { axum::Json(acme.report()) }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(api.clone(), api::auth));
    open.merge(acme).merge(api::router(api, body_limit))
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        h.prom.render(),
    )
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let version = h.store.snapshot().version;
    if h.ready.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
    } else if !h.ready.loaded.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "catalog not loaded\n".to_string(),
        )
    } else {
        // Losing etcd does not make a host unready: it serves the catalog it
        // has (withdrawing every edge at once when etcd fails would turn an
        // etcd outage into a platform outage). It says so here and in metrics.
        let etcd = h
            .ready
            .etcd
            .get()
            .map(|s| format!("{}\n", s.line()))
            .unwrap_or_default();
        let kube = h
            .ready
            .kubernetes
            .get()
            .map(|s| format!("{}\n", s.line()))
            .unwrap_or_default();
        (
            StatusCode::OK,
            format!("ready: catalog version {version}\n{etcd}{kube}"),
        )
    }
}
