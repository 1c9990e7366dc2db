//! The edge proxy plane: TLS termination with certificates chosen by SNI from the
//! live catalog, apps found by Host (or SNI), each request sent to the closest
//! healthy machine with spare capacity.
//!
//! - [`table`]: routing tables derived from a catalog snapshot, swapped whole.
//! - [`load`]: in-flight counters and queues that outlive table swaps.
//! - [`balance`]: the choice of a machine (pure, tested without sockets).
//! - [`tls`]: the certificate store and resolver.
//! - [`upstream`]: connections to machines (pooled HTTP/1.1, shared h2c).
//! - [`h1`]: skein's own HTTP/1.1 client connection.
//! - [`mux`]: skein's own h2, both sides on one wire (frames, HPACK, flow
//!   control): the client (the backhaul, h2c machines) and the server
//!   (clients' h2 and h2c, the backhaul listener).
//! - [`http`]: the request path: route, headers, queue, retry, stream back.
//! - [`listener`]: accept, TLS or plaintext, HTTP/1.1 or h2 under limits.
//!
//! The hot path loads one `Arc` (the route table, the certificate table) and
//! never takes a lock that a catalog update holds.

pub mod acme;
mod admit;
pub mod backhaul;
pub mod balance;
pub mod config;
pub mod h1;
pub mod health;
pub mod http;
pub mod listener;
pub mod load;
pub mod mux;
pub mod proxy_proto;
mod rest;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use skein_catalog::Snapshot;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{ListenerConfig, ProxyConfig};
pub use workers::Workers;

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
    /// The backhaul listener's address is unknown.
    #[error("proxy.backhaul: {0}")]
    Backhaul(String),
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
    /// The snapshot the table in force was built from.
    last: std::sync::Mutex<Option<Arc<Snapshot>>>,
    /// Certificates.
    pub certs: Arc<Certs>,
    /// Connections to machines.
    pub upstreams: Arc<Upstreams>,
    /// Live counters.
    pub loads: Loads,
    /// Request path bounds.
    pub limits: RequestLimits,
    /// Where this proxy stands: region, host, backhaul.
    pub at: table::Locality,
    /// The configuration.
    pub cfg: ProxyConfig,
    /// Request counters.
    pub metrics: http::RequestMetrics,
    /// ACME challenge answers served on the listeners.
    pub challenges: Arc<acme::Challenges>,
    /// Client connections resting (idle HTTP/1.1, buffers given back).
    resting: rest::Resting,
    http_tls: Arc<ServerConfig>,
    raw_tls: Arc<ServerConfig>,
    acme_tls: Arc<ServerConfig>,
    /// This edge's region as the header value every request carries.
    region_header: ::http::HeaderValue,
}

/// What a bound listener is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundKind {
    /// Clients, on the catalog port `port`.
    Public {
        /// The port this socket stands for.
        port: u16,
    },
    /// Clients steered here by eBPF: any anycast address and port, any
    /// flycast address (the port is the one each connection came to).
    Steered,
    /// Other edges' traffic for this host's machines.
    Backhaul,
}

/// A bound listener, ready to serve.
pub struct Bound {
    /// One socket per serving thread, all on the same address (SO_REUSEPORT:
    /// the kernel spreads connections across them).
    sockets: Vec<std::net::TcpListener>,
    /// What it serves.
    pub kind: BoundKind,
    /// The bound address.
    pub local: SocketAddr,
}

impl Bound {
    /// One socket of the group: what steering points at (the kernel's
    /// SO_REUSEPORT selection then spreads connections over the group).
    pub fn socket(&self) -> Option<&std::net::TcpListener> {
        self.sockets.first()
    }
}

impl Proxy {
    /// Client connections resting now: idle HTTP/1.1 keep-alive connections
    /// that hold no buffer and wait for their next request (also the gauge
    /// `skein_proxy_client_connections_resting`).
    pub fn connections_resting(&self) -> usize {
        self.resting.now()
    }

