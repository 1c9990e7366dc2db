//! A real etcd cluster on loopback (Debian's `etcd-server`), members started,
//! stopped and killed by the test; everything is removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Call first in a test that needs etcd: false (and says so) when the `etcd`
/// binary is missing. With `SKEIN_REQUIRE_ETCD` set (as `cargo xtask test`
/// does) a missing etcd fails the test instead.
pub fn require_etcd(test: &str) -> bool {
    crate::require_program(
        test,
        "etcd",
        &["--version"],
        "etcd-server etcd-client",
        "SKEIN_REQUIRE_ETCD",
    )
}

/// One member.
pub struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A cluster of members on 127.0.0.1 with their data under a temporary dir.
pub struct Cluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "skein-etcd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: crate::free_tcp_port(),
                peer: crate::free_tcp_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            members,
            initial,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name)))
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("etcd log: {e}"));
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "skein-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = self.ctl_at(&[self.endpoint(i)], &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "etcd member {i} not healthy within 30s; log: {}",
            std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
        );
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Stops member `i` (SIGTERM, waits).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again (its data kept) and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Starts every stopped member (their data kept) and waits until the
    /// cluster answers: after a full stop no member is healthy alone.
    pub fn start_stopped(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_none())
            .collect();
        for i in &stopped {
            self.spawn(*i);
        }
        for i in stopped {
            self.wait_healthy(i);
        }
    }

    /// Runs `etcdctl` (API v3) against every member.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_at(&self.endpoints(), args)
    }

    /// Runs `etcdctl` against some members.
    pub fn ctl_at(&self, endpoints: &[String], args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--command-timeout=3s", "--dial-timeout=1s"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("etcdctl: {e}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP forwarder on loopback that a test can cut and restore: a network
/// partition between one client and one member, without stopping the member.
pub struct Gate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Gate {
    /// Forwards a fresh loopback port to `target` (`host:port`).
    pub fn new(target: &str) -> Gate {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("gate: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (o, c, target) = (open.clone(), conns.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let pairs = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                if let Ok(mut l) = c.lock() {
                    l.extend(client.try_clone());
                    l.extend(server.try_clone());
                }
                for (from, to) in pairs {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Gate { port, open, conns }
    }

    /// The URL to give the client.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        if let Ok(mut l) = self.conns.lock() {
            for s in l.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
