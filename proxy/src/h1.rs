//! skein's own HTTP/1.1: the connection to a machine, and the client side's
//! plain requests.
//!
//! **To machines** ([`Conn`]). hyper's client runs every connection as a task
//! of its own and hands each request to it over a channel, with a oneshot for
//! the answer: two task wake-ups and three allocations per request before a
//! byte moves, on top of its dispatcher. A proxy's connection to a machine
//! carries one request at a time and is driven by the request that holds it,
//! so here it is just the socket: the request task writes the head (and a body
//! that is already whole, in the same write), reads the response head into the
//! connection's buffer, and the response body reads the rest straight from the
//! socket as the client takes it. Once the body has ended cleanly the
//! connection goes back to the pool itself. The request body is written whole
//! before the response is read: a machine that answers early and closes on an
//! upload fails it with a 502 rather than passing its early answer on.
//!
//! What it reads follows RFC 9112: interim (1xx) responses are skipped; the
//! body is empty for HEAD, 204 and 304, chunked when the last transfer coding
//! is chunked, delimited by the connection's close for any other coding or when
//! no length is given, else `Content-Length` (several that differ, or one that
//! is not a number, make the response an error, as a smuggling attempt would).
//! Upgrades (websockets, backhauled TCP) stay on hyper's client.
//!
//! **From clients** (`parse_request`, `write_response`). A request with no
//! body and nothing to upgrade is read here and its response written straight
//! back; anything else is left, byte for byte, to hyper's server
//! (`crate::rest` drives the connection).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::{BoxError, ProxyBody, Upstreams};

/// Most headers in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Longest response head.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// A request body is gathered into the head's write up to this much.
const COALESCE: usize = 64 * 1024;
/// Read buffer of a connection.
const READ_BUF: usize = 8 * 1024;

/// A connection to a machine, idle or carrying one request.
pub struct Conn {
    pub(crate) io: TcpStream,
    buf: BytesMut,
    /// Taken from the pool: it may have been closed while it waited.
    pub(crate) reused: bool,
}

/// Why a request got no response.
pub enum Failure {
    /// Nothing was written (the pooled connection had been closed): the
    /// request comes back untouched.
    NotSent(Box<Request<ProxyBody>>),
    /// The request's own body failed (over its limit, a client that broke off):
    /// the client's doing.
    Body(BoxError),
    /// The machine's side failed: a reset, a close, a response that is not
    /// HTTP/1.1.
    Machine(io::Error),
}

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl Conn {
    /// A new connection over `io`.
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            reused: false,
        }
    }

    /// False if the machine has closed this (idle) connection or sent bytes
    /// nobody asked for. Asks the reactor first: a connection it has seen no
    /// event for costs no system call.
    pub fn alive(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut b = [0u8; 1];
                matches!(self.io.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `req` (its URI in origin form, its Host set, hop-by-hop headers
    /// gone) and reads the response head. The body of the response reads the
    /// rest; it returns the connection to `pool` under `addr` when it has ended
    /// and the connection can carry another request. The request's head comes
    /// back with the response (it was only written from): a replay sends it
    /// again without a copy having been made for every request.
    pub async fn send(
        mut self,
        req: Request<ProxyBody>,
        pool: &Arc<Upstreams>,
        addr: SocketAddr,
    ) -> Result<(Response<ProxyBody>, http::request::Parts), Failure> {
        let (parts, mut body) = req.into_parts();
        let head_only = parts.method == Method::HEAD;
        let mut w = Writer::new(256 + parts.headers.len() * 32);
        let chunked = write_request_head(&parts, &body, &mut w.out);
        // Kept until the first write has gone, to give the request back whole
        // if the pooled connection turns out closed.
        w.hold = self.reused;
        match w.message(&mut self.io, &mut body, chunked).await {
            Ok(()) => {}
            Err(Wrote::Body(e)) => return Err(Failure::Body(e)),
            Err(Wrote::Io { e, nothing_sent }) => {
                if !(nothing_sent && self.reused && body.is_end_stream()) {
                    return Err(Failure::Machine(e));
                }
                let whole: Bytes = match w.held.len() {
                    0 => Bytes::new(),
                    1 => w.held[0].clone(),
                    _ => w.held.concat().into(),
                };
                let body = http_body_util::Full::new(whole)
                    .map_err(|never| match never {})
                    .boxed();
                return Err(Failure::NotSent(Box::new(Request::from_parts(parts, body))));
            }
        }
        let resp = self.response(head_only, pool, addr).await?;
        Ok((resp, parts))
    }

    /// Reads the response head (skipping interim responses) and makes the
    /// response whose body reads the rest.
    async fn response(
        mut self,
        head_only: bool,
        pool: &Arc<Upstreams>,
        addr: SocketAddr,
    ) -> Result<Response<ProxyBody>, Failure> {
        loop {
            if let Some(parsed) = parse_head(&mut self.buf).map_err(Failure::Machine)? {
                let Parsed {
                    status,
                    headers,
                    keep_alive,
                    framing,
                } = parsed;
                if status.is_informational() {
                    // 100 Continue, 103 Early Hints: the final answer follows.
                    // A 101 answers an upgrade, which never comes this way.
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Failure::Machine(bad("101 without an upgrade")));
                    }
                    continue;
                }
                let no_body = head_only || bodiless(status);
                let framing = if no_body { Framing::Done } else { framing };
                // A body that ends with the connection leaves nothing to keep.
                let keep_alive = keep_alive && framing != Framing::Close;
                let mut resp = Response::new(());
                *resp.status_mut() = status;
                *resp.headers_mut() = headers;
                let mut body = MachineBody {
                    conn: Some(self),
                    framing,
                    keep_alive,
                    pool: pool.clone(),
                    addr,
                };
                if body.framing == Framing::Done {
                    body.finish(true);
                }
                return Ok(resp.map(|()| body.boxed()));
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Failure::Machine(bad("response head too large")));
            }
            self.buf.reserve(READ_BUF);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(Failure::Machine(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before a response",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(Failure::Machine(e)),
            }
        }
    }
}

