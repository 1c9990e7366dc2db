//! Active health checks: each service's TCP and HTTP checks from the catalog,
//! run against every machine the proxy routes to. A failing check takes the
//! machine out of routing until a check passes again. (Passive ejection after a
//! refused connect lives in the request path.)
//!
//! At scale a worker checks its own machines and publishes their health in the
//! catalog (`machine.health`), which the route tables already honour; these
//! checks make a single proxy correct on its own too. Machines reached through
//! the backhaul are not checked from here (their host does; see
//! [`crate::backhaul`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use skein_catalog::model::{Check, CheckKind};
use tokio::net::TcpStream;

use crate::Proxy;
use crate::load::MachineLoad;

/// How often the scheduler looks for due checks.
const TICK: Duration = Duration::from_millis(100);

/// Runs one check; true if it passed.
pub async fn run_check(check: &Check, addr: SocketAddr, host: Option<&str>) -> bool {
    let addr = SocketAddr::new(addr.ip(), check.port.unwrap_or(addr.port()));
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        if check.kind == CheckKind::Tcp {
            return Some(true);
        }
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::get(check.path.as_deref().unwrap_or("/"))
            .header("host", host.unwrap_or("localhost"))
            .header("user-agent", "skein-health-check")
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = tx.send_request(req).await.ok()?;
        Some(resp.status().is_success() || resp.status().is_redirection())
    };
    matches!(
        tokio::time::timeout(check.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Schedules every check of the current table until `stop`.
pub async fn run(proxy: Arc<Proxy>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // When each (machine, port, check) is next due.
    let mut due: HashMap<(Arc<str>, u16, usize), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = crate::listener::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let table = proxy.routes.load_full();
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for app in table.apps() {
            for svc in &app.services {
                for (ci, check) in svc.checks.iter().enumerate() {
                    // A machine behind another host's proxy is that host's to
                    // check (it publishes the health in the catalog); the
                    // mesh does not let an edge reach it directly.
                    for b in svc.backends.iter().filter(|b| b.via.is_none()) {
                        let key = (b.machine.clone(), svc.internal_port, ci);
                        seen.insert(key.clone());
                        let next = due.entry(key).or_insert(now);
                        if *next > now {
                            continue;
                        }
                        *next = now + check.interval;
                        let (check, addr, load) = (check.clone(), b.addr, b.load.clone());
                        let (host, machine) = (svc.check_host.clone(), b.machine.clone());
                        tokio::spawn(async move {
                            let passed = run_check(&check, addr, host.as_deref()).await;
                            record(&load, &machine, passed);
                        });
                    }
                }
            }
        }
        due.retain(|k, _| seen.contains(k));
    }
}

fn record(load: &MachineLoad, machine: &str, passed: bool) {
    let result = if passed { "pass" } else { "fail" };
    metrics::counter!("skein_proxy_health_checks_total", "result" => result).increment(1);
    if load.set_check_result(passed) {
        if passed {
            tracing::info!(
                machine,
                "health check passes again; machine back in routing"
            );
        } else {
            tracing::warn!(machine, "health check failed; machine out of routing");
        }
    }
}
