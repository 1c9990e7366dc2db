//! A real authoritative DNS server on loopback (Debian's NSD) serving zones
//! the test writes; restarted on the same port to change them.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Call first in a test that needs NSD: false (and says so) when it is
/// missing; with `SKEIN_REQUIRE_PEERS` set (as `cargo xtask test` does) a
/// missing NSD fails the test instead.
pub fn require_nsd(test: &str) -> bool {
    crate::require_binary(test, "nsd", &["-v"], "nsd")
}

/// An NSD serving zones from a temporary directory.
pub struct Nsd {
    dir: PathBuf,
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Nsd {
    /// Serves `zones` (origin, zone file text) on a free loopback port.
    pub fn start(zones: &[(&str, String)]) -> Nsd {
        let dir = crate::temp_dir("nsd");
        let port = free_udp_port();
        let mut n = Nsd {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
        };
        n.serve(zones);
        n
    }

    /// Replaces the zones (NSD is restarted on the same port).
    pub fn replace(&mut self, zones: &[(&str, String)]) {
        self.stop();
        self.serve(zones);
    }

    fn serve(&mut self, zones: &[(&str, String)]) {
        let d = self.dir.display();
        let mut conf = format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  server-count: 1\n  username: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\n",
            port = self.addr.port()
        );
        for (origin, text) in zones {
            let file = format!("{origin}.zone");
            std::fs::write(self.dir.join(&file), text)
                .unwrap_or_else(|e| panic!("writing {file}: {e}"));
            conf.push_str(&format!("zone:\n  name: {origin}\n  zonefile: {file}\n"));
        }
        let conf_path = self.dir.join("nsd.conf");
        std::fs::write(&conf_path, conf).unwrap_or_else(|e| panic!("nsd.conf: {e}"));
        let child = crate::spawn_logged(
            Command::new("nsd").arg("-c").arg(&conf_path).arg("-d"),
            &self.dir.join("nsd.out"),
            "nsd",
        );
        self.child = Some(child);
        // Ready when it answers a query for the first zone's SOA.
        let origin = zones.first().map(|z| z.0).unwrap_or(".");
        let t = Instant::now();
        while !answers(self.addr, origin) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nsd did not answer on {}: {}",
                self.addr,
                std::fs::read_to_string(self.dir.join("nsd.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_udp_port() -> u16 {
    // A port free for both UDP and TCP.
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("udp: {e}"));
        let port = u.local_addr().map(|a| a.port()).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Sends a SOA query for `origin` and waits briefly for any answer.
fn answers(addr: SocketAddr, origin: &str) -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in origin
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 6, 0, 1]);
    if s.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[0] == 0x12 && buf[1] == 0x34)
}