fn put_header(out: &mut Vec<u8>, k: &HeaderName, v: &HeaderValue) {
    out.extend_from_slice(k.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(v.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Why a message could not be written.
enum Wrote {
    /// Its body failed.
    Body(BoxError),
    /// The connection failed; `nothing_sent` if not one byte had gone.
    Io { e: io::Error, nothing_sent: bool },
}

/// Writes one message: the head already in `out`, then the body, framed as
/// the head says. Body frames that are already there (a buffered body, a
/// small response read whole) go out in the head's write: one system call,
/// one TLS record; a body still coming is written as it comes.
struct Writer {
    out: Vec<u8>,
    sent_any: bool,
    /// Keep the data frames put in `out` until the first write has gone.
    hold: bool,
    held: smallvec::SmallVec<[Bytes; 2]>,
}

impl Writer {
    fn new(capacity: usize) -> Writer {
        Writer {
            out: Vec::with_capacity(capacity),
            sent_any: false,
            hold: false,
            held: smallvec::SmallVec::new(),
        }
    }

    async fn flush_out<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), Wrote> {
        if self.out.is_empty() {
            return Ok(());
        }
        if !self.sent_any {
            // The first write: a connection found dead before a byte went is
            // told apart (the request can go again).
            match io.write(&self.out).await {
                Ok(0) => {
                    return Err(Wrote::Io {
                        e: io::ErrorKind::WriteZero.into(),
                        nothing_sent: true,
                    });
                }
                Ok(n) => {
                    self.sent_any = true;
                    self.held.clear();
                    if n < self.out.len() {
                        io.write_all(&self.out[n..]).await.map_err(|e| Wrote::Io {
                            e,
                            nothing_sent: false,
                        })?;
                    }
                }
                Err(e) => {
                    return Err(Wrote::Io {
                        e,
                        nothing_sent: true,
                    });
                }
            }
        } else {
            io.write_all(&self.out).await.map_err(|e| Wrote::Io {
                e,
                nothing_sent: false,
            })?;
        }
        self.out.clear();
        Ok(())
    }

    async fn message<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        body: &mut ProxyBody,
        chunked: bool,
    ) -> Result<(), Wrote> {
        let mut trailers = None;
        while !body.is_end_stream() {
            let frame = match futures_util::FutureExt::now_or_never(body.frame()) {
                Some(f) => f,
                None => {
                    // The body is still coming: send what is here.
                    self.flush_out(io).await?;
                    io.flush().await.map_err(|e| Wrote::Io {
                        e,
                        nothing_sent: false,
                    })?;
                    body.frame().await
                }
            };
            let frame = match frame {
                None => break,
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(Wrote::Body(e)),
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        let mut hex = [0u8; 16];
                        self.out.extend_from_slice(hex_len(data.len(), &mut hex));
                        self.out.extend_from_slice(b"\r\n");
                    }
                    if self.out.len() + data.len() > COALESCE {
                        self.flush_out(io).await?;
                        io.write_all(&data).await.map_err(|e| Wrote::Io {
                            e,
                            nothing_sent: false,
                        })?;
                    } else {
                        self.out.extend_from_slice(&data);
                        if self.hold && !self.sent_any {
                            self.held.push(data);
                        }
                    }
                    if chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                    continue;
                }
                Err(f) => f,
            };
            if let Ok(t) = frame.into_trailers() {
                trailers = Some(t);
            }
        }
        if chunked {
            self.out.extend_from_slice(b"0\r\n");
            for (k, v) in trailers.iter().flatten() {
                put_header(&mut self.out, k, v);
            }
            self.out.extend_from_slice(b"\r\n");
        }
        self.flush_out(io).await?;
        io.flush().await.map_err(|e| Wrote::Io {
            e,
            nothing_sent: !self.sent_any,
        })
    }
}

