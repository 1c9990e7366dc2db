//! Running the binary and talking to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skein_testkit::{Netns, veth};

pub fn skein() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skein"))
}

/// A daemon started with `skein run`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub admin: String,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, port: u16) -> Daemon {
        let child = skein()
            .args(["run", "--config"])
            .arg(dir.join("skein.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("daemon.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            admin: format!("127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
        };
        d.wait_ready();
        d
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http(&self.admin, "GET", "/readyz", None, None) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon not ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (st, text) = http(&self.admin, method, path, body, Some(&self.token())).unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(response(&out))
}

/// A whole HTTP/1.1 response as (status, body).
pub fn response(out: &str) -> (u16, String) {
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may be chunked; tests only look for substrings and JSON, so undo it.
    (status, dechunk(&body))
}

fn dechunk(b: &str) -> String {
    let mut out = String::new();
    let mut rest = b;
    loop {
        let Some((size, tail)) = rest.split_once("\r\n") else {
            return b.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return b.to_string();
        };
        if n == 0 {
            return out;
        }
        if tail.len() < n {
            return b.to_string();
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
}

/// Reads lines of a child's stdout until one contains `marker`; returns them all.
pub fn read_until(out: &mut BufReader<std::process::ChildStdout>, marker: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("output ended before {marker:?}: {lines:#?}");
        }
        let done = line.contains(marker);
        lines.push(line.trim_end().to_string());
        if done {
            return lines;
        }
    }
}

/// A backend on a free loopback port that answers every HTTP/1.1 request with
/// 200 and `body` (connection closed after each); returns its port.
pub fn http_backend(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// Polls `ok` every 100 ms until it holds; panics naming `what` after `limit`.
pub fn wait(limit: Duration, mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// A machine: a namespace behind its host's interface `iface`, with its 6PN
/// address and the mesh's gateway.
pub struct Machine {
    pub ns: Netns,
    pub addr: &'static str,
}

/// Creates a machine behind `host` (it joins the mesh when the catalog names
/// `iface` as its interface).
pub fn machine(host: &Netns, tag: &str, iface: &str, addr: &'static str) -> Machine {
    let ns = Netns::new(tag);
    veth(host, iface, &ns, "eth0");
    ns.ip(&format!("addr add {addr}/128 dev eth0 nodad"));
    ns.ip("route add fdaa::/16 via fe80::1 dev eth0");
    Machine { ns, addr }
}

/// This host's WireGuard public key, by `skein mesh-key` on its config
/// (which creates the key file).
pub fn mesh_key(config: &Path) -> String {
    let out = skein()
        .args(["mesh-key", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
