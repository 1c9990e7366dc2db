//! `cargo xtask <verb>`: the project's verbs that need more than cargo.
//!
//! - `test`: install what is missing (idempotently), then `cargo fmt --check`,
//!   `cargo clippy --all-targets -- -D warnings` and every test. This is the
//!   command README and CI run.
//! - `ensure`: only the installs.
//! - `build-ebpf`: build the eBPF programs with nightly; binaries built afterwards
//!   embed them (without it they build, and the mesh says how to get them).
//! - `lint`: only fmt and clippy.
//! - `pgo`: skein built with profile-guided optimization (trained on the
//!   proxy harness; `target/pgo/use/release/skein`). `PGO=1` before any bench
//!   verb makes the bench build and run it.
//! - `bench proxy`: skein's proxy against nginx and HAProxy on this machine, in
//!   one run, with the peer harness in `../shared/bench/proxy-peers.sh` (proxy on
//!   core 0, load on core 1). Environment knobs pass through (DURATION, REPEAT,
//!   SCENARIOS, IDLE_CONNS…); PROXY_HARNESS runs a modified copy of the harness
//!   instead (e.g. one that keeps h2load's per-request log), SKEIN_BIN another
//!   build of skein.
//! - `bench dns`: skein's DNS against NSD and Knot on the same 10,000-service
//!   zone with `../shared/bench/dns-peers.sh` (server on core 0, dnsperf on 1).

mod e2e;
mod platform;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages the tests and builds need.
/// - curl: the demo test runs the commands the demo prints.
/// - dnsutils: dig, a real DNS client the demo test runs.
/// - llvm-22-dev: bpf-linker links libLLVM 22 (the eBPF programs).
/// - iproute2, iputils-ping, tcpdump: the network-namespace tests build topologies,
///   ping across them and capture the underlay.
/// - bird2: the BGP speakers of the platform test (anycast announce/withdraw).
/// - nsd, pebble: the ACME tests' DNS server and certificate authority.
/// - wireguard-tools, wireguard-go: `wg show` against skein's device, and the
///   interoperability test's peer.
const APT_PACKAGES: &[&str] = &[
    "bird2",
    "curl",
    "dnsutils",
    "etcd-client",
    "etcd-server",
    "iproute2",
    "iputils-ping",
    "llvm-22-dev",
    "nsd",
    "pebble",
    "tcpdump",
    "wireguard-go",
    "wireguard-tools",
];

