//! Connections to machines: HTTP/1.1 connections ([`crate::h1`], skein's own)
//! pooled per address (one request at a time each, back in the pool once the
//! response has been read), one shared h2c connection ([`crate::mux`]) per
//! address for services that ask for it and for the backhaul, and a fresh
//! hyper HTTP/1.1 connection for a request that
//! upgrades (it never comes back). Connecting is separate from sending, so a
//! refused or timed-out connect is known before any byte of the request has
//! gone, and the request can be retried elsewhere untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Any body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How the proxy speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1, one request per connection at a time.
    H1,
    /// HTTP/2 over cleartext, multiplexed.
    H2c,
}

/// A connection ready to send one request.
pub enum Sender {
    /// HTTP/1.1.
    H1(crate::h1::Conn),
    /// HTTP/1.1 through hyper, for an upgrade.
    Upgrade(http1::SendRequest<ProxyBody>),
    /// h2c.
    H2(crate::mux::Conn),
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect did not finish in time.
    #[error("connect timed out")]
    Timeout,
    /// Refused, unreachable…
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

/// A TCP connection to `addr` within `timeout`, Nagle off, with the given
/// congestion control (else the system's): how the proxy reaches every
/// upstream (machines, and other hosts' backhaul listeners).
pub async fn dial(
    addr: SocketAddr,
    timeout: Duration,
    congestion: Option<Congestion>,
) -> Result<TcpStream, ConnectError> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(c) = congestion {
        // Set before the SYN; a failure leaves the system's (counted).
        if let Err(e) = c.set(&socket) {
            metrics::counter!("skein_proxy_congestion_errors_total").increment(1);
            tracing::debug!(error = %e, congestion = c.name(), "congestion control not set");
        }
    }
    let s = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A TCP congestion control algorithm's name (at most 15 bytes, the
/// kernel's limit), small enough to copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Congestion {
    name: [u8; 15],
    len: u8,
}

impl Congestion {
    /// The algorithm `name`; None if it cannot be one (empty, too long, not
    /// letters, digits or `_`).
    pub fn new(name: &str) -> Option<Congestion> {
        let ok = !name.is_empty()
            && name.len() <= 15
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return None;
        }
        let mut c = Congestion {
            name: [0; 15],
            len: name.len() as u8,
        };
        c.name[..name.len()].copy_from_slice(name.as_bytes());
        Some(c)
    }

    /// The name.
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..usize::from(self.len)]).unwrap_or("")
    }

    /// Sets it on `socket` (a listener's is inherited by what it accepts).
    pub fn set(&self, socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        socket2::SockRef::from(socket).set_tcp_congestion(&self.name[..usize::from(self.len)])
    }
}

impl std::fmt::Debug for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

struct Idle {
    conn: crate::h1::Conn,
    since: Instant,
}

/// Limits of the upstream side.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamLimits {
    /// Time a connect may take.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub idle_timeout: Duration,
    /// Most idle connections kept per address.
    pub max_idle_per_backend: usize,
    /// How an h2 connection checks that its peer is still there.
    pub h2_keepalive: crate::mux::Keepalive,
    /// Congestion control of h2c connections (multiplexed: the backhaul, h2c
    /// machines); None: the system's.
    pub multiplexed_congestion: Option<Congestion>,
}

/// The pool, one shard per serving thread: a thread reuses only connections
/// it made, whose sockets are on its own reactor and whose h2 connection task
/// runs on its own runtime. A connection shared across threads would have the
/// reactor of one wake the task on another for every read (two thread wakes
/// where none is needed), and an h2 connection would hand every request and
/// every response between two threads.
pub struct Upstreams {
    limits: UpstreamLimits,
    shards: Box<[Shard]>,
}

#[derive(Default)]
struct Shard {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, crate::mux::Conn>>,
}

