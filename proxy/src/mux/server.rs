//! The h2 server side: clients' h2 (ALPN `h2`, or h2c with prior knowledge)
//! and other edges' backhaul, spoken with the `h2` crate directly.
//!
//! One task per connection, and the connection's streams run inside it: the
//! task reads frames, starts a handler for each new request, polls the
//! handlers that were woken, and writes what they answered, all in one poll.
//! Every serving thread runs its own single-threaded runtime, so a task per
//! stream (what hyper's server spawns) would buy no parallelism: it would
//! only add a spawn per request and a wake of the connection's task for every
//! response. Bodies are piped by their stream, in the same task.
//!
//! Limits, as for HTTP/1.1: streams per connection, header list size, the
//! time a new connection has for its preface; rapid reset (CVE-2023-44487) is
//! met twice: the `h2` crate cuts off a client whose streams are reset before
//! they are accepted, or that makes the server reset too many, and a client
//! that cancels most of the streams it opens is cut off here
//! (`ENHANCE_YOUR_CALM`). A connection is pinged while it lives and dropped
//! when its peer stops answering, closed with GOAWAY once idle for its idle
//! time (client connections), and drained (GOAWAY, then its open streams
//! finish) when the proxy stops.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{Incoming, Keepalive, alive, pipe};
use crate::upstream::ProxyBody;

/// Client-cancelled streams a connection may have before its share counts.
const RESET_ALLOWANCE: u64 = 200;

/// What one server connection allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Concurrent streams the peer may open.
    pub max_streams: u32,
    /// Largest request head (all headers, decoded).
    pub max_header_list: u32,
    /// Bytes of one request body the peer may send ahead of the handler.
    pub stream_window: u32,
    /// Bytes of all request bodies the peer may send ahead.
    pub conn_window: u32,
    /// Time for the peer's preface and settings.
    pub handshake_timeout: Duration,
    /// How the peer's liveness is checked.
    pub keepalive: Keepalive,
    /// A connection with no stream for this long (up to twice this: checked
    /// at this interval) is closed with GOAWAY; None keeps it open.
    pub idle: Option<Duration>,
}

impl Limits {
    /// A client's connection, as `[proxy]` configures it.
    pub(crate) fn clients(cfg: &crate::ProxyConfig) -> Limits {
        Limits {
            max_streams: cfg.h2_max_streams,
            max_header_list: u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX),
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            handshake_timeout: cfg.header_timeout,
            keepalive: Keepalive {
                every: cfg.idle_timeout,
                within: Duration::from_secs(20),
            },
            idle: Some(cfg.idle_timeout),
        }
    }

    /// Another edge's backhaul connection: it multiplexes many clients'
    /// requests, so a stream cap well above a client's and windows sized for
    /// a WAN; the edge's own headers ride on top of the client's. Kept while
    /// idle: the edge pings it and reuses it.
    pub(crate) fn backhaul(cfg: &crate::ProxyConfig) -> Limits {
        let extra = 4096;
        Limits {
            max_streams: cfg.h2_max_streams.saturating_mul(100),
            max_header_list: u32::try_from(cfg.max_header_bytes.saturating_add(extra))
                .unwrap_or(u32::MAX),
            stream_window: 1 << 20,
            conn_window: 16 << 20,
            idle: None,
            ..Limits::clients(cfg)
        }
    }
}

