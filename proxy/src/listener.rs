//! Client connections: accept (bounded), tell TLS from plaintext by the first
//! byte, terminate TLS with the certificate the SNI names, then serve HTTP/1.1 or
//! h2 with hyper under the configured limits. Which protocol is known before
//! hyper sees a byte: ALPN says it under TLS, a peek at the h2 preface says it in
//! plaintext (nothing is read ahead into a buffer that would have to be handed
//! back, and no buffer grows for it).
//!
//! Draining: when the proxy stops, every accept loop stops accepting, every HTTP
//! connection is asked to finish (HTTP/1.1 closes after the response in flight,
//! h2 sends GOAWAY and finishes its streams), and each loop waits until all of
//! its connections have ended (all its permits are back); the proxy bounds that
//! wait by its drain deadline.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Proxy;
use crate::http::ConnInfo;
use crate::table::{AppRoute, normalize_host};
use crate::tcp::{self, Prefixed};

/// First byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

pub use skein_catalog::store::stopped;

/// Accepts on `listener` until `stop` says so, then waits for its connections,
/// which `drain` asks to finish. `port`: the catalog port the listener stands
/// for; None for a steered socket, whose connections each carry the address
/// and port the client asked for.
pub async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    port: Option<u16>,
    stop: tokio::sync::watch::Receiver<bool>,
    drain: CancellationToken,
) {
    let max = proxy.cfg.max_connections;
    let labels = Accepting {
        total: "skein_proxy_connections_total",
        active: "skein_proxy_connections_active",
        span: "conn",
    };
    accept(
        proxy,
        listener,
        max,
        stop,
        drain,
        labels,
        move |p, s, peer, d| connection(p, s, peer, port, d),
    )
    .await
}

/// The names one accept loop reports under.
pub(crate) struct Accepting {
    /// Counter of accepted connections.
    pub total: &'static str,
    /// Gauge of open ones.
    pub active: &'static str,
    /// Name of each connection's span.
    pub span: &'static str,
}

/// The accept loop every listener shares: at most `max` connections at once
/// (more wait in the backlog), accept errors counted and paced, each
/// connection served by `serve` in its own task and span. After `stop` it
/// returns once every connection it accepted has ended (`drain` asks them to).
pub(crate) async fn accept<F, Fut>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    max: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    drain: CancellationToken,
    names: Accepting,
    serve: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, std::net::SocketAddr, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let max = max.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut stop) => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    metrics::counter!("skein_proxy_accept_errors_total").increment(1);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        metrics::counter!(names.total).increment(1);
        let span = tracing::debug_span!("accepted", kind = names.span, client = %peer);
        let open = Open::new(metrics::gauge!(names.active), permit);
        let work = serve(proxy.clone(), stream, peer, drain.clone());
        // The connection's future is the task: wrapping it in an `async` block
        // would store it twice (the block's capture and its awaitee), doubling
        // what every open connection costs.
        tokio::spawn(Guarded { work, _open: open }.instrument(span));
    }
    drop(listener);
    // Every connection holds a permit until it ends: all of them back means
    // all of this listener's connections are done.
    let _ = permits
        .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
        .await;
}

