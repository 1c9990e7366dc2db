//! `skein demo`: the embedded default. With no config and no root it brings up a
//! single-host setup on loopback: a self-signed certificate, three small real
//! HTTP backends as machines of app `demo` in two regions, the catalog and the
//! admin API, and prints what to try. Everything it made is removed on exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::any;
use skein_catalog::Document;
use skein_catalog::error::parse_toml;

use crate::config::{Config, LogFormat};
use crate::daemon;
use crate::server::{self, Limits, Listener};

/// Options of `skein demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Admin listener (falls back to a free port when this one is taken).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: String,
    /// Keep state here instead of a fresh directory that is removed on exit.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// 1: everything in this process on loopback. 3 (root): three hosts in
    /// network namespaces, joined by WireGuard, with anycast edges, the
    /// backhaul, eBPF guards and Kubernetes Services.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub hosts: u8,
    /// With --hosts 3: start no web server in the machines, leaving their port
    /// 8080 to another (`cargo xtask bench e2e` puts nginx there).
    #[arg(long, requires = "hosts")]
    pub external_backends: bool,
}

/// One demo machine.
struct Backend {
    id: &'static str,
    region: &'static str,
    host: &'static str,
    addr: SocketAddr,
}

/// Serves `hello from <machine> in <region>` on a free loopback port.
async fn spawn_backend(
    id: &'static str,
    region: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = Listener::bind(&"127.0.0.1:0".parse().map_err(anyhow::Error::msg)?).await?;
    let addr = match listener.local() {
        skein_catalog::sources::client::Endpoint::Tcp(a) => a.parse()?,
        other => anyhow::bail!("backend bound to {other}"),
    };
    let app = Router::new().fallback(any(hello)).with_state((id, region));
    let limits = Limits {
        max_connections: 1024,
        max_header_bytes: 64 << 10,
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
    };
    let mut stop = stop;
    tokio::spawn(server::serve(
        "demo-backend",
        listener,
        app,
        limits,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
        Duration::from_secs(5),
    ));
    Ok(addr)
}

async fn hello(
    State((id, region)): State<(&'static str, &'static str)>,
    headers: HeaderMap,
) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("-");
    format!("hello from machine {id} in {region} (app demo, host header {host})\n")
}

/// The demo's catalog: regions ams and iad, one host in each, network `demo`,
/// app `demo` with TLS and HTTP ports, three machines, a Kubernetes Service.
fn document(backends: &[Backend], cert_pem: &str, key_pem: &str) -> anyhow::Result<Document> {
    let mut text = String::from(
        r#"
[[regions]]
code = "ams"
name = "Amsterdam"
rtt_ms = { iad = 80 }

[[regions]]
code = "iad"
name = "Ashburn"

[[hosts]]
id = "0:2"
name = "local"
region = "ams"
underlay = "127.0.0.1"

[[hosts]]
id = "0:3"
name = "local-iad"
region = "iad"
underlay = "127.0.0.1"

[[networks]]
id = "0:18"
name = "demo"
org = "demo-org"

[[apps]]
name = "demo"
network = "demo"
hostnames = ["demo.skein.local"]
flycast = "fdaa:0:18:0:1::1"
tls = { allow_self_signed = true }

[[apps.services]]
internal_port = 8080
concurrency = { type = "requests", soft_limit = 20, hard_limit = 25 }
ports = [
  { port = 8443, handlers = ["tls", "http"] },
  { port = 8080, handlers = ["http"] },
]
checks = [{ type = "http", path = "/", interval = "5s", timeout = "1s" }]

[[k8s_services]]
name = "demo"
namespace = "default"
network = "demo"
cluster_ip = "fdaa:0:18:0:1::2"
ports = [{ name = "http", port = 80, target_port = 8080 }]
"#,
    );
    for b in backends {
        text.push_str(&format!(
            "\n[[machines]]\nid = \"{}\"\napp = \"demo\"\nregion = \"{}\"\nhost = \"{}\"\nstate = \"started\"\nhealth = \"passing\"\nendpoint = \"{}\"\nmetadata = {{ pod = \"demo-{}\", namespace = \"default\" }}\n",
            b.id, b.region, b.host, b.addr, b.id
        ));
    }
    text.push_str("\n[[certificates]]\nname = \"demo\"\n");
    text.push_str(&format!(
        "chain_pem = '''\n{cert_pem}'''\nkey_pem = '''\n{key_pem}'''\n"
    ));
    let mut doc: Document = parse_toml(&text).map_err(|e| anyhow::anyhow!("demo catalog: {e}"))?;
    doc.k8s_services[0].endpoints = backends
        .iter()
        .map(|b| skein_catalog::model::K8sEndpoint {
            machine: b.id.to_string(),
            hostname: None,
            ready: true,
        })
        .collect();
    Ok(doc)
}

