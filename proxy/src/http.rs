//! The HTTP handler: find the app by Host, choose a machine, forward with the
//! platform's headers, and stream the answer back.
//!
//! Every local answer carries `skein-error: <code>` and the same code in the body,
//! so a client (and a test) can tell the proxy's refusals from the app's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use skein_catalog::model::BackendProtocol;

use crate::Proxy;
use crate::backhaul;
use crate::balance::{Prefs, Refusal, acquire};
use crate::load::{MachineError, Slot};
use crate::table::{AppRoute, Backend, PortRoute, normalize_host};
use crate::upstream::{BoxError, ConnectError, Proto, ProxyBody, Sender};

/// The client's real address, set by the proxy; a client's own is removed.
pub const CLIENT_IP: HeaderName = HeaderName::from_static("skein-client-ip");
/// The edge's region.
pub const REGION: HeaderName = HeaderName::from_static("skein-region");
/// The request id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("skein-request-id");
/// Why the proxy answered itself.
pub const ERROR: HeaderName = HeaderName::from_static("skein-error");
/// The machine that answered.
pub const MACHINE: HeaderName = HeaderName::from_static("skein-machine");
/// Client hint: prefer machines closest to this region.
pub const PREFER_REGION: HeaderName = HeaderName::from_static("skein-prefer-region");
/// Client hint: only this machine.
pub const FORCE_MACHINE: HeaderName = HeaderName::from_static("skein-force-machine");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// What the handler knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client.
    pub client: SocketAddr,
    /// The proxy's address as the client reached it.
    pub local: SocketAddr,
    /// The public port it connected to (as the catalog names it).
    pub port: u16,
    /// TLS was terminated.
    pub tls: bool,
    /// The SNI name, if TLS.
    pub sni: Option<String>,
    /// The flycast address the client connected to: it names the app.
    pub flycast: Option<std::net::Ipv6Addr>,
    /// The client's address and the port as header values, made once per
    /// connection rather than formatted for every request.
    forwarded: (HeaderValue, HeaderValue),
}

impl ConnInfo {
    /// What the handler knows about a connection from `client` to `local`.
    pub fn new(
        client: SocketAddr,
        local: SocketAddr,
        port: u16,
        tls: bool,
        sni: Option<String>,
        flycast: Option<std::net::Ipv6Addr>,
    ) -> ConnInfo {
        let ip = client.ip().to_canonical().to_string();
        let ip = HeaderValue::from_maybe_shared(Bytes::from(ip))
            .unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            client,
            local,
            port,
            tls,
            sni,
            flycast,
            forwarded: (ip, HeaderValue::from(port)),
        }
    }
}

pub(crate) fn local(
    status: StatusCode,
    code: &'static str,
    extra: Option<(HeaderName, HeaderValue)>,
) -> Response<ProxyBody> {
    metrics::counter!("skein_proxy_local_responses_total", "code" => code).increment(1);
    let mut r = Response::new(
        Full::new(Bytes::from(format!("skein: {code}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(ERROR, HeaderValue::from_static(code));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some((k, v)) = extra {
        h.insert(k, v);
    }
    r
}

/// Headers that describe one hop and are never forwarded (RFC 9110 7.6.1).
pub(crate) fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// [`hop_by_hop`] for a name in any case (a `Connection` option).
fn hop_by_hop_token(t: &[u8]) -> bool {
    // The longest hop-by-hop name is 19 bytes.
    let mut lower = [0u8; 19];
    let Some(to) = lower.get_mut(..t.len()) else {
        return false;
    };
    to.copy_from_slice(t);
    to.make_ascii_lowercase();
    std::str::from_utf8(to).is_ok_and(hop_by_hop)
}

/// The platform's own request headers: set by the proxy, never taken from a
/// client (a client could forge its address or steer another's request).
fn platform_request_header(name: &str) -> bool {
    const OWN: [HeaderName; 6] = [
        CLIENT_IP,
        REGION,
        REQUEST_ID,
        PREFER_REGION,
        FORCE_MACHINE,
        MACHINE,
    ];
    name.starts_with("skein-")
        && (OWN.iter().any(|h| h.as_str() == name) || backhaul::is_header(name))
}

/// Removes the hop-by-hop headers (those above and the ones `Connection`
/// names) and the ones `also` picks, keeping `te: trailers` (gRPC needs it;
/// RFC 9113 8.2.2 allows it on h2). One pass over the headers, and nothing
/// hashed unless something goes: most messages carry none of them.
fn strip(h: &mut HeaderMap, also: fn(&str) -> bool) {
    // Usually `connection` and what it names, if anything: kept on the stack.
    let mut doomed: smallvec::SmallVec<[HeaderName; 4]> = smallvec::SmallVec::new();
    let mut te_trailers = false;
    for (name, value) in h.iter() {
        let n = name.as_str();
        if n == "connection" {
            // The options it lists name headers to drop, except `close` and
            // the hop-by-hop names, which go anyway: no name is made (and,
            // for one not standard, allocated) for `keep-alive` and `close`,
            // the usual ones.
            doomed.extend(
                crate::h1::tokens(value.as_bytes())
                    .filter(|t| {
                        !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !hop_by_hop_token(t)
                    })
                    .filter_map(|t| HeaderName::from_bytes(t).ok()),
            );
        } else if n == "te" {
            te_trailers |= value.as_bytes().eq_ignore_ascii_case(b"trailers");
        }
        if hop_by_hop(n) || also(n) {
            doomed.push(name.clone());
        }
    }
    for n in &doomed {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The length a message's head announces (`Content-Length`), if it announces
/// a valid one.
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Removes what only concerns one hop.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h, |_| false);
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A request id unique in this process and unlikely to repeat across them:
/// 24 hex digits, a keyed hash of a counter and the counter's low bits.
fn request_id() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = SEED.get_or_init(Default::default).build_hasher();
    h.write_u64(n);
    let v = (u128::from(h.finish()) << 32) | u128::from(n as u32);
    let mut out = [0u8; 24];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (4 * (23 - i))) & 0xf) as usize];
    }
    let mut id = HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"));
    // Unique to one request: an h2 hop (the backhaul, an h2c machine) sends it
    // as a literal never indexed. Indexed, every request would add one more
    // entry to both ends' HPACK tables, evicting the headers that do repeat,
    // and make each lookup walk a chain of dead request ids.
    id.set_sensitive(true);
    id
}

