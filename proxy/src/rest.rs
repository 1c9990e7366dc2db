//! HTTP/1.1 client connections, and resting: an idle keep-alive client
//! connection gives its buffers back.
//!
//! A connection is served by skein's own HTTP/1.1 ([`crate::h1`]) while its
//! requests have no body and upgrade nothing: between them it holds no
//! buffer (it rests at once). A request it cannot take, and what follows, is
//! served by hyper until hyper's connection rests, as below, and the
//! connection comes back.
//!
//! hyper keeps a connection's read and write buffers (8 KiB each once used),
//! its parser state and a header timer for as long as the connection lives,
//! idle or not. Most keep-alive connections at an edge are idle most of the
//! time, so those buffers are most of a proxy's memory. Like nginx's
//! keep-alive handler, skein lets them go: once a connection has moved no
//! byte for `rest_after` and has no request in flight, hyper is asked to end
//! it *without* closing the socket (the shutdown is swallowed), hands back the
//! stream and any bytes it had read ahead, and the connection waits for
//! readability holding only its socket (and TLS state). The next byte starts
//! a fresh hyper connection on the same stream; the client sees one
//! keep-alive connection throughout.
//!
//! Idleness is checked by a timer that backs off while the connection stays
//! busy (`rest_after`, then doubling up to 2 s after two busy checks), so a
//! busy connection costs one timer event every two seconds, a connection with
//! a request a second two (it rests `rest_after` to twice that after it).
//! A connection with no request for `keepalive_timeout` after its last
//! response is closed; a request head, once begun, must be whole within
//! `header_timeout` (a new connection's first, within `header_timeout` of the
//! accept), however often the connection rests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Proxy;
use crate::h1::{self, Next};
use crate::http::{ConnInfo, handle_hyper, local, serve_request};
use crate::tcp::Prefixed;
use crate::upstream::ProxyBody;

/// Longest wait between two idleness checks of a busy connection.
const MAX_CHECK: Duration = Duration::from_secs(2);

/// A stream that can wait until it has something to read without reading
/// (and so without a buffer).
pub(crate) trait Readable {
    /// Ready when a read would not block (data, EOF or an error).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl<S: Readable + Sync + ?Sized> Readable for Box<S> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        (**self).readable()
    }
}

impl Readable for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
}

impl<S: Readable + Sync> Readable for Prefixed<S> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let ready = self.has_prefix();
        let inner = self.inner();
        async move {
            if ready {
                return Ok(());
            }
            inner.readable().await
        }
    }
}

impl<S: Readable + Sync> Readable for tokio_rustls::server::TlsStream<S> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        // hyper reads until the stream has nothing more before it is idle, so
        // rustls holds no plaintext here: only the socket can wake us.
        self.get_ref().0.readable()
    }
}

/// How many connections rest, in a gauge and a number the proxy can report.
#[derive(Debug)]
pub(crate) struct Resting {
    now: std::sync::atomic::AtomicUsize,
    gauge: metrics::Gauge,
}

impl Resting {
    pub(crate) fn new() -> Resting {
        Resting {
            now: Default::default(),
            gauge: metrics::gauge!("skein_proxy_client_connections_resting"),
        }
    }

    pub(crate) fn now(&self) -> usize {
        self.now.load(Ordering::Relaxed)
    }
}

/// One connection counted as resting until dropped (however its task ends).
struct Rests(Arc<Proxy>);

impl Rests {
    fn new(proxy: &Arc<Proxy>) -> Rests {
        proxy.resting.now.fetch_add(1, Ordering::Relaxed);
        proxy.resting.gauge.increment(1.0);
        Rests(proxy.clone())
    }
}

impl Drop for Rests {
    fn drop(&mut self) {
        self.0.resting.now.fetch_sub(1, Ordering::Relaxed);
        self.0.resting.gauge.decrement(1.0);
    }
}

/// What a connection's driver shares with its stream and its requests.
#[derive(Debug, Default)]
struct Pulse {
    /// Bumped by every read or write that moved bytes.
    moved: AtomicU32,
    /// Requests whose response has not been written out.
    in_flight: AtomicU32,
    /// Requests started, ever.
    started: AtomicU32,
    /// Set while hyper is being ended for a rest: its shutdown of the stream
    /// is swallowed, the socket stays open.
    resting: AtomicBool,
}

