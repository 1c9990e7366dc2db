//! skein's h2 server (RFC 9113): clients' h2 (ALPN `h2`, or h2c with prior
//! knowledge) and other edges' backhaul.
//!
//! One task per connection, and everything of the connection lives in it,
//! owned, with no lock: the frame reader, HPACK's table, the windows, the
//! streams, the write buffer. A poll reads what the socket has, decodes its
//! frames, starts a handler for each new request, polls the streams that
//! were woken (a handler's answer, a response body's next chunk) and writes
//! what they made in one write. Every serving thread runs a single-threaded
//! runtime, so a task per stream (hyper's way) buys no parallelism, and a
//! stream store shared by handles behind a mutex (the `h2` crate's way) buys
//! nothing here but its locking and a second copy of every frame.
//!
//! Each stream has a slot: its handler's future, boxed once per slot and
//! reused by the streams that come after, a waker of its own (so a wake
//! polls that stream alone), its windows and its response body. A request
//! body is the one thing shared with the handler: a queue the connection
//! fills and the handler drains, whose draining opens the peer's windows.
//!
//! Limits, as for HTTP/1.1: streams per connection, header list size (431),
//! header block size (the CONTINUATION flood), the time a new connection has
//! for its preface; a client that cancels most of the streams it opens
//! (rapid reset, CVE-2023-44487) or makes this side reset too many of its
//! streams is cut off with `ENHANCE_YOUR_CALM`; reading stops while the
//! write buffer is full, so PING and SETTINGS floods wait on the flooder's
//! own reading. A connection is pinged while it lives and dropped when its
//! peer stops answering, closed with GOAWAY once idle for its idle time
//! (client connections), and drained (GOAWAY, then its open streams finish)
//! when the proxy stops.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::Keepalive;
use super::hpack;
use super::wire::*;
use crate::upstream::ProxyBody;

/// Client-cancelled streams a connection may have before its share counts.
const RESET_ALLOWANCE: u64 = 200;
/// Streams this side may reset for the peer's errors before it is cut off.
const LOCAL_RESETS: u64 = 256;
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
    let mut conn = Conn::new(io, limits);
    match tokio::time::timeout(limits.handshake_timeout, conn.preface()).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            metrics::counter!("skein_proxy_h2_errors_total", "reason" => why).increment(1);
            return tracing::debug!(why, "h2 preface refused");
        }
        Err(_) => {
            metrics::counter!("skein_proxy_client_timeouts_total", "phase" => "h2_preface")
                .increment(1);
            return;
        }
    }
    let end = conn.run(drain, |req| handler.call(req)).await;
    match end {
        End::Done => {}
        End::Dead(why) => {
            metrics::counter!("skein_proxy_h2_dead_total").increment(1);
            tracing::debug!(
                reason = why,
                "h2 peer stopped answering pings: connection dropped"
            );
        }
        End::Fatal(Fatal(code, why)) => {
            metrics::counter!("skein_proxy_h2_errors_total", "reason" => why).increment(1);
            tracing::debug!(code = code.0, why, "h2 connection error");
        }
    }
    // What is left to write (a GOAWAY, the last answers), briefly: a peer
    // that does not read loses it.
    let Conn {
        wire: Wire { mut io, .. },
        link: Link { out, .. },
        ..
    } = conn;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(&out.buf[out.pos..]).await?;
        io.shutdown().await
    })
    .await;
}

/// How a connection ended.
enum End {
    /// Closed by a GOAWAY (either side's) or the peer, with every stream done.
    Done,
    /// The peer stopped answering pings.
    Dead(&'static str),
    /// A connection error, told to the peer in a GOAWAY.
    Fatal(Fatal),
}

/// One connection's state, all of it owned by its task.
struct Conn<I> {
    wire: Wire<I>,
    limits: Limits,
    link: Link,
    hpack: hpack::Decoder,
    partial: Option<Partial>,
    /// Highest stream id the peer opened.
    last_id: u32,
    /// A GOAWAY was sent with this last stream id: no stream above it starts.
    goaway: Option<u32>,
    peer_goaway: bool,
    /// Streams opened, cancelled by the client while their handler ran, and
    /// reset by this side for the client's errors.
    opened: u64,
    cancelled: u64,
    local_resets: u64,
    /// Slots no stream holds, for the next streams.
    free: Vec<usize>,
    active: usize,
    by_id: ById,
    pinger: Pinger,
    wakes: Arc<Wakes>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    fn new(io: I, limits: Limits) -> Conn<I> {
        Conn {
            wire: Wire::new(io, 16 << 10),
            limits,
            link: Link::new(limits.conn_window),
            hpack: hpack::Decoder::new(TABLE_SIZE),
            partial: None,
            last_id: 0,
            goaway: None,
            peer_goaway: false,
            opened: 0,
            cancelled: 0,
            local_resets: 0,
            free: Vec::new(),
            active: 0,
            by_id: ById::default(),
            pinger: Pinger::new(limits.keepalive),
            wakes: Arc::new(Wakes::default()),
        }
    }

