//! skein's h2 client (RFC 9113, prior knowledge): the edge's backhaul to
//! other hosts' proxies, and machines whose service asks for h2c.
//!
//! The connection's side of the exchange is the server's, turned around:
//! one task owns the socket and every stream (frames, HPACK, windows, the
//! write buffer; `mux::wire` is what both sides share), with no lock
//! between the streams. A request is handed to the task through a queue
//! and its sender waits on a cell of its own for the response head; the
//! task opens the stream when the peer's stream limit lets it, pumps the
//! request body within the peer's windows, and fills the response body's
//! queue, which its reader drains (what it takes goes back to the peer as
//! window). Per request that is one allocation for the cell and one for the
//! response body's queue, where the `h2` crate adds a stream store behind a
//! mutex shared by every handle and copies each frame twice.
//!
//! A sender that stops waiting (its timeout, its client gone) or a reader
//! that drops the response body resets the stream with CANCEL. A stream the
//! peer refuses (REFUSED_STREAM, or above the last id of its GOAWAY) comes
//! back to its sender whole, to be sent elsewhere, if its body was not read
//! yet; so does every request still queued when the connection ends.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::hpack;
use super::wire::*;
use super::{Failure, Keepalive};
use crate::upstream::ProxyBody;

/// Largest response head (all fields, decoded) the peer may send.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Windows sized so that one large response does not stall on a link with
/// a real round trip; the machine's side bounds what it sends.
const STREAM_WINDOW: u32 = 2 << 20;
const CONN_WINDOW: u32 = 5 << 20;
/// Streams opened before the peer's SETTINGS say how many it takes. Only
/// requests without a body go then: one the peer refuses for its limit comes
/// back whole. A body waits for the SETTINGS, which come within the first
/// round trip.
const STREAMS_BEFORE_SETTINGS: u32 = 100;
/// The last client stream id (RFC 9113, 5.1.1).
const LAST_ID: u32 = 0x7fff_ffff;

/// Why an exchange failed on the upstream's side.
#[derive(Debug)]
pub struct Error {
    why: &'static str,
    /// The h2 error code the peer (or this side) gave, if one did.
    code: Option<u32>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{} (h2 error code {c:#x})", self.why),
            None => f.write_str(self.why),
        }
    }
}

impl std::error::Error for Error {}

fn error(why: &'static str, code: Option<Code>) -> Failure {
    Failure::Upstream(Error {
        why,
        code: code.map(|c| c.0),
    })
}

/// One h2 connection to an upstream; clones share it. The connection ends
/// once every clone is dropped and its streams are done.
#[derive(Clone)]
pub struct Conn {
    handle: Arc<Handle>,
}

/// What the clones of a `Conn` hold; dropping the last tells the task.
struct Handle {
    queue: Arc<Queue>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.gone.store(true, Ordering::Release);
        self.queue.wakes.inline.wake_ref();
    }
}

/// Requests waiting for the connection task.
struct Queue {
    state: Mutex<Waiting>,
    /// The connection takes no more requests.
    closed: AtomicBool,
    /// The list may hold requests: the task looks (and locks) only then.
    queued: AtomicBool,
    /// Every handle is gone.
    gone: AtomicBool,
    wakes: Arc<Wakes>,
}

#[derive(Default)]
struct Waiting {
    list: VecDeque<Submit>,
    closed: bool,
}

struct Submit {
    req: Request<ProxyBody>,
    cell: Arc<Cell>,
}

/// Where a request's sender waits for its answer.
#[derive(Default)]
struct Cell {
    state: Mutex<CellState>,
}

#[derive(Default)]
struct CellState {
    answer: Option<Result<Response<ProxyBody>, Failure>>,
    waiter: Option<Waker>,
    /// The sender stopped waiting.
    abandoned: bool,
    /// The stream's waker, once the stream is open: an abandon wakes it.
    stream: Option<Waker>,
}

impl Cell {
    /// Hands the answer to the sender; false if nobody waits any more.
    fn answer(&self, a: Result<Response<ProxyBody>, Failure>) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.abandoned {
            return false;
        }
        s.answer = Some(a);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
        true
    }

    fn abandoned(&self) -> bool {
        self.state.lock().map(|s| s.abandoned).unwrap_or(true)
    }
}

/// The sender's wait for its answer; dropped early, it abandons the stream.
struct Answer {
    cell: Arc<Cell>,
    done: bool,
}

impl Future for Answer {
    type Output = Result<Response<ProxyBody>, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(mut s) = self.cell.state.lock() else {
            return Poll::Ready(Err(error("connection state lost", None)));
        };
        if let Some(a) = s.answer.take() {
            drop(s);
            self.done = true;
            return Poll::Ready(a);
        }
        if !s.waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waiter = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut s) = self.cell.state.lock() {
            s.abandoned = true;
            s.answer = None;
            if let Some(w) = s.stream.take() {
                w.wake();
            }
        }
    }
}

impl Conn {
    /// Speaks h2 on `io`: the preface and this side's settings go out with
    /// the first write of the connection's task, spawned on the caller's
    /// runtime, which also pings the peer as `keepalive` says.
    pub async fn handshake(io: TcpStream, keepalive: Keepalive) -> std::io::Result<Conn> {
        let span = tracing::debug_span!("upstream_h2", peer = %io.peer_addr()?);
        Ok(Conn::start(io, keepalive, span))
    }

