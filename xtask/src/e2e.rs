//! `cargo xtask bench e2e` (root): the platform end to end. `skein demo --hosts 3`
//! builds three hosts in network namespaces; nginx (1 KiB body) is the one web
//! machine, `webams` on the worker `w1` (the iad machine is stopped, so every
//! request goes there). A load-generating machine `loadgen` on `e2` (network
//! alpha, and a leg on the underlay) sends the same load two ways, in one run,
//! interleaved:
//!
//! - `proxied`: HTTPS to the anycast address, steered to e2's proxy, which
//!   backhauls over the mesh (h2) to w1's proxy, which delivers to the machine;
//! - `direct`: plain HTTP straight to the machine's 6PN address over the same
//!   mesh (e2 to w1), the eBPF guard and rewrite on the way.
//!
//! - `proxied-http`: the same path as `proxied` over plain HTTP (the app's
//!   port 80): the two proxies without TLS at the edge.
//!
//! - `nginx-pair` (and `nginx-pair-http`): what people would build instead,
//!   in the same run over the same mesh: nginx on e2 (TLS, h2 to the client)
//!   proxying over HTTP/1.1 keep-alive to nginx on w1 (on w1's own 6PN
//!   address), which proxies to the machine. One worker process each, as the
//!   demo's daemons have one serving thread.
//!
//! - `l4-pair` and `relay-pair`: the floor. Two proxies that do no HTTP work
//!   at all, on the same hosts, addresses and mesh: HAProxy in TCP mode (a
//!   production L4 relay) and socat (a process per connection copying bytes).
//!   What they add to the direct path is what any pair of user-space proxies
//!   pays here before parsing a byte: two more TCP connections, two more
//!   processes to wake per direction.
//!
//! So the difference is the two proxies (and TLS at the edge). The report goes
//! to target/bench-report/ with the others; `REPEAT=3` repeats.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{apt_ensure, root, run};

const MACHINE: &str = "fdaa:0:18:0:4:0:1:0";
const LOADGEN: &str = "fdaa:0:18:0:3:0:9:0";
const ANYCAST: &str = "2001:db8:a::10";
/// e2's address on the underlay (where the anycast route points).
const E2_UNDERLAY: &str = "fd00:99::2";
/// w1's own 6PN address (`SixPn::host_address` of host 0:4), where its
/// backhaul listener is: the nginx pair's worker listens there too.
const W1_HOST: &str = "fdaa::4:0:0:1";

/// nginx as the edge (on e2: TLS and plain HTTP on the underlay) and as the
/// worker (on w1's 6PN address), keep-alive upstreams, one worker process.
fn pair_conf(d: &std::path::Path, edge: bool) -> String {
    let d = d.display();
    let server = if edge {
        format!(
            "  upstream next {{ server [{W1_HOST}]:8181; keepalive 64; }}\n  server {{\n    listen [{E2_UNDERLAY}]:8443 ssl http2 backlog=4096;\n    listen [{E2_UNDERLAY}]:8080 backlog=4096;\n    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n    ssl_protocols TLSv1.3; ssl_session_cache shared:SSL:10m;\n    location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; }}\n  }}\n"
        )
    } else {
        format!(
            "  upstream next {{ server [{MACHINE}]:8080; keepalive 64; }}\n  server {{\n    listen [{W1_HOST}]:8181 backlog=4096;\n    location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n"
        )
    };
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\nevents {{ worker_connections 16384; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n  tcp_nodelay on; keepalive_timeout 120s; keepalive_requests 10000000;\n{server}}}\n"
    )
}

/// HAProxy as an L4 relay (`mode tcp`, one thread) from `listen` to `server`.
fn l4_conf(listen: &str, server: &str) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\nlisten relay\n  bind {listen} backlog 4096\n  server s1 {server}\n"
    )
}

