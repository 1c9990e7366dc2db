//! Multiplexed upstream connections: h2 with prior knowledge (h2c), spoken
//! with the `h2` crate directly. They carry the backhaul (an edge's requests
//! to another host's proxy) and reach machines whose service asks for h2.
//!
//! A request is handed to the connection's stream state by the task that
//! proxies it, and its response is awaited by that same task: two tasks per
//! request (this one and the connection's), where hyper's client adds a
//! dispatch channel, a task per request to await the response and two
//! one-shot channels. A body still to send is piped by a task of its own,
//! spawned only when it cannot all go at once.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use crate::upstream::{BoxError, ProxyBody};

pub(crate) mod hpack;
pub(crate) mod server;
pub(crate) mod wire;

/// Largest response head (all headers, decoded) a peer may send.
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// One h2 connection to an upstream; clones share it.
#[derive(Clone)]
pub struct Conn {
    tx: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// Why a request got no answer on a connection.
pub enum Failure {
    /// The connection takes no more requests (it closed, or the peer sent
    /// GOAWAY): nothing was sent and the request comes back whole.
    NotSent(Request<ProxyBody>),
    /// The request's own body failed (over its limit, cut short): the
    /// stream was reset.
    Body(BoxError),
    /// The peer or the connection failed the exchange.
    Upstream(h2::Error),
}

/// How a connection checks that its peer is still there: a PING every
/// `every`, and the connection is given up when its PONG has not come
/// `within`. A host that vanished (powered off, cut off) sends no reset: the
/// connection would otherwise look open until TCP gave up, minutes later,
/// and every request sent on it would wait out its response timeout.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Time between two PINGs.
    pub every: Duration,
    /// Time a PONG may take.
    pub within: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            every: Duration::from_secs(10),
            within: Duration::from_secs(10),
        }
    }
}

impl Conn {
    /// Speaks h2 on `io` (the preface, then settings); the connection's
    /// frames are read and written by a task on the caller's runtime, which
    /// also pings the peer as `keepalive` says.
    pub async fn handshake(io: TcpStream, keepalive: Keepalive) -> Result<Conn, h2::Error> {
        let (tx, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            // Windows sized so that one large response does not stall on a
            // link with a real round trip; the machine side bounds memory.
            .initial_window_size(2 << 20)
            .initial_connection_window_size(5 << 20)
            .max_send_buffer_size(1 << 20)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let pings = conn.ping_pong();
        tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upstream h2 connection ended");
                    }
                }
                why = alive(pings, keepalive) => {
                    // Dropping the connection fails its streams at once.
                    metrics::counter!("skein_proxy_upstream_h2_dead_total").increment(1);
                    tracing::warn!(reason = why, "upstream h2 peer stopped answering pings: connection dropped");
                }
            }
            done.store(true, Ordering::Release);
        });
        Ok(Conn { tx, closed })
    }

    /// True once the connection has ended or refused a new stream.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (its URI absolute, no connection-specific header) and
    /// waits for the response head; the response's body reads the rest.
    pub async fn send(mut self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, Failure> {
        // Waits while the peer's concurrent stream limit is reached.
        if poll_fn(|cx| self.tx.poll_ready(cx)).await.is_err() {
            self.closed.store(true, Ordering::Release);
            return Err(Failure::NotSent(req));
        }
        let (parts, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (response, stream) = self
            .tx
            .send_request(Request::from_parts(parts, ()), eos)
            .map_err(Failure::Upstream)?;
        let body_failed = if eos {
            None
        } else {
            let failed = Arc::new(std::sync::Mutex::new(None));
            let kept = failed.clone();
            let mut pipe = Box::pin(async move {
                if let Some(e) = pipe(body, stream, h2::Reason::CANCEL).await {
                    *kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            });
            // Most bodies are whole already (held for a replay): sent now,
            // with no task.
            if pipe.as_mut().now_or_never().is_none() {
                tokio::spawn(pipe);
            }
            Some(failed)
        };
        match response.await {
            Ok(resp) => {
                let remaining = crate::http::content_length(resp.headers());
                Ok(resp.map(|recv| Incoming::new(recv, remaining).boxed()))
            }
            Err(e) => {
                let own =
                    body_failed.and_then(|f| f.lock().unwrap_or_else(|p| p.into_inner()).take());
                Err(own.map_or(Failure::Upstream(e), Failure::Body))
            }
        }
    }
}

/// Pings the peer for as long as it answers; returns why it stopped.
pub(crate) async fn alive(pings: Option<h2::PingPong>, keepalive: Keepalive) -> &'static str {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(keepalive.every).await;
        match tokio::time::timeout(keepalive.within, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "ping failed",
            Err(_) => return "no pong in time",
        }
    }
}