/// One open connection: counted in the gauge and holding its permit until
/// the connection's task ends or is dropped.
struct Open {
    active: metrics::Gauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Open {
    fn new(active: metrics::Gauge, permit: tokio::sync::OwnedSemaphorePermit) -> Open {
        active.increment(1.0);
        Open {
            active,
            _permit: permit,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

pin_project_lite::pin_project! {
    /// A connection's future with the accounting it releases when it ends.
    struct Guarded<F> {
        #[pin]
        work: F,
        _open: Open,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Guarded<F> {
    type Output = ();
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.project().work.poll(cx)
    }
}

/// Most bytes read while looking for a complete ClientHello.
const MAX_HELLO: usize = 64 << 10;

/// Reads TLS records until rustls has a whole ClientHello; returns the bytes
/// read (to be replayed), the SNI name, and whether it offers `acme-tls/1`.
async fn read_client_hello(stream: &mut TcpStream) -> io::Result<(Bytes, Option<String>, bool)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        let start = buf.len();
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut fresh = &buf[start..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let sni = hello.server_name().map(normalize_host);
                let acme = crate::acme::offers_acme_tls(&hello);
                return Ok((buf.freeze(), sni, acme));
            }
            Ok(None) if buf.len() < MAX_HELLO => continue,
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello too large",
                ));
            }
            Err((e, _)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// One client connection, start to end. Its future is the connection's task,
/// kept for as long as the connection is open: the rarer paths (raw TCP,
/// ACME validation) are boxed so that their state does not set the size of
/// every HTTP connection's task.
async fn connection(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    port: Option<u16>,
    drain: CancellationToken,
) {
    let header_timeout = proxy.cfg.header_timeout;
    let local = stream.local_addr().unwrap_or(peer);
    let local = std::net::SocketAddr::new(local.ip().to_canonical(), local.port());
    let port = port.unwrap_or(local.port());
    // A flycast address names its app (or Kubernetes Service) itself.
    let flycast = match local.ip() {
        std::net::IpAddr::V6(a) if skein_catalog::sixpn::policy::is_flycast(&a.octets()) => Some(a),
        _ => None,
    };
    let info = |tls: bool, sni: Option<String>| ConnInfo::new(peer, local, port, tls, sni, flycast);
    let table = proxy.routes.load_full();
    let on_port = |app: &Arc<AppRoute>| Some((app.clone(), app.ports.get(&port)?.clone()));
    let pinned = match flycast {
        Some(a) => {
            let found = table.flycast(a).and_then(on_port);
            if found.is_none() {
                metrics::counter!("skein_proxy_flycast_refused_total").increment(1);
                return tracing::debug!(%a, port, "no app or service on this flycast port");
            }
            found
        }
        None => None,
    };
    // A raw TCP port: the machine may speak first, so nothing is read here.
    let raw = match &pinned {
        Some((app, route)) => (!route.tls && !route.http).then(|| (app.clone(), route.clone())),
        None => table.raw_port(port).and_then(on_port),
    };
    if let Some((app, route)) = raw {
        return Box::pin(tcp::pipe(
            proxy,
            stream,
            table,
            app,
            route,
            info(false, None),
        ))
        .await;
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) => {
            metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "first_byte")
                .increment(1);
            return;
        }
    }
    if first[0] != TLS_HANDSHAKE {
        // An idle keep-alive connection must not keep the table it was routed
        // by (after a few catalog changes, every old table would stay alive).
        drop((table, pinned));
        let Some(speaks) = plaintext_speaks(&stream, header_timeout).await else {
            return;
        };
        let info = Arc::new(info(false, None));
        return serve_http(&proxy, stream, info, drain, speaks).await;
    }
    let (hello, sni, acme) =
        // Boxed: rustls's acceptor (a whole connection state) must not size
        // the task every open connection keeps.
        match tokio::time::timeout(header_timeout, Box::pin(read_client_hello(&mut stream))).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                metrics::counter!("skein_proxy_tls_handshakes_total", "result" => "bad_hello")
                    .increment(1);
                return tracing::debug!(error = %e, "no ClientHello");
            }
            Err(_) => {
                metrics::counter!("skein_proxy_tls_handshakes_total", "result" => "timeout")
                    .increment(1);
                return;
            }
        };
    if acme {
        return Box::pin(acme_validation(
            &proxy,
            Prefixed::new(hello, stream),
            header_timeout,
        ))
        .await;
    }
    let name = sni.clone().or_else(|| proxy.cfg.default_hostname.clone());
    let routed = pinned.or_else(|| name.as_deref().and_then(|n| table.app(n)).and_then(on_port));
    let stream = Prefixed::new(hello, stream);
    // TLS the machine terminates itself: pass the bytes through, ClientHello first.
    if let Some((app, route)) = &routed
        && !route.tls
        && !route.http
    {
        return Box::pin(tcp::pipe(
            proxy.clone(),
            stream,
            table,
            app.clone(),
            route.clone(),
            info(true, sni),
        ))
        .await;
    }
    let raw = matches!(&routed, Some((_, r)) if r.tls && !r.http);
    let config = if raw {
        proxy.raw_tls.clone()
    } else {
        proxy.http_tls.clone()
    };
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
        start.into_stream(config).await
    };
    // The handshake's state is boxed and the stream it makes too: the task of
    // an open connection then holds a pointer, not rustls's connection (1.2
    // KB) in each of the places the task's layout keeps one.
    let tls = match tokio::time::timeout(header_timeout, Box::pin(handshake)).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            metrics::counter!("skein_proxy_tls_handshakes_total", "result" => "failed")
                .increment(1);
            return tracing::debug!(error = %e, "TLS handshake failed");
        }
        Err(_) => {
            metrics::counter!("skein_proxy_tls_handshakes_total", "result" => "timeout")
                .increment(1);
            return;
        }
    };
    metrics::counter!("skein_proxy_tls_handshakes_total", "result" => "ok").increment(1);
    match routed.filter(|_| raw) {
        Some((app, route)) => {
            Box::pin(tcp::pipe(proxy, tls, table, app, route, info(true, sni))).await
        }
        None => {
            drop(table);
            // ALPN decided; a client that offered none speaks HTTP/1.1.
            let speaks = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Speaks::H2,
                _ => Speaks::H1,
            };
            let info = Arc::new(info(true, sni));
            serve_http(&proxy, tls, info, drain, speaks).await
        }
    }
}