/// Writes the framing of a body: its exact length when known
/// (`Content-Length`), else chunked (returns true).
fn put_framing(body: &ProxyBody, out: &mut Vec<u8>) -> bool {
    match body.size_hint().exact() {
        Some(n) => {
            put_length(out, n);
            false
        }
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
    }
}

/// Writes the request head; returns whether the body goes chunked. The
/// framing is the body's, not the headers': its exact length when known
/// (`Content-Length`, left out for an empty body of a method that carries
/// none), else chunked.
fn write_request_head(parts: &http::request::Parts, body: &ProxyBody, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (k, v) in &parts.headers {
        if k == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if k == header::TRANSFER_ENCODING {
            continue;
        }
        put_header(out, k, v);
    }
    let carries = had_length || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    let chunked = if body.is_end_stream() && !carries {
        false
    } else {
        put_framing(body, out)
    };
    out.extend_from_slice(b"\r\n");
    chunked
}

/// Most header fields in a request head skein reads itself; a request with
/// more goes to hyper, which holds it to `[proxy] max_headers`.
const OWN_HEADERS: usize = 64;

/// What the start of a client connection's buffer holds.
// Returned once per request and taken apart at once: a box would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Next {
    /// A request skein serves itself, its head taken off the buffer.
    Plain(Plain),
    /// More bytes are needed.
    Partial,
    /// A head skein read but cannot take (a header value hyper would refuse
    /// too, a bad target): answered 400 and closed.
    Invalid(&'static str),
    /// Anything else is hyper's: a request with a body or an upgrade,
    /// `Expect`, HTTP/1.0, a target in another form, or a head that is
    /// malformed or too large (hyper answers those as it always has).
    Hyper,
}

/// A request without a body, nothing to upgrade.
pub(crate) struct Plain {
    pub req: Request<ProxyBody>,
    /// The client asked to close after the response.
    pub close: bool,
}

/// Reads a request head at the start of `buf` (see [`Next`]). Header values
/// and the target are views of the head's bytes (no copy).
pub(crate) fn parse_request(buf: &mut BytesMut, max_headers: usize) -> Next {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; OWN_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let len = match r.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Next::Partial,
        Err(_) => return Next::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (r.method, r.path, r.version) else {
        return Next::Hyper;
    };
    if method == "CONNECT" || !target.starts_with('/') || r.headers.len() > max_headers {
        return Next::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Next::Hyper;
    };
    let base = buf.as_ptr() as usize;
    let at_target = (target.as_ptr() as usize - base, target.len());
    let mut at = Spans::new();
    let (mut hosts, mut close) = (0, false);
    for h in r.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
        if is(&header::CONTENT_LENGTH) {
            // Only a length of zero says "no body".
            if h.value.trim_ascii() != b"0" {
                return Next::Hyper;
            }
        } else if is(&header::TRANSFER_ENCODING) || is(&header::UPGRADE) || is(&header::EXPECT) {
            return Next::Hyper;
        } else if is(&header::HOST) {
            hosts += 1;
        } else if is(&header::CONNECTION) {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return Next::Hyper;
                }
            }
        }
        at.push(span(base, h));
    }
    if hosts != 1 {
        return Next::Hyper;
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) = http::Uri::from_maybe_shared(head.slice(at_target.0..at_target.0 + at_target.1))
    else {
        return Next::Invalid("bad_request_target");
    };
    // Room for what the proxy adds (the forwarded headers, client address,
    // region, request id): no growing the map per request.
    let mut headers = HeaderMap::with_capacity(at.len() + 8);
    for at in at {
        let Some((name, value)) = cut(&head, at) else {
            return Next::Invalid("bad_request_header");
        };
        headers.append(name, value);
    }
    let mut req = Request::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Next::Plain(Plain { req, close })
}

