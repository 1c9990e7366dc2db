//! The backhaul: how an edge reaches a machine on another host, and how that
//! host's proxy takes the traffic in.
//!
//! An edge that picked a machine living elsewhere sends the request to the
//! backhaul listener of the machine's host (`[proxy.backhaul]`; over the mesh
//! by default), naming the machine in three headers. HTTP rides one
//! multiplexed h2 connection per worker; an upgrade (websocket) and each raw
//! TCP connection ride their own HTTP/1.1 connection, upgraded. The worker
//! checks that the machine is its own, takes a slot under the machine's hard
//! limit from the same counters its own edge uses (so every edge's traffic
//! for a machine meets there), and delivers. A worker that cannot deliver
//! answers at once with [`REFUSED`]: the edge then tries another machine if it
//! still holds the request whole.
//!
//! The listener trusts what the edge says (the client's address, the
//! forwarded headers): it is bound to the host's mesh address, which only
//! other hosts reach (the machine guard drops anything a machine sends to
//! network 0), or to an underlay the operator declared private.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::Proxy;
use crate::balance::{Pick, Prefs, pick};
use crate::http::{SendFailure, connect_failed, local};
use crate::table::{AppRoute, Backend};
use crate::upstream::{BoxError, ConnectError, ProxyBody, dial};

/// The app the request is for.
pub const APP: HeaderName = HeaderName::from_static("skein-backhaul-app");
/// The service's port on the machine.
pub const PORT: HeaderName = HeaderName::from_static("skein-backhaul-port");
/// The machine the edge chose.
pub const MACHINE: HeaderName = HeaderName::from_static("skein-backhaul-machine");
/// Raw TCP: the client's address as the edge saw it.
pub const CLIENT: HeaderName = HeaderName::from_static("skein-backhaul-client");
/// Raw TCP: the edge address the client connected to.
pub const LOCAL: HeaderName = HeaderName::from_static("skein-backhaul-local");
/// Raw TCP: the PROXY protocol version the machine wants (`1` or `2`).
pub const PROXY_PROTO: HeaderName = HeaderName::from_static("skein-backhaul-proxy-proto");
/// On a worker's answer: it did not deliver, and why (`capacity`,
/// `unavailable`, `connect_failed`, `not_here`, `bad_target`). Nothing
/// reached the machine; the edge may send the request elsewhere.
pub const REFUSED: HeaderName = HeaderName::from_static("skein-backhaul-refused");
/// The upgrade token of a raw TCP stream.
pub const TCP_UPGRADE: &str = "skein-tcp";

/// Every backhaul header.
pub const HEADERS: [HeaderName; 7] = [APP, PORT, MACHINE, CLIENT, LOCAL, PROXY_PROTO, REFUSED];

/// True for every backhaul header (all of [`HEADERS`] begin so); an edge
/// removes them from what clients send.
pub fn is_header(name: &str) -> bool {
    name.starts_with("skein-backhaul-")
}

/// The machine a backhauled request is for (borrowed: from the edge's
/// route, or from the worker's request headers; nothing is copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// App name.
    pub app: &'a str,
    /// Service port on the machine.
    pub port: u16,
    /// Machine id.
    pub machine: &'a str,
}

impl<'a> Target<'a> {
    /// Reads the target from a request's headers.
    pub fn from_headers(h: &'a HeaderMap) -> Option<Target<'a>> {
        let get = |n: HeaderName| h.get(n).and_then(|v| v.to_str().ok());
        Some(Target {
            app: get(APP)?,
            port: get(PORT)?.parse().ok()?,
            machine: get(MACHINE)?,
        })
    }

    /// Writes the target into a request's headers.
    pub fn write(&self, h: &mut HeaderMap) {
        for (n, v) in [(APP, self.app), (MACHINE, self.machine)] {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(n, v);
            }
        }
        h.insert(PORT, HeaderValue::from(self.port));
    }
}

/// Removes every backhaul header (nothing is hashed when there is none).
pub fn strip(h: &mut HeaderMap) {
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|n| is_header(n.as_str()))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

/// The worker's own answer when it delivers nothing: the proxy's local
/// answer, marked [`REFUSED`] so the edge knows it may go elsewhere.
fn refuse(status: StatusCode, why: &'static str) -> Response<ProxyBody> {
    metrics::counter!("skein_proxy_backhaul_refused_total", "reason" => why).increment(1);
    let mark = (REFUSED, HeaderValue::from_static(why));
    local(status, why, Some(mark))
}