/// A demo CA and a certificate it signs for `demo.skein.local` and
/// `*.demo.skein.local`. The CA goes to `demo-ca.pem` for `curl --cacert`.
fn demo_pki(dir: &Path) -> anyhow::Result<(String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "skein demo CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![
        "demo.skein.local".to_string(),
        "*.demo.skein.local".to_string(),
    ])?
    .signed_by(&key, &ca)?;
    std::fs::write(dir.join("demo-ca.pem"), ca.pem())?;
    Ok((leaf.pem(), key.serialize_pem()))
}

/// `want` if it can be bound now, else a free port standing for `port`.
fn listener_for(want: &str, port: u16) -> anyhow::Result<skein_proxy::ListenerConfig> {
    let bind: std::net::SocketAddr = want.parse()?;
    Ok(if std::net::TcpListener::bind(bind).is_ok() {
        skein_proxy::ListenerConfig {
            bind,
            port: Some(port),
        }
    } else {
        skein_proxy::ListenerConfig {
            bind: std::net::SocketAddr::new(bind.ip(), 0),
            port: Some(port),
        }
    })
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    match args.hosts {
        1 => {}
        3 => return crate::demo_hosts::run(args.external_backends).await,
        n => anyhow::bail!("--hosts {n}: the demo runs 1 host or 3"),
    }
    let (dir, temporary) = match &args.state_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("skein-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&args, &dir).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(args: &DemoArgs, dir: &Path) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut backends = Vec::new();
    for (id, region, host) in [
        ("ams1", "ams", "0:2"),
        ("ams2", "ams", "0:2"),
        ("iad1", "iad", "0:3"),
    ] {
        let addr = spawn_backend(id, region, stop_rx.clone()).await?;
        backends.push(Backend {
            id,
            region,
            host,
            addr,
        });
    }
    let (cert_pem, key_pem) = demo_pki(dir)?;
    let doc = document(&backends, &cert_pem, &key_pem)?;

    let admin = if std::net::TcpListener::bind(&args.admin).is_ok() {
        args.admin.clone()
    } else {
        "127.0.0.1:0".to_string()
    };
    let mut cfg = Config::default();
    cfg.admin.listen = admin;
    cfg.state.dir = dir.to_path_buf();
    cfg.shutdown.drain_timeout = Duration::from_secs(5);
    cfg.log.format = LogFormat::Human;
    cfg.host.region = "ams".into();
    cfg.proxy.enabled = true;
    cfg.proxy.listeners = vec![
        listener_for("127.0.0.1:8443", 8443)?,
        listener_for("127.0.0.1:8080", 8080)?,
    ];
    cfg.dns.enabled = true;
    cfg.dns.default_network = Some("demo".into());
    let dns_free = std::net::UdpSocket::bind("127.0.0.1:5353").is_ok()
        && std::net::TcpListener::bind("127.0.0.1:5353").is_ok();
    cfg.dns.listen = vec![
        if dns_free {
            "127.0.0.1:5353"
        } else {
            "127.0.0.1:0"
        }
        .parse()?,
    ];
    let running = daemon::start(cfg, Some(doc)).await?;

    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "skein".into());
    let token_file = dir.join("admin.token");
    let admin = running.admin.to_string();
    let auth = format!(
        "-H \"Authorization: Bearer $(cat {})\"",
        token_file.display()
    );
    println!(
        "\nskein demo is up: catalog version {}, admin API on {admin}\n",
        running.store.snapshot().version
    );
    let (tls_port, http_port) = (running.proxy[0].port(), running.proxy[1].port());
    let ca = dir.join("demo-ca.pem");
    let tls = format!(
        "--cacert {} --resolve demo.skein.local:{tls_port}:127.0.0.1 https://demo.skein.local:{tls_port}/",
        ca.display()
    );
    println!("Try:\n");
    println!("  # through the proxy: TLS by SNI, the closest machine (this edge is in ams)");
    println!("  curl -s {tls}");
    println!("  curl -s --http2 -o /dev/null -w '%{{http_version}} %{{http_code}}\\n' {tls}");
    println!("  # ask for machines closest to another region");
    println!("  curl -s -H 'skein-prefer-region: iad' {tls}");
    println!("  # plain HTTP on the app's other port");
    println!("  curl -s -H 'Host: demo.skein.local' http://127.0.0.1:{http_port}/");
    println!("  # an unknown app: the proxy's own answer, with its reason in skein-error");
    println!("  curl -s -H 'Host: nope.skein.local' http://127.0.0.1:{http_port}/\n");
    let dns_port = running.dns.first().map(|a| a.port()).unwrap_or(5353);
    println!("  # DNS from the same catalog: machines, regions, Kubernetes Services");
    println!("  dig @127.0.0.1 -p {dns_port} +short demo.internal AAAA");
    println!("  dig @127.0.0.1 -p {dns_port} +short iad.demo.internal AAAA");
    println!("  dig @127.0.0.1 -p {dns_port} +short _http._tcp.demo.default.svc.cluster.local SRV");
    println!("  dig @127.0.0.1 -p {dns_port} +short vms.demo.internal TXT\n");
    println!("  # the machines of app demo, from the catalog (admin API, bearer token)");
    println!("  curl -s {auth} http://{admin}/v1/machines\n");
    println!("  # the same through skein's own client");
    println!(
        "  {exe} catalog --admin {admin} --token-file {} get apps demo\n",
        token_file.display()
    );
    println!("  # each machine, directly");
    for b in &backends {
        println!("  curl -s http://{}/", b.addr);
    }
    println!("\n  # add a machine live, then see the catalog's version move");
    println!(
        "  curl -s -X PUT {auth} -d '{{\"id\":\"iad2\",\"app\":\"demo\",\"region\":\"iad\",\"host\":\"0:3\",\"state\":\"started\",\"endpoint\":\"{}\"}}' http://{admin}/v1/machines/iad2",
        backends[2].addr
    );
    println!("  curl -s http://{admin}/readyz\n");
    println!("  # an invalid change is refused with the field's path");
    println!(
        "  curl -s -X PUT {auth} -d '{{\"name\":\"broken\",\"network\":\"demo\",\"services\":[{{\"internal_port\":8080,\"concurrency\":{{\"soft_limit\":20,\"hard_limit\":5}}}}]}}' http://{admin}/v1/apps/broken\n"
    );
    println!("  # metrics");
    println!("  curl -s http://{admin}/metrics | grep skein_catalog");
    println!(
        "  curl -s http://{admin}/metrics | grep -E 'skein_proxy_app_request(s_total|_duration_seconds_count)\\{{app=\"demo\"'"
    );
    println!("  curl -s http://{admin}/metrics | grep skein_proxy_machine_\n");
    println!("Ctrl-C stops the demo and removes what it made.");

    let out = running.until_signal().await;
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    out
}
