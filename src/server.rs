//! Serving an axum router on a TCP or unix listener with explicit limits
//! (connections, header bytes, header and request timeouts) and a graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use skein_catalog::sources::client::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

/// Bounds of one HTTP listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Most bytes of request headers.
    pub max_header_bytes: usize,
    /// Time a client has to send its headers.
    pub header_timeout: Duration,
    /// Time one request may take.
    pub request_timeout: Duration,
}

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds `endpoint`. A unix socket replaces a stale file and is made 0600.
    pub async fn bind(endpoint: &Endpoint) -> std::io::Result<Listener> {
        match endpoint {
            Endpoint::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            Endpoint::Unix(p) => {
                use std::os::unix::fs::PermissionsExt as _;
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                match std::fs::remove_file(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let l = UnixListener::bind(p)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(l))
            }
        }
    }

    /// What it is bound to.
    pub fn local(&self) -> Endpoint {
        match self {
            Listener::Tcp(l) => {
                Endpoint::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default())
            }
            Listener::Unix(l) => Endpoint::Unix(
                l.local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
                    .unwrap_or_default(),
            ),
        }
    }
}

/// Answers 503 when a request runs past `limit`.
async fn request_deadline(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
    }
}

/// Serves `router` until `shutdown` resolves, then stops accepting and waits up
/// to `drain` for open connections to finish their requests.
pub async fn serve(
    name: &'static str,
    listener: Listener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let deadline = limits.request_timeout;
    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        request_deadline(deadline, req, next)
    }));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = accept(&listener) => r,
        };
        let (io, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                metrics::counter!("skein_listener_accept_errors_total", "listener" => name)
                    .increment(1);
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics::counter!("skein_listener_connections_total", "listener" => name).increment(1);
        let svc = TowerToHyperService::new(router.clone());
        let span = tracing::debug_span!("conn", listener = name, peer = %peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(
            async move {
                let gauge =
                    metrics::gauge!("skein_listener_connections_active", "listener" => name);
                gauge.increment(1.0);
                let conn = builder.serve_connection_with_upgrades(io, svc);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                gauge.decrement(1.0);
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracing::info!(listener = name, "stopped accepting; draining");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain deadline passed; closing what is left"
        );
    }
}

type BoxIo = TokioIo<Box<dyn IoStream>>;

trait IoStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> IoStream for T {}

async fn accept(l: &Listener) -> std::io::Result<(BoxIo, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((TokioIo::new(Box::new(s)), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((TokioIo::new(Box::new(s)), "unix".to_string()))
        }
    }
}
