//! What either side of an h2 connection needs (RFC 9113), skein's server
//! and client alike: frame types and codes, the write buffer, the link (the
//! peer's settings, the connection windows, the streams blocked on them),
//! each stream's outgoing and incoming halves, the queue an incoming body
//! waits in for its reader, and the wakers that let a connection poll only
//! the streams that woke.

use std::collections::{HashMap, VecDeque};
use std::future::Future as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};

use super::hpack::{self, Name};
use crate::upstream::{BoxError, ProxyBody};

/// Bytes waiting to be written past which no more is read or produced.
pub(super) const WRITE_HIGH: usize = 128 << 10;
/// Bytes read in one round before the other work of the connection.
pub(super) const READ_BUDGET: usize = 256 << 10;
/// Largest frame this side accepts (the protocol's default; not raised).
pub(super) const MAX_FRAME: usize = 16_384;
/// HPACK table this side keeps for the peer (the protocol's default).
pub(super) const TABLE_SIZE: usize = 4096;
/// The client's connection preface.
pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags (RFC 9113, 6).
pub(super) const DATA: u8 = 0;
pub(super) const HEADERS: u8 = 1;
pub(super) const PRIORITY: u8 = 2;
pub(super) const RST_STREAM: u8 = 3;
pub(super) const SETTINGS: u8 = 4;
pub(super) const PUSH_PROMISE: u8 = 5;
pub(super) const PING: u8 = 6;
pub(super) const GOAWAY: u8 = 7;
pub(super) const WINDOW_UPDATE: u8 = 8;
pub(super) const CONTINUATION: u8 = 9;
pub(super) const END_STREAM: u8 = 0x1;
pub(super) const ACK: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY_FLAG: u8 = 0x20;

/// An h2 error code (RFC 9113, 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Code(pub(super) u32);

impl Code {
    pub(super) const NO_ERROR: Code = Code(0);
    pub(super) const PROTOCOL_ERROR: Code = Code(1);
    pub(super) const INTERNAL_ERROR: Code = Code(2);
    pub(super) const FLOW_CONTROL_ERROR: Code = Code(3);
    pub(super) const STREAM_CLOSED: Code = Code(5);
    pub(super) const FRAME_SIZE_ERROR: Code = Code(6);
    pub(super) const REFUSED_STREAM: Code = Code(7);
    pub(super) const CANCEL: Code = Code(8);
    pub(super) const COMPRESSION_ERROR: Code = Code(9);
    pub(super) const ENHANCE_YOUR_CALM: Code = Code(0xb);
}