/// Writes `resp` to a client that sent an HTTP/1.1 request (`head_only`: a
/// HEAD request). The body is framed by what it knows (its length, else
/// chunked); `Date` is added when the response has none. Returns whether the
/// connection can carry another request: not when `close` (asked by the
/// client or the proxy), when the response says `Connection: close`, or when
/// its body failed part way (then the client sees it cut short).
pub(crate) async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    resp: Response<ProxyBody>,
    head_only: bool,
    close: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let no_body = head_only || bodiless(status);
    // Room for the head and, when its length is known and small, the body
    // that goes in the same write: the buffer does not grow mid-message.
    let inline = match body.size_hint().exact() {
        Some(n) if !no_body => usize::try_from(n)
            .ok()
            .filter(|n| *n <= COALESCE)
            .unwrap_or(0),
        _ => 0,
    };
    let mut w = Writer::new(256 + parts.headers.len() * 40 + inline);
    let out = &mut w.out;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut keep = !close;
    let mut dated = false;
    let mut sized = false;
    for (k, v) in &parts.headers {
        if k == header::CONNECTION {
            keep &= !tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
            continue;
        }
        if k == header::TRANSFER_ENCODING {
            continue;
        }
        if k == header::CONTENT_LENGTH {
            if !no_body {
                continue;
            }
            sized = true;
        }
        dated |= k == header::DATE;
        put_header(out, k, v);
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        now_http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    // HEAD: the length a GET would have had, when the answer knows it (the
    // proxy's own answers); a machine's is passed on as it gave it.
    if head_only
        && !sized
        && !bodiless(status)
        && let Some(n) = body.size_hint().exact()
    {
        put_length(out, n);
    }
    let chunked = !no_body && put_framing(&body, out);
    out.extend_from_slice(b"\r\n");
    let written = if no_body {
        drop(body);
        match w.flush_out(io).await {
            Ok(()) => io.flush().await.map_err(|e| Wrote::Io {
                e,
                nothing_sent: false,
            }),
            Err(e) => Err(e),
        }
    } else {
        w.message(io, &mut body, chunked).await
    };
    match written {
        Ok(()) => Ok(keep),
        Err(Wrote::Body(e)) => {
            tracing::debug!(error = %e, "response body failed; closing");
            metrics::counter!("skein_proxy_response_body_errors_total").increment(1);
            if !w.sent_any {
                // Nothing has gone: the client gets a clear answer instead.
                let failed = crate::http::local(StatusCode::BAD_GATEWAY, "upstream_error", None);
                Box::pin(write_response(io, failed, head_only, true)).await?;
            }
            Ok(false)
        }
        Err(Wrote::Io { e, .. }) => Err(e),
    }
}

/// Appends the current time as an HTTP date.
fn now_http_date(out: &mut Vec<u8>) {
    with_date(|d| out.extend_from_slice(d.as_bytes()));
}

/// The current time as a `Date` header's value (h2 responses).
pub(crate) fn date_value() -> HeaderValue {
    with_date(HeaderValue::clone)
}

/// Runs `f` on the current time as an HTTP date, formatted once a second
/// per thread.
fn with_date<T>(f: impl FnOnce(&HeaderValue) -> T) -> T {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            *at = secs;
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                *value = v;
            }
        }
        f(value)
    })
}

fn hex_len(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// Chunked: where the decoder is.
    Chunked(Chunk),
    /// When the machine closes the connection.
    Close,
    /// It has.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This much of a chunk's data is left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

struct Parsed {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
    framing: Framing,
}

/// Parses a complete response head at the start of `buf` and takes it off;
/// None if more bytes are needed. Header values are views of the head's bytes
/// (no copy).
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Parsed>> {
    // Uninitialized: zeroing a hundred slots per response is not free.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut r, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad("too many response headers")),
        Err(_) => return Err(bad("malformed response head")),
    };
    let (Some(code), Some(version)) = (r.code, r.version) else {
        return Err(bad("malformed response head"));
    };
    let status = StatusCode::from_u16(code).map_err(|_| bad("bad status code"))?;
    let base = buf.as_ptr() as usize;
    let at: Spans = r.headers.iter().map(|h| span(base, h)).collect();
    let head = buf.split_to(len).freeze();
    // Room for `Via` and the machine's name.
    let mut headers = HeaderMap::with_capacity(at.len() + 2);
    let mut keep_alive = version == 1;
    let mut length: Option<u64> = None;
    let mut coded: Option<bool> = None;
    for at in at {
        let (name, value) = cut(&head, at).ok_or_else(|| bad("bad header"))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            let last = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or(b"");
            coded = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for t in tokens(value.as_bytes()) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    keep_alive = true;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = match (coded, length) {
        (Some(true), _) => Framing::Chunked(Chunk::Size),
        (Some(false), _) | (None, None) => Framing::Close,
        (None, Some(0)) => Framing::Done,
        (None, Some(n)) => Framing::Length(n),
    };
    if coded.is_some() {
        // The body is decoded here and framed again for the client.
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Some(Parsed {
        status,
        headers,
        keep_alive,
        framing,
    }))
}

/// Where one header sits in a head (name and value: start, length), to cut
/// it from the head's bytes once they are frozen.
type Span = (usize, usize, usize, usize);
type Spans = smallvec::SmallVec<[Span; 24]>;

fn span(base: usize, h: &httparse::Header<'_>) -> Span {
    (
        h.name.as_ptr() as usize - base,
        h.name.len(),
        h.value.as_ptr() as usize - base,
        h.value.len(),
    )
}

/// The header at `at` in `head`: the name parsed, the value a view of the
/// head's bytes (no copy). None if `http` refuses either.
fn cut(head: &Bytes, (n, nl, v, vl): Span) -> Option<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(&head[n..n + nl]).ok()?;
    let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl)).ok()?;
    Some((name, value))
}

/// The comma-separated tokens of a header value (`Connection`), trimmed.
pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// A status whose response has no body whatever its headers say (RFC 9112
/// section 6.3): 1xx, 204, 304.
fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Writes `content-length: n`.
fn put_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa(n, &mut [0u8; 20]));
    out.extend_from_slice(b"\r\n");
}

