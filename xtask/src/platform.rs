//! `cargo xtask bench platform`: skein, nginx and HAProxy side by side under
//! the same platform-shaped load from `skein-bench` (benches/scenarios/*.toml):
//! 1,000 apps' hostnames behind one address, Zipf popularity, kept, new and
//! resumed TLS, h1 and h2. Each proxy runs alone on core 0 (PROXY_CPUS) with
//! one worker; the backend (nginx, 1 KiB body) and the load generator share
//! core 1 (LOAD_CPUS). The report (JSON, HTML with charts, history of earlier
//! runs) goes to target/bench-report/. `SKEIN_APPS=one` gives skein one app
//! with every hostname (one upstream pool, as the peers have) instead of
//! 1,000 apps with a machine each; `SCENARIOS="keepalive h2"` picks scenarios;
//! `REPEAT=3` runs each three times, interleaved, and reports the median run;
//! `SKEIN_PROXY="<key> = <value>"` adds settings to skein's `[proxy]`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{apt_ensure, root, run};

/// Hostnames served: h0.bench.test .. h999.bench.test, one app each.
const APPS: usize = 1000;

/// Children killed when the bench ends, however it ends.
pub struct Kids(pub Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16, what: &str, log: &Path) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{what} did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// skein's catalog: 1,000 apps with a machine each (all the same backend),
/// or with `one_app` one app with every hostname and one machine (the shape
/// nginx and HAProxy are given: one upstream, one connection pool).
fn catalog(cert: &str, key: &str, one_app: bool) -> String {
    let mut s = String::from(
        "regions = [{ code = \"ams\" }]\nhosts = [{ id = \"0:2\", name = \"local\", region = \"ams\", underlay = \"127.0.0.1\" }]\nnetworks = [{ id = \"18\", name = \"bench\" }]\n",
    );
    if one_app {
        let names: Vec<String> = (0..APPS).map(|i| format!("\"h{i}.bench.test\"")).collect();
        s.push_str(&format!(
            "\n[[apps]]\nname = \"app\"\nnetwork = \"bench\"\nhostnames = [{}]\n[[apps.services]]\ninternal_port = 8080\nconcurrency = {{ type = \"requests\", soft_limit = 10000, hard_limit = 20000 }}\nports = [{{ port = 443, handlers = [\"tls\", \"http\"] }}]\n[[machines]]\nid = \"m\"\napp = \"app\"\nregion = \"ams\"\nhost = \"0:2\"\nstate = \"started\"\nendpoint = \"127.0.0.1:8080\"\n",
            names.join(", ")
        ));
    }
    for i in (0..APPS).filter(|_| !one_app) {
        s.push_str(&format!(
            "\n[[apps]]\nname = \"app{i}\"\nnetwork = \"bench\"\nhostnames = [\"h{i}.bench.test\"]\n[[apps.services]]\ninternal_port = 8080\nconcurrency = {{ type = \"requests\", soft_limit = 10000, hard_limit = 20000 }}\nports = [{{ port = 443, handlers = [\"tls\", \"http\"] }}]\n[[machines]]\nid = \"m{i}\"\napp = \"app{i}\"\nregion = \"ams\"\nhost = \"0:2\"\nstate = \"started\"\nendpoint = \"127.0.0.1:8080\"\n"
        ));
    }
    s.push_str(&format!(
        "\n[[certificates]]\nname = \"wildcard\"\nchain_pem = \"\"\"{cert}\"\"\"\nkey_pem = \"\"\"{key}\"\"\"\n"
    ));
    s
}

const SKEIN: &str = r#"[host]
region = "ams"
[admin]
listen = "127.0.0.1:9912"
[state]
dir = "state"
[catalog]
file = "catalog.toml"
[log]
level = "warn"
[proxy]
enabled = true
threads = 1
max_connections = 20000
keepalive_timeout = "120s"  # as nginx's and HAProxy's here
listeners = [{ bind = "127.0.0.1:9443", port = 443 }]
"#;

