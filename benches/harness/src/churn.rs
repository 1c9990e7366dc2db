//! Catalog churn while the load runs: machines added and removed and a
//! certificate rotated through skein's admin API at a set rate, so a run
//! shows what live route and certificate changes cost the traffic (compare
//! with the same scenario without churn).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// `[churn]` in a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Catalog changes per second.
    pub rate: f64,
    /// Apps whose machines come and go: `app0 .. app<apps-1>`.
    #[serde(default = "default_apps")]
    pub apps: usize,
    /// Every this-many changes, the certificate of `h0.<domain>` is replaced
    /// by a new one (0: never).
    #[serde(default = "default_cert_every")]
    pub cert_every: u64,
    /// The machines' backend (`ip:port`).
    #[serde(default = "default_backend")]
    pub backend: String,
}

fn default_apps() -> usize {
    100
}
fn default_cert_every() -> u64 {
    10
}
fn default_backend() -> String {
    "127.0.0.1:8080".into()
}

/// Where a target's catalog is changed.
#[derive(Clone, Debug)]
pub struct Admin {
    /// The admin listener.
    pub addr: SocketAddr,
    /// The bearer token.
    pub token: String,
}

/// What the churn did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnResult {
    /// Changes the catalog took.
    pub ok: u64,
    /// Changes refused or failed.
    pub failed: u64,
    /// Certificates rotated.
    pub certificates: u64,
}

async fn call(admin: &Admin, method: &str, path: &str, body: Option<String>) -> Result<(), String> {
    let tcp = TcpStream::connect(admin.addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "skein-admin")
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", admin.token),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body.to_bytes())
        ))
    }
}

fn certificate(host: &str) -> Result<String, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .map_err(|e| e.to_string())?
        .self_signed(&key)
        .map_err(|e| e.to_string())?;
    serde_json::to_string(&serde_json::json!({
        "name": "churn-cert",
        "hostnames": [host],
        "chain_pem": cert.pem(),
        "key_pem": key.serialize_pem(),
    }))
    .map_err(|e| e.to_string())
}

/// Changes the catalog at `churn.rate` until `end`: each tick adds machine
/// `churn<n>` to app `app<n % apps>` and removes `churn<n-1>`; every
/// `cert_every` ticks replaces the certificate of `host0`.
pub async fn run(churn: Churn, admin: Admin, host0: String, end: Instant) -> ChurnResult {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut certs = 0;
    let gap = Duration::from_secs_f64(1.0 / churn.rate.max(0.001));
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        let due = start + gap.mul_f64(n as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let app = format!("app{}", n as usize % churn.apps.max(1));
        let m = serde_json::json!({
            "id": format!("churn{n}"),
            "app": app,
            "region": "ams",
            "host": "0:2",
            "state": "started",
            "endpoint": churn.backend,
        });
        let mut results = vec![
            call(
                &admin,
                "PUT",
                &format!("/v1/machines/churn{n}"),
                Some(m.to_string()),
            )
            .await,
        ];
        if n > 0 {
            results.push(
                call(
                    &admin,
                    "DELETE",
                    &format!("/v1/machines/churn{}", n - 1),
                    None,
                )
                .await,
            );
        }
        if churn.cert_every > 0 && n.is_multiple_of(churn.cert_every) {
            let r = match certificate(&host0) {
                Ok(body) => call(&admin, "PUT", "/v1/certificates/churn-cert", Some(body)).await,
                Err(e) => Err(e),
            };
            if r.is_ok() {
                certs += 1;
            }
            results.push(r);
        }
        for r in results {
            match r {
                Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("skein-bench: churn: {e}");
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        n += 1;
    }
    // Leave the catalog as it was.
    if n > 0 {
        let _ = call(
            &admin,
            "DELETE",
            &format!("/v1/machines/churn{}", n - 1),
            None,
        )
        .await;
    }
    let _ = call(&admin, "DELETE", "/v1/certificates/churn-cert", None).await;
    ChurnResult {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        certificates: certs,
    }
}