/// A response body read straight from the machine's connection.
struct MachineBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Upstreams>,
    addr: SocketAddr,
}

/// What the decoder made of the bytes at hand.
enum Step {
    Frame(Frame<Bytes>),
    More,
    End,
}

impl MachineBody {
    /// The body has ended: the connection goes back to the pool when it can
    /// carry another request (nothing left over, the machine keeps it open).
    fn finish(&mut self, clean: bool) {
        self.framing = Framing::Done;
        if let Some(mut conn) = self.conn.take()
            && clean
            && self.keep_alive
            && conn.buf.is_empty()
        {
            // An idle connection holds its socket only: an edge keeps some
            // for every machine it reaches.
            conn.buf = BytesMut::new();
            self.pool.push_idle(self.addr, conn);
        }
    }

    fn decode(&mut self) -> io::Result<Step> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::End);
        };
        let buf = &mut conn.buf;
        loop {
            match self.framing {
                Framing::Done => return Ok(Step::End),
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Frame(Frame::data(buf.split().freeze())));
                }
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    return Ok(Step::Frame(Frame::data(buf.split_to(take).freeze())));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(eol) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(bad("chunk size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..eol])?;
                    buf.advance(eol + 2);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Step::Frame(Frame::data(buf.split_to(take).freeze())));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.framing = Framing::Done;
                        return Ok(Step::End);
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > MAX_TRAILERS {
                            return Err(bad("trailers too large"));
                        }
                        return Ok(Step::More);
                    };
                    let section = buf.split_to(end + 4);
                    self.framing = Framing::Done;
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    let mut map = HeaderMap::new();
                    if let Ok(httparse::Status::Complete((_, list))) =
                        httparse::parse_headers(&section, &mut slots)
                    {
                        for h in list {
                            if let (Ok(k), Ok(v)) = (
                                HeaderName::from_bytes(h.name.as_bytes()),
                                HeaderValue::from_bytes(h.value),
                            ) {
                                map.append(k, v);
                            }
                        }
                    }
                    if map.is_empty() {
                        return Ok(Step::End);
                    }
                    return Ok(Step::Frame(Frame::trailers(map)));
                }
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// The size of a chunk-size line (`1a;ext=v`): hex digits, extensions ignored.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .map(<[u8]>::trim_ascii)
        .unwrap_or_default();
    if digits.is_empty() || digits.len() > 16 {
        return Err(bad("bad chunk size"));
    }
    let mut n = 0u64;
    for d in digits {
        let v = (*d as char)
            .to_digit(16)
            .ok_or_else(|| bad("bad chunk size"))?;
        n = (n << 4) | u64::from(v);
    }
    Ok(n)
}

impl Body for MachineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Step::Frame(f)) => {
                    if this.framing == Framing::Done {
                        this.finish(true);
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    this.finish(true);
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_BUF);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.framing == Framing::Close => {
                    this.finish(false);
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.finish(false);
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "body cut short");
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::{Full, StreamBody};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::{Proto, Sender, UpstreamLimits};

    /// What a scripted machine saw.
    #[derive(Default)]
    struct Seen {
        accepts: AtomicUsize,
        bytes: Mutex<Vec<u8>>,
    }