impl Upstreams {
    /// An empty pool for `threads` serving threads.
    pub fn new(limits: UpstreamLimits, threads: usize) -> Self {
        Upstreams {
            limits,
            shards: (0..threads.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// The limits it was made with.
    pub fn limits(&self) -> &UpstreamLimits {
        &self.limits
    }

    /// The calling serving thread's shard (the first off the serving threads).
    fn shard(&self) -> &Shard {
        let i = crate::workers::index().unwrap_or(0) % self.shards.len();
        &self.shards[i]
    }

    /// A connection to `addr`: a pooled one if any is alive, else a new one;
    /// a new hyper one for an `upgrade`. Returns whether it was reused (a
    /// reused one may have been closed by the peer in the meantime; the caller
    /// retries such a send).
    pub async fn get(
        &self,
        addr: SocketAddr,
        proto: Proto,
        upgrade: bool,
    ) -> Result<(Sender, bool), ConnectError> {
        match proto {
            Proto::H1 if !upgrade => {
                if let Some(c) = self.take_idle(addr) {
                    return Ok((Sender::H1(c), true));
                }
                let io = dial(addr, self.limits.connect_timeout, None).await?;
                metrics::counter!("skein_proxy_upstream_connects_total", "proto" => "h1")
                    .increment(1);
                Ok((Sender::H1(crate::h1::Conn::new(io)), false))
            }
            Proto::H1 => {
                let io = self.connect(addr).await?;
                let (sender, conn) = http1::handshake(io).await?;
                // A combinator, not an `async move` block: the block would keep
                // `conn` and the future made of it, twice the connection's size
                // for every pooled connection.
                tokio::spawn(futures_util::FutureExt::map(conn.with_upgrades(), |r| {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upstream connection ended");
                    }
                }));
                metrics::counter!("skein_proxy_upstream_connects_total", "proto" => "h1-upgrade")
                    .increment(1);
                Ok((Sender::Upgrade(sender), false))
            }
            Proto::H2c => {
                let existing = {
                    let m = self.shard().h2.lock().unwrap_or_else(|e| e.into_inner());
                    m.get(&addr).filter(|s| !s.is_closed()).cloned()
                };
                if let Some(s) = existing {
                    return Ok((Sender::H2(s), true));
                }
                let congestion = self.limits.multiplexed_congestion;
                let io = dial(addr, self.limits.connect_timeout, congestion).await?;
                let sender = crate::mux::Conn::handshake(io, self.limits.h2_keepalive).await?;
                metrics::counter!("skein_proxy_upstream_connects_total", "proto" => "h2c")
                    .increment(1);
                self.shard()
                    .h2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(addr, sender.clone());
                Ok((Sender::H2(sender), false))
            }
        }
    }

    /// Forgets connections to addresses no longer in `live` (machines that
    /// left the catalog), so the pool does not grow with machine churn.
    pub fn retain(&self, live: &std::collections::HashSet<SocketAddr>) {
        for shard in &self.shards {
            shard
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|a, _| live.contains(a));
            shard
                .h2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|a, _| live.contains(a));
        }
    }

    /// Drops the pooled connections to addresses no route leads to any more.
    pub fn forget(&self, gone: &[SocketAddr]) {
        if gone.is_empty() {
            return;
        }
        for shard in &self.shards {
            let mut idle = shard.idle.lock().unwrap_or_else(|e| e.into_inner());
            for a in gone {
                idle.remove(a);
            }
            drop(idle);
            let mut h2 = shard.h2.lock().unwrap_or_else(|e| e.into_inner());
            for a in gone {
                h2.remove(a);
            }
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<crate::h1::Conn> {
        let mut m = self.shard().idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = m.get_mut(&addr)?;
        while let Some(mut i) = list.pop() {
            if i.since.elapsed() < self.limits.idle_timeout && i.conn.alive() {
                i.conn.reused = true;
                return Some(i.conn);
            }
        }
        None
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, ConnectError> {
        Ok(TokioIo::new(
            dial(addr, self.limits.connect_timeout, None).await?,
        ))
    }

    /// Keeps an HTTP/1.1 connection whose last response has been read to its
    /// end for the next request to `addr`.
    pub(crate) fn push_idle(&self, addr: SocketAddr, conn: crate::h1::Conn) {
        let mut m = self.shard().idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = m.entry(addr).or_default();
        // Stale entries are dropped when taken; the bound keeps the list short.
        if list.len() < self.limits.max_idle_per_backend {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Runs `f` on serving thread `i` and waits for its answer.
    fn on<T: Send + 'static>(
        w: &crate::Workers,
        i: usize,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        w.handles()[i].spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().unwrap()
    }

    #[test]
    fn a_pooled_connection_is_reused_only_by_the_thread_that_made_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // keep every accepted connection open
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for c in listener.incoming().flatten() {
                open.push(c);
            }
        });
        let w = crate::Workers::start(2, "skein-pool-test").unwrap();
        let pool = std::sync::Arc::new(Upstreams::new(
            UpstreamLimits {
                connect_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
                max_idle_per_backend: 8,
                h2_keepalive: crate::mux::Keepalive::default(),
                multiplexed_congestion: None,
            },
            2,
        ));
        let get = |i: usize| {
            let pool = pool.clone();
            on(&w, i, async move {
                match pool.get(addr, Proto::H1, false).await.unwrap() {
                    (Sender::H1(c), reused) => {
                        let port = c.io.local_addr().unwrap().port();
                        pool.push_idle(addr, c);
                        (port, reused)
                    }
                    _ => unreachable!("an HTTP/1.1 sender"),
                }
            })
        };
        let (port0, reused) = get(0);
        assert!(!reused, "the first is new");
        let (port1, reused) = get(1);
        assert!(!reused, "thread 1 does not take thread 0's connection");
        assert_ne!(port0, port1);
        assert_eq!(get(0), (port0, true), "thread 0 reuses its own");
        assert_eq!(get(1), (port1, true), "and thread 1 its own");
    }
}