    /// This side's settings go out; the client's preface must come, then
    /// its SETTINGS (left in the buffer for the first round to apply).
    async fn preface(&mut self) -> Result<(), &'static str> {
        let l = self.limits;
        let settings: [(u16, u32); 4] = [
            (0x3, l.max_streams),
            (0x4, l.stream_window.min(0x7fff_ffff)),
            (0x6, l.max_header_list),
            // A server must not announce push (0x2); 0x8 is extended CONNECT,
            // not offered.
            (0x5, MAX_FRAME as u32),
        ];
        self.link.out.head(settings.len() * 6, SETTINGS, 0, 0);
        for (id, v) in settings {
            self.link.out.buf.extend_from_slice(&id.to_be_bytes());
            self.link.out.buf.extend_from_slice(&v.to_be_bytes());
        }
        let extra = self.link.recv_window - 65_535;
        if extra > 0 {
            self.link.out.window_update(0, extra as u32);
        }
        self.wire
            .io
            .write_all(&self.link.out.buf)
            .await
            .map_err(|_| "write failed")?;
        self.wire.io.flush().await.map_err(|_| "write failed")?;
        self.link.out.buf.clear();
        while self.wire.rbuf.len() < PREFACE.len() + 9 {
            if self
                .wire
                .io
                .read_buf(&mut self.wire.rbuf)
                .await
                .map_err(|_| "read failed")?
                == 0
            {
                return Err("closed before its preface");
            }
            let n = self.wire.rbuf.len().min(PREFACE.len());
            if self.wire.rbuf[..n] != PREFACE[..n] {
                return Err("not an h2 preface");
            }
        }
        self.wire.rbuf.advance(PREFACE.len());
        if self.wire.rbuf[3] != SETTINGS || self.wire.rbuf[4] & ACK != 0 {
            return Err("preface not followed by SETTINGS");
        }
        Ok(())
    }

