//! ACME challenge answers, served by the proxy's own listeners while an order
//! is being validated (RFC 8555 HTTP-01, RFC 8737 TLS-ALPN-01).
//!
//! The ACME client (the `skein-acme` crate) puts an answer here before it tells
//! the CA the challenge is ready and takes it away when the order is done.
//! Lookups are a read lock on a small map: challenges exist only while orders
//! are in flight, and the request path pays for them only on the two paths
//! that need them (a `/.well-known/acme-challenge/` request on plain HTTP, a
//! ClientHello offering `acme-tls/1`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::table::normalize_host;

/// The ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Where HTTP-01 answers live.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Challenge answers in force.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token -> (hostname, key authorization).
    http: RwLock<HashMap<String, (String, String)>>,
    /// TLS-ALPN-01: hostname -> validation certificate.
    tls: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("http", &read(&self.http).len())
            .field("tls", &read(&self.tls).len())
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // The maps hold plain values: a writer that panicked left them whole.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Challenges {
    /// Answers `GET /.well-known/acme-challenge/<token>` for `hostname`.
    pub fn put_http(&self, hostname: &str, token: &str, key_authorization: &str) {
        write(&self.http).insert(
            token.to_string(),
            (normalize_host(hostname), key_authorization.to_string()),
        );
    }

    /// Stops answering a token.
    pub fn remove_http(&self, token: &str) {
        write(&self.http).remove(token);
    }

    /// The key authorization for a token asked for under `hostname`.
    pub fn http_answer(&self, hostname: &str, token: &str) -> Option<String> {
        let map = read(&self.http);
        let (host, answer) = map.get(token)?;
        (*host == normalize_host(hostname)).then(|| answer.clone())
    }

    /// Serves the TLS-ALPN-01 validation certificate for `hostname`: a
    /// self-signed certificate naming it, with the critical acmeIdentifier
    /// extension holding the SHA-256 digest of the key authorization.
    pub fn put_tls(
        &self,
        hostname: &str,
        key_authorization_digest: &[u8],
        provider: &CryptoProvider,
    ) -> Result<(), String> {
        let name = normalize_host(hostname);
        let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(vec![name.clone()]).map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(
            key_authorization_digest,
        )];
        let cert = params.self_signed(&kp).map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::try_from(kp.serialize_der()).map_err(|e| e.to_string())?;
        // Not `CertifiedKey::from_der`: its consistency check parses the
        // leaf with webpki, which refuses the critical acmeIdentifier
        // extension that this certificate exists to carry.
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| e.to_string())?;
        let ck = CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signer);
        write(&self.tls).insert(name, Arc::new(ck));
        Ok(())
    }

    /// Stops serving a hostname's validation certificate.
    pub fn remove_tls(&self, hostname: &str) {
        write(&self.tls).remove(&normalize_host(hostname));
    }

    /// Answers in force (HTTP-01, TLS-ALPN-01).
    pub fn counts(&self) -> (usize, usize) {
        (read(&self.http).len(), read(&self.tls).len())
    }
}

/// The resolver of the `acme-tls/1` server config: the validation certificate
/// of the name asked for, or no handshake.
#[derive(Debug)]
pub struct AcmeTlsResolver(pub Arc<Challenges>);

impl ResolvesServerCert for AcmeTlsResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = normalize_host(hello.server_name()?);
        let found = read(&self.0.tls).get(&name).cloned();
        let result = if found.is_some() {
            "answered"
        } else {
            "unknown"
        };
        metrics::counter!("skein_proxy_acme_challenges_total", "type" => "tls-alpn-01", "result" => result)
            .increment(1);
        found
    }
}

/// True if a ClientHello offers `acme-tls/1` (a CA validating TLS-ALPN-01
/// offers nothing else).
pub fn offers_acme_tls(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN))
}