fn main() -> anyhow::Result<()> {
    let verb = std::env::args().nth(1).unwrap_or_default();
    match verb.as_str() {
        "test" => {
            ensure()?;
            build_ebpf()?;
            lint()?;
            test()
        }
        "ensure" => ensure(),
        "build-ebpf" => build_ebpf(),
        "pgo" => {
            let bin = pgo()?;
            println!("{}", bin.display());
            Ok(())
        }
        "lint" => lint(),
        "bench" => match std::env::args().nth(2).as_deref() {
            Some("proxy") => bench_proxy(),
            Some("dns") => bench_dns(),
            Some("platform") => platform::bench_platform(),
            Some("e2e") => e2e::bench_e2e(),
            Some("mesh") => bench_mesh(),
            _ => bail!("usage: cargo xtask bench <proxy|dns|platform|e2e|mesh>"),
        },
        _ => bail!(
            "usage: cargo xtask <test|ensure|build-ebpf|lint|pgo|bench proxy|bench dns|bench platform|bench e2e|bench mesh>"
        ),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(root());
    }
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs the Debian packages of `pkgs` that are missing (as root; otherwise
/// says which to install).
fn apt_ensure(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root (apt-get install {})",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs what is missing; does nothing where all is there.
fn ensure() -> anyhow::Result<()> {
    apt_ensure(APT_PACKAGES)?;
    // The eBPF programs build with the nightly toolchain, its rust-src and
    // bpf-linker linked against Debian's LLVM 22.
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !quiet_ok(Command::new("bpf-linker").arg("--version")) {
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// Builds the eBPF programs (`ebpf/programs`, nightly, `bpfel-unknown-none`); the
/// `skein-ebpf` build script embeds the object in every binary built afterwards.
fn build_ebpf() -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .current_dir(root().join("ebpf/programs"))
        // a stable toolchain's environment must not leak into the nightly build
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))
}

fn lint() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    if !is_root() {
        eprintln!(
            "xtask: not root: tests that need root or network namespaces will say `skipped: needs root`"
        );
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--workspace"])
        .current_dir(root())
        // build_ebpf ran: a root test that cannot load the programs is a failure
        .env("SKEIN_REQUIRE_EBPF", "1")
        .env("SKEIN_REQUIRE_ETCD", "1")
        .env("SKEIN_REQUIRE_PEERS", "1")
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("running cargo test")?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(what))
                    .and_then(|n| n.trim().rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    // One closing line for the whole workspace (the last crate's doc tests would
    // otherwise close the log with "0 passed").
    println!("workspace: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// The catalog the proxy benchmark serves: one app, one machine (the harness's
/// backend on 127.0.0.1:8080), the harness's kind of certificate.
fn bench_catalog(cert: &str, key: &str) -> String {
    format!(
        r#"regions = [{{ code = "ams" }}]
hosts = [{{ id = "0:2", name = "local", region = "ams", underlay = "127.0.0.1" }}]
networks = [{{ id = "18", name = "bench" }}]

[[apps]]
name = "bench"
network = "bench"
hostnames = ["bench.local"]
[[apps.services]]
internal_port = 8080
concurrency = {{ type = "requests", soft_limit = 10000, hard_limit = 20000 }}
ports = [{{ port = 443, handlers = ["tls", "http"] }}]

[[machines]]
id = "backend"
app = "bench"
region = "ams"
host = "0:2"
state = "started"
endpoint = "127.0.0.1:8080"

[[certificates]]
name = "bench"
chain_pem = """{cert}"""
key_pem = """{key}"""
"#
    )
}

const BENCH_CONFIG: &str = r#"[host]
region = "ams"
[admin]
listen = "127.0.0.1:9911"
[state]
dir = "state"
[catalog]
file = "catalog.toml"
[log]
level = "warn"
[proxy]
enabled = true
default_hostname = "bench.local"
max_connections = 20000
keepalive_timeout = "120s"  # as nginx's and HAProxy's here
listeners = [{ bind = "127.0.0.1:9443", port = 443 }]
"#;

/// A self-signed ECDSA P-256 certificate for `cn` with `sans` (openssl
/// syntax), written as `cert.pem` and `key.pem` in `dir`; returns both PEMs.
fn self_signed(dir: &std::path::Path, cn: &str, sans: &str) -> anyhow::Result<(String, String)> {
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "7",
        ])
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName={sans}"),
        ])
        .current_dir(dir))?;
    Ok((
        std::fs::read_to_string(dir.join("cert.pem"))?,
        std::fs::read_to_string(dir.join("key.pem"))?,
    ))
}

/// The profile-guided build, once made (`PGO=1`).
static PGO_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The skein the benches run: `SKEIN_BIN` (another build, an older commit),
/// the profile-guided build with `PGO=1`, else the release build.
fn skein_bin() -> PathBuf {
    std::env::var_os("SKEIN_BIN")
        .map(PathBuf::from)
        .or_else(|| PGO_BIN.get().cloned())
        .unwrap_or_else(|| root().join("target/release/skein"))
}

/// The release build of skein and the load generator; with `PGO=1`, also
/// skein's profile-guided build, which the benches then run.
fn build_release() -> anyhow::Result<()> {
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "skein",
        "-p",
        "skein-bench",
        "--bins",
    ]))?;
    if std::env::var("PGO").is_ok_and(|v| v == "1") && PGO_BIN.get().is_none() {
        let bin = pgo()?;
        let _ = PGO_BIN.set(bin);
    }
    Ok(())
}

