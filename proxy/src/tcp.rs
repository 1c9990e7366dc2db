//! Byte streams to machines: raw TCP passthrough (by port, or by SNI for TLS the
//! machine terminates itself), TLS terminated here and the plaintext piped, and
//! the PROXY protocol header in front when the port asks for it. Concurrency is
//! counted per connection: the slot is held for the connection's life.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::Proxy;
use crate::backhaul;
use crate::balance::{Prefs, acquire};
use crate::http::{ConnInfo, connect_failed};
use crate::proxy_proto;
use crate::table::{AppRoute, PortRoute, RouteTable};
use crate::upstream::dial;

/// A stream whose first bytes were already read (a peeked ClientHello); they
/// are read again before the rest.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix` comes out first, then `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    /// Bytes of the prefix are still to be read.
    pub fn has_prefix(&self) -> bool {
        self.prefix.has_remaining()
    }

    /// The stream after the prefix.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The prefix not yet read, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if !self.prefix.has_remaining() {
                // An advanced `Bytes` still holds its whole buffer (the
                // ClientHello read, 2 KiB or more): let it go now rather
                // than when the connection ends.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Pipes a client stream to a machine of `app` for `port`. Returns when either
/// side closes.
pub async fn pipe<C>(
    proxy: Arc<Proxy>,
    mut client: C,
    table: Arc<RouteTable>,
    app: Arc<AppRoute>,
    port: PortRoute,
    info: ConnInfo,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(svc) = app.services.get(port.service) else {
        return;
    };
    let mut deadline = crate::balance::QueueDeadline::new(proxy.limits.queue_timeout);
    let mut tried: Vec<Arc<str>> = Vec::new();
    let (mut upstream, _slot, machine) = loop {
        let exclude: Vec<&str> = tried.iter().map(|s| &**s).collect();
        let (backend, slot) = match acquire(
            svc,
            &table,
            Prefs::default(),
            &exclude,
            &mut deadline,
            proxy.limits.queue_depth,
        )
        .await
        {
            Ok(x) => x,
            Err(r) => {
                metrics::counter!("skein_proxy_tcp_refused_total").increment(1);
                tracing::debug!(app = %app.name, refusal = ?r, "no machine for a TCP connection");
                return;
            }
        };
        // A machine on another host: a stream of its own through that host's
        // proxy, which writes the PROXY header and holds the hard limit.
        if let Some(via) = backend.via {
            let target = backhaul::Target {
                app: &app.name,
                port: svc.internal_port,
                machine: &backend.machine,
            };
            let opened = backhaul::open_tcp(
                via,
                target,
                info.client,
                info.local,
                port.proxy_proto,
                proxy.cfg.connect_timeout,
            )
            .await;
            match opened {
                Ok(io) => break (Upstream::Backhaul(io), slot, backend.machine.clone()),
                Err(backhaul::OpenError::Connect(e)) => connect_failed(&proxy, backend, &e),
                Err(e) => {
                    tracing::debug!(machine = %backend.machine, error = %e, "backhaul refused a TCP connection");
                }
            }
        } else {
            match dial(backend.addr, proxy.cfg.connect_timeout, None).await {
                Ok(s) => break (Upstream::Direct(s), slot, backend.machine.clone()),
                Err(e) => connect_failed(&proxy, backend, &e),
            }
        }
        tried.push(backend.machine.clone());
        if tried.len() > proxy.limits.retries as usize {
            metrics::counter!("skein_proxy_tcp_refused_total").increment(1);
            return;
        }
    };
    metrics::counter!("skein_proxy_tcp_connections_total").increment(1);
    match &mut upstream {
        Upstream::Direct(s) => {
            if let Some(v) = port.proxy_proto {
                let h = proxy_proto::header(v, info.client, info.local);
                if s.write_all(&h).await.is_err() {
                    return;
                }
            }
            relay(&mut client, s, &app.name, &machine).await
        }
        Upstream::Backhaul(io) => relay(&mut client, io, &app.name, &machine).await,
    }
}

/// Copies both ways until either side closes; counts the bytes.
pub async fn relay<A, B>(a: &mut A, b: &mut B, app: &str, machine: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(a, b).await {
        Ok((up, down)) => {
            metrics::counter!("skein_proxy_tcp_bytes_total", "direction" => "to_machine")
                .increment(up);
            metrics::counter!("skein_proxy_tcp_bytes_total", "direction" => "to_client")
                .increment(down);
        }
        Err(e) => tracing::debug!(app, machine, error = %e, "tcp pipe ended with an error"),
    }
}

/// Where a TCP connection's bytes go.
enum Upstream {
    /// The machine itself.
    Direct(TcpStream),
    /// A stream through the machine's host's proxy.
    Backhaul(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
}