/// Handles one request that hyper read from a client connection.
pub async fn handle_hyper(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let req = req.map(|b| b.map_err(BoxError::from).boxed());
    Ok(serve_request(&proxy, &conn, req).await)
}

/// Answers one request from a client connection.
pub(crate) async fn serve_request(
    proxy: &Arc<Proxy>,
    conn: &ConnInfo,
    req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let resp = route(proxy, conn, req, started).await;
    proxy.metrics.requests.record(resp.status());
    proxy
        .metrics
        .duration
        .record(started.elapsed().as_secs_f64());
    resp
}

/// A counter per status class (1xx..5xx), resolved once: counting an answer
/// is one atomic add, no registry lookup. The proxy's, each app's, each
/// service's and each machine's requests are counted with one of these.
#[derive(Debug)]
pub struct ByStatus([metrics::Counter; 5]);

impl ByStatus {
    /// The five handles, `counter(class)` registering the one of each class
    /// (`"1xx"` .. `"5xx"`, for the `status` label).
    pub fn new(counter: impl Fn(&'static str) -> metrics::Counter) -> Self {
        ByStatus(["1xx", "2xx", "3xx", "4xx", "5xx"].map(counter))
    }

    /// Counts one answer (a status outside 100-599 counts with the nearest
    /// class).
    pub fn record(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[class].increment(1);
    }
}

/// Per-app metric handles, resolved when the route table is built.
#[derive(Debug)]
pub struct AppMetrics {
    /// Requests by status class: `skein_proxy_app_requests_total{app,status}`.
    pub requests: ByStatus,
    /// Time to response headers.
    pub duration: metrics::Histogram,
}

impl AppMetrics {
    /// Registers the handles of one app.
    pub fn new(app: &str) -> Self {
        AppMetrics {
            requests: ByStatus::new(
                |class| metrics::counter!("skein_proxy_app_requests_total", "app" => app.to_string(), "status" => class),
            ),
            duration: metrics::histogram!("skein_proxy_app_request_duration_seconds", "app" => app.to_string()),
        }
    }
}

/// Metric handles resolved once, so the request path does no registry lookup.
pub struct RequestMetrics {
    /// Requests by status class: `skein_proxy_requests_total{status}`.
    pub requests: ByStatus,
    /// Time from request to response headers.
    pub duration: metrics::Histogram,
}

impl RequestMetrics {
    /// Registers the handles with the installed recorder.
    pub fn new() -> Self {
        RequestMetrics {
            requests: ByStatus::new(
                |class| metrics::counter!("skein_proxy_requests_total", "status" => class),
            ),
            duration: metrics::histogram!("skein_proxy_request_duration_seconds"),
        }
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn host_of(req: &Request<ProxyBody>, conn: &ConnInfo) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => match req.headers().get(header::HOST).map(HeaderValue::to_str) {
            Some(Ok(h)) => h,
            _ => conn.sni.as_deref()?,
        },
    };
    Some(normalize_host(raw))
}

async fn route(
    proxy: &Arc<Proxy>,
    conn: &ConnInfo,
    req: Request<ProxyBody>,
    started: Instant,
) -> Response<ProxyBody> {
    let Some(host) = host_of(&req, conn) else {
        return local(StatusCode::BAD_REQUEST, "no_host", None);
    };
    // HTTP-01 validation: answered here for a challenge in flight; any other
    // token is the app's own business (it may run its own ACME client).
    if !conn.tls
        && let Some(token) = req.uri().path().strip_prefix(crate::acme::HTTP01_PREFIX)
        && let Some(answer) = proxy.challenges.http_answer(&host, token)
    {
        metrics::counter!("skein_proxy_acme_challenges_total", "type" => "http-01", "result" => "answered")
            .increment(1);
        let mut r = Response::new(
            Full::new(Bytes::from(answer))
                .map_err(|never| match never {})
                .boxed(),
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return r;
    }
    let table = proxy.routes.load_full();
    let fallback = || {
        proxy
            .cfg
            .default_hostname
            .as_deref()
            .and_then(|d| table.app(d))
    };
    let found = match conn.flycast {
        Some(a) => table.flycast(a),
        None => table.app(&host).or_else(fallback),
    };
    let Some(app) = found.cloned() else {
        return local(StatusCode::NOT_FOUND, "no_app", None);
    };
    let Some(port) = app.ports.get(&conn.port).cloned() else {
        return local(StatusCode::NOT_FOUND, "no_service_on_port", None);
    };
    if port.tls && !conn.tls {
        return local(StatusCode::BAD_REQUEST, "tls_required", None);
    }
    if port.force_https {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let location = HeaderValue::from_str(&format!("https://{host}{path}")).ok();
        return local(
            StatusCode::PERMANENT_REDIRECT,
            "force_https",
            location.map(|l| (header::LOCATION, l)),
        );
    }
    if !port.http {
        return local(StatusCode::NOT_FOUND, "no_http_on_port", None);
    }
    // Bodies over the limit: refused at once when announced, cut off when not.
    let limit = proxy.cfg.max_request_body_bytes;
    let announced = content_length(req.headers());
    if announced.is_some_and(|n| n > limit) {
        return local(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            Some(close()),
        );
    }
    // Boxed: the forwarding state machine is large, and hyper moves the
    // handler future into a task per request (per stream on h2).
    let resp = Box::pin(forward(proxy, conn, &table, &app, &port, host, req)).await;
    let m = &app.metrics;
    m.requests.record(resp.status());
    m.duration.record(started.elapsed().as_secs_f64());
    resp
}

/// The response header with which a machine asks the proxy to send the
/// request elsewhere: `region=<code>`, `instance=<machine id>`, `app=<name>`
/// (an app of the same network), `elsewhere=true` (any machine but this one),
/// combined with `;`. The request is replayed with its body (buffered when at
/// most [`REPLAY_BODY_MAX`] bytes) and the client never sees the header.
pub const REPLAY: &str = "skein-replay";
/// The largest request body kept for a replay.
pub const REPLAY_BODY_MAX: u64 = 1 << 20;
/// Replays of one request before the proxy gives up (a loop).
pub const MAX_REPLAYS: usize = 3;

/// A parsed `skein-replay` directive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Only machines in this region.
    pub region: Option<String>,
    /// Only this machine.
    pub instance: Option<String>,
    /// Another app of the same network.
    pub app: Option<String>,
    /// Any machine but the one that answered.
    pub elsewhere: bool,
}

impl Replay {
    /// Parses `key=value;key=value`; unknown keys or an empty directive are
    /// refused (None).
    pub fn parse(v: &str) -> Option<Replay> {
        let mut r = Replay::default();
        for part in v.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = part.split_once('=')?;
            let val = val.trim().to_string();
            match k.trim() {
                "region" => r.region = Some(val),
                "instance" => r.instance = Some(val),
                "app" => r.app = Some(val),
                "elsewhere" => r.elsewhere = val == "true",
                _ => return None,
            }
        }
        (r != Replay::default()).then_some(r)
    }
}

