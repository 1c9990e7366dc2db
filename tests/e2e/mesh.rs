//! The mesh across three hosts, each a network namespace on an underlay bridge, each
//! running `skein run` (host 3 drives Debian's wireguard-go instead of skein's own
//! device). Machines are namespaces joined to their host by veth; two networks.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use skein_testkit::{Netns, require_root, veth};

use crate::support::{Machine, machine, wait};

struct Host {
    ns: Netns,
    dir: PathBuf,
    n: u8,
    iface: String,
    go: bool,
    admin: u16,
    /// Where its daemon pins its eBPF links (on the test's bpf filesystem).
    pins: PathBuf,
    daemon: Option<Child>,
    wg_go: Option<Child>,
}

impl Host {
    fn config(&self, catalog: &Path) -> String {
        let device = if self.go { "uapi" } else { "skein" };
        let uapi_dir = if self.go {
            "/var/run/wireguard".to_owned()
        } else {
            self.dir.join("wg").display().to_string()
        };
        format!(
            r#"
[host]
region = "ams"
name = "h{n}"

[admin]
listen = "127.0.0.1:{admin}"

[state]
dir = "{dir}/state"

[catalog]
file = "{catalog}"
poll_interval = "100ms"

[proxy]
enabled = false

[dns]
enabled = false

[mesh]
enabled = true
interface = "{iface}"
device = "{device}"
uapi_dir = "{uapi_dir}"
pin_dir = "{pins}"

[log]
format = "json"
level = "info"
"#,
            n = self.n,
            admin = self.admin,
            dir = self.dir.display(),
            catalog = catalog.display(),
            iface = self.iface,
            pins = self.pins.display(),
        )
    }

    fn key(&self) -> String {
        crate::support::mesh_key(&self.dir.join("skein.toml"))
    }