/// What serves the requests of a connection. A handler's future may borrow
/// it: the connection owns it for as long as it has streams.
pub(crate) trait Handler {
    /// Answers one request.
    fn call(
        &self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + '_;
}

/// Serves h2 on `io` until the peer or a drain ends it.
pub(crate) async fn serve<I, H>(io: I, limits: Limits, drain: CancellationToken, handler: H)
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: Handler + Sync,
{
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_list)
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.conn_window)
        .max_send_buffer_size(400 << 10)
        // Rapid reset: streams the client resets before they are accepted,
        // and streams the server must reset for the client's errors.
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256));
    let mut conn = match tokio::time::timeout(limits.handshake_timeout, b.handshake(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(error = %e, "h2 handshake failed"),
        Err(_) => {
            metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "h2_preface")
                .increment(1);
            return;
        }
    };
    let mut alive = pin!(alive(conn.ping_pong(), limits.keepalive));
    let mut drained = pin!(drain.cancelled_owned());
    let mut idle = limits.idle.map(|d| (Box::pin(tokio::time::sleep(d)), d));
    // Streams the client cancelled before their answer (declared before the
    // streams, which borrow it).
    let resets = AtomicU64::new(0);
    let mut streams = FuturesUnordered::new();
    let (mut draining, mut cut) = (false, false);
    let (mut opened, mut opened_at_check, mut busy_at_check) = (0u64, 0u64, false);
    let inline = std::sync::Arc::new(Inline::default());
    let own = std::task::Waker::from(inline.clone());
    let ended = poll_fn(|outer| {
        inline.enter(outer.waker());
        let cx = &mut std::task::Context::from_waker(&own);
        let mut rounds = 0;
        loop {
            if !draining && drained.as_mut().poll(cx).is_ready() {
                draining = true;
                conn.graceful_shutdown();
            }
            if let Poll::Ready(why) = alive.as_mut().poll(cx) {
                metrics::counter!("skein_proxy_h2_dead_total").increment(1);
                return Poll::Ready(Some(why));
            }
            // Answers first, so that what they wrote goes out below, in
            // this same poll.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if let Some((sleep, every)) = &mut idle
                && !draining
                && sleep.as_mut().poll(cx).is_ready()
            {
                // Idle: no stream now, none opened and none open at the
                // last check.
                let quiet = streams.is_empty() && opened == opened_at_check;
                if quiet && !busy_at_check {
                    metrics::counter!("skein_proxy_h2_idle_closed_total").increment(1);
                    draining = true;
                    conn.graceful_shutdown();
                } else {
                    opened_at_check = opened;
                    busy_at_check = !streams.is_empty();
                    sleep.as_mut().reset(tokio::time::Instant::now() + *every);
                    continue;
                }
            }
            let cancelled = resets.load(Ordering::Relaxed);
            if !cut && cancelled > RESET_ALLOWANCE && cancelled * 2 > opened {
                metrics::counter!("skein_proxy_h2_rapid_reset_total").increment(1);
                tracing::info!(
                    cancelled,
                    opened,
                    "h2 client cancels most of its streams: cut off"
                );
                // GOAWAY, written as the connection is driven below; the
                // streams in flight are dropped with it.
                cut = true;
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    opened += 1;
                    let (parts, recv) = req.into_parts();
                    let head = parts.method == Method::HEAD;
                    let body = if recv.is_end_stream() {
                        Empty::new().map_err(|never| match never {}).boxed()
                    } else {
                        Incoming::new(recv, crate::http::content_length(&parts.headers)).boxed()
                    };
                    let work = handler.call(Request::from_parts(parts, body));
                    streams.push(stream(work, respond, head, &resets));
                }
                Poll::Ready(Some(Err(e))) => {
                    if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                        metrics::counter!("skein_proxy_h2_rapid_reset_total").increment(1);
                    }
                    tracing::debug!(error = %e, "h2 connection ended with an error");
                    return Poll::Ready(None);
                }
                // Closed: every stream is done, or can no longer be answered.
                Poll::Ready(None) => return Poll::Ready(None),
                // Woken while polling (a stream queued a frame): again, here.
                Poll::Pending if inline.leave(rounds < ROUNDS) => rounds += 1,
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Some(why) = ended {
        tracing::debug!(
            reason = why,
            "h2 peer stopped answering pings: connection dropped"
        );
    }
}

/// The connection task's waker as its streams and sockets see it. When a
/// stream queues a frame, the h2 crate wakes the connection to write it; the
/// streams are polled inside the connection's own poll, so that wake would
/// come while the task runs and make the runtime poll it all once more
/// (every timer, the drain, the streams, the connection), one extra poll per
/// response. A wake that comes during the poll is instead noted and served
/// by another round of the same poll; any other is passed on.
#[derive(Default)]
struct Inline {
    state: std::sync::atomic::AtomicU8,
    task: futures_util::task::AtomicWaker,
}

/// Rounds one poll may make for wakes that came during it. A resource out
/// of tokio's cooperative budget wakes its task and says Pending until the
/// task has yielded: rounds alone would spin on it.
const ROUNDS: u32 = 4;
/// Not being polled.
const IDLE: u8 = 0;
/// Being polled.
const POLLING: u8 = 1;
/// Being polled, and woken meanwhile.
const WOKEN: u8 = 2;

impl Inline {
    /// A poll begins, on behalf of the task `outer` wakes.
    fn enter(&self, outer: &std::task::Waker) {
        self.task.register(outer);
        self.state.store(POLLING, Ordering::SeqCst);
    }

    /// The poll would end: true if a wake came during it and `again` lets
    /// the poll go on; false if it ends (a wake that came is passed to the
    /// task then; later wakes go to it directly).
    fn leave(&self, again: bool) -> bool {
        let woken = self
            .state
            .compare_exchange(POLLING, IDLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_err();
        if woken && again {
            self.state.store(POLLING, Ordering::SeqCst);
            return true;
        }
        if woken {
            self.state.store(IDLE, Ordering::SeqCst);
            self.task.wake();
        }
        false
    }
}

impl std::task::Wake for Inline {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        let mut now = self.state.load(Ordering::SeqCst);
        loop {
            match now {
                POLLING => match self.state.compare_exchange(
                    POLLING,
                    WOKEN,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => return,
                    Err(seen) => now = seen,
                },
                WOKEN => return,
                _ => return self.task.wake(),
            }
        }
    }
}

/// One stream: the handler's answer, then its body. A client that resets
/// the stream first drops the handler's work (the machine's request with it).
async fn stream<F>(
    work: F,
    mut respond: h2::server::SendResponse<Bytes>,
    head: bool,
    resets: &AtomicU64,
) where
    F: Future<Output = Response<ProxyBody>>,
{
    let mut work = pin!(work);
    let answered = poll_fn(|cx| {
        if let Poll::Ready(r) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(resp) = answered else {
        resets.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("skein_proxy_h2_client_resets_total").increment(1);
        return;
    };
    let (mut parts, body) = resp.into_parts();
    fit_response(&mut parts.headers, &body);
    let eos = head || body.is_end_stream();
    let tx = match respond.send_response(Response::from_parts(parts, ()), eos) {
        Ok(tx) => tx,
        Err(e) => return tracing::debug!(error = %e, "h2 response not sent"),
    };
    if !eos && let Some(e) = pipe(body, tx, h2::Reason::INTERNAL_ERROR).await {
        metrics::counter!("skein_proxy_response_body_errors_total").increment(1);
        tracing::debug!(error = %e, "response body failed: stream reset");
    }
}

/// A response head as h2 carries it: no hop-by-hop field (h2 refuses the
/// connection-specific ones; a local answer may say `Connection: close`), a
/// `Date`, and the body's length when it is known and was not given.
fn fit_response(h: &mut HeaderMap, body: &ProxyBody) {
    crate::http::strip_hop_by_hop(h);
    if !h.contains_key(header::DATE) {
        h.insert(header::DATE, crate::h1::date_value());
    }
    if let Some(n) = body.size_hint().exact()
        && n > 0
        && !h.contains_key(header::CONTENT_LENGTH)
    {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::Full;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpStream};

    /// Counts the handler calls started and the ones dropped unfinished.
    #[derive(Default)]
    struct Seen {
        started: AtomicUsize,
        dropped: AtomicUsize,
        started_tx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<()>>>,
    }

    struct Dropped(Arc<Seen>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `/pending` never answers; `/slow` answers after 600 ms; `/close`
    /// answers as a local error does (`Connection: close`); anything else
    /// answers `ok` at once.
    struct Test(Arc<Seen>);

    impl Handler for Test {
        fn call(
            &self,
            req: Request<ProxyBody>,
        ) -> impl Future<Output = Response<ProxyBody>> + Send + '_ {
            let seen = self.0.clone();
            async move {
                seen.started.fetch_add(1, Ordering::SeqCst);
                if let Some(tx) = &*seen.started_tx.lock().unwrap() {
                    let _ = tx.send(());
                }
                let body = |b: &'static str| {
                    Full::new(Bytes::from_static(b.as_bytes()))
                        .map_err(|never| match never {})
                        .boxed()
                };
                match req.uri().path() {
                    "/pending" => {
                        let _guard = Dropped(seen.clone());
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    "/slow" => {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        Response::new(body("slow"))
                    }
                    "/close" => {
                        let mut r = Response::new(body("bye"));
                        r.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        r
                    }
                    _ => Response::new(body("ok")),
                }
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            max_streams: 16,
            max_header_list: 16 << 10,
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            handshake_timeout: Duration::from_secs(5),
            keepalive: Keepalive::default(),
            idle: None,
        }
    }

    /// Serves `limits` on loopback; returns the address and what the
    /// handler saw.
    async fn server(limits: Limits, drain: CancellationToken) -> (std::net::SocketAddr, Arc<Seen>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = l.accept().await.unwrap();
                tokio::spawn(serve(io, limits, drain.clone(), Test(s.clone())));
            }
        });
        (addr, seen)
    }

    /// A client connection; the task ends with the connection's result.
    async fn client(
        addr: std::net::SocketAddr,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let io = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = h2::client::handshake(io).await.unwrap();
        (tx, tokio::spawn(conn))
    }

    fn get(path: &str) -> Request<()> {
        Request::get(format!("http://app.test{path}"))
            .body(())
            .unwrap()
    }

    async fn body_of(resp: Response<h2::RecvStream>) -> String {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            out.extend_from_slice(&d);
        }
        String::from_utf8(out).unwrap()
    }

    /// Counts the wakes of the task it stands for.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_during_the_poll_is_served_in_it_and_none_is_lost() {
        let outer = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(outer.clone());
        let inline = Arc::new(Inline::default());
        let own = std::task::Waker::from(inline.clone());
        // A wake while polling: another round, the task is not woken.
        inline.enter(&task);
        own.wake_by_ref();
        own.wake_by_ref();
        assert!(inline.leave(true), "one more round");
        assert!(!inline.leave(true), "nothing came during that round");
        assert_eq!(outer.0.load(Ordering::SeqCst), 0);
        // A wake after the poll goes to the task.
        own.wake_by_ref();
        assert_eq!(outer.0.load(Ordering::SeqCst), 1);
        // Out of rounds: a wake that came is passed on, not dropped.
        inline.enter(&task);
        own.wake_by_ref();
        assert!(!inline.leave(false));
        assert_eq!(outer.0.load(Ordering::SeqCst), 2, "the task polls again");
    }

    #[tokio::test]
    async fn a_local_answer_goes_out_without_connection_headers_with_date_and_length() {
        let (addr, _) = server(limits(), CancellationToken::new()).await;
        let (mut tx, _conn) = client(addr).await;
        let (resp, _) = tx.send_request(get("/close"), true).unwrap();
        let resp = resp.await.expect("h2 would refuse a Connection header");
        assert!(resp.headers().get("connection").is_none());
        assert!(
            resp.headers().get("date").is_some(),
            "a Date, as HTTP/1.1 answers carry"
        );
        assert_eq!(resp.headers()["content-length"], "3");
        assert_eq!(body_of(resp).await, "bye");
        // HEAD: the head alone.
        let head = Request::head("http://app.test/").body(()).unwrap();
        let (resp, _) = tx.send_request(head, true).unwrap();
        let resp = resp.await.unwrap();
        assert!(resp.body().is_end_stream(), "no body after a HEAD");
        assert_eq!(resp.headers()["content-length"], "2");
    }

    #[tokio::test]
    async fn a_client_that_cancels_most_of_its_streams_is_cut_off_and_its_work_dropped() {
        let (addr, seen) = server(limits(), CancellationToken::new()).await;
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        *seen.started_tx.lock().unwrap() = Some(started_tx);
        let (mut tx, conn) = client(addr).await;
        // Each stream reset only once its handler has begun (the work an
        // attacker makes the server start), so it is this server's count
        // that cuts the client off, not h2's count of streams reset before
        // they were accepted.
        let mut sent = 0;
        for _ in 0..1000 {
            let Ok(()) = poll_fn(|cx| tx.poll_ready(cx)).await else {
                break;
            };
            let Ok((_resp, mut stream)) = tx.send_request(get("/pending"), true) else {
                break;
            };
            sent += 1;
            if tokio::time::timeout(Duration::from_secs(5), started.recv())
                .await
                .is_err()
            {
                break;
            }
            stream.send_reset(h2::Reason::CANCEL);
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the server ended the connection")
            .unwrap();
        let e = ended.expect_err("cut off, not closed cleanly");
        assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e}");
        let (started, dropped) = (
            seen.started.load(Ordering::SeqCst),
            seen.dropped.load(Ordering::SeqCst),
        );
        assert!(
            sent < 1000 && started <= RESET_ALLOWANCE as usize + 2,
            "cut off early: {sent} sent, {started} started"
        );
        assert!(
            started > RESET_ALLOWANCE as usize,
            "not before its allowance: {started}"
        );
        assert_eq!(
            dropped, started,
            "every cancelled stream's work was dropped"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_but_not_while_a_request_is_in_flight() {
        let idle = Limits {
            idle: Some(Duration::from_millis(200)),
            ..limits()
        };
        let (addr, _) = server(idle, CancellationToken::new()).await;
        let (mut tx, conn) = client(addr).await;
        // A request longer than the idle time, then a few quick ones.
        let (resp, _) = tx.send_request(get("/slow"), true).unwrap();
        assert_eq!(body_of(resp.await.unwrap()).await, "slow");
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (resp, _) = tx.send_request(get("/"), true).unwrap();
            assert_eq!(body_of(resp.await.unwrap()).await, "ok");
        }
        assert!(!conn.is_finished(), "a busy connection stays open");
        let ended = tokio::time::timeout(Duration::from_secs(3), conn)
            .await
            .expect("closed within twice its idle time")
            .unwrap();
        assert!(ended.is_ok(), "a GOAWAY, not an error: {ended:?}");
    }

    #[tokio::test]
    async fn a_drain_finishes_the_request_in_flight_then_ends_the_connection() {
        let drain = CancellationToken::new();
        let (addr, _) = server(limits(), drain.clone()).await;
        let (mut tx, conn) = client(addr).await;
        let (resp, _) = tx.send_request(get("/slow"), true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain.cancel();
        assert_eq!(
            body_of(resp.await.unwrap()).await,
            "slow",
            "answered in full"
        );
        let ended = tokio::time::timeout(Duration::from_secs(3), conn)
            .await
            .expect("ended")
            .unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert!(
            tx.send_request(get("/"), true).is_err()
                || poll_fn(|cx| tx.poll_ready(cx)).await.is_err(),
            "no new stream after GOAWAY"
        );
    }
}