/// Streams a body into its h2 stream (a request's to an upstream, a
/// response's to a client): frames as they come, each once the peer's window
/// has room for at least a byte (h2 buffers the rest of a frame, bounded by
/// `max_send_buffer_size`), then the trailers or the end. A body that fails
/// resets the stream with `on_error` and its error is returned; a stream the
/// peer reset ends the pipe quietly.
pub(crate) async fn pipe(
    mut body: ProxyBody,
    mut tx: h2::SendStream<Bytes>,
    on_error: h2::Reason,
) -> Option<BoxError> {
    loop {
        tx.reserve_capacity(1);
        let room = poll_fn(|cx| {
            if tx.capacity() > 0 {
                return Poll::Ready(true);
            }
            match ready!(tx.poll_capacity(cx)) {
                Some(Ok(_)) => Poll::Ready(true),
                // The stream was reset or the connection went away.
                Some(Err(_)) | None => Poll::Ready(false),
            }
        })
        .await;
        if !room {
            return None;
        }
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reason) = tx.poll_reset(cx) {
                tracing::debug!(?reason, "upstream reset the stream mid-body");
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match frame {
            // Reset by the peer.
            None => return None,
            Some(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return None;
            }
            Some(Some(Err(e))) => {
                tx.send_reset(on_error);
                return Some(e);
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if tx.send_data(data, eos).is_err() || eos {
                    return None;
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    let _ = tx.send_trailers(t);
                    return None;
                }
                // A frame kind http-body does not have yet: skipped.
            }
        }
    }
}

/// A body read from its h2 stream (an upstream's response, a client's
/// request): each frame's bytes handed back to the peer's window as they are
/// taken, then the trailers. Its length is what `Content-Length` said (the
/// proxy's HTTP/1.1 side frames with it).
pub(crate) struct Incoming {
    recv: h2::RecvStream,
    data_done: bool,
    remaining: Option<u64>,
}