/// Keeps a request body that is absent or small enough to replay.
async fn hold_small_body(
    proxy: &Proxy,
    parts: &http::request::Parts,
    body: ProxyBody,
) -> Result<(ProxyBody, Option<Bytes>), Response<ProxyBody>> {
    if body.is_end_stream() {
        return Ok((
            Empty::new().map_err(|never| match never {}).boxed(),
            Some(Bytes::new()),
        ));
    }
    match content_length(&parts.headers) {
        Some(n) if n <= REPLAY_BODY_MAX => {
            match tokio::time::timeout(proxy.cfg.header_timeout, body.collect()).await {
                Ok(Ok(c)) => {
                    let bytes = c.to_bytes();
                    Ok((
                        Full::new(bytes.clone())
                            .map_err(|never| match never {})
                            .boxed(),
                        Some(bytes),
                    ))
                }
                Ok(Err(_)) => Err(local(
                    StatusCode::BAD_REQUEST,
                    "bad_request_body",
                    Some(close()),
                )),
                Err(_) => Err(local(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    Some(close()),
                )),
            }
        }
        _ => Ok((limited(body, proxy.cfg.max_request_body_bytes), None)),
    }
}

/// A streamed body that fails once it passes `limit` bytes; the request is then
/// refused (413) as the client's fault.
fn limited(body: ProxyBody, limit: u64) -> ProxyBody {
    http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed()
}

