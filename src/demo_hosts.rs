//! `skein demo --hosts 3` (root): the whole platform on one machine. Three hosts
//! as network namespaces on an underlay bridge, each running `skein run` with
//! the mesh (skein's WireGuard device, the eBPF guard and rewrite), the proxy
//! (steering, backhaul) and DNS; two edges serve one anycast address, a worker
//! runs machines; machines of two networks are namespaces behind veth pairs; a
//! client namespace routes the anycast address to an edge. Prints what to try;
//! on Ctrl-C stops the daemons and removes every namespace, interface and file
//! it made.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Namespace names start with this; a previous demo's leftovers (after a
/// crash) are recognised by it and removed first.
const PREFIX: &str = "skd-";
/// The anycast address both edges serve.
pub const ANYCAST: &str = "2001:db8:a::10";
/// The ClusterIP of Service `default/web`.
pub const CLUSTER_IP: &str = "fdaa:0:18:0:1::10";

/// A host of the demo.
struct Host {
    name: &'static str,
    id: &'static str,
    region: &'static str,
    role: &'static str,
    n: u8,
    edge: bool,
}

const HOSTS: [Host; 3] = [
    Host {
        name: "e1",
        id: "0:2",
        region: "ams",
        role: "edge",
        n: 1,
        edge: true,
    },
    Host {
        name: "e2",
        id: "0:3",
        region: "iad",
        role: "edge_worker",
        n: 2,
        edge: true,
    },
    Host {
        name: "w1",
        id: "0:4",
        region: "ams",
        role: "worker",
        n: 3,
        edge: false,
    },
];

/// A machine of the demo: (id, app, host index, interface, address, serves).
const MACHINES: [(&str, &str, usize, &str, &str, bool); 4] = [
    ("webams", "web", 2, "vw1", "fdaa:0:18:0:4:0:1:0", true),
    ("webiad", "web", 1, "ve2", "fdaa:0:18:0:3:0:1:0", true),
    ("poda", "pods", 2, "vw2", "fdaa:0:18:0:4:0:2:0", false),
    ("podb", "others", 2, "vw3", "fdaa:0:19:0:4:0:3:0", false),
];

