//! The platform end to end: three hosts (network namespaces on an underlay
//! bridge), each running `skein run` with the mesh, the proxy and DNS. Two edges
//! (ams, edge only; iad, edge and worker) serve one anycast address; a worker
//! (ams) runs machines. Machines of two networks; a Kubernetes Service in one.
//!
//! A client outside reaches the app by name over TLS through either edge and
//! lands on the nearest machine (across the mesh, through the worker's proxy);
//! when the near machine stops, traffic moves to the far region with no failed
//! request; a pod resolves the Service at `fdaa::3` and connects through its
//! ClusterIP (flycast); a machine of the other network can neither resolve nor
//! reach it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use skein_testkit::{Netns, require_root, veth};

use crate::support::{Machine, machine, wait};

/// The anycast address both edges serve.
const ANYCAST: &str = "2001:db8:a::10";
/// App web's flycast address, which alpha shares with beta (`flycast_from`).
const WEB_FLYCAST: &str = "fdaa:0:18:0:1::20";
/// The ClusterIP of Service default/web: a flycast address of network alpha.
const CLUSTER_IP: &str = "fdaa:0:18:0:1::10";

struct Node {
    ns: Netns,
    dir: PathBuf,
    name: &'static str,
    region: &'static str,
    admin: u16,
    anycast: bool,
    daemon: Option<Child>,
}

impl Node {
    fn config(&self, catalog: &Path) -> String {
        let anycast = if self.anycast {
            format!("anycast = [\"{ANYCAST}/128\"]\nannounce = {{ table = 4242 }}")
        } else {
            String::new()
        };
        format!(
            r#"
[host]
region = "{region}"
name = "{name}"

[admin]
listen = "127.0.0.1:{admin}"

[state]
dir = "{dir}/state"

[catalog]
file = "{catalog}"
poll_interval = "100ms"

[proxy]
enabled = true
connect_timeout = "1s"
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
            region = self.region,
            name = self.name,
            admin = self.admin,
            dir = self.dir.display(),
            catalog = catalog.display(),
        )
    }