/// True if a send failed because the request body passed its limit.
fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn close() -> (HeaderName, HeaderValue) {
    (header::CONNECTION, HeaderValue::from_static("close"))
}

/// The request's host as a proxy forwards it (Host on HTTP/1.1, the
/// authority on h2).
pub(crate) fn host_in(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// How a request reaches a machine of `svc`: h2c when the service asks for it,
/// except an upgrade, which needs HTTP/1.1.
pub(crate) fn machine_proto(svc: &crate::table::ServiceRoute, upgrade: bool) -> Proto {
    match (svc.backend_protocol, upgrade) {
        (BackendProtocol::H2c, false) => Proto::H2c,
        _ => Proto::H1,
    }
}

/// Sets what differs between HTTP/1.1 and h2c upstreams: version, URI form, Host.
pub(crate) fn fit(parts: &mut http::request::Parts, proto: Proto, host: &str) {
    parts.version = match proto {
        Proto::H1 => Version::HTTP_11,
        Proto::H2c => Version::HTTP_2,
    };
    // An HTTP/1.1 client's request is already in origin form with its Host:
    // left as it is (the common case costs nothing).
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    if !(proto == Proto::H1 && origin_form) {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = match proto {
            // The path as it is (no parse, no copy): only scheme and
            // authority go.
            Proto::H1 => {
                let mut origin = http::uri::Parts::default();
                origin.path_and_query = Some(
                    parts
                        .uri
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                );
                Uri::from_parts(origin).ok()
            }
            Proto::H2c => Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(pq)
                .build()
                .ok(),
        };
        parts.uri = uri.unwrap_or_else(|| Uri::from_static("/"));
    }
    match proto {
        Proto::H1 => {
            let same = parts
                .headers
                .get(header::HOST)
                .is_some_and(|v| v.as_bytes() == host.as_bytes());
            if !same && let Ok(v) = HeaderValue::from_str(host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        Proto::H2c => {
            parts.headers.remove(header::HOST);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    proxy: &Arc<Proxy>,
    conn: &ConnInfo,
    table: &crate::table::RouteTable,
    app: &Arc<AppRoute>,
    port: &PortRoute,
    host: String,
    mut req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    // A protocol upgrade (websocket): the connection becomes a byte tunnel
    // once the machine answers 101.
    let upgrade = upgrade_protocol(req.headers());
    let mut client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let hint = |name: HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (prefer, mut force) = (hint(PREFER_REGION), hint(FORCE_MACHINE));
    prepare_headers(&mut parts.headers, proxy, conn);
    if let Some(p) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, p.clone());
    }
    let (body, replay_body) = if upgrade.is_some() {
        (body, None)
    } else {
        match hold_small_body(proxy, &parts, body).await {
            Ok(x) => x,
            Err(resp) => return resp,
        }
    };
    let (mut app, mut service) = (app.clone(), port.service);
    let (mut only_region, mut not_machine): (Option<String>, Option<String>) = (None, None);
    let mut next = Request::from_parts(parts, body);
    for hop in 0..=MAX_REPLAYS {
        let Some(svc) = app.services.get(service) else {
            return local(StatusCode::INTERNAL_SERVER_ERROR, "bad_route", None);
        };
        let prefs = Prefs {
            machine: force.as_deref(),
            region: prefer.as_deref(),
            only_region: only_region.as_deref(),
        };
        let exclude: Vec<&str> = not_machine.iter().map(String::as_str).collect();
        let to = To {
            app: &app.name,
            svc,
            host: &host,
            upgrade: upgrade.is_some(),
            whole: replay_body.as_ref(),
        };
        let Sent { resp, head } = attempt(
            proxy,
            table,
            &to,
            prefs,
            &exclude,
            next,
            &mut client_upgrade,
        )
        .await;
        svc.queue.answered.record(resp.status());
        let Some(directive) = resp.headers().get(REPLAY) else {
            return resp;
        };
        let Some(replay) = directive.to_str().ok().and_then(Replay::parse) else {
            return local(StatusCode::BAD_GATEWAY, "replay_invalid", None);
        };
        let (Some(rp), Some(rb)) = (head, &replay_body) else {
            return local(StatusCode::BAD_GATEWAY, "replay_body_too_large", None);
        };
        if hop == MAX_REPLAYS {
            return local(StatusCode::LOOP_DETECTED, "replay_loop", None);
        }
        metrics::counter!("skein_proxy_replays_total").increment(1);
        if let Some(name) = &replay.app {
            let Some(target) = table.app_by_name(name).filter(|t| t.network == app.network) else {
                return local(StatusCode::BAD_GATEWAY, "replay_no_target", None);
            };
            let Some(route) = target.ports.get(&conn.port) else {
                return local(StatusCode::BAD_GATEWAY, "replay_no_target", None);
            };
            service = route.service;
            app = target.clone();
        }
        if replay.region.is_some() {
            only_region = replay.region;
        }
        if replay.instance.is_some() {
            force = replay.instance;
        }
        if replay.elsewhere {
            not_machine = resp
                .headers()
                .get(MACHINE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        // The head as it was last sent: each hop fits it again.
        next = Request::from_parts(
            rp,
            Full::new(rb.clone())
                .map_err(|never| match never {})
                .boxed(),
        );
    }
    local(StatusCode::LOOP_DETECTED, "replay_loop", None)
}

/// Where one hop of a request goes.
struct To<'a> {
    app: &'a str,
    svc: &'a crate::table::ServiceRoute,
    host: &'a str,
    upgrade: bool,
    /// The request's body, when it is small enough to have been held whole:
    /// then the request can be sent again (a worker refused it, a machine
    /// asked for a replay), and each send gives its head back.
    whole: Option<&'a Bytes>,
}

/// Sends a request to one machine of `to.svc`: choose, connect (retrying a
/// refused connect on another machine), send, and answer. A machine on
/// another host is reached through its host's proxy (the backhaul); if that
/// proxy refuses (the machine is at its hard limit there, say), the request
/// goes to another machine when it is still held whole. The head of the
/// request comes back with the answer when the request is held whole.
async fn attempt(
    proxy: &Arc<Proxy>,
    table: &crate::table::RouteTable,
    to: &To<'_>,
    prefs: Prefs<'_>,
    exclude: &[&str],
    req: Request<ProxyBody>,
    client_upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
) -> Sent {
    let svc = to.svc;
    let only = |resp| Sent { resp, head: None };
    let mut pending = Some(req);
    let mut tried: Vec<Arc<str>> = Vec::new();
    // A worker's refusal (status, reason), answered when no other machine
    // is left.
    let mut refused: Option<(StatusCode, &'static str)> = None;
    let mut deadline = crate::balance::QueueDeadline::new(proxy.limits.queue_timeout);
    loop {
        // Choose a machine (waiting in the service's queue while all are full).
        let mut skip: Vec<&str> = tried.iter().map(|s| &**s).collect();
        skip.extend_from_slice(exclude);
        let (backend, slot) = match acquire(
            svc,
            table,
            prefs,
            &skip,
            &mut deadline,
            proxy.limits.queue_depth,
        )
        .await
        {
            Ok(x) => x,
            Err(r) => {
                return only(match refused {
                    Some((status, why)) => local(status, why, None),
                    None => refusal(r, !tried.is_empty()),
                });
            }
        };
        // The hop: the machine itself, or its host's backhaul listener (h2,
        // multiplexed; HTTP/1.1 for an upgrade).
        let (addr, proto) = match backend.via {
            Some(via) if to.upgrade => (via, Proto::H1),
            Some(via) => (via, Proto::H2c),
            None => (backend.addr, machine_proto(svc, to.upgrade)),
        };
        let sender = match proxy.upstreams.get(addr, proto, to.upgrade).await {
            Ok((s, _reused)) => s,
            Err(e) => {
                connect_failed(proxy, backend, &e);
                tried.push(backend.machine.clone());
                if tried.len() > proxy.limits.retries as usize {
                    return only(local(StatusCode::BAD_GATEWAY, "connect_failed", None));
                }
                metrics::counter!("skein_proxy_retries_total", "reason" => "connect").increment(1);
                continue;
            }
        };
        let Some(req) = pending.take() else {
            return only(local(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request_lost",
                None,
            ));
        };
        let (mut p, b) = req.into_parts();
        fit(&mut p, proto, to.host);
        backhaul::strip(&mut p.headers);
        if backend.via.is_some() {
            backhaul::Target {
                app: to.app,
                port: svc.internal_port,
                machine: &backend.machine,
            }
            .write(&mut p.headers);
        }
        let req = Request::from_parts(p, b);
        let keep_head = to.whole.is_some();
        let sent = send(proxy, backend, sender, req, slot, client_upgrade, keep_head);
        match sent.await {
            Ok(Sent { resp, head }) => {
                let Some(why) = resp.headers().get(backhaul::REFUSED) else {
                    return Sent { resp, head };
                };
                // The worker delivered nothing: its answer is dropped here
                // (with the slot it held) and the request goes to another
                // machine if it can be sent again.
                let (status, why) = (resp.status(), backhaul::refusal_reason(why));
                drop(resp);
                if why == "connect_failed" {
                    backend.load.eject(proxy.limits.eject_for);
                }
                tried.push(backend.machine.clone());
                let again = to
                    .whole
                    .filter(|_| tried.len() <= proxy.limits.retries as usize);
                let Some((parts, body)) = head.zip(again) else {
                    return only(local(status, why, None));
                };
                refused = Some((status, why));
                metrics::counter!("skein_proxy_retries_total", "reason" => "backhaul_refused")
                    .increment(1);
                pending = Some(Request::from_parts(
                    parts,
                    Full::new(body.clone())
                        .map_err(|never| match never {})
                        .boxed(),
                ));
                continue;
            }
            Err(SendFailure::NotSent(req, _slot)) => {
                // A pooled connection that the peer had closed: the request is
                // untouched, send it again.
                pending = Some(req);
                metrics::counter!("skein_proxy_retries_total", "reason" => "stale_connection")
                    .increment(1);
                continue;
            }
            Err(SendFailure::Failed(resp)) => return only(resp),
        }
    }
}

/// The answer when no machine could be had.
fn refusal(r: Refusal, tried_some: bool) -> Response<ProxyBody> {
    match r {
        Refusal::Unavailable if tried_some => {
            local(StatusCode::BAD_GATEWAY, "connect_failed", None)
        }
        Refusal::Unavailable => local(StatusCode::SERVICE_UNAVAILABLE, "no_machines", None),
        Refusal::Capacity => local(StatusCode::SERVICE_UNAVAILABLE, "capacity", None),
        Refusal::QueueFull => local(StatusCode::SERVICE_UNAVAILABLE, "queue_full", None),
    }
}

/// Marks a machine that refused a connect.
pub fn connect_failed(proxy: &Proxy, backend: &Backend, e: &ConnectError) {
    backend.load.eject(proxy.limits.eject_for);
    backend.failed(MachineError::Connect);
    metrics::counter!("skein_proxy_upstream_connect_errors_total").increment(1);
    tracing::warn!(machine = %backend.machine, addr = %backend.addr, error = %e, "connect failed; machine ejected");
}

fn prepare_headers(h: &mut HeaderMap, proxy: &Proxy, conn: &ConnInfo) {
    strip(h, platform_request_header);
    // Room for the six below (and the backhaul's three) in one growth, not
    // one per power of two crossed.
    h.reserve(9);
    let (ip, port) = &conn.forwarded;
    let xff = match h.get(X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        None => Some(ip.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    h.insert(X_FORWARDED_PORT, port.clone());
    h.insert(CLIENT_IP, ip.clone());
    h.insert(REGION, proxy.region_header.clone());
    h.insert(REQUEST_ID, request_id());
}

/// Why [`send`] gave no answer of the machine's.
pub(crate) enum SendFailure {
    /// A pooled connection had been closed: the request and its slot come
    /// back untouched, to be sent again.
    NotSent(Request<ProxyBody>, Slot),
    /// The proxy's own answer (a timeout, a broken body…).
    Failed(Response<ProxyBody>),
}

/// Sends `req` on `sender` (connected to the machine, or to the backhaul
/// listener of its host) and streams the answer back holding `slot`.
/// With `keep_head`, the request's head comes back with the answer, to send
/// again (a replay, a worker's refusal): skein's own HTTP/1.1 gives it back
/// as it wrote it; hyper takes the request whole, so a copy is made first.
pub(crate) async fn send(
    proxy: &Arc<Proxy>,
    backend: &Backend,
    sender: Sender,
    req: Request<ProxyBody>,
    slot: Slot,
    client_upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
    keep_head: bool,
) -> Result<Sent, SendFailure> {
    // Where the sender is connected (the pool's key).
    let addr = backend.via.unwrap_or(backend.addr);
    let timeout = proxy.limits.response_timeout;
    let timed_out = || {
        backend.failed(MachineError::Timeout);
        SendFailure::Failed(local(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", None))
    };
    let (req, head) = match &sender {
        Sender::H1(_) => (req, None),
        _ if !keep_head => (req, None),
        _ => {
            let (p, b) = req.into_parts();
            let head = p.clone();
            (Request::from_parts(p, b), Some(head))
        }
    };
    let result = match sender {
        Sender::H1(c) => {
            let sent = c.send(req, &proxy.upstreams, addr);
            return match tokio::time::timeout(timeout, sent).await {
                Err(_) => Err(timed_out()),
                Ok(Ok((resp, head))) => Ok(Sent {
                    resp: answer(backend, resp, slot),
                    head: keep_head.then_some(head),
                }),
                Ok(Err(crate::h1::Failure::NotSent(req))) => Err(SendFailure::NotSent(*req, slot)),
                Ok(Err(crate::h1::Failure::Body(e))) => {
                    Err(SendFailure::Failed(body_failed(backend, &*e)))
                }
                Ok(Err(crate::h1::Failure::Machine(e))) => {
                    Err(SendFailure::Failed(upstream_failed(backend, &e)))
                }
            };
        }
        Sender::Upgrade(mut s) => {
            match tokio::time::timeout(timeout, s.try_send_request(req)).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(mut e)) => match e.take_message() {
                    Some(req) => return Err(SendFailure::NotSent(req, slot)),
                    None => Err(e.into_error()),
                },
                Ok(Ok(resp)) => Ok(resp),
            }
        }
        Sender::H2(c) => {
            return match tokio::time::timeout(timeout, c.send(req)).await {
                Err(_) => Err(timed_out()),
                Ok(Ok(resp)) => Ok(Sent {
                    resp: answer(backend, resp, slot),
                    head,
                }),
                Ok(Err(crate::mux::Failure::NotSent(req))) => Err(SendFailure::NotSent(*req, slot)),
                Ok(Err(crate::mux::Failure::Body(e))) => {
                    Err(SendFailure::Failed(body_failed(backend, &*e)))
                }
                Ok(Err(crate::mux::Failure::Upstream(e))) => {
                    Err(SendFailure::Failed(upstream_failed(backend, &e)))
                }
            };
        }
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) if e.is_user() => return Err(SendFailure::Failed(body_failed(backend, &e))),
        Err(e) => return Err(SendFailure::Failed(upstream_failed(backend, &e))),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade.take()
    {
        return Ok(Sent {
            resp: tunnel(backend, resp, client, slot),
            head,
        });
    }
    Ok(Sent {
        resp: answer(
            backend,
            resp.map(|b| b.map_err(BoxError::from).boxed()),
            slot,
        ),
        head,
    })
}

/// A machine's answer, and the head of the request it answers when the
/// sender asked to keep it.
pub(crate) struct Sent {
    pub(crate) resp: Response<ProxyBody>,
    pub(crate) head: Option<http::request::Parts>,
}

/// The client's own body broke (over its limit, a bad chunk, a reset): its
/// fault, not the machine's, and the connection cannot be trusted any more.
fn body_failed(backend: &Backend, e: &(dyn std::error::Error + 'static)) -> Response<ProxyBody> {
    if over_limit(e) {
        return local(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            Some(close()),
        );
    }
    tracing::debug!(machine = %backend.machine, error = %e, "client body failed");
    local(StatusCode::BAD_REQUEST, "bad_request_body", Some(close()))
}

fn upstream_failed(backend: &Backend, e: &dyn std::fmt::Display) -> Response<ProxyBody> {
    metrics::counter!("skein_proxy_upstream_errors_total").increment(1);
    backend.failed(MachineError::Upstream);
    tracing::warn!(machine = %backend.machine, error = %e, "upstream request failed");
    local(StatusCode::BAD_GATEWAY, "upstream_error", None)
}

/// The machine's answer as the client gets it: without what concerns one hop,
/// with `Via` and the machine's name, holding the machine's slot until its
/// body has ended.
fn answer(backend: &Backend, resp: Response<ProxyBody>, slot: Slot) -> Response<ProxyBody> {
    backend.answered(resp.status());
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static("1.1 skein"));
    if let Some(v) = &backend.machine_header {
        parts.headers.insert(MACHINE, v.clone());
    }
    let tracked = Tracked {
        inner: body,
        slot: Some(slot),
    };
    Response::from_parts(parts, tracked.boxed())
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` with an
/// `Upgrade` header), if any.
pub(crate) fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Answers the client's upgrade with the machine's 101 and joins the two
/// upgraded connections; the machine's slot is held until the tunnel closes.
fn tunnel(
    backend: &Backend,
    mut resp: Response<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    slot: Slot,
) -> Response<ProxyBody> {
    backend.answered(resp.status());
    let upstream = hyper::upgrade::on(&mut resp);
    let machine = backend.machine.clone();
    tokio::spawn(async move {
        let _slot = slot;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                metrics::counter!("skein_proxy_upgrades_total").increment(1);
                let (mut c, mut u) = (
                    hyper_util::rt::TokioIo::new(c),
                    hyper_util::rt::TokioIo::new(u),
                );
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(%machine, error = %e, "upgraded connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(%machine, error = %e, "upgrade failed"),
        }
    });
    let (mut parts, _) = resp.into_parts();
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static("1.1 skein"));
    Response::from_parts(
        parts,
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// The machine's answer on its way to the client: holds the machine's slot
/// until the body has ended (or is dropped).
struct Tracked {
    inner: ProxyBody,
    slot: Option<Slot>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.slot.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long to keep a machine out after a failed connect, and the rest of the
/// request path's bounds.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Time to wait for response headers.
    pub response_timeout: Duration,
    /// Other machines tried after a failed connect.
    pub retries: u32,
    /// A machine that refused a connect is skipped this long.
    pub eject_for: Duration,
    /// Longest wait for a free machine.
    pub queue_timeout: Duration,
    /// Most requests waiting per service.
    pub queue_depth: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_clients_hop_and_platform_headers_are_removed_and_the_rest_kept() {
        let mut h = headers(&[
            ("host", "a.example"),
            ("connection", "keep-alive, X-Trace-Hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-trace-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("skein-client-ip", "6.6.6.6"),
            ("skein-backhaul-machine", "m1"),
            ("skein-force-machine", "m2"),
            ("skein-trace", "app's own"),
            ("x-forwarded-for", "10.0.0.1"),
            ("accept", "*/*"),
        ]);
        strip(&mut h, platform_request_header);
        for name in backhaul::HEADERS
            .iter()
            .chain(&[CLIENT_IP, REGION, REQUEST_ID, MACHINE])
        {
            assert!(
                platform_request_header(name.as_str()),
                "{name} must not cross"
            );
        }
        let mut left: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "accept: */*",
                "host: a.example",
                "skein-trace: app's own",
                "te: trailers",
                "x-forwarded-for: 10.0.0.1",
            ]
        );
    }

    #[test]
    fn te_other_than_trailers_does_not_cross_and_responses_keep_platform_headers() {
        let mut h = headers(&[
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("skein-machine", "m1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["skein-machine"], "m1");
    }

    fn parts(uri: &str, host: Option<&'static str>) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).map(|r| r.into_parts().0).expect("a request")
    }

    #[test]
    fn requests_are_fitted_to_the_machines_protocol() {
        // From h2 (absolute form, no Host) to an HTTP/1.1 machine.
        let mut p = parts("https://a.example/x/y?q=1", None);
        fit(&mut p, Proto::H1, "a.example");
        assert_eq!(p.uri.to_string(), "/x/y?q=1");
        assert_eq!(p.headers["host"], "a.example");
        assert_eq!(p.version, Version::HTTP_11);
        // HTTP/1.1 in origin form keeps its path; Host is the routed name.
        let mut p = parts("/x?q=2", Some("A.Example:443"));
        fit(&mut p, Proto::H1, "a.example");
        assert_eq!(p.uri.to_string(), "/x?q=2");
        assert_eq!(p.headers["host"], "a.example");
        // To h2c: scheme and authority, no Host.
        let mut p = parts("/x?q=3", Some("a.example"));
        fit(&mut p, Proto::H2c, "a.example");
        assert_eq!(p.uri.to_string(), "http://a.example/x?q=3");
        assert!(!p.headers.contains_key("host"));
        assert_eq!(p.version, Version::HTTP_2);
    }

    #[test]
    fn request_ids_are_24_hex_digits_and_differ() {
        let (a, b) = (request_id(), request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 24);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
        }
        assert_ne!(a, b);
        assert!(a.is_sensitive(), "never indexed by HPACK");
    }

    #[test]
    fn the_announced_length_is_read_from_content_length() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert(header::CONTENT_LENGTH, "1024".parse().unwrap());
        assert_eq!(content_length(&h), Some(1024));
        h.insert(header::CONTENT_LENGTH, "x".parse().unwrap());
        assert_eq!(content_length(&h), None);
    }
}