pin_project_lite::pin_project! {
    /// A stream that tells its [`Pulse`] when bytes move.
    struct Watched<S> {
        #[pin]
        inner: S,
        pulse: Arc<Pulse>,
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() != before {
            this.pulse.moved.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.pulse.moved.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.pulse.moved.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.pulse.resting.load(Ordering::Relaxed) {
            // hyper ends for a rest, not for good: the socket stays open.
            return this.inner.poll_flush(cx);
        }
        this.inner.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its request as in flight until it has been
    /// written out (hyper drops a body once its last frame is sent) or dropped.
    struct Counted {
        #[pin]
        body: ProxyBody,
        done: Done,
    }
}

/// Ends a request's flight when dropped.
struct Done(Arc<Pulse>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why hyper's connection ended.
enum Ended<S> {
    /// For good (client closed, error, upgrade, drain).
    Done,
    /// For a rest: the stream, what hyper had read ahead, and the last moment
    /// the connection was seen moving bytes.
    Rest(Prefixed<Watched<S>>, Bytes, Instant),
}

/// Serves HTTP/1.1 on `io` until the client or a drain ends it. Requests
/// without a body or an upgrade (most of them) are read and answered here
/// ([`own`]); the first that is not, and what follows it on the connection,
/// is served by hyper until that connection rests (`[proxy] rest_after`),
/// when it comes back here. `io` is stored in the task a few times over (the
/// layout of `async` state does not share a moved value's slot): a TLS stream
/// comes boxed.
pub(crate) async fn serve<I>(
    proxy: Arc<Proxy>,
    io: I,
    info: Arc<ConnInfo>,
    drain: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Readable + Unpin + Send + Sync + 'static,
{
    let pulse = Arc::new(Pulse::default());
    let mut watched = Watched {
        inner: io,
        pulse: pulse.clone(),
    };
    let mut ahead = BytesMut::new();
    // The TLS handshake (done) and the first request head: within the header
    // timeout of the accept (roughly: from here).
    let opened = Instant::now() + proxy.cfg.header_timeout;
    let mut by = By {
        first_byte: opened,
        head: Some(opened),
    };
    loop {
        // Boxed: the request path's state lives on the heap only while a
        // request is being served.
        let mine = Box::pin(own(&proxy, &info, &mut watched, ahead, by, &drain));
        let Some((read, head_since)) = mine.await else {
            return;
        };
        let wake = Wake {
            quiet_since: head_since,
            started: pulse.started.load(Ordering::Relaxed),
        };
        let at = At {
            proxy: proxy.clone(),
            info: info.clone(),
            pulse: pulse.clone(),
            drain: drain.clone(),
            wake,
        };
        // Boxed: hyper's connection lives on the heap only while awake.
        match Box::pin(awake(at, Prefixed::new(read.freeze(), watched))).await {
            Ended::Done => return,
            Ended::Rest(s, more, quiet) => {
                pulse.resting.store(false, Ordering::Relaxed);
                let (prefix, w) = s.into_parts();
                watched = w;
                ahead = BytesMut::from(&join(prefix, more)[..]);
                // Part of a head hyper had read is finished here, by the
                // header timeout after its bytes last moved.
                by = By {
                    first_byte: quiet + proxy.cfg.keepalive_timeout,
                    head: (!ahead.is_empty()).then(|| quiet + proxy.cfg.header_timeout),
                };
            }
        }
    }
}

/// What a rest waits for besides the client's bytes: its deadline, the drain,
/// and the connection's idle timer.
struct Waits<'a, 'd> {
    until: Instant,
    drained: Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'d>>,
    idle: Pin<&'a mut tokio::time::Sleep>,
}

/// Deadlines of the next request: its first byte (the keep-alive timeout
/// after a response), and its whole head (the header timeout after its first
/// byte, unless set earlier).
#[derive(Clone, Copy)]
struct By {
    first_byte: Instant,
    head: Option<Instant>,
}

/// Serves requests without a body or an upgrade on the connection itself:
/// skein's own HTTP/1.1 ([`crate::h1`]), no per-connection buffer or parser
/// state between requests (a connection waiting for its next request holds
/// its socket and TLS state only: it rests at once). Returns the bytes read so
/// far when a request is hyper's (with when its head began), None when the
/// connection has ended.
async fn own<I>(
    proxy: &Arc<Proxy>,
    info: &Arc<ConnInfo>,
    s: &mut Watched<I>,
    mut buf: BytesMut,
    mut by: By,
    drain: &CancellationToken,
) -> Option<(BytesMut, Instant)>
where
    I: AsyncRead + AsyncWrite + Readable + Unpin + Send,
{
    let cfg = &proxy.cfg;
    // Registered with the token once, not at every rest; and one idle timer,
    // moved only when it would fire late (a later deadline is found when it
    // fires): a busy connection does not take a timer in and out of the wheel
    // per request.
    let drained = drain.cancelled();
    tokio::pin!(drained);
    let idle = tokio::time::sleep_until(by.first_byte);
    tokio::pin!(idle);
    loop {
        if buf.is_empty() {
            let waits = Waits {
                until: by.first_byte,
                drained: drained.as_mut(),
                idle: idle.as_mut(),
            };
            buf = rest(proxy, s, buf, waits).await?;
        }
        let head_since = Instant::now();
        let head_by = by.head.unwrap_or(head_since + cfg.header_timeout);
        let plain = loop {
            match h1::parse_request(&mut buf, cfg.max_headers) {
                Next::Plain(p) => break p,
                Next::Hyper => return Some((buf, head_since)),
                Next::Invalid(code) => {
                    let refused = local(StatusCode::BAD_REQUEST, code, None);
                    let _ = h1::write_response(s, refused, false, true).await;
                    close(s).await;
                    return None;
                }
                Next::Partial if buf.len() >= cfg.max_header_bytes => {
                    // hyper answers 431 as it does for any head too large.
                    return Some((buf, head_since));
                }
                Next::Partial => {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(4096);
                    }
                    match tokio::time::timeout_at(head_by, s.read_buf(&mut buf)).await {
                        Err(_) => {
                            metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "header")
                                .increment(1);
                            close(s).await;
                            return None;
                        }
                        Ok(Ok(0) | Err(_)) => return None,
                        Ok(Ok(_)) => {}
                    }
                }
            }
        };
        let head_only = plain.req.method() == Method::HEAD;
        let resp = serve_request(proxy, info, plain.req).await;
        let close_after = plain.close || drain.is_cancelled();
        match h1::write_response(s, resp, head_only, close_after).await {
            Ok(true) => {}
            Ok(false) => {
                close(s).await;
                return None;
            }
            Err(_) => return None,
        }
        let now = Instant::now();
        by = By {
            first_byte: now + cfg.keepalive_timeout,
            head: None,
        };
    }
}

/// The client's next bytes: what has come already, read into `buf` (the
/// next request of a client that does not wait; plaintext rustls read with
/// the last handshake flight or record, which the socket no longer shows),
/// else waited for holding no buffer until `deadline` (the keep-alive
/// timeout, or the header timeout of a new connection) and until a drain.
/// None when the client closed or the wait ended (the connection is then
/// closed).
async fn rest<I>(
    proxy: &Arc<Proxy>,
    s: &mut Watched<I>,
    mut buf: BytesMut,
    waits: Waits<'_, '_>,
) -> Option<BytesMut>
where
    I: AsyncRead + AsyncWrite + Readable + Unpin,
{
    // No system call when the socket has shown nothing since the last read.
    buf.reserve(2048);
    match futures_util::FutureExt::now_or_never(s.read_buf(&mut buf)) {
        Some(Ok(n)) if n > 0 => return Some(buf),
        Some(_) => return None,
        None => drop(buf),
    }
    let Waits {
        until,
        mut drained,
        mut idle,
    } = waits;
    if idle.deadline() > until {
        idle.as_mut().reset(until);
    }
    let rests = Rests::new(proxy);
    let woke = loop {
        tokio::select! {
            r = first_bytes(s, proxy.cfg.requests_per_turn) => break match r {
                Ok(b) if !b.is_empty() => Some(b),
                _ => None,
            },
            _ = drained.as_mut() => break None,
            _ = idle.as_mut() => {
                if Instant::now() < until {
                    idle.as_mut().reset(until);
                    continue;
                }
                metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "idle").increment(1);
                break None;
            }
        }
    };
    drop(rests);
    if woke.is_none() {
        close(s).await;
    }
    woke
}

/// Closes as hyper closes an idle connection (TLS close_notify, then FIN),
/// without waiting long on a client that reads nothing.
async fn close<I: AsyncWrite + Unpin>(s: &mut Watched<I>) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncWriteExt::shutdown(s),
    )
    .await;
}