pub fn backend_conf(d: &Path, listen: &str) -> String {
    let body = "x".repeat(1024);
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/backend.pid;\nerror_log {d}/backend.err warn;\nevents {{ worker_connections 16384; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n  keepalive_requests 10000000; keepalive_timeout 120s;\n  server {{ listen {listen} backlog=4096; location / {{ default_type text/plain; return 200 \"{body}\"; }} }}\n}}\n",
        d = d.display()
    )
}

fn nginx_conf(d: &Path) -> String {
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\nevents {{ worker_connections 16384; multi_accept on; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n  tcp_nodelay on; keepalive_timeout 120s; keepalive_requests 10000000;\n  ssl_protocols TLSv1.3; ssl_ecdh_curve X25519:prime256v1;\n  ssl_session_cache shared:SSL:50m; ssl_session_tickets on;\n  upstream backend {{ server 127.0.0.1:8080; keepalive 1024; keepalive_requests 10000000; keepalive_timeout 120s; }}\n  server {{\n    listen 127.0.0.1:9444 ssl http2 backlog=4096;\n    server_name *.bench.test;\n    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; }}\n  }}\n}}\n",
        d = d.display()
    )
}

fn haproxy_conf(d: &Path) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 9000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n  timeout http-keep-alive 120s\n  http-reuse always\nfrontend fe\n  bind 127.0.0.1:9445 ssl crt {d}/haproxy.pem alpn h2,http/1.1 curves X25519:P-256 backlog 4096\n  default_backend be\nbackend be\n  server s1 127.0.0.1:8080\n",
        d = d.display()
    )
}

/// Runs the bench.
pub fn bench_platform() -> anyhow::Result<()> {
    apt_ensure(&["nginx-light", "haproxy", "openssl"])?;
    crate::build_release()?;
    let proxy_cpus = std::env::var("PROXY_CPUS").unwrap_or_else(|_| "0".into());
    let load_cpus = std::env::var("LOAD_CPUS").unwrap_or_else(|_| "1".into());
    let work = root().join("target/bench/platform");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("tmp"))?;
    let (cert, key) = crate::self_signed(&work, "bench.test", "DNS:*.bench.test,DNS:bench.test")?;
    std::fs::write(work.join("haproxy.pem"), format!("{cert}{key}"))?;
    let one_app = std::env::var("SKEIN_APPS").is_ok_and(|v| v == "one");
    std::fs::write(work.join("catalog.toml"), catalog(&cert, &key, one_app))?;
    // `SKEIN_PROXY="rest_after = '0s'"`: extra `[proxy]` settings, to compare.
    let extra = std::env::var("SKEIN_PROXY").unwrap_or_default();
    std::fs::write(work.join("skein.toml"), format!("{SKEIN}{extra}\n"))?;
    std::fs::write(
        work.join("backend.conf"),
        backend_conf(&work, "127.0.0.1:8080"),
    )?;
    std::fs::write(work.join("nginx.conf"), nginx_conf(&work))?;
    std::fs::write(work.join("haproxy.cfg"), haproxy_conf(&work))?;

    let spawn = |cpus: &str, args: &[&str], log: &str| -> anyhow::Result<Child> {
        Command::new("taskset")
            .args(["-c", cpus])
            .args(args)
            .current_dir(&work)
            .stdout(std::fs::File::create(work.join(log))?)
            .stderr(std::fs::File::create(work.join(log))?)
            .spawn()
            .with_context(|| format!("starting {}", args[0]))
    };
    let w = work.display().to_string();
    let mut kids = Kids(Vec::new());
    kids.0.push(spawn(
        &load_cpus,
        &[
            "nginx",
            "-p",
            &w,
            "-c",
            &format!("{w}/backend.conf"),
            "-e",
            &format!("{w}/backend.err"),
        ],
        "backend.log",
    )?);
    wait_port(8080, "the backend", &work.join("backend.err"))?;
    let skein_bin = crate::skein_bin().display().to_string();
    let skein = spawn(
        &proxy_cpus,
        &[&skein_bin, "run", "--config", "skein.toml"],
        "skein.log",
    )?;
    let skein_pid = skein.id();
    kids.0.push(skein);
    wait_port(9443, "skein", &work.join("skein.log"))?;
    let nginx = spawn(
        &proxy_cpus,
        &[
            "nginx",
            "-p",
            &w,
            "-c",
            &format!("{w}/nginx.conf"),
            "-e",
            &format!("{w}/nginx.err"),
        ],
        "nginx.log",
    )?;
    let nginx_pid = nginx.id();
    kids.0.push(nginx);
    wait_port(9444, "nginx", &work.join("nginx.err"))?;
    let haproxy = spawn(
        &proxy_cpus,
        &["haproxy", "-db", "-f", &format!("{w}/haproxy.cfg")],
        "haproxy.log",
    )?;
    let haproxy_pid = haproxy.id();
    kids.0.push(haproxy);
    wait_port(9445, "haproxy", &work.join("haproxy.log"))?;

    let scenarios: Vec<String> = match std::env::var("SCENARIOS") {
        Ok(list) => list
            .split_whitespace()
            .map(|s| format!("benches/scenarios/{s}.toml"))
            .collect(),
        // idle first: its memory figure is RSS growth, which memory an
        // earlier scenario left allocated (and reusable) would hide.
        Err(_) => [
            "idle",
            "keepalive",
            "h2",
            "h2-rate",
            "new-tls",
            "platform-mix",
            "platform-mix-churn",
        ]
        .iter()
        .map(|s| format!("benches/scenarios/{s}.toml"))
        .collect(),
    };
    let bench_bin = root()
        .join("target/release/skein-bench")
        .display()
        .to_string();
    let label = std::env::var("LABEL").unwrap_or_else(|_| {
        let rev = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        format!("commit {rev}; proxies on cpu {proxy_cpus}, load and backend on cpu {load_cpus}")
    });
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &load_cpus, &bench_bin, "run"])
        .args(&scenarios)
        .arg("--target")
        .arg(format!("skein=https://127.0.0.1:9443@{skein_pid}"))
        .arg("--target")
        .arg(format!("nginx=https://127.0.0.1:9444@{nginx_pid}"))
        .arg("--target")
        .arg(format!("haproxy=https://127.0.0.1:9445@{haproxy_pid}"))
        .arg("--admin")
        .arg("skein=127.0.0.1:9912")
        .arg("--admin-token-file")
        .arg(work.join("state/admin.token"))
        .args(["--out", "target/bench-report", "--label", &label])
        .args([
            "--repeat",
            &std::env::var("REPEAT").unwrap_or_else(|_| "1".into()),
        ]);
    let r = run(&mut cmd);
    drop(kids);
    r
}