    /// Runs the connection; `make` starts a handler.
    async fn run<F>(
        &mut self,
        drain: CancellationToken,
        make: impl Fn(Request<ProxyBody>) -> F,
    ) -> End
    where
        F: Future<Output = Response<ProxyBody>>,
    {
        let wakes = self.wakes.clone();
        let own = Waker::from(wakes.clone());
        let mut slots: Vec<Slot<F>> = Vec::new();
        let mut woken: Vec<usize> = Vec::new();
        let mut drained = pin!(drain.cancelled_owned());
        let mut idle = self
            .limits
            .idle
            .map(|d| (Box::pin(tokio::time::sleep(d)), d));
        let (mut opened_at_check, mut busy_at_check) = (0u64, false);
        poll_fn(|outer| {
            wakes.inline.enter(outer.waker());
            let cx = &mut Context::from_waker(&own);
            let mut rounds = 0;
            loop {
                if self.goaway.is_none() && drained.as_mut().poll(cx).is_ready() {
                    self.go_away(Code::NO_ERROR);
                }
                if let Err(why) = self.pinger.poll(cx, &mut self.link.out) {
                    return Poll::Ready(End::Dead(why));
                }
                if let Some((sleep, every)) = &mut idle
                    && self.goaway.is_none()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    // Idle: no stream now, none opened and none open at the
                    // last check.
                    let quiet = self.active == 0 && self.opened == opened_at_check;
                    if quiet && !busy_at_check {
                        metrics::counter!("skein_proxy_h2_idle_closed_total").increment(1);
                        self.go_away(Code::NO_ERROR);
                    } else {
                        opened_at_check = self.opened;
                        busy_at_check = self.active != 0;
                        sleep.as_mut().reset(tokio::time::Instant::now() + *every);
                        continue;
                    }
                }
                // Read and act on the peer's frames.
                if let Err(f) = self.read(cx, &mut slots, &make) {
                    self.link.out.goaway(self.last_id, f.0);
                    return Poll::Ready(End::Fatal(f));
                }
                // The streams that were woken, or that the frames made ready.
                wakes.take(&mut woken);
                for i in woken.drain(..) {
                    if let Some(s) = slots.get(i) {
                        s.wake.queued.store(false, Ordering::Release);
                    }
                    self.link.ready.push_back(i);
                }
                while let Some(i) = self.link.ready.pop_front() {
                    if let Some(slot) = slots.get_mut(i) {
                        self.drive(slot, i);
                        if slot.done() {
                            self.release(slot);
                            self.free.push(i);
                        }
                    }
                }
                if self.cancelled > RESET_ALLOWANCE && self.cancelled * 2 > self.opened {
                    metrics::counter!("skein_proxy_h2_rapid_reset_total").increment(1);
                    tracing::info!(
                        cancelled = self.cancelled,
                        opened = self.opened,
                        "h2 client cancels most of its streams: cut off"
                    );
                    let f = Fatal(Code::ENHANCE_YOUR_CALM, "rapid reset");
                    self.link.out.goaway(self.last_id, f.0);
                    return Poll::Ready(End::Fatal(f));
                }
                // Write what the round made.
                match self.wire.flush(cx, &mut self.link.out) {
                    Err(()) => return Poll::Ready(End::Done),
                    Ok(true) if !self.link.write_blocked.is_empty() => {
                        self.link.ready.extend(self.link.write_blocked.drain(..));
                        continue;
                    }
                    Ok(true) if std::mem::take(&mut self.wire.read_paused) => {
                        // The peer's frames waited for this flush.
                        cx.waker().wake_by_ref();
                    }
                    Ok(_) => {}
                }
                let ending = self.goaway.is_some() || self.peer_goaway || self.wire.read_closed;
                if ending && self.active == 0 && self.link.out.backlog() == 0 {
                    return Poll::Ready(End::Done);
                }
                if self.wire.read_closed && self.link.out.backlog() == 0 {
                    // The peer is gone: nothing it asked can reach it.
                    return Poll::Ready(End::Done);
                }
                if wakes.inline.leave(rounds < ROUNDS) {
                    rounds += 1;
                } else {
                    self.rest();
                    return Poll::Pending;
                }
            }
        })
        .await
    }

    /// Between requests a connection holds no buffer, as an HTTP/1.1 one
    /// does: with no stream open, nothing read ahead and nothing to write,
    /// the read and write buffers go back (the next read takes a small one).
    /// Most client connections are idle most of the time.
    fn rest(&mut self) {
        let quiet = self.active == 0 && self.partial.is_none();
        if quiet && self.wire.rbuf.is_empty() && self.link.out.backlog() == 0 {
            if self.wire.rbuf.capacity() > 0 {
                self.wire.rbuf = BytesMut::new();
            }
            if self.link.out.buf.capacity() > 0 {
                self.link.out = Out {
                    buf: Vec::new(),
                    pos: 0,
                };
            }
        }
    }

    /// Sends GOAWAY with the last stream started: nothing above it will be.
    fn go_away(&mut self, code: Code) {
        self.goaway = Some(self.last_id);
        self.link.out.goaway(self.last_id, code);
    }

    /// Reads what the socket has (bounded), acting on each whole frame.
    fn read<F>(
        &mut self,
        cx: &mut Context<'_>,
        slots: &mut Vec<Slot<F>>,
        make: &impl Fn(Request<ProxyBody>) -> F,
    ) -> Result<(), Fatal> {
        let mut budget = READ_BUDGET;
        loop {
            self.frames(slots, make)?;
            if !self
                .wire
                .read_more(cx, &mut budget, self.link.out.backlog())
            {
                return Ok(());
            }
        }
    }

    /// Acts on every whole frame in the read buffer.
    fn frames<F>(
        &mut self,
        slots: &mut Vec<Slot<F>>,
        make: &impl Fn(Request<ProxyBody>) -> F,
    ) -> Result<(), Fatal> {
        while let Some((kind, f)) = self.wire.next_frame()? {
            let H2Frame { id, flags, payload } = f;
            let len = payload.len();
            if self.partial.is_some() && kind != CONTINUATION {
                return Err(Fatal(Code::PROTOCOL_ERROR, "header block interrupted"));
            }
            match kind {
                DATA => self.on_data(slots, id, flags, payload)?,
                HEADERS | CONTINUATION => {
                    let f = H2Frame { id, flags, payload };
                    let max = self.limits.max_header_list;
                    if let Some((id, end, block)) = header_block(&mut self.partial, kind, f, max)? {
                        self.on_block(slots, make, id, end, block)?;
                    }
                }
                PRIORITY => {
                    if id == 0 {
                        return Err(Fatal(Code::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                    }
                    if len != 5 {
                        self.reset(slots, id, Code::FRAME_SIZE_ERROR);
                    }
                }
                RST_STREAM => {
                    if id == 0 || len != 4 {
                        return Err(Fatal(Code::PROTOCOL_ERROR, "malformed RST_STREAM"));
                    }
                    if id > self.last_id {
                        return Err(Fatal(Code::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                    }
                    if let Some(&i) = self.by_id.get(&id)
                        && let Some(slot) = slots.get_mut(i)
                    {
                        if slot.fut.is_some() {
                            self.cancelled += 1;
                            metrics::counter!("skein_proxy_h2_client_resets_total").increment(1);
                        }
                        slot.fail_request("reset by the client");
                        self.release(slot);
                        self.free.push(i);
                    }
                }
                SETTINGS => {
                    let streams = slots.iter_mut().enumerate();
                    let open = streams
                        .filter(|(_, s)| s.id != 0)
                        .map(|(i, s)| (i, &mut s.tx));
                    self.link
                        .on_settings(&H2Frame { id, flags, payload }, open)?;
                }
                PUSH_PROMISE => {
                    return Err(Fatal(Code::PROTOCOL_ERROR, "PUSH_PROMISE from a client"));
                }
                PING => {
                    let f = H2Frame { id, flags, payload };
                    self.pinger.on_ping(&f, &mut self.link.out)?;
                }
                GOAWAY => {
                    if id != 0 || len < 8 {
                        return Err(Fatal(Code::PROTOCOL_ERROR, "malformed GOAWAY"));
                    }
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    if code != 0 {
                        tracing::debug!(code, "h2 client sent GOAWAY with an error");
                    }
                    self.peer_goaway = true;
                }
                WINDOW_UPDATE => {
                    let f = H2Frame { id, flags, payload };
                    if let Some(inc) = self.link.on_window_update(&f)? {
                        self.on_window_update(slots, id, inc)?;
                    }
                }
                // Unknown frame types are ignored (RFC 9113, 4.1).
                _ => {}
            }
        }
        Ok(())
    }

    fn on_data<F>(
        &mut self,
        slots: &mut [Slot<F>],
        id: u32,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), Fatal> {
        if id == 0 {
            return Err(Fatal(Code::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let (data, whole, pad) = self.link.data_frame(flags, payload)?;
        if id > self.last_id {
            return Err(Fatal(Code::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let open = self
            .by_id
            .get(&id)
            .copied()
            .filter(|&i| slots.get(i).is_some_and(|s| s.rx.open));
        let Some(i) = open else {
            // A stream that ended or that this side reset: its bytes are
            // given back to the connection and dropped.
            self.link.give_back(whole);
            if self.by_id.contains_key(&id) {
                self.reset(slots, id, Code::STREAM_CLOSED);
            }
            return Ok(());
        };
        let Some(slot) = slots.get_mut(i) else {
            return Ok(());
        };
        let end = flags & END_STREAM != 0;
        if let Err(code) = self.link.data_in(&mut slot.rx, data, whole, pad, end) {
            self.reset(slots, id, code);
        } else if end && slot.done() {
            self.link.ready.push_back(i);
        }
        Ok(())
    }

    /// Resets stream `id` for the peer's error; too many and the peer is
    /// cut off (at the next check of `local_resets`).
    fn reset<F>(&mut self, slots: &mut [Slot<F>], id: u32, code: Code) {
        self.link.out.rst(id, code);
        self.local_resets += 1;
        metrics::counter!("skein_proxy_h2_stream_errors_total").increment(1);
        if let Some(&i) = self.by_id.get(&id)
            && let Some(slot) = slots.get_mut(i)
        {
            slot.fail_request("stream error");
            // Released at its next drive: the free list is the caller's.
            slot.tx.done = true;
            slot.rx.open = false;
            slot.fut.set(None);
            slot.tx.body = None;
            self.link.ready.push_back(i);
        }
    }

    /// A whole header block: a new request, or the trailers of one.
    fn on_block<F>(
        &mut self,
        slots: &mut Vec<Slot<F>>,
        make: &impl Fn(Request<ProxyBody>) -> F,
        id: u32,
        end_stream: bool,
        block: Bytes,
    ) -> Result<(), Fatal> {
        let mut head = Head::new(self.limits.max_header_list as usize);
        self.hpack
            .decode(block, |name, value| head.field(name, value))
            .map_err(|e| Fatal(Code::COMPRESSION_ERROR, e.0))?;
        if let Some(&i) = self.by_id.get(&id) {
            return self.on_trailers(slots, i, id, end_stream, head);
        }
        if id <= self.last_id {
            if id.is_multiple_of(2) {
                return Err(Fatal(Code::PROTOCOL_ERROR, "HEADERS on a server stream id"));
            }
            // A stream that ended, or that this side reset.
            return Ok(());
        }
        if id.is_multiple_of(2) {
            return Err(Fatal(Code::PROTOCOL_ERROR, "HEADERS on a server stream id"));
        }
        self.last_id = id;
        if self.goaway.is_some() || self.peer_goaway {
            // After GOAWAY: not started (the peer knows from the last id).
            return Ok(());
        }
        if self.active >= self.limits.max_streams as usize {
            self.link.out.rst(id, Code::REFUSED_STREAM);
            metrics::counter!("skein_proxy_h2_refused_streams_total").increment(1);
            return Ok(());
        }
        if head.size > head.max {
            // Too large: answered here, as HTTP/1.1 answers it.
            metrics::counter!("skein_proxy_client_errors_total", "reason" => "header_list_too_large")
                .increment(1);
            self.link.block.clear();
            hpack::put_status(&mut self.link.block, 431);
            self.link
                .out
                .headers(id, &self.link.block, true, self.link.peer_frame);
            if !end_stream {
                self.link.out.rst(id, Code::NO_ERROR);
            }
            return Ok(());
        }
        let (req, remaining) = match head.request() {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(why, "malformed h2 request");
                metrics::counter!("skein_proxy_client_errors_total", "reason" => "h2_malformed")
                    .increment(1);
                self.link.out.rst(id, Code::PROTOCOL_ERROR);
                self.local_resets += 1;
                if self.local_resets > LOCAL_RESETS {
                    return Err(Fatal(
                        Code::ENHANCE_YOUR_CALM,
                        "too many malformed requests",
                    ));
                }
                return Ok(());
            }
        };
        if end_stream && remaining.is_some_and(|n| n > 0) {
            self.link.out.rst(id, Code::PROTOCOL_ERROR);
            self.local_resets += 1;
            return Ok(());
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                slots.push(Slot::new(slots.len(), &self.wakes));
                slots.len() - 1
            }
        };
        let Some(slot) = slots.get_mut(i) else {
            return Ok(());
        };
        slot.start(
            id,
            self.link.peer_window,
            self.limits.stream_window,
            !end_stream,
            remaining,
        );
        let method_head = req.method() == Method::HEAD;
        slot.head = method_head;
        let req = req.map(|()| slot.rx.reader(end_stream, &slot.waker, remaining));
        slot.fut.set(Some(make(req)));
        self.by_id.insert(id, i);
        self.active += 1;
        self.opened += 1;
        self.link.ready.push_back(i);
        Ok(())
    }

    fn on_trailers<F>(
        &mut self,
        slots: &mut [Slot<F>],
        i: usize,
        id: u32,
        end_stream: bool,
        head: Head,
    ) -> Result<(), Fatal> {
        let Some(slot) = slots.get(i) else {
            return Ok(());
        };
        if !slot.rx.open {
            self.reset(slots, id, Code::STREAM_CLOSED);
            return Ok(());
        }
        let complete = end_stream && slot.rx.remaining.is_none_or(|r| r == 0);
        let Some(trailers) = head.trailers().filter(|_| complete) else {
            self.reset(slots, id, Code::PROTOCOL_ERROR);
            return Ok(());
        };
        let Some(slot) = slots.get_mut(i) else {
            return Ok(());
        };
        slot.rx.open = false;
        if let Some(shared) = &slot.rx.shared {
            shared.trailers(trailers);
        }
        if slot.done() {
            self.link.ready.push_back(i);
        }
        Ok(())
    }

    /// A stream's WINDOW_UPDATE, `inc` bytes.
    fn on_window_update<F>(
        &mut self,
        slots: &mut [Slot<F>],
        id: u32,
        inc: i64,
    ) -> Result<(), Fatal> {
        if id > self.last_id {
            return Err(Fatal(
                Code::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(&i) = self.by_id.get(&id) else {
            return Ok(());
        };
        let Some(slot) = slots.get_mut(i) else {
            return Ok(());
        };
        if let Err(code) = slot.tx.grow(inc, i, &mut self.link.ready) {
            self.reset(slots, id, code);
        }
        Ok(())
    }

    /// Polls one stream: its handler, then its response body, as far as the
    /// windows and the write buffer let it go.
    fn drive<F>(&mut self, slot: &mut Slot<F>, i: usize)
    where
        F: Future<Output = Response<ProxyBody>>,
    {
        let Slot {
            id,
            fut,
            tx,
            rx,
            head,
            waker,
            ..
        } = slot;
        if *id == 0 {
            return;
        }
        let cx = &mut Context::from_waker(waker);
        // What the handler took of the request body goes back to the peer.
        self.link.take_back(*id, rx, self.limits.stream_window);
        if let Some(f) = fut.as_mut().as_pin_mut() {
            let Poll::Ready(resp) = f.poll(cx) else {
                return;
            };
            fut.set(None);
            self.answer(*id, *head, tx, resp);
        }
        if let Some(e) = self.link.pump(*id, tx, i, cx, Code::INTERNAL_ERROR) {
            metrics::counter!("skein_proxy_response_body_errors_total").increment(1);
            tracing::debug!(error = %e, "response body failed: stream reset");
            rx.open = false;
        }
    }

    /// The handler's answer on stream `id`: its head goes out (alone after
    /// a HEAD), its body is kept to pump.
    fn answer(&mut self, id: u32, head: bool, tx: &mut Outbound, resp: Response<ProxyBody>) {
        let (mut parts, body) = resp.into_parts();
        fit_response(&mut parts.headers, &body);
        self.link.block.clear();
        hpack::put_status(&mut self.link.block, parts.status.as_u16());
        for (name, value) in &parts.headers {
            hpack::put_field(
                &mut self.link.block,
                name.as_str(),
                value.as_bytes(),
                value.is_sensitive(),
            );
        }
        let end = head || body.is_end_stream();
        self.link
            .out
            .headers(id, &self.link.block, end, self.link.peer_frame);
        if end {
            tx.done = true;
        } else {
            tx.body = Some(body);
        }
    }

    /// Frees a stream's slot: its handler and bodies are dropped; a peer
    /// still sending a request body is told to stop.
    fn release<F>(&mut self, slot: &mut Slot<F>) {
        if slot.id == 0 {
            return;
        }
        if slot.rx.open {
            // Answered (or failed) before the request body ended: the rest
            // is not wanted (RFC 9113, 8.1).
            self.link.out.rst(slot.id, Code::NO_ERROR);
        }
        if let Some(shared) = slot.rx.shared.take() {
            // What the handler left unread goes back to the connection.
            let left = shared.finish();
            self.link.give_back(left);
        }
        self.by_id.remove(&slot.id);
        self.active = self.active.saturating_sub(1);
        slot.clear();
    }
}

/// One stream's place in its connection; reused by later streams.
struct Slot<F> {
    /// The stream's id; 0 while the slot is free.
    id: u32,
    /// The handler, until it answers (its box outlives the stream).
    fut: Pin<Box<Option<F>>>,
    /// The response going out.
    tx: Outbound,
    /// The request body coming in.
    rx: Inbound,
    /// A HEAD request: the answer's head alone goes out.
    head: bool,
    waker: Waker,
    wake: Arc<SlotWake>,
}

impl<F> Slot<F> {
    fn new(idx: usize, wakes: &Arc<Wakes>) -> Slot<F> {
        let (waker, wake) = SlotWake::new(idx, wakes);
        Slot {
            id: 0,
            fut: Box::pin(None),
            tx: Outbound::default(),
            rx: Inbound::default(),
            head: false,
            waker,
            wake,
        }
    }

    fn start(&mut self, id: u32, send: i64, recv: u32, recv_open: bool, remaining: Option<u64>) {
        self.id = id;
        self.tx = Outbound {
            window: send,
            ..Outbound::default()
        };
        self.rx = Inbound {
            window: i64::from(recv),
            open: recv_open,
            remaining,
            ..Inbound::default()
        };
    }

    fn done(&self) -> bool {
        self.id != 0 && self.tx.done && (!self.rx.open || self.fut.is_none())
    }

    fn fail_request(&self, why: &'static str) {
        if let Some(shared) = &self.rx.shared {
            shared.fail(why);
        }
    }

    fn clear(&mut self) {
        self.id = 0;
        self.fut.set(None);
        self.tx = Outbound::default();
        self.rx = Inbound::default();
        self.head = false;
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
pub(super) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::mux::hpack::Name;
    use crate::upstream::BoxError;
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Frame;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpStream};

    /// Counts the handler calls started and the ones dropped unfinished.
    #[derive(Default)]
    pub(in crate::mux) struct Seen {
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
                    "/echo" => {
                        // Reads the body slowly enough for the windows to
                        // fill, then tells what came.
                        let mut b = req.into_body();
                        let (mut len, mut trailers) = (0usize, 0usize);
                        while let Some(f) = b.frame().await {
                            let f = f.unwrap();
                            if let Some(d) = f.data_ref() {
                                len += d.len();
                                tokio::task::yield_now().await;
                            } else if let Some(t) = f.trailers_ref() {
                                trailers = t.len();
                            }
                        }
                        let text = format!("len={len} trailers={trailers}");
                        Response::new(Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed())
                    }
                    "/big" => {
                        // 3 MiB in 64 KiB chunks, as a stream.
                        let chunks = (0..48).map(|_| {
                            Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 64 << 10])))
                        });
                        let s = futures_util::stream::iter(chunks);
                        Response::new(http_body_util::StreamBody::new(s).boxed())
                    }
                    "/cookie" => {
                        let c = req.headers().get_all(header::COOKIE).iter().count();
                        let v = req.headers().get(header::COOKIE).cloned();
                        let text = format!(
                            "{c}:{}",
                            v.map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default()
                        );
                        Response::new(Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed())
                    }
                    _ => Response::new(body("ok")),
                }
            }
        }
    }

    pub(in crate::mux) fn limits() -> Limits {
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
    pub(in crate::mux) async fn server(
        limits: Limits,
        drain: CancellationToken,
    ) -> (std::net::SocketAddr, Arc<Seen>) {
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

    /// A client that writes frames as given, for what a real client will
    /// not send.
    struct Raw {
        io: TcpStream,
        buf: BytesMut,
        hpack: hpack::Decoder,
    }

    impl Raw {
        async fn connect(addr: std::net::SocketAddr) -> Raw {
            let mut io = TcpStream::connect(addr).await.unwrap();
            io.write_all(PREFACE).await.unwrap();
            io.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            Raw {
                io,
                buf: BytesMut::new(),
                hpack: hpack::Decoder::new(4096),
            }
        }

        async fn send(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8]) {
            let mut out = Out {
                buf: Vec::new(),
                pos: 0,
            };
            out.head(payload.len(), kind, flags, id);
            out.buf.extend_from_slice(payload);
            self.io.write_all(&out.buf).await.unwrap();
        }

        /// A request's HEADERS, every field a plain literal.
        async fn request(&mut self, id: u32, fields: &[(&str, &str)], end: bool) {
            let block = block(fields);
            let flags = END_HEADERS | if end { END_STREAM } else { 0 };
            self.send(HEADERS, flags, id, &block).await;
        }

        /// The next frame, or None once the server closed.
        async fn frame(&mut self) -> Option<(u8, u8, u32, Bytes)> {
            loop {
                if self.buf.len() >= 9 {
                    let len = (usize::from(self.buf[0]) << 16)
                        | (usize::from(self.buf[1]) << 8)
                        | usize::from(self.buf[2]);
                    if self.buf.len() >= 9 + len {
                        let h = self.buf.split_to(9);
                        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
                        return Some((h[3], h[4], id, self.buf.split_to(len).freeze()));
                    }
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                        .await
                        .expect("the server answers within 5 s");
                if read.unwrap_or(0) == 0 {
                    return None;
                }
            }
        }

        /// Frames of `kind` on `id`, skipping the rest (settings, windows).
        async fn next(&mut self, kind: u8, id: u32) -> Option<(u8, Bytes)> {
            while let Some((k, flags, i, payload)) = self.frame().await {
                if k == HEADERS && i == id && kind == HEADERS {
                    return Some((flags, payload));
                }
                if k == HEADERS {
                    // Another stream's answer: decoded to keep the table.
                    self.hpack.decode(payload, |_, _| {}).unwrap();
                    continue;
                }
                if k == kind && i == id {
                    return Some((flags, payload));
                }
            }
            None
        }

        /// The code of the RST_STREAM on `id`.
        async fn reset_code(&mut self, id: u32) -> u32 {
            let (_, p) = self.next(RST_STREAM, id).await.expect("RST_STREAM");
            u32::from_be_bytes(p[..4].try_into().unwrap())
        }

        /// The code of the server's GOAWAY, after which it closes.
        async fn goaway_code(&mut self) -> u32 {
            let (_, p) = self.next(GOAWAY, 0).await.expect("GOAWAY");
            u32::from_be_bytes(p[4..8].try_into().unwrap())
        }

        /// The `:status` of the answer on `id`.
        async fn status(&mut self, id: u32) -> String {
            let (_, block) = self.next(HEADERS, id).await.expect("an answer");
            let mut status = String::new();
            self.hpack
                .decode(block, |n, v| {
                    if n == Name::Status {
                        status = String::from_utf8(v.to_vec()).unwrap();
                    }
                })
                .unwrap();
            status
        }
    }

    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            // Literal names always, so a bad one goes out as written.
            b.push(0);
            hpack::put_int(&mut b, 0, 7, n.len());
            b.extend_from_slice(n.as_bytes());
            hpack::put_int(&mut b, 0, 7, v.len());
            b.extend_from_slice(v.as_bytes());
        }
        b
    }

    fn get_fields(path: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "GET".into()),
            (":scheme", "https".into()),
            (":authority", "app.test".into()),
            (":path", path.into()),
        ]
    }

    fn fields<'a>(
        base: &'a [(&'static str, String)],
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        base.iter()
            .map(|(n, v)| (*n, v.as_str()))
            .chain(extra.iter().copied())
            .collect()
    }

    #[tokio::test]
    async fn bodies_larger_than_every_window_flow_both_ways_with_trailers() {
        let (addr, _) = server(limits(), CancellationToken::new()).await;
        // A client with small windows: the 3 MiB answer must wait for its
        // WINDOW_UPDATEs.
        let io = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = h2::client::Builder::new()
            .initial_window_size(16 << 10)
            .initial_connection_window_size(32 << 10)
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (resp, _) = tx.send_request(get("/big"), true).unwrap();
        let in_time = Duration::from_secs(20);
        let big = tokio::time::timeout(in_time, async { body_of(resp.await.unwrap()).await })
            .await
            .expect("a stalled window would hang here");
        assert_eq!(big.len(), 3 << 20);
        assert!(big.bytes().all(|b| b == b'x'));
        // 5 MiB up, over a 1 MiB stream and connection window, then
        // trailers: the handler's reading opens the windows.
        let post = Request::post("http://app.test/echo").body(()).unwrap();
        let (resp, mut up) = tx.send_request(post, false).unwrap();
        let sender = tokio::spawn(async move {
            let mut left = 5 << 20;
            while left > 0 {
                let n = left.min(100_000);
                up.reserve_capacity(n);
                let got = poll_fn(|cx| up.poll_capacity(cx)).await.unwrap().unwrap();
                up.send_data(Bytes::from(vec![b'y'; got.min(n)]), false)
                    .unwrap();
                left -= got.min(n);
            }
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            up.send_trailers(t).unwrap();
        });
        let text = tokio::time::timeout(in_time, async { body_of(resp.await.unwrap()).await })
            .await
            .expect("a stalled window would hang here");
        assert_eq!(text, format!("len={} trailers=1", 5 << 20));
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn malformed_requests_are_reset_and_the_connection_serves_on() {
        let (addr, seen) = server(limits(), CancellationToken::new()).await;
        let mut c = Raw::connect(addr).await;
        let base = get_fields("/");
        let bad: Vec<Vec<(&str, &str)>> = vec![
            fields(&base, &[("X-Upper", "1")]),
            fields(&base, &[("connection", "keep-alive")]),
            fields(&base, &[("transfer-encoding", "chunked")]),
            fields(&base, &[("te", "gzip")]),
            fields(&base, &[(":bogus", "1")]),
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.test"),
            ],
            vec![
                ("x-first", "1"),
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            fields(&base, &[("content-length", "5")]),
        ];
        let mut id = 1;
        for f in &bad {
            c.request(id, f, true).await;
            assert_eq!(c.reset_code(id).await, Code::PROTOCOL_ERROR.0, "{f:?}");
            id += 2;
        }
        assert_eq!(seen.started.load(Ordering::SeqCst), 0, "no handler ran");
        c.request(id, &fields(&base, &[("te", "trailers")]), true)
            .await;
        assert_eq!(c.status(id).await, "200", "the connection still serves");
    }

    #[tokio::test]
    async fn a_head_over_the_header_list_limit_is_answered_431() {
        let (addr, seen) = server(limits(), CancellationToken::new()).await;
        let mut c = Raw::connect(addr).await;
        let big = "v".repeat(4000);
        let base = get_fields("/");
        let many: Vec<(&str, &str)> = (0..5).map(|_| ("x-big", big.as_str())).collect();
        let b = block(&fields(&base, &many));
        let (first, rest) = b.split_at(MAX_FRAME);
        c.send(HEADERS, END_STREAM, 1, first).await;
        c.send(CONTINUATION, END_HEADERS, 1, rest).await;
        assert_eq!(c.status(1).await, "431");
        assert_eq!(seen.started.load(Ordering::SeqCst), 0);
        c.request(3, &fields(&base, &[]), true).await;
        assert_eq!(c.status(3).await, "200");
    }

    #[tokio::test]
    async fn a_block_split_over_continuation_decodes_and_a_flood_of_them_is_cut() {
        let (addr, _) = server(limits(), CancellationToken::new()).await;
        let mut c = Raw::connect(addr).await;
        let b = block(&fields(
            &get_fields("/cookie"),
            &[("cookie", "a=1"), ("cookie", "b=2")],
        ));
        let (first, rest) = b.split_at(10);
        c.send(HEADERS, END_STREAM, 1, first).await;
        c.send(CONTINUATION, 0, 1, &rest[..5]).await;
        c.send(CONTINUATION, END_HEADERS, 1, &rest[5..]).await;
        assert_eq!(c.status(1).await, "200");
        let (_, body) = c.next(DATA, 1).await.unwrap();
        assert_eq!(
            &body[..],
            b"1:a=1; b=2",
            "cookie crumbs joined for HTTP/1.1"
        );
        // A header block that never ends.
        c.send(HEADERS, 0, 3, &block(&fields(&get_fields("/"), &[])))
            .await;
        let junk = vec![0u8; 16 << 10];
        for _ in 0..4 {
            c.send(CONTINUATION, 0, 3, &junk).await;
        }
        assert_eq!(c.goaway_code().await, Code::ENHANCE_YOUR_CALM.0);
        assert!(c.frame().await.is_none(), "closed");
    }

    #[tokio::test]
    async fn protocol_violations_end_the_connection_with_their_code() {
        let (addr, _) = server(limits(), CancellationToken::new()).await;
        /// Frames as (type, flags, stream, payload).
        type Frames = Vec<(u8, u8, u32, Vec<u8>)>;
        let cases: Vec<(Frames, Code)> = vec![
            // A frame over the size allowed.
            (
                vec![(DATA, 0, 1, vec![0; MAX_FRAME + 1])],
                Code::FRAME_SIZE_ERROR,
            ),
            // DATA past the connection window (64 KiB + 1 MiB granted).
            (
                {
                    let mut v = vec![(
                        HEADERS,
                        END_HEADERS,
                        1,
                        block(&fields(&get_fields("/pending"), &[])),
                    )];
                    for _ in 0..70 {
                        v.push((DATA, 0, 1, vec![0; MAX_FRAME]));
                    }
                    v
                },
                Code::FLOW_CONTROL_ERROR,
            ),
            // A HEADERS block HPACK cannot decode.
            (
                vec![(HEADERS, END_HEADERS | END_STREAM, 1, vec![0x80])],
                Code::COMPRESSION_ERROR,
            ),
            // An even (server) stream id, then a stream id going backwards.
            (
                vec![(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    2,
                    block(&fields(&get_fields("/"), &[])),
                )],
                Code::PROTOCOL_ERROR,
            ),
            (
                vec![(PUSH_PROMISE, END_HEADERS, 1, vec![0, 0, 0, 2])],
                Code::PROTOCOL_ERROR,
            ),
            (
                vec![(WINDOW_UPDATE, 0, 0, vec![0, 0, 0, 0])],
                Code::PROTOCOL_ERROR,
            ),
            (
                vec![(SETTINGS, 0, 0, vec![0, 4, 0x80, 0, 0, 0])],
                Code::FLOW_CONTROL_ERROR,
            ),
            (
                vec![(CONTINUATION, END_HEADERS, 1, vec![0x82])],
                Code::PROTOCOL_ERROR,
            ),
        ];
        for (frames, code) in cases {
            let mut c = Raw::connect(addr).await;
            for (kind, flags, id, payload) in &frames {
                c.send(*kind, *flags, *id, payload).await;
            }
            assert_eq!(
                c.goaway_code().await,
                code.0,
                "{:?}",
                frames.first().map(|f| f.0)
            );
        }
    }

    #[tokio::test]
    async fn streams_over_the_limit_are_refused_and_pings_answered() {
        let (addr, _) = server(limits(), CancellationToken::new()).await;
        let mut c = Raw::connect(addr).await;
        let base = get_fields("/pending");
        let f = fields(&base, &[]);
        for k in 0..17u32 {
            c.request(1 + 2 * k, &f, true).await;
        }
        assert_eq!(
            c.reset_code(33).await,
            Code::REFUSED_STREAM.0,
            "the 17th of 16"
        );
        c.send(PING, 0, 0, b"12345678").await;
        let (flags, payload) = c.next(PING, 0).await.unwrap();
        assert_eq!((flags, &payload[..]), (ACK, &b"12345678"[..]));
    }

    /// A small deterministic generator (xorshift), for the fuzz-like tests:
    /// a failure repeats.
    pub(in crate::mux) struct Rng(pub(in crate::mux) u64);

    impl Rng {
        pub(in crate::mux) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(in crate::mux) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn hpack_survives_arbitrary_and_mangled_blocks() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = block(&fields(
            &get_fields("/a?b=c"),
            &[("cookie", "x=1"), ("user-agent", "t")],
        ));
        let mut decoder = hpack::Decoder::new(TABLE_SIZE);
        for round in 0..20_000 {
            let b = if round % 2 == 0 {
                let n = rng.below(64) as usize;
                rng.bytes(n)
            } else {
                let mut b = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next() as u8;
                }
                b
            };
            // Any result but a panic; a failed block ends its connection, so a
            // fresh decoder follows an error, as a fresh connection would.
            if decoder.decode(Bytes::from(b), |_, _| {}).is_err() {
                decoder = hpack::Decoder::new(TABLE_SIZE);
            }
        }
    }

    #[tokio::test]
    async fn random_frames_never_panic_the_server_and_others_are_still_served() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, t) = (seen.clone(), tasks.clone());
        tokio::spawn(async move {
            loop {
                let (io, _) = l.accept().await.unwrap();
                let task = tokio::spawn(serve(
                    io,
                    limits(),
                    CancellationToken::new(),
                    Test(s.clone()),
                ));
                t.lock().unwrap().push(task);
            }
        });
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let base = get_fields("/");
        let valid = block(&fields(&base, &[]));
        for _ in 0..150 {
            let mut c = Raw::connect(addr).await;
            for _ in 0..1 + rng.below(12) {
                let kind = rng.below(11) as u8;
                let flags = rng.next() as u8;
                let id = rng.below(8) as u32;
                let payload = match rng.below(3) {
                    0 => valid.clone(),
                    1 => {
                        let n = rng.below(40) as usize;
                        rng.bytes(n)
                    }
                    _ => {
                        let mut v = valid.clone();
                        let i = rng.below(v.len() as u64) as usize;
                        v[i] = rng.next() as u8;
                        v
                    }
                };
                c.send(kind, flags, id, &payload).await;
            }
            // Read what comes back until the server closes or goes quiet.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), c.frame()).await
            {
            }
        }
        // A well-behaved client is served as ever.
        let (mut tx, _conn) = client(addr).await;
        let (resp, _) = tx.send_request(get("/"), true).unwrap();
        assert_eq!(body_of(resp.await.unwrap()).await, "ok");
        // No connection's task panicked (those still open are cut here).
        let tasks: Vec<_> = std::mem::take(&mut *tasks.lock().unwrap());
        assert!(tasks.len() > 150);
        for t in tasks {
            t.abort();
            if let Err(e) = t.await {
                assert!(!e.is_panic(), "a connection panicked: {e}");
            }
        }
    }
}