/// A connection error: the code for GOAWAY and why, for the logs and the
/// metric.
pub(super) struct Fatal(pub(super) Code, pub(super) &'static str);

/// The bytes waiting to be written.
pub(super) struct Out {
    pub(super) buf: Vec<u8>,
    /// Written so far.
    pub(super) pos: usize,
}

impl Out {
    pub(super) fn backlog(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn head(&mut self, len: usize, kind: u8, flags: u8, id: u32) {
        let len = len as u32;
        self.buf
            .extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        self.buf
            .extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    }

    pub(super) fn rst(&mut self, id: u32, code: Code) {
        self.head(4, RST_STREAM, 0, id);
        self.buf.extend_from_slice(&code.0.to_be_bytes());
    }

    pub(super) fn window_update(&mut self, id: u32, inc: u32) {
        self.head(4, WINDOW_UPDATE, 0, id);
        self.buf.extend_from_slice(&inc.to_be_bytes());
    }

    pub(super) fn goaway(&mut self, last: u32, code: Code) {
        self.head(8, GOAWAY, 0, 0);
        self.buf.extend_from_slice(&last.to_be_bytes());
        self.buf.extend_from_slice(&code.0.to_be_bytes());
    }

    pub(super) fn data(&mut self, id: u32, chunk: &[u8], end: bool) {
        self.head(chunk.len(), DATA, if end { END_STREAM } else { 0 }, id);
        self.buf.extend_from_slice(chunk);
    }

    /// A header block as HEADERS, then CONTINUATION frames when it is larger
    /// than the peer's frames.
    pub(super) fn headers(&mut self, id: u32, block: &[u8], end: bool, max_frame: usize) {
        let mut chunks = block.chunks(max_frame.max(1)).peekable();
        let first = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let flags = if end { END_STREAM } else { 0 } | if last { END_HEADERS } else { 0 };
        self.head(first.len(), HEADERS, flags, id);
        self.buf.extend_from_slice(first);
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            self.head(c.len(), CONTINUATION, flags, id);
            self.buf.extend_from_slice(c);
        }
    }
}

/// A frame as its handler gets it: stream, flags, payload.
pub(super) struct H2Frame {
    pub(super) id: u32,
    pub(super) flags: u8,
    pub(super) payload: Bytes,
}

/// A header block that CONTINUATION frames are still adding to.
pub(super) struct Partial {
    id: u32,
    end_stream: bool,
    block: BytesMut,
}

/// A header block as its frames come: a HEADERS frame (its fragment past
/// padding and priority) starts one, CONTINUATION frames add to it. Returns
/// the whole block (stream, END_STREAM, bytes) once its last frame came. The
/// compressed block may not outgrow what its decoded list may be (`max_list`)
/// by much: a flood of CONTINUATION frames is cut here.
pub(super) fn header_block(
    partial: &mut Option<Partial>,
    kind: u8,
    f: H2Frame,
    max_list: u32,
) -> Result<Option<(u32, bool, Bytes)>, Fatal> {
    let H2Frame { id, flags, payload } = f;
    let done = flags & END_HEADERS != 0;
    if kind == HEADERS {
        if id == 0 {
            return Err(Fatal(Code::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let block = headers_fragment(flags, payload)?;
        let end_stream = flags & END_STREAM != 0;
        if done {
            return Ok(Some((id, end_stream, block)));
        }
        *partial = Some(Partial {
            id,
            end_stream,
            block: BytesMut::from(&block[..]),
        });
        return Ok(None);
    }
    let Some(mut p) = partial.take() else {
        return Err(Fatal(Code::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
    };
    if p.id != id {
        return Err(Fatal(
            Code::PROTOCOL_ERROR,
            "CONTINUATION on another stream",
        ));
    }
    p.block.extend_from_slice(&payload);
    if p.block.len() > max_list as usize + 16 * 1024 {
        return Err(Fatal(Code::ENHANCE_YOUR_CALM, "header block too large"));
    }
    if !done {
        *partial = Some(p);
        return Ok(None);
    }
    Ok(Some((id, p.end_stream, p.block.freeze())))
}

/// A map keyed by stream id: ids are distinct integers, hashing them with
/// SipHash would only cost time.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(super) type ById = HashMap<u32, usize, BuildHasherDefault<IdHasher>>;

/// What a connection's streams share, whichever side it is: the write
/// buffer, the peer's settings, both connection windows, and the streams
/// waiting on a window or on the write buffer.
pub(super) struct Link {
    pub(super) out: Out,
    /// A header block for reuse by every head and trailers.
    pub(super) block: Vec<u8>,
    /// The peer's settings: frame size, initial stream window, concurrent
    /// streams, and whether its SETTINGS came yet.
    pub(super) peer_frame: usize,
    pub(super) peer_window: i64,
    pub(super) peer_streams: u32,
    pub(super) peer_settings: bool,
    /// What this side may still send on the connection.
    pub(super) send_window: i64,
    /// What the peer may still send on the connection, what its bodies'
    /// readers took that was not given back yet, and the window's size.
    pub(super) recv_window: i64,
    pub(super) recv_unacked: u32,
    pub(super) recv_size: u32,
    /// Slots waiting for the connection window, or for the write buffer.
    pub(super) conn_blocked: Vec<usize>,
    pub(super) write_blocked: Vec<usize>,
    /// Slots the connection itself wants polled.
    pub(super) ready: VecDeque<usize>,
}

impl Link {
    /// Bytes the connection window gets back; a WINDOW_UPDATE goes out once
    /// half the window is owed.
    pub(super) fn give_back(&mut self, n: u32) {
        self.recv_unacked += n;
        if self.recv_unacked >= self.recv_size / 2 {
            self.out.window_update(0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
        }
    }

    /// What the reader of stream `id`'s body took goes back to the peer:
    /// to the connection window, and to the stream's (`size`) once half of
    /// it is owed and the peer may still send.
    pub(super) fn take_back(&mut self, id: u32, rx: &mut Inbound, size: u32) {
        if let Some(shared) = &rx.shared {
            let took = shared.take_released();
            if took > 0 {
                rx.unacked += took;
                self.give_back(took);
            }
        }
        if rx.open && rx.unacked >= size / 2 {
            self.out.window_update(id, rx.unacked);
            rx.window += i64::from(rx.unacked);
            rx.unacked = 0;
        }
    }

    /// Sends what stream `id`'s outgoing body has (slot `i`), within the
    /// windows and the write buffer; the stream is left where a window
    /// update or a flush will make it ready again. A body that fails resets
    /// the stream with `on_error` and its error is returned.
    pub(super) fn pump(
        &mut self,
        id: u32,
        tx: &mut Outbound,
        i: usize,
        cx: &mut Context<'_>,
        on_error: Code,
    ) -> Option<BoxError> {
        loop {
            if tx.done {
                return None;
            }
            if !tx.pending.is_empty() {
                if self.out.backlog() >= WRITE_HIGH {
                    // A large chunk goes out as the buffer drains, not
                    // copied into it whole.
                    self.write_blocked.push(i);
                    return None;
                }
                let room = tx.window.min(self.send_window).min(self.peer_frame as i64);
                if room <= 0 {
                    if self.send_window <= 0 {
                        self.conn_blocked.push(i);
                    }
                    // Else a WINDOW_UPDATE on the stream makes it ready.
                    return None;
                }
                let n = (room as usize).min(tx.pending.len());
                let chunk = tx.pending.split_to(n);
                let end = tx.pending.is_empty() && tx.end_after && tx.trailers.is_none();
                self.out.data(id, &chunk, end);
                tx.window -= n as i64;
                self.send_window -= n as i64;
                if end {
                    tx.done = true;
                    tx.body = None;
                    return None;
                }
                continue;
            }
            if let Some(t) = tx.trailers.take() {
                self.trailers(id, tx, &t);
                return None;
            }
            if tx.end_after {
                self.out.data(id, &[], true);
                tx.done = true;
                tx.body = None;
                return None;
            }
            if self.out.backlog() >= WRITE_HIGH {
                self.write_blocked.push(i);
                return None;
            }
            let body = tx.body.as_mut()?;
            tx.polled = true;
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return None,
                Poll::Ready(None) => tx.end_after = true,
                Poll::Ready(Some(Err(e))) => {
                    self.out.rst(id, on_error);
                    tx.done = true;
                    tx.body = None;
                    return Some(e);
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        tx.end_after = body.is_end_stream();
                        tx.pending = data;
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            tx.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    /// A DATA frame's payload without its padding, the whole frame's length
    /// (which counts against the windows) and the padding's; the
    /// connection window is charged.
    pub(super) fn data_frame(
        &mut self,
        flags: u8,
        mut payload: Bytes,
    ) -> Result<(Bytes, u32, u32), Fatal> {
        let whole = payload.len();
        self.recv_window -= whole as i64;
        if self.recv_window < 0 {
            return Err(Fatal(
                Code::FLOW_CONTROL_ERROR,
                "DATA over the connection window",
            ));
        }
        let pad = if flags & PADDED != 0 {
            let Some(&p) = payload.first() else {
                return Err(Fatal(Code::PROTOCOL_ERROR, "DATA padding cut short"));
            };
            if usize::from(p) >= whole {
                return Err(Fatal(Code::PROTOCOL_ERROR, "DATA padding too long"));
            }
            payload.advance(1);
            payload.truncate(whole - 1 - usize::from(p));
            usize::from(p) + 1
        } else {
            0
        };
        Ok((payload, whole as u32, pad as u32))
    }

    /// A stream's data (`whole` bytes of frame, `pad` of them padding) into
    /// its body: charged to the stream's window, checked against its
    /// Content-Length, queued for its reader (or, with none, given back).
    /// Err: the stream is to be reset with that code (its bytes were given
    /// back to the connection).
    pub(super) fn data_in(
        &mut self,
        rx: &mut Inbound,
        data: Bytes,
        whole: u32,
        pad: u32,
        end: bool,
    ) -> Result<(), Code> {
        rx.window -= i64::from(whole);
        let refused = if rx.window < 0 {
            Some(Code::FLOW_CONTROL_ERROR)
        } else {
            match &mut rx.remaining {
                Some(r) if *r < data.len() as u64 => Some(Code::PROTOCOL_ERROR),
                Some(r) => {
                    *r -= data.len() as u64;
                    (end && *r > 0).then_some(Code::PROTOCOL_ERROR)
                }
                None => None,
            }
        };
        if let Some(code) = refused {
            self.give_back(whole);
            return Err(code);
        }
        rx.unacked += pad;
        let taken = match &rx.shared {
            Some(shared) => shared.push(data, end),
            None => false,
        };
        if end {
            rx.open = false;
        }
        if pad > 0 {
            self.give_back(pad);
        }
        if !taken {
            // Nobody reads this body any more.
            self.give_back(whole - pad);
        }
        Ok(())
    }

    /// Trailers end stream `id`.
    pub(super) fn trailers(&mut self, id: u32, tx: &mut Outbound, t: &HeaderMap) {
        self.block.clear();
        for (name, value) in t {
            hpack::put_field(
                &mut self.block,
                name.as_str(),
                value.as_bytes(),
                value.is_sensitive(),
            );
        }
        self.out.headers(id, &self.block, true, self.peer_frame);
        tx.done = true;
        tx.body = None;
    }

    pub(super) fn new(conn_window: u32) -> Link {
        Link {
            out: Out {
                buf: Vec::with_capacity(16 << 10),
                pos: 0,
            },
            block: Vec::with_capacity(512),
            peer_frame: MAX_FRAME,
            peer_window: 65_535,
            peer_streams: u32::MAX,
            peer_settings: false,
            send_window: 65_535,
            recv_window: i64::from(conn_window.max(65_535)),
            recv_unacked: 0,
            recv_size: conn_window.max(65_535),
            conn_blocked: Vec::new(),
            write_blocked: Vec::new(),
            ready: VecDeque::new(),
        }
    }
}

/// A stream's body going out: the body, what the windows held back, its
/// end.
#[derive(Default)]
pub(super) struct Outbound {
    pub(super) body: Option<ProxyBody>,
    /// Data the body gave that the windows did not let out yet.
    pub(super) pending: Bytes,
    /// The body ends after `pending` (and the trailers, if any).
    pub(super) end_after: bool,
    pub(super) trailers: Option<HeaderMap>,
    /// What this side may still send on the stream.
    pub(super) window: i64,
    /// This side has ended the stream (END_STREAM or RST_STREAM).
    pub(super) done: bool,
    /// The body was polled: it cannot be sent again elsewhere.
    pub(super) polled: bool,
}

/// A stream's body coming in: the windows and the queue its reader drains.
#[derive(Default)]
pub(super) struct Inbound {
    /// What the peer may still send, and what was taken and not yet given
    /// back.
    pub(super) window: i64,
    pub(super) unacked: u32,
    /// The peer may still send (no END_STREAM yet).
    pub(super) open: bool,
    /// What Content-Length says is still to come.
    pub(super) remaining: Option<u64>,
    /// The body's queue, shared with its reader.
    pub(super) shared: Option<Arc<Shared>>,
}

/// A body with nothing in it.
pub(super) fn empty() -> ProxyBody {
    use http_body_util::BodyExt as _;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

impl Inbound {
    /// The body a head's reader gets: empty when the head ended the stream,
    /// else the queue this side fills (`waker` is the stream's: the reader's
    /// takes may open the peer's window).
    pub(super) fn reader(
        &mut self,
        end_stream: bool,
        waker: &Waker,
        remaining: Option<u64>,
    ) -> ProxyBody {
        use http_body_util::BodyExt as _;
        if end_stream {
            return empty();
        }
        let shared = Arc::new(Shared::default());
        self.shared = Some(shared.clone());
        RecvBody {
            shared,
            conn: waker.clone(),
            remaining,
        }
        .boxed()
    }
}

/// Fields h2 forbids (RFC 9113, 8.2.2): the hop-by-hop ones that describe a
/// connection (h2 has its own), `TE` unless it says `trailers`; a proxy's
/// authentication fields are hop-by-hop but allowed.
pub(super) fn is_connection_specific(h: &HeaderName, value: &[u8]) -> bool {
    match h.as_str() {
        "te" => !value.eq_ignore_ascii_case(b"trailers"),
        "proxy-authenticate" | "proxy-authorization" => false,
        n => crate::http::hop_by_hop(n),
    }
}

/// The wakes of a connection's streams: which slots want polling, and the
/// connection task's own waker (see `Inline`).
#[derive(Default)]
pub(super) struct Wakes {
    pub(super) list: Mutex<Vec<usize>>,
    /// Set once a slot is on the list: a round with no woken stream (most,
    /// on a busy connection) takes no lock.
    pub(super) listed: AtomicBool,
    pub(super) inline: Inline,
}

impl Wakes {
    /// Moves the woken slots into `into`.
    pub(super) fn take(&self, into: &mut Vec<usize>) {
        if !self.listed.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut l) = self.list.lock() {
            std::mem::swap(&mut *l, into);
        }
    }
}

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.inline.wake_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inline.wake_ref();
    }
}

/// One slot's waker.
pub(super) struct SlotWake {
    pub(super) idx: usize,
    pub(super) queued: AtomicBool,
    pub(super) wakes: Arc<Wakes>,
}

impl SlotWake {
    /// Slot `idx`'s waker, and the flag its wakes set.
    pub(super) fn new(idx: usize, wakes: &Arc<Wakes>) -> (Waker, Arc<SlotWake>) {
        let wake = Arc::new(SlotWake {
            idx,
            queued: AtomicBool::new(false),
            wakes: wakes.clone(),
        });
        (Waker::from(wake.clone()), wake)
    }
}

impl std::task::Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel)
            && let Ok(mut l) = self.wakes.list.lock()
        {
            l.push(self.idx);
            drop(l);
            // After the push: a `take` that misses the flag finds the slot
            // at its next round, which this wake brings about.
            self.wakes.listed.store(true, Ordering::Release);
        }
        self.wakes.inline.wake_ref();
    }
}

/// An incoming body (a request's at the server, a response's at the client)
/// between the connection, which fills it, and its reader,
/// which drains it.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) state: Mutex<RecvState>,
}

#[derive(Default)]
pub(super) struct RecvState {
    pub(super) chunks: VecDeque<Bytes>,
    pub(super) buffered: u32,
    /// Taken by the reader and not yet given back to the peer's windows.
    pub(super) released: u32,
    pub(super) end: bool,
    pub(super) trailers: Option<HeaderMap>,
    pub(super) failed: Option<&'static str>,
    /// The reader dropped the body: nothing more is kept.
    pub(super) closed: bool,
    pub(super) reader: Option<Waker>,
}

impl Shared {
    /// Data from the peer; false if nobody reads it any more.
    pub(super) fn push(&self, data: Bytes, end: bool) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if s.closed {
            return false;
        }
        if !data.is_empty() {
            s.buffered += data.len() as u32;
            s.chunks.push_back(data);
        }
        s.end |= end;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        true
    }

    pub(super) fn trailers(&self, t: HeaderMap) {
        if let Ok(mut s) = self.state.lock() {
            s.trailers = Some(t);
            s.end = true;
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }

    pub(super) fn fail(&self, why: &'static str) {
        if let Ok(mut s) = self.state.lock()
            && !s.end
        {
            s.failed = Some(why);
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }

    pub(super) fn take_released(&self) -> u32 {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.released))
            .unwrap_or(0)
    }

    /// The reader dropped the body.
    pub(super) fn is_closed(&self) -> bool {
        self.state.lock().map(|s| s.closed).unwrap_or(true)
    }

    /// The stream's slot goes. A body that ended whole stays for its
    /// reader, and all of it is given back to the connection window now (the
    /// stream takes no more); any other is closed, see `close`.
    pub(super) fn finish(&self) -> u32 {
        let Ok(mut s) = self.state.lock() else {
            return 0;
        };
        if s.end && s.failed.is_none() && !s.closed {
            // Its reader still counts what it takes, for nobody: the
            // connection does not look at this queue again.
            return s.buffered + std::mem::take(&mut s.released);
        }
        drop(s);
        self.close()
    }

    /// The stream is gone: what was not read (or not yet given back) is
    /// returned, for the connection window.
    pub(super) fn close(&self) -> u32 {
        let Ok(mut s) = self.state.lock() else {
            return 0;
        };
        s.closed = true;
        s.chunks.clear();
        if s.failed.is_none() && !s.end {
            s.failed = Some("stream closed");
        }
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        std::mem::take(&mut s.buffered) + std::mem::take(&mut s.released)
    }
}

/// An incoming body as its reader (a handler, the proxy) reads it.
pub(super) struct RecvBody {
    pub(super) shared: Arc<Shared>,
    /// The stream's waker: taking data may open the peer's window.
    pub(super) conn: Waker,
    pub(super) remaining: Option<u64>,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut s) = self.shared.state.lock() else {
            return Poll::Ready(Some(Err("body lost".into())));
        };
        if let Some(data) = s.chunks.pop_front() {
            let n = data.len() as u32;
            s.buffered -= n;
            s.released += n;
            // Tell the connection when the queue runs dry or enough was
            // taken: the peer may be waiting for window.
            let tell = s.buffered == 0 || s.released >= 16 << 10;
            drop(s);
            if tell {
                self.conn.wake_by_ref();
            }
            if let Some(r) = &mut self.remaining {
                *r = r.saturating_sub(u64::from(n));
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(why) = s.failed.take() {
            s.end = true;
            return Poll::Ready(Some(Err(why.into())));
        }
        if s.end {
            return Poll::Ready(s.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.shared
            .state
            .lock()
            .map(|s| s.end && s.chunks.is_empty() && s.trailers.is_none() && s.failed.is_none())
            .unwrap_or(true)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.closed = true;
            s.released += std::mem::take(&mut s.buffered);
            s.chunks.clear();
        }
        self.conn.wake_by_ref();
    }
}

/// The connection task's waker as its streams and sockets see it. A stream
/// is polled inside the connection's own poll, and what it does there (a
/// handler answering, a body giving its next chunk, a request queued to the
/// client) wakes the connection while its task runs: the runtime would poll
/// it all once more (every timer, the drain, the streams, the socket), one
/// extra poll per response. A wake that comes during the poll is instead
/// noted and served by another round of the same poll; any other is passed
/// on.
#[derive(Default)]
pub(super) struct Inline {
    pub(super) state: std::sync::atomic::AtomicU8,
    pub(super) task: futures_util::task::AtomicWaker,
}

/// Rounds one poll may make for wakes that came during it. A resource out
/// of tokio's cooperative budget wakes its task and says Pending until the
/// task has yielded: rounds alone would spin on it.
pub(super) const ROUNDS: u32 = 4;
/// Not being polled.
pub(super) const IDLE: u8 = 0;
/// Being polled.
pub(super) const POLLING: u8 = 1;
/// Being polled, and woken meanwhile.
pub(super) const WOKEN: u8 = 2;

impl Inline {
    /// A poll begins, on behalf of the task `outer` wakes.
    pub(super) fn enter(&self, outer: &std::task::Waker) {
        self.task.register(outer);
        self.state.store(POLLING, Ordering::SeqCst);
    }

    /// The poll would end: true if a wake came during it and `again` lets
    /// the poll go on; false if it ends (a wake that came is passed to the
    /// task then; later wakes go to it directly).
    pub(super) fn leave(&self, again: bool) -> bool {
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

    /// A wake: noted if the poll runs, else passed to the task.
    pub(super) fn wake_ref(&self) {
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

impl std::task::Wake for Inline {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.wake_ref();
    }
}

/// Keeps a connection's peer proven alive: a PING every `every` of quiet,
/// and the peer given up when its answer has not come `within`.
pub(super) struct Pinger {
    timer: Pin<Box<tokio::time::Sleep>>,
    keepalive: super::Keepalive,
    /// The payload of the PING in flight, if one is.
    in_flight: Option<u64>,
    sent: u64,
}

impl Pinger {
    pub(super) fn new(keepalive: super::Keepalive) -> Pinger {
        Pinger {
            timer: Box::pin(tokio::time::sleep(keepalive.every)),
            keepalive,
            in_flight: None,
            sent: 0,
        }
    }

    /// Sends a PING when one is due. Err: the last one was not answered in
    /// time.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Result<(), &'static str> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        if self.in_flight.is_some() {
            return Err("no pong in time");
        }
        self.sent += 1;
        self.in_flight = Some(self.sent);
        out.head(8, PING, 0, 0);
        out.buf.extend_from_slice(&self.sent.to_be_bytes());
        let at = tokio::time::Instant::now() + self.keepalive.within;
        self.timer.as_mut().reset(at);
        // Polled once more so that the new deadline is registered.
        let _ = self.timer.as_mut().poll(cx);
        Ok(())
    }

    /// A PING frame from the peer: answered, or taken as the answer to ours.
    pub(super) fn on_ping(&mut self, f: &H2Frame, out: &mut Out) -> Result<(), Fatal> {
        if f.id != 0 || f.payload.len() != 8 {
            return Err(Fatal(Code::FRAME_SIZE_ERROR, "malformed PING"));
        }
        if f.flags & ACK == 0 {
            out.head(8, PING, ACK, 0);
            out.buf.extend_from_slice(&f.payload);
            return Ok(());
        }
        let n = u64::from_be_bytes(f.payload[..8].try_into().unwrap_or([0; 8]));
        if self.in_flight == Some(n) {
            self.in_flight = None;
            let at = tokio::time::Instant::now() + self.keepalive.every;
            self.timer.as_mut().reset(at);
        }
        Ok(())
    }
}

impl Link {
    /// A SETTINGS frame from the peer, applied and acknowledged; `streams`
    /// are the open streams' outgoing halves (by slot), whose windows move
    /// with the peer's initial window.
    pub(super) fn on_settings<'a>(
        &mut self,
        f: &H2Frame,
        streams: impl Iterator<Item = (usize, &'a mut Outbound)>,
    ) -> Result<(), Fatal> {
        if f.id != 0 {
            return Err(Fatal(Code::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if f.flags & ACK != 0 {
            if !f.payload.is_empty() {
                return Err(Fatal(Code::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        if !f.payload.len().is_multiple_of(6) {
            return Err(Fatal(Code::FRAME_SIZE_ERROR, "SETTINGS of a bad length"));
        }
        let mut delta = 0;
        for s in f.payload.chunks_exact(6) {
            let key = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match key {
                // Push: 0 or 1.
                0x2 if v > 1 => {
                    return Err(Fatal(Code::PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1"));
                }
                0x3 => self.peer_streams = v,
                0x4 => {
                    if v > 0x7fff_ffff {
                        return Err(Fatal(
                            Code::FLOW_CONTROL_ERROR,
                            "INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    delta += i64::from(v) - self.peer_window;
                    self.peer_window = i64::from(v);
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(Fatal(Code::PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range"));
                    }
                    self.peer_frame = v as usize;
                }
                // The encoder indexes nothing, so the peer's table size does
                // not bind it; the rest are advisory or for pushes.
                _ => {}
            }
        }
        if delta != 0 {
            for (i, tx) in streams {
                tx.window += delta;
                if delta > 0 && !tx.pending.is_empty() {
                    self.ready.push_back(i);
                }
            }
        }
        self.peer_settings = true;
        self.out.head(0, SETTINGS, ACK, 0);
        Ok(())
    }

    /// A WINDOW_UPDATE frame: the connection's is applied here; a stream's
    /// increment is returned for the caller to find the stream (0 is a
    /// stream error there).
    pub(super) fn on_window_update(&mut self, f: &H2Frame) -> Result<Option<i64>, Fatal> {
        let [a, b, c, d] = f.payload[..] else {
            return Err(Fatal(
                Code::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE of a bad length",
            ));
        };
        let inc = i64::from(u32::from_be_bytes([a, b, c, d]) & 0x7fff_ffff);
        if f.id != 0 {
            return Ok(Some(inc));
        }
        if inc == 0 {
            return Err(Fatal(Code::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
        }
        self.send_window += inc;
        if self.send_window > 0x7fff_ffff {
            return Err(Fatal(
                Code::FLOW_CONTROL_ERROR,
                "connection window over 2^31-1",
            ));
        }
        self.ready.extend(self.conn_blocked.drain(..));
        Ok(None)
    }
}

impl Outbound {
    /// The stream's window grows by `inc` (slot `i`): the stream is made
    /// ready if data waited on it. Err: the code to reset the stream with.
    pub(super) fn grow(
        &mut self,
        inc: i64,
        i: usize,
        ready: &mut VecDeque<usize>,
    ) -> Result<(), Code> {
        if inc == 0 {
            return Err(Code::PROTOCOL_ERROR);
        }
        self.window += inc;
        if self.window > 0x7fff_ffff {
            return Err(Code::FLOW_CONTROL_ERROR);
        }
        if !self.pending.is_empty() {
            ready.push_back(i);
        }
        Ok(())
    }
}

/// The 9-byte header of the frame at the start of `buf`: length, type,
/// flags, stream id.
pub(super) fn frame_header(buf: &[u8]) -> Option<(usize, u8, u8, u32)> {
    let h = buf.get(..9)?;
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((len, h[3], h[4], id))
}

/// A HEADERS frame's header block fragment, without padding and priority.
fn headers_fragment(flags: u8, mut payload: Bytes) -> Result<Bytes, Fatal> {
    if flags & PADDED != 0 {
        let Some(&p) = payload.first() else {
            return Err(Fatal(Code::PROTOCOL_ERROR, "HEADERS padding cut short"));
        };
        let whole = payload.len();
        if usize::from(p) >= whole {
            return Err(Fatal(Code::PROTOCOL_ERROR, "HEADERS padding too long"));
        }
        payload.advance(1);
        payload.truncate(whole - 1 - usize::from(p));
    }
    if flags & PRIORITY_FLAG != 0 {
        if payload.len() < 5 {
            return Err(Fatal(Code::FRAME_SIZE_ERROR, "HEADERS priority cut short"));
        }
        payload.advance(5);
    }
    Ok(payload)
}

/// A header block as it decodes: a request's head, a response's, or
/// trailers.
pub(super) struct Head {
    status: Option<Bytes>,
    pub(super) method: Option<Bytes>,
    pub(super) scheme: Option<Bytes>,
    pub(super) authority: Option<Bytes>,
    pub(super) path: Option<Bytes>,
    pub(super) headers: HeaderMap,
    pub(super) cookies: Vec<Bytes>,
    pub(super) size: usize,
    pub(super) max: usize,
    pub(super) regular: bool,
    pub(super) malformed: Option<&'static str>,
}

impl Head {
    pub(super) fn new(max: usize) -> Head {
        Head {
            status: None,
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            cookies: Vec::new(),
            size: 0,
            max,
            regular: false,
            malformed: None,
        }
    }

    fn bad(&mut self, why: &'static str) {
        self.malformed.get_or_insert(why);
    }

    pub(super) fn field(&mut self, name: Name, value: Bytes) {
        let name_len = match &name {
            Name::Header(h) => h.as_str().len(),
            Name::Authority => 10,
            Name::Method | Name::Scheme | Name::Status => 7,
            Name::Path => 5,
            Name::Protocol => 9,
            Name::UnknownPseudo | Name::Invalid => 0,
        };
        self.size += name_len + value.len() + 32;
        if self.size > self.max || self.malformed.is_some() {
            // Over the limit (answered 431) or already refused: not kept.
            return;
        }
        let pseudo = |this: &mut Head, slot: fn(&mut Head) -> &mut Option<Bytes>| {
            if this.regular {
                return this.bad("pseudo-header after a regular one");
            }
            let s = slot(this);
            if s.is_some() {
                return this.bad("pseudo-header twice");
            }
            *s = Some(value.clone());
        };
        match name {
            Name::Method => pseudo(self, |h| &mut h.method),
            Name::Scheme => pseudo(self, |h| &mut h.scheme),
            Name::Authority => pseudo(self, |h| &mut h.authority),
            Name::Path => pseudo(self, |h| &mut h.path),
            Name::Protocol => self.bad(":protocol (extended CONNECT) is not offered"),
            Name::Status => pseudo(self, |h| &mut h.status),
            Name::UnknownPseudo => self.bad("unknown pseudo-header"),
            Name::Invalid => self.bad("invalid field name"),
            Name::Header(h) => {
                self.regular = true;
                if is_connection_specific(&h, &value) {
                    return self.bad("connection-specific field");
                }
                if h == header::COOKIE {
                    // Crumbs are joined again for HTTP/1.1 (RFC 9113, 8.2.3).
                    self.cookies.push(value);
                    return;
                }
                match HeaderValue::from_maybe_shared(value) {
                    Ok(v) => {
                        self.headers.append(h, v);
                    }
                    Err(_) => self.bad("invalid field value"),
                }
            }
        }
    }

    /// The request, and the length its `Content-Length` announces.
    pub(super) fn request(mut self) -> Result<(Request<()>, Option<u64>), &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        if self.status.is_some() {
            return Err(":status in a request");
        }
        self.join_cookies()?;
        let method = self.method.ok_or("no :method")?;
        let method = Method::from_bytes(&method).map_err(|_| "invalid :method")?;
        let uri = if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return Err("CONNECT with :scheme or :path");
            }
            let a = self.authority.ok_or("CONNECT without :authority")?;
            Uri::from(Authority::from_maybe_shared(a).map_err(|_| "invalid :authority")?)
        } else {
            let scheme = self.scheme.ok_or("no :scheme")?;
            let path = self.path.ok_or("no :path")?;
            if path.is_empty() {
                return Err("empty :path");
            }
            let path = PathAndQuery::from_maybe_shared(path).map_err(|_| "invalid :path")?;
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(path);
            if let Some(a) = self.authority {
                parts.scheme = Some(match &scheme[..] {
                    b"https" => Scheme::HTTPS,
                    b"http" => Scheme::HTTP,
                    other => Scheme::try_from(other).map_err(|_| "invalid :scheme")?,
                });
                parts.authority =
                    Some(Authority::from_maybe_shared(a).map_err(|_| "invalid :authority")?);
            }
            Uri::from_parts(parts).map_err(|_| "invalid request target")?
        };
        let remaining = match self.headers.get_all(header::CONTENT_LENGTH).iter().count() {
            0 => None,
            _ => Some(crate::http::content_length(&self.headers).ok_or("invalid content-length")?),
        };
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Ok((req, remaining))
    }

    fn join_cookies(&mut self) -> Result<(), &'static str> {
        if self.cookies.is_empty() {
            return Ok(());
        }
        let joined = if self.cookies.len() == 1 {
            self.cookies.pop().unwrap_or_default()
        } else {
            let mut v = Vec::new();
            for (k, c) in self.cookies.iter().enumerate() {
                if k > 0 {
                    v.extend_from_slice(b"; ");
                }
                v.extend_from_slice(c);
            }
            Bytes::from(v)
        };
        let v = HeaderValue::from_maybe_shared(joined).map_err(|_| "invalid cookie")?;
        self.headers.insert(header::COOKIE, v);
        Ok(())
    }

    /// The fields as a response's head: its status and headers, and the
    /// length its `Content-Length` announces.
    pub(super) fn response(mut self) -> Result<(Response<()>, Option<u64>), &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        let request_only = self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some();
        if request_only {
            return Err("a request pseudo-header in a response");
        }
        self.join_cookies()?;
        let status = self.status.as_deref().ok_or("no :status")?;
        let status = http::StatusCode::from_bytes(status).map_err(|_| "invalid :status")?;
        let remaining = match self.headers.get_all(header::CONTENT_LENGTH).iter().count() {
            0 => None,
            _ => Some(crate::http::content_length(&self.headers).ok_or("invalid content-length")?),
        };
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = Version::HTTP_2;
        *resp.headers_mut() = self.headers;
        Ok((resp, remaining))
    }

    /// The fields as trailers: no pseudo-header.
    pub(super) fn trailers(mut self) -> Option<HeaderMap> {
        if self.malformed.is_some() || self.size > self.max {
            return None;
        }
        let pseudo = self.status.is_some()
            || self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some();
        if pseudo || self.join_cookies().is_err() {
            return None;
        }
        Some(self.headers)
    }
}

/// A connection's socket and what has been read from it.
pub(super) struct Wire<I> {
    pub(super) io: I,
    pub(super) rbuf: BytesMut,
    /// The peer closed its side (or the socket failed).
    pub(super) read_closed: bool,
    /// Reading stopped for the write buffer; a flush resumes it.
    pub(super) read_paused: bool,
    /// Written and not yet flushed.
    pub(super) unflushed: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Wire<I> {
    pub(super) fn new(io: I, rbuf: usize) -> Wire<I> {
        Wire {
            io,
            rbuf: BytesMut::with_capacity(rbuf),
            read_closed: false,
            read_paused: false,
            unflushed: false,
        }
    }

    /// After the frames in the buffer were acted on: reads more when it
    /// may (true: frames may have come). It may not once the peer closed,
    /// while `backlog` bytes wait to be written past the high mark, or once
    /// `budget` is spent (the task is woken for another round then).
    pub(super) fn read_more(
        &mut self,
        cx: &mut Context<'_>,
        budget: &mut usize,
        backlog: usize,
    ) -> bool {
        if self.read_closed {
            return false;
        }
        if backlog >= WRITE_HIGH {
            self.read_paused = true;
            return false;
        }
        if *budget == 0 {
            // More may be waiting: another round, after the streams.
            cx.waker().wake_by_ref();
            return false;
        }
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            // Small after a rest, a whole frame's room once frames come in
            // a stream.
            let want = if self.rbuf.capacity() == 0 {
                4096
            } else {
                MAX_FRAME + 9
            };
            self.rbuf.reserve(want);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                self.read_closed = true;
                false
            }
            Poll::Ready(Ok(n)) => {
                *budget = budget.saturating_sub(n);
                true
            }
        }
    }

    /// The next whole frame in the buffer, if one is: its header and
    /// payload. Err: a frame larger than this side allows.
    pub(super) fn next_frame(&mut self) -> Result<Option<(u8, H2Frame)>, Fatal> {
        let Some((len, kind, flags, id)) = frame_header(&self.rbuf) else {
            return Ok(None);
        };
        if len > MAX_FRAME {
            return Err(Fatal(Code::FRAME_SIZE_ERROR, "frame over the size allowed"));
        }
        if self.rbuf.len() < 9 + len {
            self.rbuf.reserve(9 + len - self.rbuf.len());
            return Ok(None);
        }
        self.rbuf.advance(9);
        let payload = self.rbuf.split_to(len).freeze();
        Ok(Some((kind, H2Frame { id, flags, payload })))
    }

    /// Writes `out`; true once it is all out. Err: the socket failed.
    pub(super) fn flush(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Result<bool, ()> {
        while out.backlog() > 0 {
            match Pin::new(&mut self.io).poll_write(cx, &out.buf[out.pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
                Poll::Ready(Ok(n)) => {
                    out.pos += n;
                    self.unflushed = true;
                }
                Poll::Pending => return Ok(false),
            }
        }
        out.buf.clear();
        out.pos = 0;
        if !self.unflushed {
            return Ok(true);
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(_)) => Err(()),
            Poll::Ready(Ok(())) => {
                self.unflushed = false;
                Ok(true)
            }
            Poll::Pending => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::BodyExt as _;

    #[test]
    fn a_large_body_goes_into_the_write_buffer_no_faster_than_it_drains() {
        let mut link = Link::new(1 << 20);
        link.send_window = 0x7fff_ffff;
        let body = http_body_util::Full::new(Bytes::from(vec![b'x'; 8 << 20]))
            .map_err(|never| match never {})
            .boxed();
        let mut tx = Outbound {
            body: Some(body),
            window: 0x7fff_ffff,
            ..Outbound::default()
        };
        let waker = Waker::noop();
        let cx = &mut Context::from_waker(waker);
        let mut sent = 0;
        let mut rounds = 0;
        loop {
            assert!(link.pump(1, &mut tx, 0, cx, Code::CANCEL).is_none());
            let backlog = link.out.backlog();
            assert!(
                backlog <= WRITE_HIGH + MAX_FRAME + 9,
                "the buffer holds {backlog} bytes"
            );
            sent += backlog;
            if tx.done {
                break;
            }
            assert_eq!(link.write_blocked, [0], "waits for the buffer to drain");
            // A flush.
            link.write_blocked.clear();
            link.out.buf.clear();
            link.out.pos = 0;
            rounds += 1;
        }
        assert!(rounds >= 60, "8 MiB in bounded steps ({rounds})");
        // Every byte went, framed: 9 bytes of header per 16 KiB frame (and
        // the empty last one).
        assert!(sent > 8 << 20 && sent < (8 << 20) + 600 * 9, "{sent}");
    }
}