    impl Seen {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.bytes.lock().expect("seen")).into_owned()
        }
    }

    /// A machine on a real socket that answers each request (read until the
    /// bytes end with its marker) with the next canned response, then, if
    /// `close`, closes the connection.
    async fn machine(
        script: Vec<(&'static [u8], &'static [u8])>,
        close: bool,
    ) -> (SocketAddr, Arc<Seen>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                s.accepts.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(c, script.clone(), close, s.clone()));
            }
        });
        (addr, seen)
    }

    async fn serve(
        mut c: tokio::net::TcpStream,
        script: Vec<(&'static [u8], &'static [u8])>,
        close: bool,
        s: Arc<Seen>,
    ) {
        {
            {
                for (ends, answer) in &script {
                    let mut got = Vec::new();
                    while !got.ends_with(ends) {
                        let mut b = [0u8; 4096];
                        match c.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&b[..n]),
                        }
                    }
                    s.bytes.lock().expect("seen").extend_from_slice(&got);
                    if c.write_all(answer).await.is_err() {
                        return;
                    }
                }
                if close {
                    return;
                }
                // Held open until the client closes it.
                let mut b = [0u8; 64];
                while matches!(c.read(&mut b).await, Ok(n) if n > 0) {}
            }
        }
    }

    /// Waits (boundedly) for something the machine's task does on its own time.
    async fn until(what: &str, ok: impl Fn() -> bool) {
        for _ in 0..500 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    /// A body of unknown length: `chunks`, then one trailer.
    fn streamed(chunks: &[&'static [u8]], trailer: (&'static str, &'static str)) -> ProxyBody {
        let mut trailers = HeaderMap::new();
        trailers.insert(trailer.0, HeaderValue::from_static(trailer.1));
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        frames.push(Ok(Frame::trailers(trailers)));
        BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    fn pool() -> Arc<Upstreams> {
        Arc::new(Upstreams::new(
            UpstreamLimits {
                connect_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
                max_idle_per_backend: 8,
                h2_keepalive: crate::mux::Keepalive::default(),
                multiplexed_congestion: None,
            },
            1,
        ))
    }

    fn empty() -> ProxyBody {
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed()
    }

    fn get(method: &str, path: &str, body: ProxyBody) -> Request<ProxyBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "a.example")
            .body(body)
            .expect("request")
    }

    /// Sends on a connection from the pool; returns the response, its body
    /// (or the body's error) and whether the connection was reused.
    async fn exchange(
        pool: &Arc<Upstreams>,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<
        (
            http::response::Parts,
            Result<http_body_util::Collected<Bytes>, BoxError>,
            bool,
        ),
        String,
    > {
        let (sender, reused) = pool
            .get(addr, Proto::H1, false)
            .await
            .map_err(|e| e.to_string())?;
        let Sender::H1(conn) = sender else {
            return Err("not skein's own HTTP/1.1".into());
        };
        match conn.send(req, pool, addr).await {
            Ok((resp, _head)) => {
                let (parts, body) = resp.into_parts();
                Ok((parts, body.collect().await, reused))
            }
            Err(Failure::Machine(e)) => Err(format!("machine: {e}")),
            Err(Failure::Body(e)) => Err(format!("body: {e}")),
            Err(Failure::NotSent(_)) => Err("not sent".into()),
        }
    }

    #[tokio::test]
    async fn a_sized_response_is_read_and_its_connection_carries_the_next_request() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";
        let (addr, seen) = machine(vec![(b"\r\n\r\n", ok), (b"\r\n\r\n", ok)], false).await;
        let pool = pool();
        for round in 0..2 {
            let (parts, body, reused) = exchange(&pool, addr, get("GET", "/p?q=1", empty()))
                .await
                .expect("answered");
            assert_eq!(parts.status, 200);
            assert_eq!(parts.headers["x-a"], "1");
            assert_eq!(body.expect("body").to_bytes(), "hello");
            assert_eq!(reused, round == 1);
        }
        assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
        let text = seen.text();
        assert!(
            text.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: a.example\r\n"),
            "{text}"
        );
        assert!(
            !text.contains("content-length"),
            "a GET carries no length: {text}"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_extensions_and_trailers() {
        let (addr, _) = machine(
            vec![(
                b"\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 99\r\n\r\n\
                  5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: v\r\n\r\n",
            )],
            false,
        )
        .await;
        let pool = pool();
        let (parts, body, _) = exchange(&pool, addr, get("GET", "/", empty()))
            .await
            .expect("answered");
        assert!(
            parts.headers.get("content-length").is_none(),
            "a length beside a coding is dropped"
        );
        let body = body.expect("body");
        assert_eq!(
            body.trailers().map(|t| t["x-t"].clone()),
            Some(HeaderValue::from_static("v"))
        );
        assert_eq!(body.to_bytes(), "hello world");
        let (_, reused) = pool.get(addr, Proto::H1, false).await.expect("conn");
        assert!(
            reused,
            "a chunked response that ended cleanly leaves its connection pooled"
        );
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_head_and_204_have_no_body() {
        let (addr, _) =
            machine(
                vec![
                (
                    b"\r\n\r\n",
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
                      HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
                ),
                (b"\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
                (b"\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),
                (b"\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            ],
                false,
            )
            .await;
        let pool = pool();
        let (parts, body, _) = exchange(&pool, addr, get("GET", "/", empty()))
            .await
            .expect("answered");
        assert_eq!(parts.status, 200);
        assert_eq!(body.expect("body").to_bytes(), "abc");
        let (parts, body, _) = exchange(&pool, addr, get("HEAD", "/", empty()))
            .await
            .expect("answered");
        assert_eq!(parts.headers["content-length"], "10");
        assert!(body.expect("body").to_bytes().is_empty());
        let (parts, body, _) = exchange(&pool, addr, get("GET", "/", empty()))
            .await
            .expect("answered");
        assert_eq!(parts.status, 204);
        assert!(body.expect("body").to_bytes().is_empty());
        // All four on one connection: nothing was misread as a body.
        let (_, body, reused) = exchange(&pool, addr, get("GET", "/", empty()))
            .await
            .expect("answered");
        assert_eq!(body.expect("body").to_bytes(), "ok");
        assert!(reused);
    }

    #[tokio::test]
    async fn a_connection_the_machine_ends_is_not_used_again() {
        let cases: [(&'static [u8], &str, u64); 2] = [
            // No length: the body ends with the connection.
            (b"HTTP/1.1 200 OK\r\nx: y\r\n\r\nall of it", "all of it", 0),
            // A length, then a close the response did not announce; the
            // reactor learns of the FIN while the runtime waits.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx", "x", 50),
        ];
        for (answer, want, wait) in cases {
            let (addr, seen) = machine(vec![(b"\r\n\r\n", answer)], true).await;
            let pool = pool();
            let (_, body, _) = exchange(&pool, addr, get("GET", "/", empty()))
                .await
                .expect("answered");
            assert_eq!(body.expect("body").to_bytes(), want);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let (_, reused) = pool.get(addr, Proto::H1, false).await.expect("conn");
            assert!(!reused, "an ended connection was handed out ({want})");
            until("a second connection", || {
                seen.accepts.load(Ordering::SeqCst) == 2
            })
            .await;
        }
    }

    #[tokio::test]
    async fn malformed_responses_are_errors_not_answers() {
        let cases: [(&'static [u8], &str); 5] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
                "machine",
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: -3\r\n\r\n", "machine"),
            (b"NOT HTTP AT ALL\r\n\r\n", "machine"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "body",
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "body"),
        ];
        for (answer, kind) in cases {
            let (addr, _) = machine(vec![(b"\r\n\r\n", answer)], true).await;
            let pool = pool();
            let got = exchange(&pool, addr, get("GET", "/", empty())).await;
            let what = match got {
                Err(e) if e.starts_with("machine") => "machine",
                Ok((_, Err(_), _)) => "body",
                other => panic!(
                    "{:?} was taken as {:?}",
                    String::from_utf8_lossy(answer),
                    other.map(|(p, _, _)| p.status)
                ),
            };
            assert_eq!(what, kind, "{}", String::from_utf8_lossy(answer));
            let (_, reused) = pool.get(addr, Proto::H1, false).await.expect("conn");
            assert!(!reused, "a connection that misbehaved is not kept");
        }
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_what_the_body_knows() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (addr, seen) = machine(
            vec![
                (b"\r\n\r\ndata", ok),
                (b"0\r\nx-t: 1\r\n\r\n", ok),
                (b"\r\n\r\n", ok),
            ],
            false,
        )
        .await;
        let pool = pool();
        let whole = Full::new(Bytes::from_static(b"data"))
            .map_err(|never| match never {})
            .boxed();
        let (_, body, _) = exchange(&pool, addr, get("POST", "/a", whole))
            .await
            .expect("answered");
        assert!(body.is_ok());
        let streamed = streamed(&[b"abcd", b"ef"], ("x-t", "1"));
        let (_, body, _) = exchange(&pool, addr, get("PUT", "/b", streamed))
            .await
            .expect("answered");
        assert!(body.is_ok());
        let (_, body, _) = exchange(&pool, addr, get("POST", "/c", empty()))
            .await
            .expect("answered");
        assert!(body.is_ok());
        let text = seen.text();
        assert!(
            text.contains("POST /a HTTP/1.1\r\nhost: a.example\r\ncontent-length: 4\r\n\r\ndata"),
            "{text}"
        );
        assert!(
            text.contains(
                "PUT /b HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n\
                 4\r\nabcd\r\n2\r\nef\r\n0\r\nx-t: 1\r\n\r\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("POST /c HTTP/1.1\r\nhost: a.example\r\ncontent-length: 0\r\n\r\n"),
            "{text}"
        );
        assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_large_body_is_streamed_across_many_reads() {
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n".to_vec();
        answer.extend((0..300_000u32).map(|i| b'a' + (i % 26) as u8));
        let answer: &'static [u8] = answer.leak();
        let (addr, _) = machine(vec![(b"\r\n\r\n", answer)], false).await;
        let pool = pool();
        let (parts, body, _) = exchange(&pool, addr, get("GET", "/big", empty()))
            .await
            .expect("answered");
        assert_eq!(parts.headers["content-length"], "300000");
        let body = body.expect("body").to_bytes();
        assert_eq!(body.len(), 300_000);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, b)| *b == b'a' + (i % 26) as u8)
        );
        let (_, reused) = pool.get(addr, Proto::H1, false).await.expect("conn");
        assert!(reused);
    }

    fn next(raw: &str) -> (Next, BytesMut) {
        let mut buf = BytesMut::from(raw.as_bytes());
        (parse_request(&mut buf, 100), buf)
    }

    #[test]
    fn plain_requests_are_read_here_and_the_rest_left_to_hyper() {
        let (n, left) = next(
            "GET /a?b=1 HTTP/1.1\r\nHost: a.example\r\nX-Y: z\r\nConnection: keep-alive, close\r\n\r\nGET /next",
        );
        let Next::Plain(p) = n else {
            panic!("a plain GET is read here");
        };
        assert_eq!(p.req.method(), Method::GET);
        assert_eq!(p.req.uri(), "/a?b=1");
        assert_eq!(p.req.headers()["host"], "a.example");
        assert_eq!(p.req.headers()["x-y"], "z");
        assert!(p.close);
        assert!(p.req.body().is_end_stream());
        assert_eq!(
            &left[..],
            b"GET /next",
            "a pipelined request stays in the buffer"
        );
        let (n, _) = next("DELETE /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n");
        assert!(matches!(n, Next::Plain(p) if !p.close));
        assert!(matches!(
            next("GET / HTTP/1.1\r\nHost: a\r\n").0,
            Next::Partial
        ));
        for hyper in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            let (n, left) = next(hyper);
            assert!(matches!(n, Next::Hyper), "{hyper:?} is hyper's");
            assert_eq!(
                &left[..],
                hyper.as_bytes(),
                "hyper gets every byte of {hyper:?}"
            );
        }
        let many: String = (0..70).map(|i| format!("x-{i}: v\r\n")).collect();
        let (n, _) = next(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n"));
        assert!(matches!(n, Next::Hyper), "more headers than read here");
    }

    async fn written(resp: Response<ProxyBody>, head_only: bool, close: bool) -> (String, bool) {
        let mut out = Vec::new();
        let keep = write_response(&mut out, resp, head_only, close)
            .await
            .expect("written");
        (String::from_utf8_lossy(&out).into_owned(), keep)
    }

    fn response(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: ProxyBody,
    ) -> Response<ProxyBody> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        for (k, v) in headers {
            r.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        r
    }

    fn full(b: &'static str) -> ProxyBody {
        Full::new(Bytes::from_static(b.as_bytes()))
            .map_err(|never| match never {})
            .boxed()
    }

    #[tokio::test]
    async fn responses_are_framed_by_what_their_body_knows() {
        // A known length: Content-Length from the body, whatever the header said.
        let (t, keep) = written(
            response(
                200,
                &[("content-length", "99"), ("x-a", "1")],
                full("hello"),
            ),
            false,
            false,
        )
        .await;
        assert!(t.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "), "{t}");
        assert!(t.ends_with("GMT\r\ncontent-length: 5\r\n\r\nhello"), "{t}");
        assert!(keep);
        // Unknown length: chunked, trailers after the last chunk.
        let streamed = streamed(&[b"abc", b"0123456789abcdefg"], ("grpc-status", "0"));
        let (t, _) = written(
            response(200, &[("date", "Tue, 01 Dec 2026 00:00:00 GMT")], streamed),
            false,
            false,
        )
        .await;
        assert_eq!(
            t,
            "HTTP/1.1 200 OK\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n\
             3\r\nabc\r\n11\r\n0123456789abcdefg\r\n0\r\ngrpc-status: 0\r\n\r\n"
        );
        // HEAD keeps the length the machine gave and sends no body; 204 and
        // 304 have no framing at all.
        let (t, _) = written(
            response(200, &[("content-length", "10")], empty()),
            true,
            false,
        )
        .await;
        assert!(
            t.contains("content-length: 10\r\n") && t.ends_with("\r\n\r\n"),
            "{t}"
        );
        let (t, _) = written(response(404, &[], full("skein: no_app\n")), true, false).await;
        assert!(
            t.contains("content-length: 14\r\n") && t.ends_with("\r\n\r\n"),
            "{t}"
        );
        for status in [204, 304] {
            let (t, _) = written(response(status, &[], empty()), false, false).await;
            assert!(
                !t.contains("content-length") && !t.contains("transfer-encoding"),
                "{t}"
            );
        }
        // Closing: asked by the client, or by the response (the proxy's own
        // refusals), said once.
        let (t, keep) = written(response(200, &[], full("x")), false, true).await;
        assert!(!keep && t.contains("connection: close\r\n"), "{t}");
        let (t, keep) = written(
            response(413, &[("connection", "close")], full("x")),
            false,
            false,
        )
        .await;
        assert!(!keep && t.matches("connection").count() == 1, "{t}");
    }

    fn failing(slow: bool) -> ProxyBody {
        use futures_util::StreamExt;
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err("machine went away".into()),
        ];
        let frames = futures_util::stream::iter(frames).then(move |f| async move {
            if slow {
                tokio::task::yield_now().await;
            }
            f
        });
        BodyExt::boxed(StreamBody::new(frames))
    }

    #[tokio::test]
    async fn a_response_body_that_fails_ends_the_connection() {
        // Part of it sent: the client sees it cut short (no last chunk).
        let (t, keep) = written(response(200, &[], failing(true)), false, false).await;
        assert!(!keep);
        assert!(t.starts_with("HTTP/1.1 200 OK\r\n"), "{t}");
        assert!(t.ends_with("3\r\nabc\r\n"), "{t}");
        // Failed before a byte went: a clear 502 instead.
        let (t, keep) = written(response(200, &[], failing(false)), false, false).await;
        assert!(!keep);
        assert!(t.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{t}");
        assert!(
            t.contains("skein-error: upstream_error\r\n") && t.contains("connection: close\r\n"),
            "{t}"
        );
    }

    #[test]
    fn chunk_sizes_are_hex_and_bounded() {
        assert_eq!(chunk_size(b"1a").ok(), Some(26));
        assert_eq!(chunk_size(b"FF ; name=value").ok(), Some(255));
        for bad in [&b""[..], b";x", b"g", b"12345678901234567"] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