impl Incoming {
    /// The body arriving on `recv`, `remaining` bytes long if announced.
    pub(crate) fn new(recv: h2::RecvStream, remaining: Option<u64>) -> Incoming {
        Incoming {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut self.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            _ if self.recv.is_end_stream() => SizeHint::with_exact(0),
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http::HeaderMap;

    /// What the test server saw of one request.
    #[derive(Debug)]
    enum Seen {
        /// The body's length and its trailers' `x-sum` (the sum of its bytes).
        Body(usize, Option<String>),
        /// The client reset the stream.
        Reset,
    }

    /// An h2 server (the `h2` crate's) on loopback: it reads each request
    /// whole, tells the test what it saw, answers with a 100 KiB body and a
    /// trailer; on `/goaway` it answers, then closes gracefully.
    async fn server() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Seen>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(s).await.unwrap();
                    // Requests are answered by tasks: the connection is
                    // driven only while `accept` is polled.
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        let goaway = req.uri().path() == "/goaway";
                        tokio::spawn(answer(req, respond, seen.clone()));
                        if goaway {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    async fn answer(
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        seen: tokio::sync::mpsc::UnboundedSender<Seen>,
    ) {
        let mut body = req.into_body();
        let (mut n, mut sum) = (0usize, 0u64);
        while let Some(d) = body.data().await {
            let Ok(d) = d else {
                seen.send(Seen::Reset).unwrap();
                return;
            };
            body.flow_control().release_capacity(d.len()).unwrap();
            n += d.len();
            sum += d.iter().map(|b| u64::from(*b)).sum::<u64>();
        }
        let t = body.trailers().await.unwrap();
        let x = t.and_then(|t| t.get("x-sum").map(|v| v.to_str().unwrap().to_string()));
        seen.send(Seen::Body(n, x)).unwrap();
        let resp = Response::builder()
            .header("content-length", "102400")
            .body(())
            .unwrap();
        let mut tx = respond.send_response(resp, false).unwrap();
        tx.send_data(Bytes::from(vec![7u8; 102_400]), false)
            .unwrap();
        let mut tr = HeaderMap::new();
        tr.insert("x-sum", sum.to_string().parse().unwrap());
        tx.send_trailers(tr).unwrap();
    }

    async fn connect(addr: std::net::SocketAddr, keepalive: Keepalive) -> Conn {
        let io = TcpStream::connect(addr).await.unwrap();
        Conn::handshake(io, keepalive).await.unwrap()
    }

    fn request(path: &str, body: ProxyBody) -> Request<ProxyBody> {
        Request::post(format!("http://machine{path}"))
            .body(body)
            .unwrap()
    }

    /// A body of `chunks` frames of 64 KiB, made as the server reads, then
    /// trailers; or an error instead of the last chunk.
    fn streamed(chunks: usize, fail: bool) -> (ProxyBody, u64) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let mut sum = 0u64;
        for i in 0..chunks {
            sum += 64 * 1024 * (i as u64 % 251);
        }
        tokio::spawn(async move {
            for i in 0..chunks {
                let frame = if fail && i == chunks - 1 {
                    Err(BoxError::from("the client went away"))
                } else {
                    Ok(Frame::data(Bytes::from(vec![(i % 251) as u8; 64 * 1024])))
                };
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            let mut t = HeaderMap::new();
            t.insert("x-sum", sum.to_string().parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        });
        let body = http_body_util::StreamBody::new(tokio_stream_of(rx));
        (body.boxed(), sum)
    }

    fn tokio_stream_of<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn a_body_larger_than_the_windows_streams_up_and_trailers_come_back() {
        let (addr, mut seen) = server().await;
        let conn = connect(addr, Keepalive::default()).await;
        // 1.5 MiB: many times the server's windows (h2's 64 KiB defaults).
        let (body, sum) = streamed(24, false);
        let resp = conn.clone().send(request("/", body)).await.ok().unwrap();
        match seen.recv().await.unwrap() {
            Seen::Body(n, x) => assert_eq!((n, x), (24 * 64 * 1024, Some(sum.to_string()))),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            resp.body().size_hint().exact(),
            Some(102_400),
            "its length as announced"
        );
        let got = resp.into_body().collect().await.unwrap();
        let trailers = got.trailers().cloned().unwrap();
        assert_eq!(got.to_bytes().len(), 102_400);
        assert_eq!(trailers["x-sum"], sum.to_string().as_str());
        // A whole body, sent without a task, and another request on the same
        // connection.
        let whole = http_body_util::Full::new(Bytes::from_static(b"abc"))
            .map_err(|never| match never {})
            .boxed();
        let resp = conn.send(request("/", whole)).await.ok().unwrap();
        assert!(matches!(seen.recv().await.unwrap(), Seen::Body(3, None)));
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes().len(),
            102_400
        );
    }

    #[tokio::test]
    async fn a_failing_body_resets_its_stream_and_is_the_clients_fault() {
        let (addr, mut seen) = server().await;
        let conn = connect(addr, Keepalive::default()).await;
        let (body, _) = streamed(4, true);
        match conn.clone().send(request("/", body)).await {
            Err(Failure::Body(e)) => assert_eq!(e.to_string(), "the client went away"),
            Err(Failure::Upstream(e)) => panic!("blamed on the machine: {e}"),
            _ => panic!("an answer to a broken request"),
        }
        assert!(matches!(seen.recv().await.unwrap(), Seen::Reset));
        assert!(
            !conn.is_closed(),
            "one stream's failure leaves the connection"
        );
    }

    /// A TCP relay to `to` that, once `frozen`, moves no more bytes either
    /// way and keeps both sockets open: a host that vanished.
    async fn relay(to: std::net::SocketAddr, frozen: Arc<AtomicBool>) -> std::net::SocketAddr {
        async fn pump(
            mut r: tokio::net::tcp::OwnedReadHalf,
            mut w: tokio::net::tcp::OwnedWriteHalf,
            frozen: Arc<AtomicBool>,
        ) {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if frozen.load(Ordering::SeqCst) {
                    return std::future::pending().await;
                }
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (a, _) = l.accept().await.unwrap();
                let b = TcpStream::connect(to).await.unwrap();
                let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
                tokio::spawn(pump(ar, bw, frozen.clone()));
                tokio::spawn(pump(br, aw, frozen.clone()));
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_pings_is_given_up_and_its_requests_fail() {
        let (addr, mut seen) = server().await;
        let frozen = Arc::new(AtomicBool::new(false));
        let via = relay(addr, frozen.clone()).await;
        let keepalive = Keepalive {
            every: Duration::from_millis(100),
            within: Duration::from_millis(300),
        };
        let conn = connect(via, keepalive).await;
        let empty = || {
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed()
        };
        let resp = conn.clone().send(request("/", empty())).await.ok().unwrap();
        resp.into_body().collect().await.unwrap();
        assert!(matches!(seen.recv().await.unwrap(), Seen::Body(0, None)));
        // Several pings answered: the connection stays.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!conn.is_closed(), "a peer that answers is kept");
        // Silence: a request sent into it fails once the pings go unanswered,
        // not when TCP would give up, minutes later.
        frozen.store(true, Ordering::SeqCst);
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            conn.clone().send(request("/", empty())),
        )
        .await
        .expect("the request ends with its connection");
        assert!(matches!(sent, Err(Failure::Upstream(_))));
        assert!(conn.is_closed(), "the pool makes a new one");
    }

    #[tokio::test]
    async fn a_connection_that_said_goaway_gives_the_next_request_back_unsent() {
        let (addr, mut seen) = server().await;
        let conn = connect(addr, Keepalive::default()).await;
        let empty = || {
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed()
        };
        let resp = conn
            .clone()
            .send(request("/goaway", empty()))
            .await
            .ok()
            .unwrap();
        resp.into_body().collect().await.unwrap();
        assert!(matches!(seen.recv().await.unwrap(), Seen::Body(0, None)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !conn.is_closed() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection ended"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match conn.send(request("/again", empty())).await {
            Err(Failure::NotSent(req)) => assert_eq!(req.uri().path(), "/again"),
            _ => panic!("the request should come back unsent"),
        }
    }
}