    /// The connection on any byte stream, its task spawned.
    fn start<I>(io: I, keepalive: Keepalive, span: tracing::Span) -> Conn
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (conn, task) = Conn::new(io, keepalive);
        tokio::spawn(tracing::Instrument::instrument(task, span));
        conn
    }

    /// The connection and its task, for the caller to run.
    fn new<I>(io: I, keepalive: Keepalive) -> (Conn, impl Future<Output = ()> + Send + 'static)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let wakes = Arc::new(Wakes::default());
        let queue = Arc::new(Queue {
            state: Mutex::new(Waiting::default()),
            closed: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            wakes: wakes.clone(),
        });
        let driver = Driver::new(io, keepalive, queue.clone(), wakes);
        let conn = Conn {
            handle: Arc::new(Handle { queue }),
        };
        (conn, driver.run())
    }

    /// True once the connection has ended or takes no more requests.
    pub fn is_closed(&self) -> bool {
        self.handle.queue.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (its URI absolute, no connection-specific header) and
    /// waits for the response head; the response's body reads the rest.
    /// Waits while the peer's concurrent stream limit is reached.
    pub async fn send(self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, Failure> {
        let queue = &self.handle.queue;
        let cell = Arc::new(Cell::default());
        {
            let Ok(mut w) = queue.state.lock() else {
                return Err(Failure::NotSent(Box::new(req)));
            };
            if w.closed {
                return Err(Failure::NotSent(Box::new(req)));
            }
            w.list.push_back(Submit {
                req,
                cell: cell.clone(),
            });
            queue.queued.store(true, Ordering::Release);
        }
        queue.wakes.inline.wake_ref();
        Answer { cell, done: false }.await
    }
}

/// One stream's place in the connection; reused by later streams.
struct Slot {
    /// The stream's id; 0 while the slot is free.
    id: u32,
    tx: Outbound,
    rx: Inbound,
    /// Who waits for the response head, until it comes.
    cell: Option<Arc<Cell>>,
    /// The request's head, until the response's: a refused stream goes
    /// back whole.
    parts: Option<Parts>,
    /// The response has no body whatever its head says (a HEAD request).
    no_body: bool,
    waker: Waker,
    wake: Arc<SlotWake>,
}

impl Slot {
    fn new(idx: usize, wakes: &Arc<Wakes>) -> Slot {
        let (waker, wake) = SlotWake::new(idx, wakes);
        Slot {
            id: 0,
            tx: Outbound::default(),
            rx: Inbound::default(),
            cell: None,
            parts: None,
            no_body: false,
            waker,
            wake,
        }
    }

    fn done(&self) -> bool {
        self.id != 0 && self.tx.done && !self.rx.open && self.cell.is_none()
    }

    /// The request comes back whole if nothing of its body was read.
    fn unsent(&mut self) -> Option<Request<ProxyBody>> {
        if self.tx.polled {
            return None;
        }
        let parts = self.parts.take()?;
        let body = self.tx.body.take().unwrap_or_else(empty);
        Some(Request::from_parts(parts, body))
    }

    /// The stream failed: its sender or its response body's reader is told.
    fn fail(&mut self, why: &'static str, code: Option<Code>, refused: bool) {
        if let Some(cell) = self.cell.take() {
            let answer = match self.unsent() {
                Some(req) if refused => Failure::NotSent(Box::new(req)),
                _ => error(why, code),
            };
            let _ = cell.answer(Err(answer));
        } else if let Some(shared) = &self.rx.shared {
            shared.fail(why);
        }
        self.tx.done = true;
        self.rx.open = false;
    }
}

/// How the connection ended, for the streams and requests still on it.
struct Ended(&'static str);

/// The connection's task and everything it owns.
struct Driver<I> {
    wire: Wire<I>,
    link: Link,
    hpack: hpack::Decoder,
    partial: Option<Partial>,
    pinger: Pinger,
    queue: Arc<Queue>,
    wakes: Arc<Wakes>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_id: ById,
    active: usize,
    /// The id the next stream gets.
    next_id: u32,
    /// The peer's GOAWAY: no stream above this id was or will be processed.
    peer_last: Option<u32>,
    /// Every stream and sender was answered.
    ended: bool,
    /// Requests wait for the write buffer to drain.
    start_blocked: bool,
}

impl<I> Driver<I> {
    /// The connection is over: the streams still open fail, and the
    /// requests still queued go back unsent.
    fn close(&mut self, end: Ended) {
        self.ended = true;
        self.refuse_new();
        for slot in &mut self.slots {
            if slot.id != 0 {
                slot.fail(end.0, None, false);
            }
        }
    }

    /// Takes no more requests: those queued go back unsent.
    fn refuse_new(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        let waiting = match self.queue.state.lock() {
            Ok(mut w) => {
                w.closed = true;
                self.queue.queued.store(false, Ordering::Release);
                std::mem::take(&mut w.list)
            }
            Err(_) => VecDeque::new(),
        };
        for s in waiting {
            let _ = s.cell.answer(Err(Failure::NotSent(Box::new(s.req))));
        }
    }
}

/// A task that ends without closing (a panic, a runtime shutting down)
/// still answers every sender: none waits out its timeout for it.
impl<I> Drop for Driver<I> {
    fn drop(&mut self) {
        if !self.ended {
            self.close(Ended("the connection's task ended"));
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Driver<I> {
    fn new(io: I, keepalive: Keepalive, queue: Arc<Queue>, wakes: Arc<Wakes>) -> Driver<I> {
        let mut link = Link::new(CONN_WINDOW);
        let out = &mut link.out;
        out.buf.extend_from_slice(PREFACE);
        let settings: [(u16, u32); 3] = [(0x2, 0), (0x4, STREAM_WINDOW), (0x6, MAX_HEADER_LIST)];
        out.head(settings.len() * 6, SETTINGS, 0, 0);
        for (id, v) in settings {
            out.buf.extend_from_slice(&id.to_be_bytes());
            out.buf.extend_from_slice(&v.to_be_bytes());
        }
        out.window_update(0, CONN_WINDOW - 65_535);
        Driver {
            wire: Wire::new(io, 16 << 10),
            link,
            hpack: hpack::Decoder::new(TABLE_SIZE),
            partial: None,
            pinger: Pinger::new(keepalive),
            queue,
            wakes,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: ById::default(),
            active: 0,
            next_id: 1,
            peer_last: None,
            ended: false,
            start_blocked: false,
        }
    }

    async fn run(mut self) {
        let wakes = self.wakes.clone();
        let own = Waker::from(wakes.clone());
        let mut woken: Vec<usize> = Vec::new();
        let end = poll_fn(|outer| {
            wakes.inline.enter(outer.waker());
            let cx = &mut Context::from_waker(&own);
            let mut rounds = 0;
            loop {
                if let Err(why) = self.pinger.poll(cx, &mut self.link.out) {
                    metrics::counter!("skein_proxy_upstream_h2_dead_total").increment(1);
                    tracing::warn!(
                        reason = why,
                        "upstream h2 peer stopped answering pings: connection dropped"
                    );
                    return Poll::Ready(Ended("the upstream stopped answering pings"));
                }
                if let Err(f) = self.read(cx) {
                    metrics::counter!("skein_proxy_upstream_h2_errors_total", "reason" => f.1)
                        .increment(1);
                    tracing::debug!(code = f.0.0, why = f.1, "upstream h2 connection error");
                    // The last stream the peer opened: none (no push).
                    self.link.out.goaway(0, f.0);
                    let _ = self.wire.flush(cx, &mut self.link.out);
                    return Poll::Ready(Ended(f.1));
                }
                self.start_streams();
                wakes.take(&mut woken);
                for i in woken.drain(..) {
                    if let Some(s) = self.slots.get(i) {
                        s.wake.queued.store(false, Ordering::Release);
                    }
                    self.link.ready.push_back(i);
                }
                while let Some(i) = self.link.ready.pop_front() {
                    self.drive(i);
                }
                match self.wire.flush(cx, &mut self.link.out) {
                    Err(()) => return Poll::Ready(Ended("the upstream connection failed")),
                    Ok(true) if !self.link.write_blocked.is_empty() || self.start_blocked => {
                        // The buffer drained: what waited on it goes on, and
                        // requests the backlog held back are opened.
                        self.start_blocked = false;
                        self.link.ready.extend(self.link.write_blocked.drain(..));
                        continue;
                    }
                    Ok(true) if std::mem::take(&mut self.wire.read_paused) => {
                        cx.waker().wake_by_ref();
                    }
                    Ok(_) => {}
                }
                if self.wire.read_closed {
                    return Poll::Ready(Ended("the upstream closed the connection"));
                }
                if self.active == 0 && self.finished() {
                    return Poll::Ready(Ended("the connection ended"));
                }
                if !wakes.inline.leave(rounds < ROUNDS) {
                    return Poll::Pending;
                }
                rounds += 1;
            }
        })
        .await;
        self.close(end);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            use tokio::io::AsyncWriteExt as _;
            let out = &self.link.out;
            self.wire.io.write_all(&out.buf[out.pos..]).await?;
            self.wire.io.shutdown().await
        })
        .await;
    }

    /// No more requests will come or be taken, and none waits.
    fn finished(&mut self) -> bool {
        if self.queue.closed.load(Ordering::Relaxed) {
            // Only this task closes the queue (`refuse_new`): the list was
            // emptied then, and nothing is queued after.
            return true;
        }
        if !self.queue.gone.load(Ordering::Acquire) || self.queue.queued.load(Ordering::Acquire) {
            return false;
        }
        // Every handle is gone: a GOAWAY tells the peer, then the end.
        self.refuse_new();
        self.link.out.goaway(0, Code::NO_ERROR);
        true
    }

    fn read(&mut self, cx: &mut Context<'_>) -> Result<(), Fatal> {
        let mut budget = READ_BUDGET;
        loop {
            while let Some((kind, f)) = self.wire.next_frame()? {
                self.frame(kind, f)?;
            }
            if !self
                .wire
                .read_more(cx, &mut budget, self.link.out.backlog())
            {
                return Ok(());
            }
        }
    }

    fn frame(&mut self, kind: u8, f: H2Frame) -> Result<(), Fatal> {
        if !self.link.peer_settings && (kind != SETTINGS || f.flags & ACK != 0) {
            // The server's preface is a SETTINGS frame (RFC 9113, 3.4).
            return Err(Fatal(Code::PROTOCOL_ERROR, "server preface not SETTINGS"));
        }
        if self.partial.is_some() && kind != CONTINUATION {
            return Err(Fatal(Code::PROTOCOL_ERROR, "header block interrupted"));
        }
        match kind {
            DATA => self.on_data(f),
            HEADERS | CONTINUATION => {
                if kind == HEADERS {
                    self.opened_stream(f.id, "HEADERS")?;
                }
                match header_block(&mut self.partial, kind, f, MAX_HEADER_LIST)? {
                    Some((id, end_stream, block)) => self.on_block(id, end_stream, block),
                    None => Ok(()),
                }
            }
            PRIORITY => {
                if f.id == 0 {
                    return Err(Fatal(Code::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                Ok(())
            }
            RST_STREAM => {
                if f.id == 0 || f.payload.len() != 4 {
                    return Err(Fatal(Code::PROTOCOL_ERROR, "malformed RST_STREAM"));
                }
                self.opened_stream(f.id, "RST_STREAM")?;
                let code = Code(u32::from_be_bytes([
                    f.payload[0],
                    f.payload[1],
                    f.payload[2],
                    f.payload[3],
                ]));
                self.on_reset(f.id, code);
                Ok(())
            }
            SETTINGS => {
                let streams = self.slots.iter_mut().enumerate();
                let open = streams
                    .filter(|(_, s)| s.id != 0)
                    .map(|(i, s)| (i, &mut s.tx));
                self.link.on_settings(&f, open)
            }
            PUSH_PROMISE => Err(Fatal(Code::PROTOCOL_ERROR, "PUSH_PROMISE though disabled")),
            PING => self.pinger.on_ping(&f, &mut self.link.out),
            GOAWAY => {
                if f.id != 0 || f.payload.len() < 8 {
                    return Err(Fatal(Code::PROTOCOL_ERROR, "malformed GOAWAY"));
                }
                let p = &f.payload;
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                if code != 0 {
                    tracing::debug!(code, "upstream sent GOAWAY with an error");
                }
                self.on_goaway(last);
                Ok(())
            }
            WINDOW_UPDATE => {
                let Some(inc) = self.link.on_window_update(&f)? else {
                    return Ok(());
                };
                self.opened_stream(f.id, "WINDOW_UPDATE")?;
                let Some(&i) = self.by_id.get(&f.id) else {
                    return Ok(());
                };
                if let Some(slot) = self.slots.get_mut(i)
                    && let Err(code) = slot.tx.grow(inc, i, &mut self.link.ready)
                {
                    self.reset(i, code, "stream window error");
                }
                Ok(())
            }
            // Unknown frame types are ignored (RFC 9113, 4.1).
            _ => Ok(()),
        }
    }

    /// A frame on stream `id` must be on one this side opened.
    fn opened_stream(&self, id: u32, what: &'static str) -> Result<(), Fatal> {
        if id == 0 || id.is_multiple_of(2) || id >= self.next_id {
            tracing::debug!(id, what, "frame on a stream this side did not open");
            return Err(Fatal(Code::PROTOCOL_ERROR, "frame on an idle stream"));
        }
        Ok(())
    }

    fn on_data(&mut self, f: H2Frame) -> Result<(), Fatal> {
        if f.id == 0 {
            return Err(Fatal(Code::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let (data, whole, pad) = self.link.data_frame(f.flags, f.payload)?;
        self.opened_stream(f.id, "DATA")?;
        let open = self.by_id.get(&f.id).copied().filter(|&i| {
            self.slots
                .get(i)
                .is_some_and(|s| s.rx.open && s.cell.is_none())
        });
        let Some(i) = open else {
            // A stream that ended or was reset: the bytes go back to the
            // connection and are dropped.
            self.link.give_back(whole);
            if let Some(&i) = self.by_id.get(&f.id) {
                let (code, why) = match self.slots.get(i) {
                    Some(s) if s.cell.is_some() => {
                        (Code::PROTOCOL_ERROR, "DATA before the response head")
                    }
                    _ => (Code::STREAM_CLOSED, "DATA on a closed stream"),
                };
                self.reset(i, code, why);
            }
            return Ok(());
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(());
        };
        let end = f.flags & END_STREAM != 0;
        if let Err(code) = self.link.data_in(&mut slot.rx, data, whole, pad, end) {
            self.reset(i, code, "response body malformed");
        } else if end {
            self.link.ready.push_back(i);
        }
        Ok(())
    }

    /// A whole header block: a response's head (or an interim one), or its
    /// trailers.
    fn on_block(&mut self, id: u32, end_stream: bool, block: Bytes) -> Result<(), Fatal> {
        let mut head = Head::new(MAX_HEADER_LIST as usize);
        self.hpack
            .decode(block, |name, value| head.field(name, value))
            .map_err(|e| Fatal(Code::COMPRESSION_ERROR, e.0))?;
        let Some(&i) = self.by_id.get(&id) else {
            // A stream this side reset: decoded for the table, dropped.
            return Ok(());
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(());
        };
        if slot.cell.is_none() {
            // Trailers.
            let complete = end_stream && slot.rx.remaining.is_none_or(|r| r == 0);
            let trailers = head.trailers().filter(|_| complete && slot.rx.open);
            let Some(t) = trailers else {
                self.reset(i, Code::PROTOCOL_ERROR, "malformed response trailers");
                return Ok(());
            };
            slot.rx.open = false;
            if let Some(shared) = &slot.rx.shared {
                shared.trailers(t);
            }
            self.link.ready.push_back(i);
            return Ok(());
        }
        if head.size > head.max {
            self.reset(i, Code::CANCEL, "response head too large");
            return Ok(());
        }
        let (resp, mut remaining) = match head.response() {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(why, "malformed h2 response");
                self.reset(i, Code::PROTOCOL_ERROR, "malformed response head");
                return Ok(());
            }
        };
        let status = resp.status();
        if status.is_informational() {
            // 100, 103: the final head is still to come; 101 is not h2's.
            if end_stream || status == StatusCode::SWITCHING_PROTOCOLS {
                self.reset(i, Code::PROTOCOL_ERROR, "malformed interim response");
            }
            return Ok(());
        }
        if slot.no_body || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            remaining = None;
        }
        if end_stream && remaining.is_some_and(|n| n > 0) {
            self.reset(i, Code::PROTOCOL_ERROR, "response shorter than its length");
            return Ok(());
        }
        slot.rx.remaining = remaining;
        // Processed: the head is not needed to send the request again.
        slot.parts = None;
        slot.rx.open = !end_stream;
        let resp = resp.map(|()| slot.rx.reader(end_stream, &slot.waker, remaining));
        let Some(cell) = slot.cell.take() else {
            return Ok(());
        };
        if !cell.answer(Ok(resp)) {
            // Nobody waits any more.
            self.reset(i, Code::CANCEL, "abandoned");
        } else {
            self.link.ready.push_back(i);
        }
        Ok(())
    }

    fn on_reset(&mut self, id: u32, code: Code) {
        let Some(&i) = self.by_id.get(&id) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if code == Code::NO_ERROR && slot.cell.is_none() && !slot.rx.open {
            // The response is whole: the peer wants no more of the request
            // (RFC 9113, 8.1).
            slot.tx.done = true;
            slot.tx.body = None;
        } else {
            let refused = code == Code::REFUSED_STREAM;
            let why = if refused {
                "the upstream refused the stream"
            } else {
                "the upstream reset the stream"
            };
            slot.fail(why, Some(code), refused);
        }
        self.release(i);
    }

    fn on_goaway(&mut self, last: u32) {
        self.peer_last = Some(last);
        self.refuse_new();
        for i in 0..self.slots.len() {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            if slot.id > last {
                // Not processed, and never will be: sent elsewhere.
                slot.fail("the upstream went away", None, true);
                self.release(i);
            }
        }
    }

    /// Resets stream (slot) `i` with `code`; its sender or reader fails.
    fn reset(&mut self, i: usize, code: Code, why: &'static str) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        self.link.out.rst(slot.id, code);
        if code != Code::CANCEL {
            metrics::counter!("skein_proxy_upstream_h2_stream_errors_total").increment(1);
        }
        slot.fail(why, Some(code), false);
        self.release(i);
    }

    /// Opens streams for the queued requests, as many as the peer takes.
    fn start_streams(&mut self) {
        let limit = if self.link.peer_settings {
            self.link.peer_streams
        } else {
            STREAMS_BEFORE_SETTINGS
        };
        while self.active < limit as usize
            && self.peer_last.is_none()
            && self.queue.queued.load(Ordering::Acquire)
        {
            if self.link.out.backlog() >= WRITE_HIGH {
                // Opened after the next full flush.
                self.start_blocked = true;
                return;
            }
            let settled = self.link.peer_settings;
            let next = match self.queue.state.lock() {
                Ok(mut w) => {
                    let bodiless = |s: &Submit| s.req.body().is_end_stream();
                    if !settled && !w.list.front().is_some_and(bodiless) {
                        return;
                    }
                    let next = w.list.pop_front();
                    if w.list.is_empty() {
                        self.queue.queued.store(false, Ordering::Release);
                    }
                    next
                }
                Err(_) => None,
            };
            let Some(Submit { req, cell }) = next else {
                return;
            };
            if cell.abandoned() {
                continue;
            }
            if self.next_id > LAST_ID {
                // Out of stream ids: a new connection takes the rest.
                let _ = cell.answer(Err(Failure::NotSent(Box::new(req))));
                self.refuse_new();
                return;
            }
            self.open(req, cell);
        }
    }

    fn open(&mut self, req: Request<ProxyBody>, cell: Arc<Cell>) {
        let id = self.next_id;
        self.next_id += 2;
        let (parts, body) = req.into_parts();
        let block = &mut self.link.block;
        block.clear();
        hpack::put_field(block, ":method", parts.method.as_str().as_bytes(), false);
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        hpack::put_field(block, ":scheme", scheme.as_bytes(), false);
        let authority = match parts.uri.authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => parts.headers.get(header::HOST).map(HeaderValue::as_bytes),
        };
        if let Some(a) = authority {
            hpack::put_field(block, ":authority", a, false);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        hpack::put_field(block, ":path", path.as_bytes(), false);
        for (name, value) in &parts.headers {
            if name == header::HOST || is_connection_specific(name, value.as_bytes()) {
                continue;
            }
            hpack::put_field(block, name.as_str(), value.as_bytes(), value.is_sensitive());
        }
        let eos = body.is_end_stream();
        self.link
            .out
            .headers(id, &self.link.block, eos, self.link.peer_frame);
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::new(self.slots.len(), &self.wakes));
                self.slots.len() - 1
            }
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.id = id;
        slot.no_body = parts.method == Method::HEAD;
        slot.tx = Outbound {
            window: self.link.peer_window,
            body: Some(body),
            done: eos,
            ..Outbound::default()
        };
        slot.rx = Inbound {
            window: i64::from(STREAM_WINDOW),
            open: true,
            ..Inbound::default()
        };
        slot.parts = Some(parts);
        if let Ok(mut s) = cell.state.lock() {
            s.stream = Some(slot.waker.clone());
        }
        slot.cell = Some(cell);
        self.by_id.insert(id, i);
        self.active += 1;
        if !eos {
            self.link.ready.push_back(i);
        }
    }

    /// Polls stream (slot) `i`: its sender, its response body's reader, its
    /// request body.
    fn drive(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if slot.id == 0 {
            return;
        }
        let gone = match (&slot.cell, &slot.rx.shared) {
            (Some(cell), _) => cell.abandoned(),
            (None, Some(shared)) => slot.rx.open && shared.is_closed(),
            (None, None) => false,
        };
        if gone {
            // Its sender stopped waiting, or its reader dropped the body.
            return self.reset(i, Code::CANCEL, "abandoned");
        }
        self.link.take_back(slot.id, &mut slot.rx, STREAM_WINDOW);
        let cx = &mut Context::from_waker(&slot.waker);
        if let Some(e) = self.link.pump(slot.id, &mut slot.tx, i, cx, Code::CANCEL) {
            // Reset by the pump: the client's fault, not the upstream's.
            if let Some(cell) = slot.cell.take() {
                let _ = cell.answer(Err(Failure::Body(e)));
            } else if let Some(shared) = &slot.rx.shared {
                shared.fail("the request body failed");
            }
            slot.rx.open = false;
            slot.tx.done = true;
            return self.release(i);
        }
        if slot.done() {
            self.release(i);
        }
    }

    /// Frees slot `i`: what its response body's reader left goes back to
    /// the connection window.
    fn release(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if slot.id == 0 {
            return;
        }
        if let Some(shared) = slot.rx.shared.take() {
            let left = shared.finish();
            self.link.give_back(left);
        }
        self.by_id.remove(&slot.id);
        self.active = self.active.saturating_sub(1);
        slot.id = 0;
        slot.tx = Outbound::default();
        slot.rx = Inbound::default();
        slot.cell = None;
        slot.parts = None;
        slot.no_body = false;
        self.free.push(i);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::{Buf as _, BytesMut};
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Frame;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use crate::mux::server::tests::Rng;
    use crate::upstream::BoxError;

    fn get(path: &str) -> Request<ProxyBody> {
        Request::get(format!("http://machine{path}"))
            .body(empty())
            .unwrap()
    }

    /// An h2 server written frame by frame, to make the client meet what a
    /// real server rarely does on cue: refusals, GOAWAY, interim heads,
    /// bodies that lie about their length.
    struct Peer {
        io: TcpStream,
        buf: BytesMut,
        hpack: hpack::Decoder,
    }

    /// A frame as the peer reads it.
    #[derive(Debug)]
    struct Got {
        kind: u8,
        id: u32,
        payload: Bytes,
    }

    impl Peer {
        /// The server's end of a connection, past the client's preface.
        async fn connected(io: TcpStream) -> Peer {
            let mut p = Peer {
                io,
                buf: BytesMut::new(),
                hpack: hpack::Decoder::new(4096),
            };
            while p.buf.len() < PREFACE.len() {
                p.read().await;
            }
            assert_eq!(&p.buf[..PREFACE.len()], PREFACE, "the client's preface");
            p.buf.advance(PREFACE.len());
            p
        }

        /// Accepts the client's connection: its preface, then this side's
        /// (empty) SETTINGS, or `settings` when given.
        async fn accept(l: &TcpListener, settings: &[(u16, u32)]) -> Peer {
            let (io, _) = l.accept().await.unwrap();
            let mut p = Peer::connected(io).await;
            let mut payload = Vec::new();
            for (k, v) in settings {
                payload.extend_from_slice(&k.to_be_bytes());
                payload.extend_from_slice(&v.to_be_bytes());
            }
            p.send(SETTINGS, 0, 0, &payload).await;
            p
        }

        async fn read(&mut self) -> usize {
            tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                .await
                .expect("the client sent nothing for 5 s")
                .unwrap()
        }

        async fn send(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
            let len = payload.len() as u32;
            let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(payload);
            self.io.write_all(&f).await.unwrap();
        }

        /// The next frame; None once the client closed the connection.
        async fn frame(&mut self) -> Option<Got> {
            loop {
                if let Some((len, kind, _, id)) = frame_header(&self.buf)
                    && self.buf.len() >= 9 + len
                {
                    self.buf.advance(9);
                    let payload = self.buf.split_to(len).freeze();
                    return Some(Got { kind, id, payload });
                }
                if self.read().await == 0 {
                    return None;
                }
            }
        }

        /// The next frame that is not about the connection's settings or
        /// windows.
        async fn next(&mut self) -> Option<Got> {
            loop {
                let f = self.frame().await?;
                if f.kind != SETTINGS && f.kind != WINDOW_UPDATE {
                    return Some(f);
                }
            }
        }

        /// The next request's stream id and path.
        async fn request(&mut self) -> (u32, String) {
            let f = self.next().await.expect("a request");
            assert_eq!(f.kind, HEADERS, "{f:?}");
            let mut path = String::new();
            self.hpack
                .decode(f.payload, |name, value| {
                    if name == hpack::Name::Path {
                        path = String::from_utf8(value.to_vec()).unwrap();
                    }
                })
                .unwrap();
            (f.id, path)
        }

        /// A response head on `id`.
        async fn head(&mut self, id: u32, status: u16, fields: &[(&str, &str)], end: bool) {
            let mut block = Vec::new();
            hpack::put_status(&mut block, status);
            for (n, v) in fields {
                hpack::put_field(&mut block, n, v.as_bytes(), false);
            }
            let flags = END_HEADERS | if end { END_STREAM } else { 0 };
            self.send(HEADERS, flags, id, &block).await;
        }

        /// The code of the next RST_STREAM, on stream `id`.
        async fn reset_of(&mut self, id: u32) -> u32 {
            let f = self.next().await.expect("a reset");
            assert_eq!((f.kind, f.id), (RST_STREAM, id), "{f:?}");
            u32::from_be_bytes(f.payload[..4].try_into().unwrap())
        }
    }

    async fn pair(settings: &[(u16, u32)]) -> (Conn, Peer) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let conn = Conn::handshake(io, Keepalive::default()).await.unwrap();
        let peer = Peer::accept(&l, settings).await;
        (conn, peer)
    }

    fn path_of(f: Result<Response<ProxyBody>, Failure>) -> String {
        match f {
            Err(Failure::NotSent(req)) => req.uri().path().to_owned(),
            Err(Failure::Upstream(e)) => panic!("failed, not given back: {e}"),
            Err(Failure::Body(e)) => panic!("body failed: {e}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
    }

    #[tokio::test]
    async fn refused_streams_and_those_above_a_goaway_come_back_whole() {
        let (conn, mut peer) = pair(&[]).await;
        // REFUSED_STREAM: not processed, so the request comes back to be
        // sent to another machine.
        let one = tokio::spawn(conn.clone().send(get("/one")));
        let (id, path) = peer.request().await;
        assert_eq!(path, "/one");
        peer.send(RST_STREAM, 0, id, &7u32.to_be_bytes()).await;
        assert_eq!(path_of(one.await.unwrap()), "/one");
        // Two in flight; GOAWAY names the first as the last processed.
        let two = tokio::spawn(conn.clone().send(get("/two")));
        let (two_id, _) = peer.request().await;
        let three = tokio::spawn(conn.clone().send(get("/three")));
        let (three_id, path) = peer.request().await;
        assert_eq!((three_id, path.as_str()), (two_id + 2, "/three"));
        let mut goaway = two_id.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0u32.to_be_bytes());
        peer.send(GOAWAY, 0, 0, &goaway).await;
        assert_eq!(path_of(three.await.unwrap()), "/three");
        // The one below the last id is still answered.
        peer.head(two_id, 200, &[("content-length", "0")], true)
            .await;
        let resp = two.await.unwrap().ok().expect("/two answered");
        assert_eq!(resp.status(), 200);
        assert!(conn.is_closed(), "the pool makes a new connection");
        assert_eq!(path_of(conn.clone().send(get("/four")).await), "/four");
        // A refused stream whose body was read cannot be sent again: an
        // error, not a second copy with half a body.
        let (conn, mut peer) = pair(&[]).await;
        let body = Full::new(Bytes::from_static(b"data"))
            .map_err(|never| match never {})
            .boxed();
        let post = Request::post("http://machine/post").body(body).unwrap();
        let sent = tokio::spawn(conn.clone().send(post));
        let (id, _) = peer.request().await;
        let data = peer.next().await.unwrap();
        assert_eq!((data.kind, &data.payload[..]), (DATA, &b"data"[..]));
        peer.send(RST_STREAM, 0, id, &7u32.to_be_bytes()).await;
        match sent.await.unwrap() {
            Err(Failure::Upstream(e)) => assert!(e.to_string().contains("refused"), "{e}"),
            _ => panic!("a read body was given back or answered"),
        }
    }

    #[tokio::test]
    async fn a_sender_that_stops_waiting_or_a_reader_that_drops_the_body_cancels_its_stream() {
        let (conn, mut peer) = pair(&[]).await;
        // The sender times out: its stream is reset with CANCEL.
        let waited =
            tokio::time::timeout(Duration::from_millis(100), conn.clone().send(get("/slow")));
        let (sent, got) = tokio::join!(waited, peer.request());
        assert!(sent.is_err(), "no answer came");
        assert_eq!(peer.reset_of(got.0).await, 8, "CANCEL");
        // The reader drops a body half way: CANCEL too.
        let big = tokio::spawn(conn.clone().send(get("/big")));
        let (id, _) = peer.request().await;
        peer.head(id, 200, &[], false).await;
        peer.send(DATA, 0, id, &[b'x'; 1000]).await;
        let mut body = big.await.unwrap().ok().unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(1000));
        drop(body);
        assert_eq!(peer.reset_of(id).await, 8, "CANCEL");
        // An interim head is skipped; a body shorter than its length fails
        // and is reset; the connection serves on.
        let short = tokio::spawn(conn.clone().send(get("/short")));
        let (id, _) = peer.request().await;
        peer.head(id, 103, &[("link", "</a.css>")], false).await;
        peer.head(id, 200, &[("content-length", "5")], false).await;
        peer.send(DATA, END_STREAM, id, b"abc").await;
        let resp = short.await.unwrap().ok().unwrap();
        assert_eq!(resp.status(), 200, "the final head, not the interim one");
        assert!(resp.into_body().collect().await.is_err(), "3 bytes of 5");
        assert_eq!(peer.reset_of(id).await, 1, "PROTOCOL_ERROR");
        let ok = tokio::spawn(conn.clone().send(get("/ok")));
        let (id, _) = peer.request().await;
        peer.head(id, 204, &[], true).await;
        assert_eq!(ok.await.unwrap().ok().unwrap().status(), 204);
    }

    #[tokio::test]
    async fn when_every_handle_is_gone_the_connection_says_goaway_and_closes() {
        let (conn, mut peer) = pair(&[]).await;
        let one = tokio::spawn(conn.clone().send(get("/one")));
        let (id, _) = peer.request().await;
        drop(conn);
        // The stream in flight is still answered.
        peer.head(id, 200, &[], false).await;
        peer.send(DATA, END_STREAM, id, b"late").await;
        let body = one.await.unwrap().ok().unwrap().into_body();
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"late");
        let f = peer.next().await.expect("a GOAWAY");
        assert_eq!(f.kind, GOAWAY, "{f:?}");
        loop {
            match peer.frame().await {
                None => break,
                Some(f) => assert_ne!(f.kind, HEADERS, "no stream after GOAWAY"),
            }
        }
    }

    #[tokio::test]
    async fn a_request_queued_behind_a_full_write_buffer_goes_once_it_drains() {
        // The largest windows, and a peer that reads nothing at first: a
        // 48 MiB upload fills the socket's buffers and the write buffer.
        let (conn, mut peer) = pair(&[(0x4, 0x7fff_ffff)]).await;
        peer.send(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes())
            .await;
        let body = Full::new(Bytes::from(vec![b'u'; 48 << 20]))
            .map_err(|never| match never {})
            .boxed();
        let up = Request::post("http://machine/up").body(body).unwrap();
        let _up = tokio::spawn(conn.clone().send(up));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _get = tokio::spawn(conn.clone().send(get("/after")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The peer now reads, and sends nothing that would wake the client:
        // the queued request must come from the drained buffer alone.
        let mut paths = Vec::new();
        while paths.len() < 2 {
            let f = peer.next().await.expect("the connection stays");
            if f.kind == HEADERS {
                peer.hpack
                    .decode(f.payload, |name, value| {
                        if name == hpack::Name::Path {
                            paths.push(String::from_utf8(value.to_vec()).unwrap());
                        }
                    })
                    .unwrap();
            }
        }
        assert_eq!(paths, ["/up", "/after"]);
    }

    #[tokio::test]
    async fn a_server_whose_first_frame_is_not_settings_is_not_spoken_to() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let conn = Conn::handshake(io, Keepalive::default()).await.unwrap();
        let (io, _) = l.accept().await.unwrap();
        let mut peer = Peer::connected(io).await;
        let sent = tokio::spawn(conn.clone().send(get("/x")));
        // Not an h2 server's preface: a PING where SETTINGS must be.
        peer.send(PING, 0, 0, &[0; 8]).await;
        match tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .unwrap()
            .unwrap()
        {
            Err(Failure::Upstream(e)) => assert!(e.to_string().contains("SETTINGS"), "{e}"),
            Err(Failure::NotSent(_)) => {}
            _ => panic!("answered by a server that did not speak h2"),
        }
        while let Some(f) = peer.frame().await {
            if f.kind == GOAWAY {
                let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
                assert_eq!(code, 1, "PROTOCOL_ERROR");
                return;
            }
        }
        panic!("closed without GOAWAY");
    }

    #[tokio::test]
    async fn a_connection_task_that_is_dropped_answers_every_sender() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (conn, task) = Conn::new(io, Keepalive::default());
        let task = tokio::spawn(task);
        let mut peer = Peer::accept(&l, &[(0x3, 1)]).await;
        // One stream open (the peer's limit), one request queued behind it.
        let open = tokio::spawn(conn.clone().send(get("/open")));
        peer.request().await;
        let queued = tokio::spawn(conn.clone().send(get("/queued")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The runtime drops the task (a shutdown; a panic unwinds the same
        // way): nobody is left waiting out a timeout.
        task.abort();
        let open = tokio::time::timeout(Duration::from_secs(5), open).await;
        match open.expect("answered").unwrap() {
            Err(Failure::Upstream(e)) => assert!(e.to_string().contains("task ended"), "{e}"),
            _ => panic!("the open stream should fail"),
        }
        let queued = tokio::time::timeout(Duration::from_secs(5), queued).await;
        assert_eq!(path_of(queued.expect("answered").unwrap()), "/queued");
        assert!(conn.is_closed());
    }

    /// A body of `n` chunks of 64 KiB, made as it is read, then a trailer.
    fn streamed(n: usize) -> ProxyBody {
        let mut chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..n)
            .map(|_| Ok(Frame::data(Bytes::from(vec![b'u'; 64 << 10]))))
            .collect();
        let mut t = http::HeaderMap::new();
        t.insert("x-end", HeaderValue::from_static("1"));
        chunks.push(Ok(Frame::trailers(t)));
        http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed()
    }

    #[tokio::test]
    async fn against_skeins_own_server_streams_queue_at_its_limit_and_bodies_flow_both_ways() {
        let mut limits = super::super::server::tests::limits();
        limits.max_streams = 2;
        limits.stream_window = 64 << 10;
        let drain = tokio_util::sync::CancellationToken::new();
        let (addr, _) = super::super::server::tests::server(limits, drain).await;
        let io = TcpStream::connect(addr).await.unwrap();
        let conn = Conn::handshake(io, Keepalive::default()).await.unwrap();
        // 12 uploads of 1 MiB and 4 downloads of 3 MiB at once, on a server
        // that takes two streams at a time with 64 KiB windows.
        let mut tasks = Vec::new();
        for k in 0..16 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let req = if k % 4 == 3 {
                    get("/big")
                } else {
                    Request::post("http://machine/echo")
                        .body(streamed(16))
                        .unwrap()
                };
                let resp = match conn.send(req).await {
                    Ok(r) => r,
                    Err(Failure::Upstream(e)) => panic!("failed: {e}"),
                    Err(Failure::Body(e)) => panic!("body failed: {e}"),
                    Err(Failure::NotSent(_)) => panic!("not sent"),
                };
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                if k % 4 == 3 {
                    format!("{}", body.len())
                } else {
                    String::from_utf8(body.to_vec()).unwrap()
                }
            }));
        }
        for (k, t) in tasks.into_iter().enumerate() {
            let got = t.await.unwrap();
            if k % 4 == 3 {
                assert_eq!(got, (3 << 20).to_string());
            } else {
                assert_eq!(got, "len=1048576 trailers=1");
            }
        }
        assert!(!conn.is_closed());
    }

    /// A frame for the client: well formed about half the time (on the
    /// streams it opened, of the right length: deep enough to reach the
    /// streams), else of random type, flags, stream and payload.
    fn frame_for(rng: &mut Rng) -> (u8, u8, u32, Vec<u8>) {
        let open = [1u32, 3, 5][rng.below(3) as usize];
        let noise = |rng: &mut Rng, n: u64| -> Vec<u8> {
            (0..rng.below(n)).map(|_| rng.next() as u8).collect()
        };
        if rng.below(2) == 0 {
            let kind = match rng.below(12) {
                k @ 0..=9 => k as u8,
                _ => 0x20 + rng.below(8) as u8,
            };
            let id = [0, 2, 1 << 30, 1, 3, 5][rng.below(6) as usize];
            let n = if rng.below(2) == 0 { 24 } else { 3000 };
            return (kind, rng.next() as u8, id, noise(rng, n));
        }
        match rng.below(7) {
            0 => {
                let mut b = Vec::new();
                let status = [100, 103, 200, 204, 304, 404, 999][rng.below(7) as usize];
                hpack::put_status(&mut b, status);
                if rng.below(2) == 0 {
                    hpack::put_field(&mut b, "content-length", b"3", false);
                }
                if rng.below(4) == 0 {
                    b.extend(noise(rng, 8));
                }
                let end = if rng.below(2) == 0 { END_STREAM } else { 0 };
                (HEADERS, END_HEADERS | end, open, b)
            }
            1 => {
                let end = if rng.below(2) == 0 { END_STREAM } else { 0 };
                (DATA, end, open, noise(rng, 40))
            }
            2 => {
                let inc = (rng.next() as u32) >> rng.below(32);
                (
                    WINDOW_UPDATE,
                    0,
                    [0, open][rng.below(2) as usize],
                    inc.to_be_bytes().to_vec(),
                )
            }
            3 => {
                let mut b = Vec::new();
                for _ in 0..rng.below(4) {
                    b.extend_from_slice(&(rng.below(9) as u16).to_be_bytes());
                    b.extend_from_slice(&((rng.next() as u32) >> rng.below(32)).to_be_bytes());
                }
                (SETTINGS, 0, 0, b)
            }
            4 => (
                PING,
                rng.below(2) as u8,
                0,
                noise(rng, 1).into_iter().chain([0; 8]).take(8).collect(),
            ),
            5 => (
                RST_STREAM,
                0,
                open,
                (rng.below(14) as u32).to_be_bytes().to_vec(),
            ),
            _ => {
                let mut b = (rng.below(8) as u32).to_be_bytes().to_vec();
                b.extend_from_slice(&(rng.below(3) as u32).to_be_bytes());
                (GOAWAY, 0, 0, b)
            }
        }
    }

    #[tokio::test]
    async fn random_frames_from_a_peer_never_panic_the_client_and_every_sender_is_answered() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut rng = Rng(0x5eed_cafe_f00d_d00d);
        for round in 0..120 {
            let io = TcpStream::connect(addr).await.unwrap();
            let (conn, task) = Conn::new(io, Keepalive::default());
            let task = tokio::spawn(task);
            let mut peer = Peer::accept(&l, &[]).await;
            let senders: Vec<_> = (0..3)
                .map(|k| {
                    let req = if k == 2 {
                        Request::post("http://machine/up")
                            .body(streamed(2))
                            .unwrap()
                    } else {
                        get("/x")
                    };
                    tokio::spawn(conn.clone().send(req))
                })
                .collect();
            for _ in 0..(1 + rng.below(16)) {
                let (kind, flags, id, payload) = frame_for(&mut rng);
                peer.send(kind, flags, id, &payload).await;
            }
            if round % 2 == 0 {
                // The peer goes away: everything must end.
                drop(peer);
            } else {
                // Or stays, quiet: the senders are dropped (their timeout).
                tokio::time::sleep(Duration::from_millis(5)).await;
                for s in &senders {
                    s.abort();
                }
                drop(peer);
            }
            for s in senders {
                match tokio::time::timeout(Duration::from_secs(5), s).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => assert!(e.is_cancelled(), "a sender panicked: {e}"),
                    Err(_) => panic!("round {round}: a sender was never answered"),
                }
            }
            drop(conn);
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("round {round}: the connection panicked: {e}"),
                Err(_) => panic!("round {round}: the connection never ended"),
            }
        }
    }
}