/// The floor's relays, each leg as (namespace, HAProxy config to write
/// first if any, command).
type Leg = (&'static str, Option<(PathBuf, String)>, Vec<String>);

fn floor_pairs(work: &std::path::Path) -> Vec<Leg> {
    let haproxy = |ns, name: &str, listen: String, server: String| -> Leg {
        let cfg = work.join(format!("{name}.cfg"));
        let cmd = vec![
            "haproxy".into(),
            "-db".into(),
            "-f".into(),
            cfg.display().to_string(),
        ];
        (ns, Some((cfg, l4_conf(&listen, &server))), cmd)
    };
    let socat = |ns, port: u16, at: &str, to: String| -> Leg {
        let cmd = vec![
            "socat".into(),
            format!("TCP6-LISTEN:{port},bind=[{at}],fork,reuseaddr,nodelay,backlog=4096"),
            format!("TCP6:{to},nodelay"),
        ];
        (ns, None, cmd)
    };
    vec![
        haproxy(
            "skd-e2",
            "l4-edge",
            format!("[{E2_UNDERLAY}]:7080"),
            format!("[{W1_HOST}]:7181"),
        ),
        haproxy(
            "skd-w1",
            "l4-worker",
            format!("[{W1_HOST}]:7181"),
            format!("[{MACHINE}]:8080"),
        ),
        socat("skd-e2", 7090, E2_UNDERLAY, format!("[{W1_HOST}]:7191")),
        socat("skd-w1", 7191, W1_HOST, format!("[{MACHINE}]:8080")),
    ]
}

/// The demo, stopped with SIGINT (so it removes its namespaces) however the
/// bench ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn ip(args: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// `args` to run in namespace `ns`, its output discarded.
fn quiet_in<S: AsRef<std::ffi::OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Runs `cmd` in namespace `ns`; true if it succeeded.
fn ok_in(ns: &str, cmd: &[&str]) -> bool {
    quiet_in(ns, cmd).status().is_ok_and(|s| s.success())
}

/// Starts `args` in namespace `ns` as a quiet child (its output discarded).
fn spawn_in<S: AsRef<std::ffi::OsStr>>(ns: &str, args: &[S]) -> anyhow::Result<Child> {
    let what = args
        .first()
        .map(|a| a.as_ref().to_string_lossy().into_owned());
    quiet_in(ns, args)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", what.unwrap_or_default()))
}

/// The demo catalog with the iad machine stopped and the load generator added.
fn bench_catalog(text: &str) -> String {
    let mut out = String::new();
    for (i, block) in text.split("\n[[machines]]").enumerate() {
        if i > 0 {
            out.push_str("\n[[machines]]");
        }
        if block.contains("id = \"webiad\"") {
            out.push_str(&block.replace("state = \"started\"", "state = \"stopped\""));
        } else {
            out.push_str(block);
        }
    }
    out.push_str(&format!(
        "\n[[machines]]\nid = \"loadgen\"\napp = \"pods\"\nregion = \"iad\"\nhost = \"0:3\"\nstate = \"started\"\naddress = \"{LOADGEN}\"\ninterface = \"vl9\"\n"
    ));
    out
}

fn wait(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out waiting for {what}")
}

pub fn bench_e2e() -> anyhow::Result<()> {
    apt_ensure(&["nginx-light", "haproxy", "socat"])?;
    crate::build_ebpf()?;
    crate::build_release()?;
    let work = root().join("target/bench/e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("tmp"))?;
    let skein = crate::skein_bin();
    let mut child = Command::new(&skein)
        .args(["demo", "--hosts", "3", "--external-backends"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting skein demo --hosts 3")?;
    let out = child.stdout.take().context("the demo's output")?;
    let demo = Demo(child);
    let mut dir: Option<PathBuf> = None;
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        if let Some(d) = line.split("Files: ").nth(1) {
            dir = Some(PathBuf::from(d.trim()));
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let dir = dir.context("the demo did not come up (run as root, with the eBPF programs)")?;
    let cat = dir.join("catalog.toml");
    let text = std::fs::read_to_string(&cat)?;
    std::fs::write(&cat, bench_catalog(&text))?;

    // The load generator: a machine on e2 with a leg on the underlay. Its
    // namespace has the demo's prefix, so the demo removes it too.
    ip("netns add skd-load")?;
    ip("-n skd-load link set lo up")?;
    ip("link add vl9 netns skd-e2 type veth peer name eth0 netns skd-load")?;
    ip("-n skd-e2 link set vl9 up")?;
    ip("-n skd-load link set eth0 up")?;
    ip(&format!(
        "-n skd-load addr add {LOADGEN}/128 dev eth0 nodad"
    ))?;
    ip("-n skd-load route add fdaa::/16 via fe80::1 dev eth0")?;
    ip("link add pl9 netns skd-ul type veth peer name ul0 netns skd-load")?;
    ip("-n skd-ul link set pl9 master br0")?;
    ip("-n skd-ul link set pl9 up")?;
    ip("-n skd-load link set ul0 up")?;
    ip("-n skd-load addr add fd00:99::109/64 dev ul0 nodad")?;
    ip(&format!(
        "-n skd-load -6 route add {ANYCAST}/128 via fd00:99::2"
    ))?;

    // nginx is the machine's web server.
    std::fs::write(
        work.join("backend.conf"),
        crate::platform::backend_conf(&work, &format!("[{MACHINE}]:8080")),
    )?;
    let w = work.display().to_string();
    let nginx = spawn_in(
        "skd-webams",
        &[
            "nginx".into(),
            "-p".into(),
            w.clone(),
            "-c".into(),
            format!("{w}/backend.conf"),
            "-e".into(),
            format!("{w}/backend.err"),
        ],
    )?;
    let mut kids = crate::platform::Kids(vec![nginx]);
    // The nginx pair, for comparison.
    for (ns, name, edge) in [
        ("skd-e2", "pair-edge", true),
        ("skd-w1", "pair-worker", false),
    ] {
        let d = work.join(name);
        std::fs::create_dir_all(d.join("tmp"))?;
        if edge {
            crate::self_signed(&d, "web.example.com", "DNS:web.example.com")?;
        }
        std::fs::write(d.join("nginx.conf"), pair_conf(&d, edge))?;
        let d = d.display();
        let args = [
            "nginx".into(),
            "-p".into(),
            d.to_string(),
            "-c".into(),
            format!("{d}/nginx.conf"),
            "-e".into(),
            format!("{d}/nginx.err"),
        ];
        kids.0.push(spawn_in(ns, &args)?);
    }

    // The floor: the L4 relay pairs.
    for (ns, conf, cmd) in floor_pairs(&work) {
        if let Some((path, text)) = conf {
            std::fs::write(path, text)?;
        }
        kids.0.push(spawn_in(ns, &cmd)?);
    }

    let direct = format!("http://[{MACHINE}]:8080/");
    wait(
        Duration::from_secs(30),
        "the load generator on the mesh",
        || ok_in("skd-load", &["curl", "-sf", "--max-time", "2", &direct]),
    )?;
    let proxied = [
        "curl",
        "-sfk",
        "--max-time",
        "2",
        "--resolve",
        &format!("web.example.com:443:[{ANYCAST}]"),
        "https://web.example.com/",
    ];
    wait(Duration::from_secs(30), "the proxied path", || {
        (0..5).all(|_| ok_in("skd-load", &proxied))
    })?;

    let pair = [
        "curl",
        "-sfk",
        "--max-time",
        "2",
        "--resolve",
        &format!("web.example.com:8443:[{E2_UNDERLAY}]"),
        "https://web.example.com:8443/",
    ];
    wait(Duration::from_secs(30), "the nginx pair", || {
        ok_in("skd-load", &pair)
    })?;
    for port in [7080, 7090] {
        let url = format!("http://[{E2_UNDERLAY}]:{port}/");
        wait(Duration::from_secs(30), "the L4 relay pairs", || {
            ok_in("skd-load", &["curl", "-sf", "--max-time", "2", &url])
        })?;
    }

    // HOLD=<seconds>: keep the topology up that long instead of loading it
    // (to measure by hand: perf, strace, tcpdump in the namespaces), then
    // tear it down.
    if let Some(secs) = std::env::var("HOLD").ok().and_then(|s| s.parse().ok()) {
        println!("holding the e2e topology for {secs} s (namespaces skd-*)");
        std::thread::sleep(Duration::from_secs(secs));
        drop(kids);
        drop(demo);
        return Ok(());
    }
    let label = std::env::var("LABEL").unwrap_or_else(|_| {
        "client -> e2 proxy -> mesh -> w1 proxy -> machine, against client -> mesh -> machine"
            .into()
    });
    let bench = root().join("target/release/skein-bench");
    let scenarios: Vec<String> = std::env::var("SCENARIOS")
        .unwrap_or_else(|_| "e2e e2e-rate".into())
        .split_whitespace()
        .map(|s| format!("benches/scenarios/{s}.toml"))
        .collect();
    let targets = [
        format!("proxied=https://[{ANYCAST}]:443"),
        // The same two proxies without TLS at the edge (the app's plain
        // HTTP port): what the proxies cost apart from TLS.
        format!("proxied-http=http://[{ANYCAST}]:80"),
        format!("nginx-pair=https://[{E2_UNDERLAY}]:8443"),
        format!("nginx-pair-http=http://[{E2_UNDERLAY}]:8080"),
        // The floor: relays that never parse HTTP.
        format!("l4-pair=http://[{E2_UNDERLAY}]:7080"),
        format!("relay-pair=http://[{E2_UNDERLAY}]:7090"),
        format!("direct=http://[{MACHINE}]:8080"),
    ];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", "skd-load"])
        .arg(&bench)
        .arg("run")
        .args(&scenarios);
    for t in &targets {
        cmd.arg("--target").arg(t);
    }
    let r = run(cmd
        .args(["--out", "target/bench-report", "--label", &label])
        // The goal's figure: what each path adds to the direct one's p99.
        .args(["--baseline", "direct"])
        .args([
            "--repeat",
            &std::env::var("REPEAT").unwrap_or_else(|_| "3".into()),
        ])
        .current_dir(root()));
    drop(kids);
    drop(demo);
    r
}