/// A profile-guided build of skein (`cargo xtask pgo`, or `PGO=1` before a
/// bench verb): an instrumented build serves the proxy harness's keep-alive,
/// h2 and new-connection scenarios (against nginx from Debian as the
/// backend), LLVM's `llvm-profdata` of rustc's own LLVM version merges what
/// it counted, and skein is built again with that profile, in
/// `target/pgo/use`. Returns the binary.
fn pgo() -> anyhow::Result<PathBuf> {
    let dir = root().join("target/pgo");
    let raw = dir.join("raw");
    let merged = dir.join("skein.profdata");
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    let major = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next().map(str::to_string))
        .context("rustc -vV names no LLVM version")?;
    let profdata = format!("llvm-profdata-{major}");
    if !quiet_ok(Command::new(&profdata).arg("--version")) {
        apt_ensure(&[&format!("llvm-{major}")])?;
    }
    let build = |target: &str, flags: String| {
        run(Command::new("cargo")
            .args(["build", "--release", "-p", "skein"])
            .env("CARGO_TARGET_DIR", dir.join(target))
            .env("RUSTFLAGS", flags))
    };
    build("gen", format!("-Cprofile-generate={}", raw.display()))?;
    // What the build scripts counted is not skein's.
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    proxy_harness(
        &dir.join("gen/release/skein"),
        &[
            ("PROXIES", "nginx"),
            ("SCENARIOS", "ka h2 close"),
            ("IDLE_CONNS", "0"),
            ("DIRECT", "0"),
            ("REPEAT", "1"),
            ("DURATION", "5"),
        ],
    )?;
    run(Command::new(&profdata)
        .args(["merge", "-o"])
        .arg(&merged)
        .arg(&raw))?;
    build("use", format!("-Cprofile-use={}", merged.display()))?;
    Ok(dir.join("use/release/skein"))
}

/// iperf3 between machines on two hosts: skein's device with and without the
/// eBPF programs, and wireguard-go (benches/mesh.sh; root).
fn bench_mesh() -> anyhow::Result<()> {
    apt_ensure(&["iperf3", "wireguard-go", "wireguard-tools"])?;
    build_ebpf()?;
    build_release()?;
    let secs = std::env::var("MESH_SECONDS").unwrap_or_else(|_| "10".into());
    run(Command::new("bash")
        .arg(root().join("benches/mesh.sh"))
        .arg(secs)
        .env("SKEIN_BENCH", root().join("target/release/skein-bench"))
        .env(
            "REPEAT",
            std::env::var("REPEAT").unwrap_or_else(|_| "3".into()),
        )
        .current_dir(root()))
}

fn bench_proxy() -> anyhow::Result<()> {
    build_release()?;
    proxy_harness(&skein_bin(), &[])
}

/// Runs the proxy harness against `bin` (with `env` set for the harness).
fn proxy_harness(bin: &std::path::Path, env: &[(&str, &str)]) -> anyhow::Result<()> {
    // PROXY_HARNESS: a modified copy of the harness, for experiments.
    let harness = std::env::var_os("PROXY_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/bench/proxy-peers.sh"));
    if !harness.exists() {
        bail!(
            "{} is missing (the shared folder sits beside the repository)",
            harness.display()
        );
    }
    apt_ensure(&["nginx-light", "haproxy", "wrk", "nghttp2-client", "openssl"])?;
    let work = root().join("target/bench/proxy");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (cert, key) = self_signed(&work, "bench.local", "DNS:bench.local,DNS:localhost")?;
    std::fs::write(work.join("catalog.toml"), bench_catalog(&cert, &key))?;
    std::fs::write(work.join("skein.toml"), BENCH_CONFIG)?;
    with_skein(bin, &work, "PROXY_CPUS", 9911, 100, &|_| {
        let mut cmd = Command::new("bash");
        cmd.arg(&harness).arg("skein=127.0.0.1:9443");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    })
}

/// The 10,000 Services the DNS peers serve as a zone file (dns-peers.sh):
/// `svc-N.ns-(N%50).svc.cluster.local` AAAA `fdaa:0:1:0:1::<hex N>` with a named
/// port `http` (80/tcp).
fn bench_dns_catalog() -> String {
    let mut s = String::from(
        "regions = [{ code = \"ams\" }]\nnetworks = [{ id = \"0:1\", name = \"bench\" }]\n",
    );
    for n in 0..10_000u32 {
        s.push_str(&format!(
            "[[k8s_services]]\nname = \"svc-{n}\"\nnamespace = \"ns-{}\"\nnetwork = \"bench\"\ncluster_ip = \"fdaa:0:1:0:1::{n:x}\"\nports = [{{ name = \"http\", port = 80 }}]\n",
            n % 50
        ));
    }
    s
}