    fn key(&self) -> String {
        crate::support::mesh_key(&self.dir.join("skein.toml"))
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let child = self
            .ns
            .command(env!("CARGO_BIN_EXE_skein"))
            .args(["run", "--config"])
            .arg(self.dir.join("skein.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        for _ in 0..200 {
            let log = self.log();
            if log.contains("mesh up") && log.contains("proxy backhaul listening") {
                return;
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(Child::try_wait) {
                panic!("{} exited with {st}:\n{log}", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} did not come up:\n{}", self.name, self.log());
    }

    /// The sum of a metric's series whose labels contain `labels`.
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let out = self.ns.run(&["curl", "-s", "--max-time", "2", &url]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP server in a machine, on `[addr]:8080`, answering its name; stops
/// (closing its socket: connects are refused) when `up` turns false.
fn serve(m: &Machine, name: &'static str, up: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = m.ns.name().to_owned();
    let at: SocketAddr = format!("[{}]:8080", m.addr).parse().unwrap();
    std::thread::spawn(move || {
        skein_testkit::enter_netns(&ns);
        let l = TcpListener::bind(at).unwrap();
        l.set_nonblocking(true).unwrap();
        while up.load(Ordering::SeqCst) {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("{name}\n");
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    })
}

fn catalog(keys: &[String], web_ams: &str) -> String {
    let mut s = format!(
        r#"
regions = [{{ code = "ams", rtt_ms = {{ iad = 80 }} }}, {{ code = "iad" }}]
networks = [{{ id = "0:18", name = "alpha" }}, {{ id = "0:19", name = "beta" }}]

[[hosts]]
id = "0:2"
name = "e1"
region = "ams"
role = "edge"
underlay = "fd00:99::1"
wireguard = {{ public_key = "{k0}" }}

[[hosts]]
id = "0:3"
name = "e2"
region = "iad"
role = "edge_worker"
underlay = "fd00:99::2"
wireguard = {{ public_key = "{k1}" }}

[[hosts]]
id = "0:4"
name = "w1"
region = "ams"
role = "worker"
underlay = "fd00:99::3"
wireguard = {{ public_key = "{k2}" }}

[[apps]]
name = "web"
network = "alpha"
hostnames = ["web.example.com"]
flycast = "{WEB_FLYCAST}"
flycast_from = ["beta"]
tls = {{ allow_self_signed = true }}
[[apps.services]]
internal_port = 8080
ports = [{{ port = 443, handlers = ["tls", "http"] }}, {{ port = 80, handlers = ["http"] }}]

[[apps]]
name = "pods"
network = "alpha"

[[apps]]
name = "others"
network = "beta"

[[machines]]
id = "webams"
app = "web"
region = "ams"
host = "0:4"
state = "{web_ams}"
address = "fdaa:0:18:0:4:0:1:0"
interface = "vw1"

[[machines]]
id = "webiad"
app = "web"
region = "iad"
host = "0:3"
state = "started"
address = "fdaa:0:18:0:3:0:1:0"
interface = "ve2"

[[machines]]
id = "poda"
app = "pods"
region = "ams"
host = "0:4"
state = "started"
address = "fdaa:0:18:0:4:0:2:0"
interface = "vw2"

[[machines]]
id = "podb"
app = "others"
region = "ams"
host = "0:4"
state = "started"
address = "fdaa:0:19:0:4:0:3:0"
interface = "vw3"

[[k8s_services]]
name = "web"
namespace = "default"
network = "alpha"
cluster_ip = "{CLUSTER_IP}"
ports = [{{ name = "http", port = 80, target_port = 8080 }}]
endpoints = [{{ machine = "webams" }}, {{ machine = "webiad" }}]
"#,
        k0 = keys[0],
        k1 = keys[1],
        k2 = keys[2],
    );
    s.push('\n');
    s
}

/// One HTTPS request from the client to the anycast address: the machine
/// that answered, or the failure.
fn get(client: &Netns) -> Result<String, String> {
    let out = client.run(&[
        "curl",
        "-sSk",
        "--max-time",
        "5",
        "--resolve",
        &format!("web.example.com:443:[{ANYCAST}]"),
        "https://web.example.com/",
    ]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Points the client's route to the anycast address at edge `n`'s underlay.
fn via_edge(client: &Netns, n: u8) {
    client.ip(&format!("-6 route replace {ANYCAST}/128 via fd00:99::{n}"));
}

#[test]
fn a_client_reaches_the_nearest_machine_through_either_edge_and_pods_reach_services() {
    if !require_root(
        "a_client_reaches_the_nearest_machine_through_either_edge_and_pods_reach_services",
    ) {
        return;
    }
    if !skein_ebpf::embedded() {
        assert!(
            std::env::var_os("SKEIN_REQUIRE_EBPF").is_none(),
            "this binary has no eBPF programs"
        );
        return println!("skipped: needs the eBPF object (cargo xtask build-ebpf)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let ul = Netns::new("pu");
    ul.ip("link add br0 type bridge");
    ul.ip("link set br0 up");
    let mut nodes = Vec::new();
    for (n, name, region, anycast) in [
        (1u8, "e1", "ams", true),
        (2, "e2", "iad", true),
        (3, "w1", "ams", false),
    ] {
        let ns = Netns::new(&format!("p{name}"));
        veth(&ns, "ul0", &ul, &format!("p{n}"));
        ul.ip(&format!("link set p{n} master br0"));
        ns.ip(&format!("addr add fd00:99::{n}/64 dev ul0 nodad"));
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        nodes.push(Node {
            ns,
            dir,
            name,
            region,
            admin: 9500 + u16::from(n),
            anycast,
            daemon: None,
        });
    }
    // The client: on the underlay, routing the anycast address to an edge
    // (what BGP would do).
    let client = Netns::new("pc");
    veth(&client, "ul0", &ul, "pc");
    ul.ip("link set pc master br0");
    client.ip("addr add fd00:99::100/64 dev ul0 nodad");
    via_edge(&client, 1);
    let web_ams = machine(&nodes[2].ns, "pwa", "vw1", "fdaa:0:18:0:4:0:1:0");
    let web_iad = machine(&nodes[1].ns, "pwi", "ve2", "fdaa:0:18:0:3:0:1:0");
    let pod_a = machine(&nodes[2].ns, "ppa", "vw2", "fdaa:0:18:0:4:0:2:0");
    let pod_b = machine(&nodes[2].ns, "ppb", "vw3", "fdaa:0:19:0:4:0:3:0");
    let ams_up = Arc::new(AtomicBool::new(true));
    let iad_up = Arc::new(AtomicBool::new(true));
    let servers = [
        serve(&web_ams, "webams", ams_up.clone()),
        serve(&web_iad, "webiad", iad_up.clone()),
    ];

    let cat = tmp.path().join("catalog.toml");
    for node in &nodes {
        std::fs::write(node.dir.join("skein.toml"), node.config(&cat)).unwrap();
    }
    let keys: Vec<String> = nodes.iter().map(Node::key).collect();
    std::fs::write(&cat, catalog(&keys, "started")).unwrap();
    for node in &mut nodes {
        node.start();
    }
    let logs = |nodes: &[Node]| {
        nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The mesh device is the default's choice: the kernel's WireGuard where the
    // kernel has it, else skein's own (this kernel has none).
    let kernel_wg = std::path::Path::new("/sys/module/wireguard").exists();
    for node in &nodes {
        let fell_back = node.log().contains("no WireGuard in this kernel");
        assert_eq!(fell_back, !kernel_wg, "{}", logs(&nodes));
    }

    // Through the ams edge: the ams machine, across the mesh through w1's proxy.
    wait(
        Duration::from_secs(20),
        || get(&client).is_ok_and(|m| m == "webams"),
        "the client reaching webams through e1",
    );
    for _ in 0..5 {
        assert_eq!(get(&client).as_deref(), Ok("webams"), "{}", logs(&nodes));
    }
    // The path: steered to e1's proxy, backhauled to w1's, which delivered.
    // (The steering counters are published every 2 s.)
    wait(
        Duration::from_secs(5),
        || nodes[0].metric("skein_ebpf_steered_total", "to=\"anycast\"") >= 6.0,
        "e1's steering counter",
    );
    assert!(nodes[2].metric("skein_proxy_backhaul_requests_total", "") >= 6.0);
    // Through the iad edge: its own iad machine.
    via_edge(&client, 2);
    for _ in 0..5 {
        assert_eq!(get(&client).as_deref(), Ok("webiad"), "{}", logs(&nodes));
    }

    // A pod resolves the Service at fdaa::3 and connects to its ClusterIP.
    let dig = |m: &Machine, name: &str| {
        let out = m.ns.run(&[
            "dig", "+short", "+time=2", "+tries=1", "-b", m.addr, "@fdaa::3", "AAAA", name,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(dig(&pod_a, "web.default.svc.cluster.local"), CLUSTER_IP);
    let curl_to = |m: &Machine, ip: &str| {
        let out =
            m.ns.run(&["curl", "-sS", "--max-time", "3", &format!("http://[{ip}]/")]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let curl_in = |m: &Machine| curl_to(m, CLUSTER_IP);
    let seen = curl_in(&pod_a);
    assert!(
        matches!(seen.as_deref(), Some("webams" | "webiad")),
        "{seen:?}\n{}",
        logs(&nodes)
    );
    wait(
        Duration::from_secs(5),
        || nodes[2].metric("skein_ebpf_steered_total", "to=\"flycast\"") >= 1.0,
        "w1's flycast steering counter",
    );
    // The other network: no such name, no way through (the guard drops it).
    assert_eq!(dig(&pod_b, "web.default.svc.cluster.local"), "");
    let dropped = |n: &Node| {
        n.metric(
            "skein_ebpf_packets_total",
            "program=\"guard\",reason=\"foreign_destination\"",
        )
    };
    let before = dropped(&nodes[2]);
    assert_eq!(curl_in(&pod_b), None);
    wait(
        Duration::from_secs(5),
        || dropped(&nodes[2]) > before,
        "the guard counting pod-b's attempt",
    );
    // ...except what alpha shares with beta: web's flycast address, by name
    // and by address, served by the proxy on pod-b's own host.
    assert_eq!(dig(&pod_b, "web.flycast"), WEB_FLYCAST);
    let seen = curl_to(&pod_b, WEB_FLYCAST);
    assert!(
        matches!(seen.as_deref(), Some("webams" | "webiad")),
        "{seen:?}\n{}",
        logs(&nodes)
    );
    assert_eq!(
        curl_in(&pod_b),
        None,
        "sharing web's address shares nothing else"
    );

    // The ams machine stops (its server goes, then the catalog says so) while
    // the client keeps asking through the ams edge: every request succeeds,
    // and the iad machine takes over.
    via_edge(&client, 1);
    let mut answers = Vec::new();
    for i in 0..30 {
        if i == 5 {
            ams_up.store(false, Ordering::SeqCst);
        }
        if i == 10 {
            std::fs::write(&cat, catalog(&keys, "stopped")).unwrap();
        }
        answers.push(get(&client));
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
    assert!(failed.is_empty(), "{failed:?}\n{}", logs(&nodes));
    assert_eq!(answers.last().unwrap().as_deref(), Ok("webiad"));

    // Anycast by BGP: each edge's BIRD exports what skein announces in table
    // 4242; the client's BIRD (its router) installs the routes it learns.
    if skein_testkit::require_binary(
        "a_client_reaches_the_nearest_machine_through_either_edge_and_pods_reach_services",
        "bird",
        &["--version"],
        "bird2",
    ) {
        client.ip(&format!("-6 route del {ANYCAST}/128"));
        let birds: Vec<Bird> = [(&nodes[0].ns, 1u8), (&nodes[1].ns, 2), (&client, 100)]
            .into_iter()
            .map(|(ns, n)| Bird::start(ns, n, tmp.path()))
            .collect();
        let route = || {
            let out = client.run(&["ip", "-6", "route", "show", ANYCAST]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        wait(
            Duration::from_secs(30),
            || route().contains("fd00:99::1") && route().contains("fd00:99::2"),
            "the client learning the anycast route from both edges",
        );
        for _ in 0..5 {
            assert_eq!(get(&client).as_deref(), Ok("webiad"), "{}", logs(&nodes));
        }
        // An edge dies (no goodbye): its announcement dies with it, and new
        // connections go to the other edge.
        let before = nodes[1].metric("skein_ebpf_steered_total", "to=\"anycast\"");
        if let Some(mut c) = nodes[0].daemon.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        wait(
            Duration::from_secs(15),
            || !route().contains("fd00:99::1") && route().contains("fd00:99::2"),
            "the dead edge's route withdrawn",
        );
        for _ in 0..10 {
            assert_eq!(get(&client).as_deref(), Ok("webiad"), "{}", logs(&nodes));
        }
        wait(
            Duration::from_secs(5),
            || nodes[1].metric("skein_ebpf_steered_total", "to=\"anycast\"") >= before + 10.0,
            "the other edge taking the connections",
        );
        drop(birds);
    }

    iad_up.store(false, Ordering::SeqCst);
    for s in servers {
        s.join().unwrap();
    }
    drop(nodes);
}

/// BIRD in a namespace: on an edge (`n` 1, 2), it exports the routes skein
/// puts in kernel table 4242 to the router; on the router (`n` 100, the
/// client), it installs what both edges announce (several paths merged).
struct Bird {
    child: Child,
}

impl Bird {
    fn start(ns: &Netns, n: u8, dir: &Path) -> Bird {
        let conf = if n == 100 {
            r#"
router id 192.0.2.100;
protocol device { scan time 1; }
protocol kernel {
  ipv6 { import none; export all; };
  merge paths on;
  scan time 1;
}
protocol bgp e1 {
  local fd00:99::100 as 65000;
  neighbor fd00:99::1 as 65001;
  hold time 3; connect retry time 1;
  ipv6 { import all; export none; };
}
protocol bgp e2 {
  local fd00:99::100 as 65000;
  neighbor fd00:99::2 as 65002;
  hold time 3; connect retry time 1;
  ipv6 { import all; export none; };
}
"#
            .to_string()
        } else {
            format!(
                r#"
router id 192.0.2.{n};
protocol device {{ scan time 1; }}
ipv6 table anycast;
protocol kernel {{
  ipv6 {{ table anycast; import all; export none; }};
  kernel table 4242;
  learn;
  scan time 1;
}}
protocol bgp upstream {{
  local fd00:99::{n} as 6500{n};
  neighbor fd00:99::100 as 65000;
  hold time 3; connect retry time 1;
  ipv6 {{ table anycast; import none; export all; next hop self; }};
}}
"#
            )
        };
        let path = dir.join(format!("bird{n}.conf"));
        std::fs::write(&path, conf).unwrap();
        let log = dir.join(format!("bird{n}.log"));
        let child = skein_testkit::spawn_logged(
            ns.command("bird")
                .arg("-f")
                .arg("-c")
                .arg(&path)
                .arg("-s")
                .arg(dir.join(format!("bird{n}.ctl")))
                .arg("-P")
                .arg(dir.join(format!("bird{n}.pid"))),
            &log,
            "bird",
        );
        Bird { child }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
