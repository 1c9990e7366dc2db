//! The edge proxy plane: TLS termination with certificates chosen by SNI from the
//! live catalog, apps found by Host (or SNI), each request sent to the closest
//! healthy machine with spare capacity.
//!
//! - [`table`]: routing tables derived from a catalog snapshot, swapped whole.
//! - [`load`]: in-flight counters and queues that outlive table swaps.
//! - [`balance`]: the choice of a machine (pure, tested without sockets).
//! - [`tls`]: the certificate store and resolver.
//! - [`upstream`]: connections to machines (pooled HTTP/1.1, shared h2c).
//! - [`http`]: the request path: route, headers, queue, retry, stream back.
//! - [`listener`]: accept, TLS or plaintext, hyper under limits.
//!
//! The hot path loads one `Arc` (the route table, the certificate table) and
//! never takes a lock that a catalog update holds.

pub mod balance;
pub mod config;
pub mod http;
pub mod listener;
pub mod load;
pub mod table;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use skein_catalog::Snapshot;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{ListenerConfig, ProxyConfig};

use crate::http::RequestLimits;
use crate::load::Loads;
use crate::table::RouteTable;
use crate::tls::Certs;
use crate::upstream::{UpstreamLimits, Upstreams};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// TLS setup.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The proxy's shared state.
pub struct Proxy {
    /// The routing table in force.
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// Certificates.
    pub certs: Arc<Certs>,
    /// Connections to machines.
    pub upstreams: Arc<Upstreams>,
    /// Live counters.
    pub loads: Loads,
    /// Request path bounds.
    pub limits: RequestLimits,
    /// This edge's region.
    pub region: String,
    /// The configuration.
    pub cfg: ProxyConfig,
    http_tls: Arc<ServerConfig>,
}

/// A bound listener, ready to serve.
pub struct Bound {
    listener: TcpListener,
    port: u16,
    /// The bound address.
    pub local: SocketAddr,
}

impl Proxy {
    /// A proxy for an edge in `region`, with empty tables.
    pub fn new(cfg: ProxyConfig, region: impl Into<String>) -> Result<Arc<Proxy>, ProxyError> {
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        let certs = Arc::new(Certs::new(routes.clone()));
        let resumption = tls::resumption()?;
        let http_tls = certs.server_config(&[b"h2", b"http/1.1"], &resumption)?;
        Ok(Arc::new(Proxy {
            routes,
            certs,
            upstreams: Arc::new(Upstreams::new(UpstreamLimits {
                connect_timeout: cfg.connect_timeout,
                idle_timeout: cfg.upstream_idle_timeout,
                max_idle_per_backend: cfg.upstream_max_idle,
            })),
            loads: Loads::default(),
            limits: RequestLimits {
                response_timeout: cfg.response_timeout,
                retries: cfg.retries,
                eject_for: cfg.eject_for,
                queue_timeout: cfg.queue_timeout,
                queue_depth: cfg.queue_depth,
            },
            region: region.into(),
            cfg,
            http_tls,
        }))
    }

    /// Builds and swaps in the tables for a snapshot.
    pub fn apply(&self, snap: &Snapshot) {
        let started = std::time::Instant::now();
        let table = RouteTable::build(snap, &self.region, &self.loads);
        let hosts = table.len();
        self.routes.store(Arc::new(table));
        self.certs.update(snap);
        metrics::gauge!("skein_proxy_route_version").set(snap.version as f64);
        metrics::histogram!("skein_proxy_table_build_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(version = snap.version, hosts, "proxy tables swapped");
    }

    /// Applies every new snapshot until `stop`.
    pub async fn follow(
        self: Arc<Self>,
        mut rx: watch::Receiver<Arc<Snapshot>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let first = rx.borrow_and_update().clone();
        self.apply(&first);
        loop {
            tokio::select! {
                _ = listener::stopped(&mut stop) => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let snap = rx.borrow_and_update().clone();
            let me = self.clone();
            // Parsing certificates is CPU work; keep it off the I/O threads.
            let _ = tokio::task::spawn_blocking(move || me.apply(&snap)).await;
        }
    }

    /// Binds the configured listeners.
    pub async fn bind(&self) -> Result<Vec<Bound>, ProxyError> {
        let mut out = Vec::new();
        for l in &self.cfg.listeners {
            let listener = TcpListener::bind(l.bind)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: l.bind,
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| ProxyError::Bind {
                addr: l.bind,
                source,
            })?;
            out.push(Bound {
                listener,
                port: l.port.unwrap_or(local.port()),
                local,
            });
        }
        Ok(out)
    }

    /// Serves bound listeners until `stop`, then drains open connections for up
    /// to `drain`.
    pub async fn serve(
        self: Arc<Self>,
        bound: Vec<Bound>,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
        let mut loops = tokio::task::JoinSet::new();
        for b in bound {
            tracing::info!(addr = %b.local, port = b.port, "proxy listening");
            loops.spawn(listener::accept_loop(
                self.clone(),
                b.listener,
                b.port,
                stop.clone(),
                graceful.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
        tracing::info!("proxy stopped accepting; draining");
        let Ok(graceful) = Arc::try_unwrap(graceful) else {
            tracing::warn!("proxy drain: listeners still hold the tracker");
            return;
        };
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("proxy drain deadline passed; closing what is left");
        }
    }
}