/// The pods' lookup mix (`benches/scenarios/dns-pods.toml`) against skein's
/// DNS (already running, `skein_pid`, on 127.0.0.1:5403) and NSD serving the
/// same zone (the one `dns-peers.sh` wrote into `peers`), each on core 0,
/// skein-bench on core 1; into the same report as the HTTP scenarios.
pub fn dns_pods(peers: &Path, skein_pid: u32) -> anyhow::Result<()> {
    let server_cpus = std::env::var("SERVER_CPUS").unwrap_or_else(|_| "0".into());
    let load_cpus = std::env::var("LOAD_CPUS").unwrap_or_else(|_| "1".into());
    let d = peers.join("nsd-pods");
    std::fs::create_dir_all(&d)?;
    std::fs::copy(
        peers.join("cluster.local.zone"),
        d.join("cluster.local.zone"),
    )
    .context("the zone dns-peers.sh writes")?;
    let dd = d.display();
    std::fs::write(
        d.join("nsd.conf"),
        format!(
            "server:\n  ip-address: 127.0.0.1@5411\n  server-count: 1\n  username: \"\"\n  zonesdir: \"{dd}\"\n  database: \"\"\n  pidfile: \"{dd}/nsd.pid\"\n  xfrdfile: \"{dd}/xfrd.state\"\n  zonelistfile: \"{dd}/zone.list\"\n  logfile: \"{dd}/nsd.log\"\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\nzone:\n  name: cluster.local\n  zonefile: cluster.local.zone\n"
        ),
    )?;
    let nsd = Command::new("taskset")
        .args(["-c", &server_cpus, "nsd", "-d", "-c"])
        .arg(d.join("nsd.conf"))
        .stdout(std::fs::File::create(d.join("nsd.out"))?)
        .stderr(std::fs::File::create(d.join("nsd.err"))?)
        .spawn()
        .context("starting nsd")?;
    let nsd_pid = nsd.id();
    let _kids = Kids(vec![nsd]);
    std::thread::sleep(Duration::from_secs(1));
    // NSD forks its server and xfrd processes (they keep its command line):
    // measure them all.
    let pgrep = Command::new("pgrep")
        .arg("-f")
        .arg(d.join("nsd.conf"))
        .output()
        .context("pgrep")?;
    let mut pids: Vec<String> = String::from_utf8_lossy(&pgrep.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if pids.is_empty() {
        pids.push(nsd_pid.to_string());
    }
    let bench_bin = root()
        .join("target/release/skein-bench")
        .display()
        .to_string();
    run(Command::new("taskset")
        .args([
            "-c",
            &load_cpus,
            &bench_bin,
            "run",
            "benches/scenarios/dns-pods.toml",
        ])
        .arg("--target")
        .arg(format!("skein=udp://127.0.0.1:5403@{skein_pid}"))
        .arg("--target")
        .arg(format!("nsd=udp://127.0.0.1:5411@{}", pids.join(",")))
        .args(["--out", "target/bench-report", "--label", "dns-pods"]))
}