    fn start(&mut self) {
        if self.go && self.wg_go.is_none() {
            let go = self
                .ns
                .command("wireguard-go")
                .args(["-f", &self.iface])
                .env("LOG_LEVEL", "error")
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            self.wg_go = Some(go);
            let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.iface));
            wait(
                Duration::from_secs(10),
                || sock.exists(),
                "wireguard-go socket",
            );
        }
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
        wait(
            Duration::from_secs(20),
            || self.log().contains("mesh up") && self.log().contains("machine joined the mesh"),
            &format!("h{} mesh up", self.n),
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = c.try_wait() {
                    assert!(
                        st.success(),
                        "h{} exited with {st}:\n{}",
                        self.n,
                        self.log()
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            panic!("h{} did not stop on SIGTERM:\n{}", self.n, self.log());
        }
    }

    /// The daemon dies without a chance to clean up (a crash, the OOM killer).
    fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The TCX programs attached to `dev` on this host, as the kernel lists
    /// them (`ingress guard`); none when `dev` does not exist.
    fn tcx(&self, dev: &str) -> Vec<String> {
        let (ns, dev) = (self.ns.name().to_owned(), dev.to_owned());
        std::thread::spawn(move || {
            skein_testkit::enter_netns(&ns);
            skein_ebpf::tcx_programs(&dev)
                .map(|l| l.into_iter().map(|(d, p)| format!("{d} {p}")).collect())
                .unwrap_or_default()
        })
        .join()
        .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A counter from the daemon's /metrics (0 when absent).
    fn ebpf_counter(&self, program: &str, reason: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let out = self.ns.run(&["curl", "-s", "--max-time", "2", &url]);
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("program=\"{program}\",reason=\"{reason}\"");
        text.lines()
            .filter(|l| l.starts_with("skein_ebpf_packets_total{") && l.contains(&want))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for c in [self.daemon.take(), self.wg_go.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn catalog(keys: &[Option<String>; 3]) -> String {
    let mut s = String::from(
        r#"
[[regions]]
code = "ams"
name = "Amsterdam"

[[networks]]
id = "0:18"
name = "alpha"

[[networks]]
id = "0:19"
name = "beta"

[[apps]]
name = "app-a"
network = "alpha"

[[apps]]
name = "app-b"
network = "beta"
"#,
    );
    for (i, k) in keys.iter().enumerate() {
        let n = i + 1;
        s.push_str(&format!(
            "\n[[hosts]]\nid = \"0:{id}\"\nname = \"h{n}\"\nregion = \"ams\"\nunderlay = \"fd00:99::{n}\"\n",
            id = n + 1
        ));
        if let Some(k) = k {
            s.push_str(&format!("wireguard = {{ public_key = \"{k}\" }}\n"));
        }
    }
    let machines = [
        ("a1", "app-a", 2, "vm1", "fdaa:0:18:0:2:0:1:0"),
        ("a2", "app-a", 3, "vm2", "fdaa:0:18:0:3:0:1:0"),
        ("a3", "app-a", 4, "vm3", "fdaa:0:18:0:4:0:1:0"),
        ("b2", "app-b", 3, "vm4", "fdaa:0:19:0:3:0:2:0"),
        ("b3", "app-b", 4, "vm5", "fdaa:0:19:0:4:0:2:0"),
    ];
    for (id, app, host, iface, addr) in machines {
        s.push_str(&format!(
            "\n[[machines]]\nid = \"{id}\"\napp = \"{app}\"\nregion = \"ams\"\nhost = \"0:{host}\"\nstate = \"started\"\naddress = \"{addr}\"\ninterface = \"{iface}\"\n"
        ));
    }
    s
}

/// One TCP round trip from `from` to `to` (port 7000), each side in its namespace.
fn tcp_echo(from: &Machine, to: &Machine) -> bool {
    let to_addr: SocketAddr = format!("[{}]:7000", to.addr).parse().unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            to.ns.enter();
            let l = TcpListener::bind(to_addr).unwrap();
            l.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok((mut c, _)) = l.accept() {
                    c.set_nonblocking(false).unwrap();
                    let mut b = [0u8; 5];
                    if c.read_exact(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let client = s.spawn(|| {
            from.ns.enter();
            std::thread::sleep(Duration::from_millis(100));
            let Ok(mut c) = TcpStream::connect_timeout(&to_addr, Duration::from_secs(3)) else {
                return false;
            };
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut b = [0u8; 5];
            c.write_all(b"hello").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"hello"
        });
        let ok = client.join().unwrap();
        server.join().unwrap();
        ok
    })
}

fn ping_eventually(m: &Machine, to: &str) -> bool {
    (0..15).any(|_| m.ns.ping(m.addr, to))
}

#[test]
fn three_hosts_isolate_networks_and_carry_only_wireguard() {
    if !require_root("three_hosts_isolate_networks_and_carry_only_wireguard") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id() % 100_000;
    // The daemons run under `ip netns exec`, which gives each its own /sys: a
    // bpf filesystem mounted here, in the test's mount namespace, is the one
    // they all see, and it outlives a daemon that dies (what pinning is for).
    let bpffs = skein_testkit::BpfFs::mount("mesh-bpf");

    // underlay: a bridge in its own namespace, one veth per host
    let ul = Netns::new("ul");
    ul.ip("link add br0 type bridge");
    ul.ip("link set br0 up");
    let mut hosts = Vec::new();
    for n in 1..=3u8 {
        let ns = Netns::new(&format!("h{n}"));
        veth(&ns, "ul0", &ul, &format!("p{n}"));
        ul.ip(&format!("link set p{n} master br0"));
        ns.ip(&format!("addr add fd00:99::{n}/64 dev ul0 nodad"));
        let dir = tmp.path().join(format!("h{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let go = n == 3;
        hosts.push(Host {
            ns,
            dir,
            n,
            iface: if go {
                format!("skg{pid}")
            } else {
                "skein0".to_owned()
            },
            go,
            admin: 9300 + u16::from(n),
            pins: bpffs.path().join(format!("h{n}")),
            daemon: None,
            wg_go: None,
        });
    }
    let a1 = machine(&hosts[0].ns, "a1", "vm1", "fdaa:0:18:0:2:0:1:0");
    let a2 = machine(&hosts[1].ns, "a2", "vm2", "fdaa:0:18:0:3:0:1:0");
    let a3 = machine(&hosts[2].ns, "a3", "vm3", "fdaa:0:18:0:4:0:1:0");
    let b2 = machine(&hosts[1].ns, "b2", "vm4", "fdaa:0:19:0:3:0:2:0");
    let b3 = machine(&hosts[2].ns, "b3", "vm5", "fdaa:0:19:0:4:0:2:0");

    let cat_path = tmp.path().join("catalog.toml");
    for h in &hosts {
        std::fs::write(h.dir.join("skein.toml"), h.config(&cat_path)).unwrap();
    }
    let mut keys = [
        Some(hosts[0].key()),
        Some(hosts[1].key()),
        Some(hosts[2].key()),
    ];
    std::fs::write(&cat_path, catalog(&keys)).unwrap();
    // the key file is private
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(hosts[0].dir.join("state/wireguard.key"))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o777, 0o600);
    for h in &mut hosts {
        h.start();
    }

    // the same network across hosts: ping and TCP, both ways, also to and from
    // the wireguard-go host
    assert!(ping_eventually(&a1, a2.addr), "a1 -> a2");
    assert!(ping_eventually(&a2, a1.addr), "a2 -> a1");
    assert!(
        ping_eventually(&a1, a3.addr),
        "a1 -> a3 (wireguard-go host)"
    );
    assert!(ping_eventually(&b2, b3.addr), "b2 -> b3");
    assert!(tcp_echo(&a1, &a2), "TCP a1 -> a2");
    assert!(tcp_echo(&a3, &a1), "TCP a3 -> a1");
    // `wg show` works against skein's device (the UAPI socket in its dir)
    let wg = Command::new("wg")
        .args(["show", &hosts[2].iface, "peers"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&wg.stdout).lines().count(),
        2,
        "h3 has two peers"
    );

    // another network: dropped by the guard and counted
    let before = hosts[0].ebpf_counter("guard", "foreign_destination");
    assert!(!a1.ns.ping(a1.addr, b2.addr), "alpha must not reach beta");
    assert!(
        !b2.ns.ping(b2.addr, a2.addr),
        "beta must not reach alpha, even on its own host"
    );
    wait(
        Duration::from_secs(5),
        || hosts[0].ebpf_counter("guard", "foreign_destination") > before,
        "the foreign-destination counter",
    );
    // a spoofed source: dropped and counted
    a1.ns.ip("addr add fdaa:0:18:0:2:0:9:0/128 dev eth0 nodad");
    assert!(
        !a1.ns.ping("fdaa:0:18:0:2:0:9:0", a2.addr),
        "spoofed source"
    );
    wait(
        Duration::from_secs(5),
        || hosts[0].ebpf_counter("guard", "spoofed_source") > 0,
        "the spoofed-source counter",
    );
    // A machine whose link MTU is larger than the mesh's (the machines here
    // keep veth's 1500) is told so by its host (Packet Too Big), learns the
    // path MTU and gets through; without the message its large packets vanish.
    let big = |pmtu: &str| {
        let out = a1.ns.run(&[
            "ping", "-6", "-n", "-c", "1", "-W", "2", "-s", "1452", "-M", pmtu, "-I", a1.addr,
            a2.addr,
        ]);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (_, told) = big("do");
    assert!(
        told.contains("mtu=1420"),
        "no Packet Too Big reached the machine:\n{told}"
    );
    // a2 (MTU 1500 as well) learns it from its own host with the first
    // answer, which does not fit the mesh; from then on both ends fragment.
    let _ = big("want");
    let (ok, out) = big("want");
    assert!(
        ok,
        "a 1500-byte ping after both ends learned the path MTU:\n{out}"
    );

    // a host that sends into another network's machine is stopped on arrival
    assert!(!hosts[1].ns.ping("fdaa:0:0:0:3::1", a1.addr));
    wait(
        Duration::from_secs(5),
        || hosts[0].ebpf_counter("mesh_in", "cross_network") > 0,
        "the cross-network counter on the receiving host",
    );

    // the underlay carries only WireGuard: capture while traffic flows
    let pcap = tmp.path().join("ul.pcap");
    let mut dump = ul
        .command("tcpdump")
        .args([
            "-i",
            "any",
            "--immediate-mode",
            "-U",
            "-n",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&pcap)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(ping_eventually(&a1, a2.addr));
    assert!(tcp_echo(&a2, &a3));
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let _ = dump.wait();
    let read = ul.run(&["tcpdump", "-n", "-r", pcap.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&read.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.contains(".51820")).collect();
    assert!(
        udp.len() >= 4,
        "WireGuard packets on the underlay:\n{text}\n{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(
        !text.contains("fdaa"),
        "inner addresses in clear on the underlay:\n{text}"
    );
    for l in text.lines() {
        assert!(
            l.contains(".51820") || l.contains("ICMP6, neighbor") || l.contains("ICMP6, router"),
            "not WireGuard: {l}"
        );
    }

    // re-keying h2 (new key, restart, catalog updated) keeps h1 <-> h3 flowing
    let mut flow = a1
        .ns
        .command("ping")
        .args(["-6", "-n", "-i", "0.2", "-W", "1", "-I", a1.addr, a3.addr])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    hosts[1].stop();
    std::fs::remove_file(hosts[1].dir.join("state/wireguard.key")).unwrap();
    let new_key = hosts[1].key();
    assert_ne!(Some(&new_key), keys[1].as_ref());
    keys[1] = Some(new_key);
    std::fs::write(&cat_path, catalog(&keys)).unwrap();
    hosts[1].start();
    assert!(
        ping_eventually(&a1, a2.addr),
        "h2 reachable with its new key"
    );
    let _ = Command::new("kill")
        .args(["-INT", &flow.id().to_string()])
        .status();
    let mut out = String::new();
    flow.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = flow.wait();
    assert!(
        out.contains(" 0% packet loss"),
        "h1 -> h3 traffic during h2's re-key:\n{out}"
    );

    // removing a peer (h2 loses its key in the catalog) cuts its traffic only
    keys[1] = None;
    std::fs::write(&cat_path, catalog(&keys)).unwrap();
    wait(
        Duration::from_secs(5),
        || !a1.ns.ping(a1.addr, a2.addr),
        "h1 -> h2 cut after the peer was removed",
    );
    assert!(a1.ns.ping(a1.addr, a3.addr), "h1 -> h3 unaffected");

    // A daemon that dies without stopping leaves its guards in force (fail
    // closed): h2's routes outlive it, so without the guard beta would reach
    // alpha through h2 itself.
    assert_eq!(hosts[1].tcx("vm2").len(), 1, "{:?}", hosts[1].tcx("vm2"));
    hosts[1].kill();
    assert!(
        !b2.ns.ping(b2.addr, a2.addr),
        "beta reached alpha on h2 after h2's daemon died"
    );
    assert!(
        hosts[1].tcx("vm4").iter().any(|l| l.contains("guard")),
        "b2's guard outlives its daemon: {:?}",
        hosts[1].tcx("vm4")
    );
    assert!(
        hosts[1].pins.join("guard@vm4").exists(),
        "the guard's link is pinned"
    );
    // The next daemon takes over: its own guard on each machine, the dead
    // daemon's gone (one program per interface, not two), traffic flows.
    hosts[1].start();
    wait(
        Duration::from_secs(10),
        || hosts[1].tcx("vm2").len() == 1 && hosts[1].tcx("vm4").len() == 1,
        "one guard per machine after the restart",
    );
    assert!(hosts[1].log().contains("did not stop cleanly"));
    assert!(!b2.ns.ping(b2.addr, a2.addr), "beta must not reach alpha");
    keys[1] = Some(hosts[1].key());
    std::fs::write(&cat_path, catalog(&keys)).unwrap();
    assert!(ping_eventually(&a1, a2.addr), "h1 -> h2 after the restart");

    // a clean stop leaves nothing behind
    for h in &mut hosts {
        h.stop();
    }
    for h in &hosts {
        assert!(!h.pins.exists(), "h{} left its pin directory", h.n);
        // no program left on any interface (the kernel's own list, so a
        // pinned link of the killed daemon would show too)
        for dev in ["vm1", "vm2", "vm3", "vm4", "vm5", h.iface.as_str()] {
            assert!(h.tcx(dev).is_empty(), "h{} {dev}: {:?}", h.n, h.tcx(dev));
        }
    }
    for h in &hosts {
        let routes = h.ns.run(&["ip", "-6", "route", "show"]);
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(!routes.contains("fdaa"), "h{} routes left: {routes}", h.n);
        let fwd = h.ns.run(&["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]);
        assert_eq!(
            String::from_utf8_lossy(&fwd.stdout).trim(),
            "0",
            "forwarding restored"
        );
        let addrs = h.ns.run(&["ip", "-6", "addr", "show"]);
        assert!(!String::from_utf8_lossy(&addrs.stdout).contains("fe80::1/64"));
        if h.go {
            // wireguard-go keeps running; the peers skein gave it are gone
            let wg = Command::new("wg")
                .args(["show", &h.iface, "peers"])
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&wg.stdout).trim(),
                "",
                "peers left on h3"
            );
        } else {
            assert!(!h.ns.run(&["ip", "link", "show", &h.iface]).status.success());
        }
    }
}