/// A CA validating TLS-ALPN-01: the handshake is the whole answer (RFC 8737
/// section 3); no application data follows, so the connection is closed.
async fn acme_validation<S>(proxy: &Proxy, stream: S, timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = proxy.acme_tls.clone();
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
        start.into_stream(config).await
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(mut tls)) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "acme-tls/1 handshake failed"),
        Err(_) => tracing::debug!("acme-tls/1 handshake timed out"),
    }
}

/// The h2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a plaintext connection speaks: h2 if it opens with the h2 preface (h2c
/// with prior knowledge), HTTP/1.1 at the first byte that differs (or at EOF).
/// None when the socket fails or nothing decides within `timeout` (counted).
pub(crate) async fn plaintext_speaks(stream: &TcpStream, timeout: Duration) -> Option<Speaks> {
    match tokio::time::timeout(timeout, h2c_preface(stream)).await {
        Ok(Ok(true)) => Some(Speaks::H2),
        Ok(Ok(false)) => Some(Speaks::H1),
        Ok(Err(_)) => None,
        Err(_) => {
            metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "preface")
                .increment(1);
            None
        }
    }
}

/// True if the stream opens with the h2 preface, false at the first byte that
/// differs (or at EOF). Peeks, so hyper reads everything itself; a preface
/// that arrives in pieces is peeked again after a millisecond (rare: it is
/// one segment from every real client).
async fn h2c_preface(stream: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Which HTTP a connection speaks, decided before hyper reads a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Speaks {
    /// HTTP/1.1 (and 1.0), with upgrades.
    H1,
    /// h2 (ALPN `h2`, or h2c with prior knowledge).
    H2,
}

/// hyper's HTTP/1.1 server under the configured limits: header size, count
/// and read timeout (slowloris). Every listener serves HTTP/1.1 with this.
pub(crate) fn h1_server(cfg: &crate::ProxyConfig) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(cfg.max_headers)
        .keep_alive(true);
    b
}

/// A hyper connection that can be asked to finish what it is doing and end.
pub(crate) trait Graceful: std::future::Future {
    /// HTTP/1.1: close after the response in flight (at once when idle);
    /// h2: GOAWAY, then finish the open streams.
    fn finish(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn finish(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

pin_project_lite::pin_project! {
    /// A connection served to its end, asked to finish when the drain begins.
    pub(crate) struct Drained<C> {
        #[pin]
        conn: C,
        #[pin]
        drain: tokio_util::sync::WaitForCancellationFutureOwned,
        asked: bool,
    }
}

impl<C: Graceful> Drained<C> {
    pub(crate) fn new(conn: C, drain: CancellationToken) -> Self {
        Drained {
            conn,
            drain: drain.cancelled_owned(),
            asked: false,
        }
    }
}

impl<C: Graceful> std::future::Future for Drained<C> {
    type Output = C::Output;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<C::Output> {
        let mut this = self.project();
        if !*this.asked && this.drain.as_mut().poll(cx).is_ready() {
            *this.asked = true;
            this.conn.as_mut().finish();
        }
        this.conn.poll(cx)
    }
}

/// Serves HTTP on `io` until the client or a drain ends it. Not an `async fn`:
/// the connection is built here and only it is awaited, so the future an idle
/// connection keeps is hyper's connection and nothing stored beside it (an
/// `async fn` would also keep its moved-out arguments).
fn serve_http<I>(
    proxy: &Arc<Proxy>,
    io: I,
    info: Arc<ConnInfo>,
    drain: CancellationToken,
    speaks: Speaks,
) -> impl std::future::Future<Output = ()> + Send + use<I>
where
    I: AsyncRead + AsyncWrite + crate::rest::Readable + Unpin + Send + Sync + 'static,
{
    if speaks == Speaks::H1 {
        return Either::Left(crate::rest::serve(proxy.clone(), io, info, drain));
    }
    let limits = crate::mux::server::Limits::clients(&proxy.cfg);
    let clients = Clients {
        proxy: proxy.clone(),
        info,
    };
    // Boxed, so the task of a resting HTTP/1.1 connection is not sized for
    // an h2 connection.
    Either::Right(Box::pin(crate::mux::server::serve(
        io, limits, drain, clients,
    )))
}

/// What answers a client's h2 requests.
struct Clients {
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
}

impl crate::mux::server::Handler for Clients {
    fn call(
        &self,
        req: http::Request<crate::upstream::ProxyBody>,
    ) -> impl std::future::Future<Output = http::Response<crate::upstream::ProxyBody>> + Send + '_
    {
        crate::http::serve_request(&self.proxy, &self.info, req)
    }
}