/// The reason in a worker's [`REFUSED`] header, as one of the codes it
/// sends (anything else reads as `refused`).
pub fn refusal_reason(v: &HeaderValue) -> &'static str {
    match v.as_bytes() {
        b"capacity" => "capacity",
        b"unavailable" => "unavailable",
        b"connect_failed" => "connect_failed",
        b"not_here" => "not_here",
        b"bad_target" => "bad_target",
        _ => "refused",
    }
}

/// Why a raw TCP stream could not be opened through a worker.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The worker's listener could not be reached.
    #[error("backhaul connect: {0}")]
    Connect(#[from] ConnectError),
    /// The worker refused (the reason it gave).
    #[error("the worker refused: {0}")]
    Refused(String),
    /// The exchange broke.
    #[error("backhaul: {0}")]
    Http(#[from] hyper::Error),
}

/// Opens a raw TCP stream to `target` through the worker at `via`; the
/// worker writes the PROXY header the port asks for, with the client's
/// address, before the first byte.
pub async fn open_tcp(
    via: SocketAddr,
    target: Target<'_>,
    client: SocketAddr,
    local: SocketAddr,
    proxy_proto: Option<skein_catalog::model::ProxyProtoVersion>,
    connect_timeout: Duration,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, OpenError> {
    let stream = dial(via, connect_timeout, None).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(futures_util::FutureExt::map(conn.with_upgrades(), |r| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "backhaul tcp stream ended");
        }
    }));
    let mut req = Request::new(Empty::<Bytes>::new());
    let h = req.headers_mut();
    h.insert(header::HOST, HeaderValue::from_static("backhaul"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    target.write(h);
    for (n, a) in [(CLIENT, client), (LOCAL, local)] {
        if let Ok(v) = HeaderValue::from_str(&a.to_string()) {
            h.insert(n, v);
        }
    }
    if let Some(v) = proxy_proto {
        let n = match v {
            skein_catalog::model::ProxyProtoVersion::V1 => "1",
            skein_catalog::model::ProxyProtoVersion::V2 => "2",
        };
        h.insert(PROXY_PROTO, HeaderValue::from_static(n));
    }
    let mut resp = tx.send_request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let why = resp
            .headers()
            .get(REFUSED)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no upgrade")
            .to_string();
        return Err(OpenError::Refused(why));
    }
    let up = hyper::upgrade::on(&mut resp).await?;
    Ok(TokioIo::new(up))
}

/// Accepts backhaul connections on `listener` until `stop`.
pub async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
    drain: tokio_util::sync::CancellationToken,
) {
    let max = proxy.cfg.backhaul.max_connections;
    let names = crate::listener::Accepting {
        total: "skein_proxy_backhaul_connections_total",
        active: "skein_proxy_backhaul_connections_active",
        span: "backhaul",
    };
    crate::listener::accept(proxy, listener, max, stop, drain, names, |p, s, _, d| {
        serve(p, s, d)
    })
    .await
}

/// One edge's connection: h2c (requests multiplexed) or HTTP/1.1 (an upgrade:
/// a websocket or a raw TCP stream), told apart by the h2 preface.
async fn serve(proxy: Arc<Proxy>, stream: TcpStream, drain: tokio_util::sync::CancellationToken) {
    use crate::listener::{Drained, Speaks};
    let cfg = &proxy.cfg;
    let Some(speaks) = crate::listener::plaintext_speaks(&stream, cfg.header_timeout).await else {
        return;
    };
    if speaks == Speaks::H2 {
        let limits = crate::mux::server::Limits::backhaul(cfg);
        return crate::mux::server::serve(stream, limits, drain, Edge(proxy)).await;
    }
    let p = proxy.clone();
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let p = p.clone();
        let req = req.map(|b| b.map_err(BoxError::from).boxed());
        async move { Ok::<_, Infallible>(handle(&p, req).await) }
    });
    let mut b = crate::listener::h1_server(cfg);
    // The edge's forwarding headers and the target ride on top of a client's.
    b.max_headers(cfg.max_headers + HEADERS.len() + 8);
    let conn = b
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = Drained::new(conn, drain).await {
        tracing::debug!(error = %e, "backhaul connection ended with an error");
    }
}

/// What answers an edge's multiplexed requests.
struct Edge(Arc<Proxy>);

impl crate::mux::server::Handler for Edge {
    fn call(
        &self,
        req: Request<ProxyBody>,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + '_ {
        handle(&self.0, req)
    }
}