    /// A proxy for an edge in `region`, with empty tables.
    pub fn new(cfg: ProxyConfig, region: impl Into<String>) -> Result<Arc<Proxy>, ProxyError> {
        Self::with_challenges(cfg, region, Arc::new(acme::Challenges::default()))
    }

    /// [`Proxy::new`] serving the ACME challenge answers of `challenges`
    /// (made before the proxy, so that etcd's follower can fill it from
    /// its first read).
    pub fn with_challenges(
        cfg: ProxyConfig,
        region: impl Into<String>,
        challenges: Arc<acme::Challenges>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        Self::on_host(cfg, region, None, challenges)
    }

    /// A proxy on the catalog host named `host`: with `[proxy.backhaul]`
    /// enabled, machines on other hosts are reached through their host's
    /// proxy, and this one serves other edges' traffic for its own machines.
    pub fn on_host(
        cfg: ProxyConfig,
        region: impl Into<String>,
        host: Option<String>,
        challenges: Arc<acme::Challenges>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        let certs = Arc::new(Certs::new(routes.clone(), cfg.default_hostname.clone()));
        let resumption = tls::resumption()?;
        let http_tls = certs.server_config(&[b"h2", b"http/1.1"], &resumption)?;
        let raw_tls = certs.server_config(&[], &resumption)?;
        let acme_tls = acme_server_config(&challenges)?;
        let region: String = region.into();
        Ok(Arc::new(Proxy {
            routes,
            last: std::sync::Mutex::new(None),
            certs,
            upstreams: Arc::new(Upstreams::new(
                UpstreamLimits {
                    connect_timeout: cfg.connect_timeout,
                    idle_timeout: cfg.upstream_idle_timeout,
                    max_idle_per_backend: cfg.upstream_max_idle,
                    h2_keepalive: mux::Keepalive::default(),
                    multiplexed_congestion: cfg
                        .multiplexed_congestion
                        .as_deref()
                        .and_then(upstream::Congestion::new),
                },
                skein_catalog::serving_threads(cfg.threads),
            )),
            loads: Loads::default(),
            limits: RequestLimits {
                response_timeout: cfg.response_timeout,
                retries: cfg.retries,
                eject_for: cfg.eject_for,
                queue_timeout: cfg.queue_timeout,
                queue_depth: cfg.queue_depth,
            },
            region_header: ::http::HeaderValue::from_str(&region)
                .unwrap_or(::http::HeaderValue::from_static("unknown")),
            at: table::Locality {
                region,
                host,
                backhaul: cfg.backhaul.enabled.then(|| cfg.backhaul.clone()),
            },
            cfg,
            metrics: http::RequestMetrics::new(),
            challenges,
            resting: rest::Resting::new(),
            http_tls,
            raw_tls,
            acme_tls,
        }))
    }

    /// Builds and swaps in the tables for a snapshot.
    /// Only the apps the change since the last snapshot touched are built
    /// again; the others keep their routes.
    pub fn apply(&self, snap: &Arc<Snapshot>) {
        let started = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (table, gone) = match last.as_ref() {
            Some(prev) => self.routes.load().update(prev, snap, &self.at, &self.loads),
            None => (RouteTable::build(snap, &self.at, &self.loads), None),
        };
        *last = Some(snap.clone());
        let hosts = table.len();
        match gone {
            Some(gone) => self.upstreams.forget(&gone),
            None => self.upstreams.retain(&table.addresses()),
        }
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
        rx: watch::Receiver<Arc<Snapshot>>,
        stop: watch::Receiver<bool>,
    ) {
        skein_catalog::store::follow(rx, stop, move |s| self.apply(s)).await
    }

    /// How many threads serve clients.
    pub fn threads(&self) -> usize {
        skein_catalog::serving_threads(self.cfg.threads)
    }

