//! h2, spoken by skein itself: the server (`server`) that clients' h2 and
//! h2c and other edges' backhaul reach, and the client (`Conn`) that carries
//! the backhaul (an edge's requests to another host's proxy) and reaches
//! machines whose service asks for h2c. What both sides need (frames,
//! windows, a stream's halves, wakers) is `wire`; HPACK is `hpack`.

use std::time::Duration;

use http::Request;

use crate::upstream::{BoxError, ProxyBody};

mod client;
pub(crate) mod hpack;
pub(crate) mod server;
pub(crate) mod wire;

pub use client::{Conn, Error};

/// Why a request got no answer on a connection.
pub enum Failure {
    /// The connection takes no more requests (it closed, or the peer sent
    /// GOAWAY), or the peer refused the stream before reading any of it:
    /// the request comes back whole, to be sent elsewhere.
    NotSent(Box<Request<ProxyBody>>),
    /// The request's own body failed (over its limit, cut short): the
    /// stream was reset.
    Body(BoxError),
    /// The peer or the connection failed the exchange.
    Upstream(Error),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, Response};
    use http_body_util::BodyExt as _;
    use hyper::body::{Body as _, Frame};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::TcpStream;

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