fn ns(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Runs `ip` with `args`; fails with its stderr.
fn ip(args: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {args}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Removes every namespace this demo may have made (its daemons die with
/// their namespaces' interfaces; the processes are stopped before).
fn remove_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> anyhow::Result<()> {
    ip(&format!(
        "link add {a_if} netns {} type veth peer name {b_if} netns {}",
        ns(a),
        ns(b)
    ))?;
    ip(&format!("-n {} link set {a_if} up", ns(a)))?;
    ip(&format!("-n {} link set {b_if} up", ns(b)))
}

fn build_topology() -> anyhow::Result<()> {
    for n in ["ul", "client"]
        .into_iter()
        .chain(HOSTS.iter().map(|h| h.name))
        .chain(MACHINES.iter().map(|m| m.0))
    {
        ip(&format!("netns add {}", ns(n)))?;
        ip(&format!("-n {} link set lo up", ns(n)))?;
    }
    ip(&format!("-n {} link add br0 type bridge", ns("ul")))?;
    ip(&format!("-n {} link set br0 up", ns("ul")))?;
    for (name, n) in HOSTS
        .iter()
        .map(|h| (h.name, h.n))
        .chain([("client", 100u8)])
    {
        let port = format!("p{n}");
        veth(name, "ul0", "ul", &port)?;
        ip(&format!("-n {} link set {port} master br0", ns("ul")))?;
        ip(&format!(
            "-n {} addr add fd00:99::{n}/64 dev ul0 nodad",
            ns(name)
        ))?;
    }
    ip(&format!(
        "-n {} -6 route replace {ANYCAST}/128 via fd00:99::1",
        ns("client")
    ))?;
    for (id, _, host, iface, addr, _) in MACHINES {
        veth(HOSTS[host].name, iface, id, "eth0")?;
        ip(&format!("-n {} addr add {addr}/128 dev eth0 nodad", ns(id)))?;
        ip(&format!(
            "-n {} route add fdaa::/16 via fe80::1 dev eth0",
            ns(id)
        ))?;
    }
    Ok(())
}

fn catalog(keys: &[String]) -> String {
    let mut s = String::from(
        r#"regions = [{ code = "ams", name = "Amsterdam", rtt_ms = { iad = 80 } }, { code = "iad", name = "Ashburn" }]
networks = [{ id = "0:18", name = "alpha", org = "acme" }, { id = "0:19", name = "beta", org = "globex" }]
"#,
    );
    for (h, k) in HOSTS.iter().zip(keys) {
        s.push_str(&format!(
            "\n[[hosts]]\nid = \"{}\"\nname = \"{}\"\nregion = \"{}\"\nrole = \"{}\"\nunderlay = \"fd00:99::{}\"\nwireguard = {{ public_key = \"{k}\" }}\n",
            h.id, h.name, h.region, h.role, h.n
        ));
    }
    s.push_str(
        r#"
[[apps]]
name = "web"
network = "alpha"
hostnames = ["web.example.com"]
tls = { allow_self_signed = true }
[[apps.services]]
internal_port = 8080
concurrency = { type = "requests", soft_limit = 20, hard_limit = 25 }
ports = [{ port = 443, handlers = ["tls", "http"] }, { port = 80, handlers = ["http"] }]

[[apps]]
name = "pods"
network = "alpha"

[[apps]]
name = "others"
network = "beta"
"#,
    );
    for (id, app, host, iface, addr, _) in MACHINES {
        let h = &HOSTS[host];
        s.push_str(&format!(
            "\n[[machines]]\nid = \"{id}\"\napp = \"{app}\"\nregion = \"{}\"\nhost = \"{}\"\nstate = \"started\"\naddress = \"{addr}\"\ninterface = \"{iface}\"\n",
            h.region, h.id
        ));
    }
    s.push_str(&format!(
        r#"
[[k8s_services]]
name = "web"
namespace = "default"
network = "alpha"
cluster_ip = "{CLUSTER_IP}"
ports = [{{ name = "http", port = 80, target_port = 8080 }}]
endpoints = [{{ machine = "webams" }}, {{ machine = "webiad" }}]
"#
    ));
    s
}

fn config(h: &Host, dir: &Path, catalog: &Path) -> String {
    let anycast = if h.edge {
        format!("anycast = [\"{ANYCAST}/128\"]")
    } else {
        String::new()
    };
    format!(
        r#"[host]
region = "{region}"
name = "{name}"

[admin]
listen = "127.0.0.1:9901"

[state]
dir = "{dir}/state"

[catalog]
file = "{catalog}"
poll_interval = "200ms"

[proxy]
enabled = true
# three hosts share this machine's cores: one serving thread each
threads = 1
# the backhaul's h2 connection carries every client's requests: BBR (this
# machine's default, without the fq qdisc) would pace it with a timer per
# burst, which costs a VM exit; reno is built into every kernel
multiplexed_congestion = "reno"
[proxy.backhaul]
enabled = true
[proxy.steer]
flycast = true
{anycast}

[dns]
enabled = true
listen = ["[fdaa::3]:53"]
threads = 1

[mesh]
enabled = true
uapi_dir = "{dir}/wg"

[log]
format = "json"
level = "info"
"#,
        region = h.region,
        name = h.name,
        dir = dir.display(),
        catalog = catalog.display(),
    )
}

/// A machine's web server: `hello from machine <id> in <region>` on
/// `[addr]:8080`, in the machine's namespace, until `up` turns false.
fn serve(
    id: &'static str,
    region: &'static str,
    addr: &str,
    up: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let at: SocketAddr = format!("[{addr}]:8080").parse()?;
    let path = format!("/run/netns/{}", ns(id));
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name(format!("demo-{id}"))
        .spawn(move || {
            let bound = (|| -> anyhow::Result<TcpListener> {
                let f = std::fs::File::open(&path)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let l = TcpListener::bind(at)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match bound {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => return drop(tx.send(Err(e))),
            };
            while up.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        std::thread::spawn(move || answer(c, id, region));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("the machine's server did not start")?
}

fn answer(mut c: std::net::TcpStream, id: &str, region: &str) {
    use std::io::{Read as _, Write as _};
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65536 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&got);
    let client = head
        .lines()
        .find_map(|l| l.strip_prefix("skein-client-ip: "))
        .unwrap_or("-")
        .to_string();
    let body = format!("hello from machine {id} in {region} (client {client})\n");
    let _ = c.write_all(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// The running demo: daemons, servers, files. Dropping it takes everything down.
struct Demo {
    dir: PathBuf,
    daemons: Vec<(String, Child)>,
    up: Arc<AtomicBool>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.up.store(false, Ordering::SeqCst);
        for (_, c) in &self.daemons {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in &mut self.daemons {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("{name} did not stop; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        remove_namespaces();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the three-host demo until SIGINT/SIGTERM; `external_backends`: the
/// machines' port 8080 is left to someone else.
pub async fn run(external_backends: bool) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("skein demo --hosts 3 builds network namespaces, WireGuard and eBPF: run it as root");
    }
    if !skein_ebpf::embedded() {
        bail!(
            "this skein binary was built without its eBPF programs: run `cargo xtask build-ebpf`, then build skein again"
        );
    }
    remove_namespaces();
    let dir = std::env::temp_dir().join(format!("skein-demo-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut demo = Demo {
        dir: dir.clone(),
        daemons: Vec::new(),
        up: Arc::new(AtomicBool::new(true)),
    };
    build_topology()?;
    let exe = std::env::current_exe().context("finding the skein binary")?;
    let cat = dir.join("catalog.toml");
    let mut keys = Vec::new();
    for h in &HOSTS {
        let hd = dir.join(h.name);
        std::fs::create_dir_all(hd.join("state"))?;
        std::fs::write(hd.join("skein.toml"), config(h, &hd, &cat))?;
        let key = skein_mesh::key::load_or_create(&hd.join("state/wireguard.key"))?;
        keys.push(key.public().to_base64());
    }
    std::fs::write(&cat, catalog(&keys))?;
    for (id, _, host, _, addr, serves) in MACHINES {
        if serves && !external_backends {
            serve(id, HOSTS[host].region, addr, demo.up.clone())?;
        }
    }
    for h in &HOSTS {
        let hd = dir.join(h.name);
        let log = std::fs::File::create(hd.join("daemon.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(h.name)])
            .arg(&exe)
            .args(["run", "--config"])
            .arg(hd.join("skein.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting host {}", h.name))?;
        demo.daemons.push((h.name.to_string(), child));
    }
    // Up when every daemon serves (or one exits: say why).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, h) in HOSTS.iter().enumerate() {
        let log = dir.join(h.name).join("daemon.log");
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("mesh up") && text.contains("proxy backhaul listening") {
                break;
            }
            if let Ok(Some(st)) = demo.daemons[i].1.try_wait() {
                bail!("host {} exited with {st}:\n{text}", h.name);
            }
            if Instant::now() > deadline {
                bail!("host {} did not come up:\n{text}", h.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    print_what_to_try(&dir);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping: daemons, machines, namespaces");
    drop(demo);
    Ok(())
}

fn print_what_to_try(dir: &Path) {
    let c = ns("client");
    let web = format!("--resolve web.example.com:443:[{ANYCAST}] https://web.example.com/");
    println!(
        "\nskein demo --hosts 3 is up: e1 (edge, ams), e2 (edge and worker, iad), w1 (worker, ams)"
    );
    println!("on an underlay bridge, joined by WireGuard; machines webams (w1), webiad (e2),");
    println!(
        "poda (w1, network alpha) and podb (w1, network beta). Files: {}\n",
        dir.display()
    );
    println!("Try:\n");
    println!("  # a client reaches the app at the anycast address through e1 (ams): the ams");
    println!("  # machine, across the mesh through w1's proxy");
    println!("  ip netns exec {c} curl -sk {web}");
    println!("  # the client's route to the other edge (what BGP would do): the iad machine");
    println!("  ip -n {c} -6 route replace {ANYCAST}/128 via fd00:99::2");
    println!("  ip netns exec {c} curl -sk {web}");
    println!("  ip -n {c} -6 route replace {ANYCAST}/128 via fd00:99::1\n");
    println!("  # a pod resolves a Kubernetes Service at fdaa::3 and connects to its ClusterIP");
    println!(
        "  ip netns exec {} dig +short @fdaa::3 web.default.svc.cluster.local AAAA",
        ns("poda")
    );
    println!(
        "  ip netns exec {} curl -s http://[{CLUSTER_IP}]/",
        ns("poda")
    );
    println!("  # a machine of another network: no such name, and the eBPF guard drops it");
    println!(
        "  ip netns exec {} dig +short @fdaa::3 web.default.svc.cluster.local AAAA",
        ns("podb")
    );
    println!(
        "  ip netns exec {} curl -s --max-time 2 http://[{CLUSTER_IP}]/\n",
        ns("podb")
    );
    println!("  # the mesh and the eBPF programs, on the worker");
    println!("  ip -n {} -6 route show", ns("w1"));
    println!(
        "  ip netns exec {} curl -s http://127.0.0.1:9901/metrics | grep -E 'skein_ebpf_(packets|steered)_total'\n",
        ns("w1")
    );
    println!("Ctrl-C stops the demo and removes what it made.");
}