    /// Binds the configured listeners, one SO_REUSEPORT socket per thread,
    /// and the backhaul listener when it is enabled (its default address
    /// comes from this host's catalog record: apply a snapshot first).
    pub fn bind(&self) -> Result<Vec<Bound>, ProxyError> {
        let mut out = Vec::new();
        for l in &self.cfg.listeners {
            let (sockets, local) = self.bind_one(l.bind, false)?;
            out.push(Bound {
                sockets,
                kind: BoundKind::Public {
                    port: l.port.unwrap_or(local.port()),
                },
                local,
            });
        }
        // Steered sockets: one per family, on the loopback (a socket bound to
        // one address is single-family); connections reach them only
        // through the steering program.
        let steer = &self.cfg.steer;
        let v4 = steer
            .anycast
            .iter()
            .any(|p| matches!(p, ipnet::IpNet::V4(_)));
        let v6 = steer.flycast
            || steer
                .anycast
                .iter()
                .any(|p| matches!(p, ipnet::IpNet::V6(_)));
        let loopback = [
            (v4, std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)),
            (v6, std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ];
        for (_, ip) in loopback.into_iter().filter(|(want, _)| *want) {
            let (sockets, local) = self.bind_one(SocketAddr::new(ip, 0), false)?;
            out.push(Bound {
                sockets,
                kind: BoundKind::Steered,
                local,
            });
        }
        if let Some(addr) = self.backhaul_bind()? {
            let (sockets, local) = self.bind_one(addr, true)?;
            // Accepted connections inherit the listener's congestion control.
            if let Some(c) = self.upstreams.limits().multiplexed_congestion {
                for s in &sockets {
                    c.set(s)
                        .map_err(|source| ProxyError::Bind { addr, source })?;
                }
            }
            out.push(Bound {
                sockets,
                kind: BoundKind::Backhaul,
                local,
            });
        }
        Ok(out)
    }

    fn bind_one(
        &self,
        addr: SocketAddr,
        freebind: bool,
    ) -> Result<(Vec<std::net::TcpListener>, SocketAddr), ProxyError> {
        let err = |source| ProxyError::Bind { addr, source };
        let first = reuseport_listener(addr, freebind).map_err(err)?;
        // Port 0: the other sockets join the port the first one got.
        let local = first.local_addr().map_err(err)?;
        let mut sockets = vec![first];
        for _ in 1..self.threads() {
            sockets.push(reuseport_listener(local, freebind).map_err(err)?);
        }
        Ok((sockets, local))
    }

    /// Where the backhaul listener goes: as configured, else this host's
    /// mesh address (or underlay) from the catalog.
    fn backhaul_bind(&self) -> Result<Option<SocketAddr>, ProxyError> {
        let Some(b) = &self.at.backhaul else {
            return Ok(None);
        };
        if let Some(a) = b.bind {
            return Ok(Some(a));
        }
        let Some(name) = &self.at.host else {
            return Err(ProxyError::Backhaul(
                "host.name is not set, so this host's address is unknown; set proxy.backhaul.bind"
                    .into(),
            ));
        };
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let host = last
            .as_ref()
            .and_then(|s| s.catalog.hosts.values().find(|h| &h.name == name).cloned());
        match host {
            Some(h) => Ok(Some(b.address_of(&h))),
            None => Err(ProxyError::Backhaul(format!(
                "host {name:?} is not in the catalog, so its address is unknown; set proxy.backhaul.bind"
            ))),
        }
    }

    /// Serves bound listeners until `stop`, then drains open connections for up
    /// to `drain`, on [`Proxy::threads`] serving threads of its own.
    pub async fn serve(
        self: Arc<Self>,
        bound: Vec<Bound>,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        match Workers::start(self.threads(), "skein-proxy") {
            Ok(w) => self.serve_on(w.handles(), bound, stop, drain).await,
            Err(e) => tracing::error!(error = %e, "cannot start the proxy's threads"),
        }
    }

