//! A client of the admin API over TCP or a unix socket (used by `skein catalog`
//! and by tests).

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the admin API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// `unix:/path` or `host:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Endpoint::Unix(PathBuf::from(p))),
            Some(_) => Err("unix: needs a path".into()),
            None if s.contains(':') => Ok(Endpoint::Tcp(s.to_string())),
            None => Err(format!("{s:?} is neither host:port nor unix:/path")),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect or the exchange broke.
    #[error("admin API at {0}: {1}")]
    Io(String, String),
    /// The body was not JSON.
    #[error("admin API answered {0} with a body that is not JSON: {1}")]
    NotJson(StatusCode, String),
}

/// A client of one admin API.
#[derive(Clone, Debug)]
pub struct Client {
    endpoint: Endpoint,
    token: String,
    timeout: Duration,
}

impl Client {
    /// A client with a 10 s timeout per request.
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> Self {
        Client {
            endpoint,
            token: token.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Where it sends requests.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one request; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let io_err =
            |e: &dyn std::fmt::Display| ClientError::Io(self.endpoint.to_string(), e.to_string());
        let fut = async {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "skein-admin")
                .header("authorization", format!("Bearer {}", self.token))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| io_err(&e))?;
            let resp = match &self.endpoint {
                Endpoint::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect(a)
                        .await
                        .map_err(|e| io_err(&e))?;
                    send(TokioIo::new(s), req).await
                }
                Endpoint::Unix(p) => {
                    let s = tokio::net::UnixStream::connect(p)
                        .await
                        .map_err(|e| io_err(&e))?;
                    send(TokioIo::new(s), req).await
                }
            }
            .map_err(|e| io_err(&e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| io_err(&e))?
                .to_bytes();
            let v = serde_json::from_slice(&bytes).map_err(|_| {
                ClientError::NotJson(status, String::from_utf8_lossy(&bytes).into_owned())
            })?;
            Ok((status, v))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| io_err(&"timed out"))?
    }
}

async fn send<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    tx.send_request(req).await
}