/// The worker's side of one backhauled request.
pub async fn handle(proxy: &Arc<Proxy>, mut req: Request<ProxyBody>) -> Response<ProxyBody> {
    let Some(target) = Target::from_headers(req.headers()) else {
        return refuse(StatusCode::BAD_REQUEST, "bad_target");
    };
    let table = proxy.routes.load_full();
    let Some(app) = table.app_by_name(target.app).cloned() else {
        return refuse(StatusCode::MISDIRECTED_REQUEST, "not_here");
    };
    let Some(svc) = app.services.iter().find(|s| s.internal_port == target.port) else {
        return refuse(StatusCode::MISDIRECTED_REQUEST, "not_here");
    };
    // Only this host's own machines: a table that thinks the machine lives
    // elsewhere (the catalog moved it) must not bounce the request on.
    if !svc
        .backends
        .iter()
        .any(|b| &*b.machine == target.machine && b.via.is_none())
    {
        return refuse(StatusCode::MISDIRECTED_REQUEST, "not_here");
    }
    let prefs = Prefs {
        machine: Some(target.machine),
        ..Default::default()
    };
    // The hard limit is enforced here, at once: the edge holds the request
    // and can try another machine sooner than a queue here would free up.
    let (backend, slot) = match pick(svc, &table, prefs, &[]) {
        Pick::Chosen(b, s) => (b, s),
        Pick::Full => return refuse(StatusCode::SERVICE_UNAVAILABLE, "capacity"),
        Pick::Unavailable => return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    metrics::counter!("skein_proxy_backhaul_requests_total").increment(1);
    let upgrade = crate::http::upgrade_protocol(req.headers());
    if upgrade
        .as_ref()
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(TCP_UPGRADE.as_bytes()))
    {
        return tcp(proxy, &app, backend, slot, req).await;
    }
    let mut client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip(&mut parts.headers);
    let host = crate::http::host_in(&parts).unwrap_or_default();
    let proto = crate::http::machine_proto(svc, upgrade.is_some());
    crate::http::fit(&mut parts, proto, &host);
    let (mut req, mut slot) = (Request::from_parts(parts, body), slot);
    // One more try when a pooled connection turns out closed.
    for _ in 0..2 {
        let sender = match proxy
            .upstreams
            .get(backend.addr, proto, upgrade.is_some())
            .await
        {
            Ok((s, _)) => s,
            Err(e) => {
                connect_failed(proxy, backend, &e);
                return refuse(StatusCode::BAD_GATEWAY, "connect_failed");
            }
        };
        let sent = crate::http::send(
            proxy,
            backend,
            sender,
            req,
            slot,
            &mut client_upgrade,
            false,
        );
        match sent.await {
            Ok(crate::http::Sent { resp, .. }) | Err(SendFailure::Failed(resp)) => return resp,
            Err(SendFailure::NotSent(r, s)) => (req, slot) = (r, s),
        }
    }
    refuse(StatusCode::BAD_GATEWAY, "connect_failed")
}

/// A raw TCP stream for a machine: connect first (so a refusal still lets the
/// edge go elsewhere), then answer 101 and join the two.
async fn tcp(
    proxy: &Arc<Proxy>,
    app: &AppRoute,
    backend: &Backend,
    slot: crate::load::Slot,
    mut req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    let addr_of = |n: HeaderName| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok())
    };
    let (client, local) = (addr_of(CLIENT), addr_of(LOCAL));
    let pp = match req.headers().get(PROXY_PROTO).map(HeaderValue::as_bytes) {
        Some(b"1") => Some(skein_catalog::model::ProxyProtoVersion::V1),
        Some(b"2") => Some(skein_catalog::model::ProxyProtoVersion::V2),
        _ => None,
    };
    let mut upstream = match dial(backend.addr, proxy.cfg.connect_timeout, None).await {
        Ok(s) => s,
        Err(e) => {
            connect_failed(proxy, backend, &e);
            return refuse(StatusCode::BAD_GATEWAY, "connect_failed");
        }
    };
    if let (Some(v), Some(c), Some(l)) = (pp, client, local) {
        let h = crate::proxy_proto::header(v, c, l);
        if upstream.write_all(&h).await.is_err() {
            return refuse(StatusCode::BAD_GATEWAY, "connect_failed");
        }
    }
    let on = hyper::upgrade::on(&mut req);
    let (app_name, machine) = (app.name.clone(), backend.machine.clone());
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(up) = on.await else {
            return tracing::debug!(%machine, "backhaul tcp upgrade failed");
        };
        metrics::counter!("skein_proxy_tcp_connections_total").increment(1);
        let mut edge = TokioIo::new(up);
        crate::tcp::relay(&mut edge, &mut upstream, &app_name, &machine).await;
    });
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(TCP_UPGRADE));
    r
}