    /// [`Proxy::serve`] on `workers` (single-threaded runtimes, each on its
    /// own thread: [`Workers`]), which may carry other planes' tasks too.
    /// Each takes its share of the listeners' SO_REUSEPORT sockets, as nginx
    /// runs its workers: a connection and the tasks it spawns stay on one
    /// thread, with no work stealing and no cross-thread wakeups.
    pub async fn serve_on(
        self: Arc<Self>,
        workers: &[tokio::runtime::Handle],
        bound: Vec<Bound>,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        if workers.is_empty() {
            return tracing::error!("the proxy was given no serving threads");
        }
        let threads = workers.len();
        let mut per_thread: Vec<Vec<Socket>> = (0..threads).map(|_| Vec::new()).collect();
        for b in bound {
            match b.kind {
                BoundKind::Backhaul => {
                    tracing::info!(addr = %b.local, threads, "proxy backhaul listening")
                }
                BoundKind::Steered => {
                    tracing::info!(addr = %b.local, threads, "proxy steered socket listening")
                }
                BoundKind::Public { port } => {
                    tracing::info!(addr = %b.local, port, threads, "proxy listening")
                }
            }
            for (i, s) in b.sockets.into_iter().enumerate() {
                per_thread[i % threads].push(Socket {
                    socket: s,
                    kind: b.kind,
                    local: b.local,
                });
            }
        }
        let serving: Vec<_> = workers
            .iter()
            .zip(per_thread)
            .map(|(rt, sockets)| rt.spawn(self.clone().serve_thread(sockets, stop.clone(), drain)))
            .collect();
        for s in serving {
            let _ = s.await;
        }
    }

    /// One thread's share: its listeners' accept loops, then their drain.
    async fn serve_thread(
        self: Arc<Self>,
        sockets: Vec<Socket>,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let drain_signal = tokio_util::sync::CancellationToken::new();
        let mut loops = tokio::task::JoinSet::new();
        for s in sockets {
            let port = match s.kind {
                BoundKind::Public { port } => Some(port),
                _ => None,
            };
            match TcpListener::from_std(s.socket) {
                Ok(l) if s.kind == BoundKind::Backhaul => {
                    loops.spawn(backhaul::accept_loop(
                        self.clone(),
                        l,
                        stop.clone(),
                        drain_signal.clone(),
                    ));
                }
                Ok(l) => {
                    loops.spawn(listener::accept_loop(
                        self.clone(),
                        l,
                        port,
                        stop.clone(),
                        drain_signal.clone(),
                    ));
                }
                Err(e) => {
                    tracing::error!(addr = %s.local, error = %e, "cannot register a listener")
                }
            }
        }
        // The loops stop accepting at `stop`; from then on connections are
        // asked to finish, and the loops end when theirs have, or the
        // deadline closes what is left (dropping their tasks).
        let mut stop = stop;
        if !loops.is_empty() {
            listener::stopped(&mut stop).await;
        }
        drain_signal.cancel();
        let drained = async { while loops.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, drained).await.is_err() {
            tracing::warn!("proxy drain deadline passed; closing what is left");
            loops.abort_all();
        }
    }
}

/// The server config of TLS-ALPN-01 validation handshakes.
fn acme_server_config(
    challenges: &Arc<acme::Challenges>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(acme::AcmeTlsResolver(challenges.clone())));
    cfg.alpn_protocols = vec![acme::ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// One listening socket of one serving thread.
struct Socket {
    socket: std::net::TcpListener,
    kind: BoundKind,
    local: SocketAddr,
}

/// A listening socket with SO_REUSEPORT (and SO_REUSEADDR), non-blocking.
/// `freebind`: an address that is not up yet (the mesh address, before the
/// mesh agent has put it on its device) can be bound.
fn reuseport_listener(addr: SocketAddr, freebind: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if freebind {
        match addr {
            SocketAddr::V4(_) => s.set_freebind_v4(true)?,
            SocketAddr::V6(_) => s.set_freebind_v6(true)?,
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}
