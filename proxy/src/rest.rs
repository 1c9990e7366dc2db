//! Resting HTTP/1.1 connections: an idle keep-alive client connection gives
//! its buffers back.
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
//! The header timeout keeps its meaning across a rest: a client that sends
//! nothing, or part of a request head, is closed `header_timeout` after it
//! went quiet, however often it rests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Proxy;
use crate::http::{ConnInfo, handle};
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

/// Serves HTTP/1.1 on `io` until the client or a drain ends it, resting the
/// connection whenever it has been idle for `[proxy] rest_after`. `io` is stored in
/// the task a few times over (the layout of `async` state does not share a
/// moved value's slot): a TLS stream comes boxed.
pub(crate) async fn serve<I>(
    proxy: Arc<Proxy>,
    io: I,
    info: Arc<ConnInfo>,
    drain: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Readable + Unpin + Send + Sync + 'static,
{
    let pulse = Arc::new(Pulse::default());
    let mut stream = Prefixed::new(
        Bytes::new(),
        Watched {
            inner: io,
            pulse: pulse.clone(),
        },
    );
    // Until a request head is read, the header timeout runs from here.
    let mut quiet_since = Instant::now();
    let mut started_at_wake = 0;
    let mut carried = false;
    loop {
        let wake = Wake {
            quiet_since,
            started: started_at_wake,
            carried,
        };
        // Boxed: hyper's connection lives on the heap only while awake.
        let (s, ahead, quiet) = match Box::pin(awake(
            At {
                proxy: proxy.clone(),
                info: info.clone(),
                pulse: pulse.clone(),
                drain: drain.clone(),
                wake,
            },
            stream,
        ))
        .await
        {
            Ended::Done => return,
            Ended::Rest(s, ahead, quiet) => (s, ahead, quiet),
        };
        pulse.resting.store(false, Ordering::Relaxed);
        let (prefix, mut watched) = s.into_parts();
        let ahead = join(prefix, ahead);
        // The header timeout counts from when the client went quiet, whether
        // it then sends nothing or part of a head, however often it rests.
        let started = pulse.started.load(Ordering::Relaxed);
        if started != started_at_wake {
            quiet_since = quiet;
            started_at_wake = started;
        }
        carried = !ahead.is_empty();
        if carried && !drain.is_cancelled() {
            // Part of a request head had arrived: carry on at once, and do
            // not rest again before that request starts.
            stream = Prefixed::new(ahead, watched);
            continue;
        }
        drop(ahead);
        let deadline = quiet_since + proxy.cfg.header_timeout;
        let rests = Rests::new(&proxy);
        let mut first = Bytes::new();
        let woke = tokio::select! {
            r = first_bytes(&mut watched) => match r {
                Ok(b) if !b.is_empty() => {
                    first = b;
                    true
                }
                // The client closed (or failed): hyper is not built for it.
                _ => false,
            },
            _ = drain.cancelled() => false,
            _ = tokio::time::sleep_until(deadline) => {
                metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "idle").increment(1);
                false
            }
        };
        drop(rests);
        if !woke {
            // Closed as hyper closes an idle connection (TLS close_notify,
            // then FIN), without waiting long on a client that reads nothing.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncWriteExt::shutdown(&mut watched),
            )
            .await;
            return;
        }
        stream = Prefixed::new(first, watched);
    }
}

/// Waits for the client's next bytes without a buffer, then reads what came
/// into a small one that hyper is handed first: a client that only closes
/// (FIN, close_notify) is let go without building a hyper connection (and its
/// buffers) to read the end of it, which matters when many leave at once.
async fn first_bytes<I>(s: &mut Watched<I>) -> io::Result<Bytes>
where
    I: AsyncRead + Readable + Unpin,
{
    s.inner.readable().await?;
    let mut b = BytesMut::with_capacity(1024);
    tokio::io::AsyncReadExt::read_buf(s, &mut b).await?;
    Ok(b.freeze())
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
    /// Requests started before this wake.
    started: u32,
    /// The wake began with part of a request head hyper had read.
    carried: bool,
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
        let answer = handle(p.clone(), i.clone(), req);
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
            _ = &mut tick, if !asked => {
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
                    && !(wake.carried && no_head_yet)
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