/// Waits for the client's next bytes without a buffer, then reads what came
/// into a small one that hyper is handed first: a client that only closes
/// (FIN, close_notify) is let go without building a hyper connection (and its
/// buffers) to read the end of it, which matters when many leave at once.
async fn first_bytes<I>(s: &mut Watched<I>, per_turn: u32) -> io::Result<BytesMut>
where
    I: AsyncRead + Readable + Unpin,
{
    s.inner.readable().await?;
    crate::admit::admit(per_turn).await;
    let mut b = BytesMut::with_capacity(2048);
    s.read_buf(&mut b).await?;
    Ok(b)
}

/// Bytes read but not yet used, copied out: what hyper hands back is a view
/// of its whole read buffer (8 KiB or more), which must not outlive it.
fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() && b.is_empty() {
        return Bytes::new();
    }
    let mut m = BytesMut::with_capacity(a.len() + b.len());
    m.extend_from_slice(&a);
    m.extend_from_slice(&b);
    m.freeze()
}

/// Where a wake starts from.
#[derive(Clone, Copy)]
struct Wake {
    /// When the client last went quiet before a request head: the header
    /// timeout counts from here until the next request starts.
    quiet_since: Instant,
    /// Requests started before this wake. A wake always begins with the head
    /// (whole or in part) of the request skein handed over: it does not rest
    /// before that request starts.
    started: u32,
}