fn bench_dns() -> anyhow::Result<()> {
    let harness = root().join("../shared/bench/dns-peers.sh");
    if !harness.exists() {
        bail!(
            "{} is missing (the shared folder sits beside the repository)",
            harness.display()
        );
    }
    build_release()?;
    let work = root().join("target/bench/dns");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("catalog.toml"), bench_dns_catalog())?;
    std::fs::write(
        work.join("skein.toml"),
        "[admin]\nlisten = \"127.0.0.1:9912\"\n[state]\ndir = \"state\"\n[catalog]\nfile = \"catalog.toml\"\n[log]\nlevel = \"warn\"\n[dns]\nenabled = true\nthreads = 1\ndefault_network = \"bench\"\nlisten = [\"127.0.0.1:5403\"]\n",
    )?;
    let peers = work.join("peers");
    with_skein(&skein_bin(), &work, "SERVER_CPUS", 9912, 300, &|pid| {
        // The table goes to the screen and, through skein-bench, into the
        // reports (dnsperf-peak: qps, mean latency, core-0 us/query).
        let table = work.join("dnsperf.txt");
        run(Command::new("bash")
            .args([
                "-o",
                "pipefail",
                "-c",
                "bash \"$0\" skein=127.0.0.1:5403 | tee \"$1\"",
            ])
            .arg(&harness)
            .arg(&table)
            .env("WORK", &peers))?;
        run(Command::new(root().join("target/release/skein-bench"))
            .args(["import-dnsperf", "--scenario", "dnsperf-peak"])
            .arg(&table)
            .args(["--out", "target/bench-report", "--label"])
            .arg("dnsperf against skein, NSD and Knot (server on core 0), 10,000-Service zone")
            .current_dir(root()))?;
        dns_latency("skein", "127.0.0.1", "5403", &peers.join("queries.txt"))?;
        platform::dns_pods(&peers, pid)
    })
}

/// Latency at half the peak rate, the issue's goal (p99 under 1 ms): an
/// unthrottled dnsperf run finds the peak, then `dnsperf -Q <peak/2> -v`
/// reports every response's latency. dnsperf on core 1, as in the harness.
fn dns_latency(
    name: &str,
    host: &str,
    port: &str,
    queries: &std::path::Path,
) -> anyhow::Result<()> {
    let secs = std::env::var("DURATION").unwrap_or_else(|_| "10".into());
    let dnsperf = |extra: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("taskset")
            .args(["-c", "1", "dnsperf", "-s", host, "-p", port, "-l", &secs])
            .args(["-c", "8", "-q", "64", "-T", "1", "-t", "1", "-d"])
            .arg(queries)
            .args(extra)
            .output()
            .context("running dnsperf")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let peak: f64 = dnsperf(&[])?
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .context("dnsperf printed no rate")?;
    let half = format!("{}", (peak / 2.0) as u64);
    let out = dnsperf(&["-Q", &half, "-v"])?;
    let (mut ms, mut lost) = (Vec::new(), 0usize);
    for l in out.lines().filter_map(|l| l.strip_prefix("> ")) {
        match l
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(s) if !l.starts_with("T ") => ms.push(s * 1000.0),
            _ => lost += 1,
        }
    }
    if ms.is_empty() {
        bail!("dnsperf -v reported no latencies");
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "\n{name} at half its peak ({half} of {peak:.0} qps): {} answers, {lost} lost, latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
    Ok(())
}

/// Runs `skein run --config skein.toml` in `work`, pinned to the cores named by
/// the environment variable `cpus_var` (default core 0); waits for its admin
/// `/readyz` on `admin_port` (up to `tries` x 100 ms); then runs `bench` (the
/// peer harness and any phase of its own), and stops skein whatever happened.
fn with_skein(
    bin: &std::path::Path,
    work: &std::path::Path,
    cpus_var: &str,
    admin_port: u16,
    tries: usize,
    bench: &dyn Fn(u32) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let cpus = std::env::var(cpus_var).unwrap_or_else(|_| "0".into());
    let mut skein = Command::new("taskset")
        .args(["-c", &cpus])
        .arg(bin)
        .args(["run", "--config", "skein.toml"])
        .current_dir(work)
        .stderr(std::fs::File::create(work.join("skein.log"))?)
        .spawn()
        .context("starting skein")?;
    let readyz = format!("http://127.0.0.1:{admin_port}/readyz");
    let ready = (0..tries).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        quiet_ok(Command::new("curl").args(["-sf", &readyz]))
    });
    let result = if ready {
        bench(skein.id())
    } else {
        Err(anyhow::anyhow!(
            "skein did not become ready; see {}",
            work.join("skein.log").display()
        ))
    };
    stop_gracefully(&mut skein, std::time::Duration::from_secs(15));
    result
}

/// SIGTERM, then SIGKILL if it has not exited in `grace`: skein drains and
/// returns from `main` (an instrumented build writes its profile then).
fn stop_gracefully(child: &mut std::process::Child, grace: std::time::Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
