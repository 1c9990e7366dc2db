//! A real ACME server on loopback (Debian's `pebble`, Let's Encrypt's test
//! CA), validating challenges against ports the test gives and resolving
//! names with the DNS server the test gives.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Call first in a test that needs pebble (see [`crate::require_binary`]).
pub fn require_pebble(test: &str) -> bool {
    crate::require_binary(test, "pebble", &["-version"], "pebble")
}

/// A running pebble.
pub struct Pebble {
    dir: PathBuf,
    child: Option<Child>,
    /// The ACME directory URL.
    pub directory: String,
    /// The CA file that pebble's own HTTPS certificate chains to.
    pub ca_file: PathBuf,
    /// The management interface (`/roots/0` is the issuing root).
    pub management: SocketAddr,
}

impl Pebble {
    /// Starts pebble; it validates HTTP-01 on `http_port` and TLS-ALPN-01 on
    /// `tls_port` of the address each name resolves to through `dns`.
    pub fn start(dns: SocketAddr, http_port: u16, tls_port: u16) -> Pebble {
        Self::start_with(dns, http_port, tls_port, None)
    }

    /// [`Pebble::start`], issuing certificates valid for `validity` seconds
    /// when given (pebble's default is five years).
    pub fn start_with(
        dns: SocketAddr,
        http_port: u16,
        tls_port: u16,
        validity: Option<u64>,
    ) -> Pebble {
        let dir = crate::temp_dir("pebble");
        // Pebble's own HTTPS certificate, from a CA made here.
        let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("ca: {e}"));
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "skein test: pebble's HTTPS CA");
        let ca = ca_params
            .self_signed(&ca_key)
            .unwrap_or_else(|e| panic!("ca: {e}"));
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap_or_else(|e| panic!("leaf: {e}"));
        let leaf = params
            .signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("leaf: {e}"));
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap_or_else(|e| panic!("{name}: {e}"));
            p
        };
        let ca_file = write("ca.pem", ca.pem());
        let cert = write("cert.pem", leaf.pem());
        let privkey = write("key.pem", key.serialize_pem());
        let port = crate::free_tcp_port();
        let mgmt = crate::free_tcp_port();
        let config = write(
            "pebble.json",
            format!(
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:{port}", "managementListenAddress": "127.0.0.1:{mgmt}", "certificate": "{}", "privateKey": "{}", "httpPort": {http_port}, "tlsPort": {tls_port}, "ocspResponderURL": "", "externalAccountBindingRequired": false{validity}}}}}"#,
                cert.display(),
                privkey.display(),
                validity = validity
                    .map(|v| format!(r#", "certificateValidityPeriod": {v}"#))
                    .unwrap_or_default()
            ),
        );
        let child = crate::spawn_logged(
            Command::new("pebble")
                .arg("-config")
                .arg(&config)
                .arg("-dnsserver")
                .arg(dns.to_string())
                // Validate at once (pebble otherwise sleeps up to 15 s first).
                .env("PEBBLE_VA_NOSLEEP", "1")
                // Debian's pebble 2.4 has deadlocked under concurrent orders
                // (every handler waiting on its memory store's lock); the
                // goroutines of one wedge showed FindValidAuthorization, so
                // authorization reuse is off. It has wedged without it too:
                // the ACME tests also keep orders in flight low.
                .env("PEBBLE_AUTHZREUSE", "0"),
            &dir.join("pebble.log"),
            "pebble",
        );
        let p = Pebble {
            child: Some(child),
            directory: format!("https://127.0.0.1:{port}/dir"),
            ca_file,
            management: SocketAddr::from(([127, 0, 0, 1], mgmt)),
            dir,
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pebble did not listen: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Asks pebble (Go) to write every goroutine's stack to its log, for a
    /// test that saw it stop answering.
    pub fn dump_goroutines(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Pebble's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