/// What one wake of a connection works with (owned: the future is `Send`
/// for every lifetime, as a spawned task's must be).
struct At {
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    pulse: Arc<Pulse>,
    drain: CancellationToken,
    wake: Wake,
}

/// Drives one hyper connection on `stream` until it ends for good or rests.
async fn awake<I>(at: At, stream: Prefixed<Watched<I>>) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let At {
        proxy,
        info,
        pulse,
        drain,
        wake,
    } = at;
    let (p, i, pl) = (proxy.clone(), info.clone(), pulse.clone());
    let svc = service_fn(move |req| {
        pl.in_flight.fetch_add(1, Ordering::Relaxed);
        pl.started.fetch_add(1, Ordering::Relaxed);
        let done = Done(pl.clone());
        let answer = handle_hyper(p.clone(), i.clone(), req);
        async move {
            let resp = answer.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Counted { body, done }))
        }
    });
    let mut conn = crate::listener::h1_server(&proxy.cfg)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let header_deadline = wake.quiet_since + proxy.cfg.header_timeout;
    let rest_after = proxy.cfg.rest_after;
    let mut every = rest_after;
    let mut seen = pulse.moved.load(Ordering::Relaxed);
    let mut moving_at = Instant::now();
    let mut busy_ticks = 0u32;
    let tick = tokio::time::sleep(every);
    tokio::pin!(tick);
    // `rest_after = 0s`: a connection hyper serves keeps its buffers (no
    // idleness checks; a drain still ends it).
    let checks = !rest_after.is_zero();
    let mut asked = false;
    loop {
        tokio::select! {
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                    return Ended::Done;
                }
                if !pulse.resting.load(Ordering::Relaxed) {
                    return Ended::Done;
                }
                // Ended for a rest (None: the connection was upgraded meanwhile).
                return match conn.into_parts() {
                    Some(parts) => Ended::Rest(parts.io.into_inner(), parts.read_buf, moving_at),
                    None => Ended::Done,
                };
            }
            // The drain `listener::Drained` gives other connections, done
            // here: a rest needs the connection itself (`into_parts`), which
            // `Drained` would hold pinned.
            _ = drain.cancelled(), if !asked => {
                asked = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            _ = &mut tick, if !asked && checks => {
                let now = Instant::now();
                let moved = pulse.moved.load(Ordering::Relaxed);
                let no_head_yet = pulse.started.load(Ordering::Relaxed) == wake.started;
                if no_head_yet && now >= header_deadline {
                    // Woken by bytes that never became a request head in time
                    // (hyper's own timer restarted when it was woken).
                    metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "header").increment(1);
                    return Ended::Done;
                }
                if moved == seen
                    && pulse.in_flight.load(Ordering::Relaxed) == 0
                    && !no_head_yet
                {
                    pulse.resting.store(true, Ordering::Relaxed);
                    metrics::counter!("skein_proxy_client_rests_total").increment(1);
                    Pin::new(&mut conn).graceful_shutdown();
                    asked = true;
                } else {
                    // One busy tick (the request that woke the connection)
                    // checks again as soon; a connection busy for longer is
                    // checked less and less often.
                    if moved != seen {
                        moving_at = now;
                        busy_ticks += 1;
                    }
                    seen = moved;
                    if busy_ticks > 1 {
                        every = (every * 2).min(MAX_CHECK);
                    }
                    let mut next = now + every;
                    if no_head_yet {
                        next = next.min(header_deadline);
                    }
                    tick.as_mut().reset(next);
                }
            }
        }
    }
}
