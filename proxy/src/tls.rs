//! TLS: certificates chosen by SNI from the live catalog (exact name, then a
//! one-label wildcard, then the app's generated self-signed certificate when its
//! options allow), session resumption by tickets and a session cache.
//!
//! The certificate table is rebuilt on every catalog change, but a certificate
//! whose catalog record did not change (same `Arc`) keeps its parsed key, so a
//! change to one certificate among 100,000 parses one, and handshakes only ever
//! load the table (`ArcSwap`), never wait for a rebuild.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};
use skein_catalog::Snapshot;
use skein_catalog::model::{CertSource, Certificate};

use crate::table::{RouteTable, normalize_host};

/// Most generated self-signed certificates kept.
const SELF_SIGNED_CACHE: usize = 10_000;

#[derive(Default)]
struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Parsed keys by certificate name, with the record they came from.
    parsed: HashMap<String, (Arc<Certificate>, Arc<CertifiedKey>)>,
}

/// The live certificate store; also rustls's certificate resolver.
pub struct Certs {
    provider: Arc<CryptoProvider>,
    table: ArcSwap<CertTable>,
    routes: Arc<ArcSwap<RouteTable>>,
    self_signed: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    default_name: Option<String>,
    parses: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.load();
        f.debug_struct("Certs")
            .field("exact", &t.exact.len())
            .field("wildcard", &t.wildcard.len())
            .finish()
    }
}

/// Parses a catalog certificate into a signing key and chain.
pub fn certified_key(c: &Certificate, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("chain: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| e.to_string())
}

impl Certs {
    /// An empty store that consults `routes` for apps' self-signed option and
    /// serves `default_name`'s certificate to clients without SNI.
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, default_name: Option<String>) -> Self {
        Certs {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            table: ArcSwap::from_pointee(CertTable::default()),
            routes,
            self_signed: Mutex::new(HashMap::new()),
            default_name,
            parses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Rebuilds the table from a snapshot, reusing unchanged parsed keys.
    pub fn update(&self, snap: &Snapshot) {
        let old = self.table.load();
        let mut t = CertTable::default();
        // Issued first, imported after: where both cover a name, the imported
        // one is served (the catalog allows exactly that overlap).
        let by_source = |source| {
            snap.catalog
                .certificates
                .iter()
                .filter(move |(_, c)| c.source == source)
        };
        let ordered = by_source(CertSource::Issued).chain(by_source(CertSource::Imported));
        for (name, rec) in ordered {
            let key = match old.parsed.get(name) {
                Some((src, key)) if Arc::ptr_eq(src, rec) => key.clone(),
                _ => match certified_key(rec, &self.provider) {
                    Ok(k) => {
                        self.parses
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Arc::new(k)
                    }
                    Err(e) => {
                        metrics::counter!("skein_proxy_certificate_errors_total").increment(1);
                        tracing::warn!(certificate = %name, error = %e, "certificate not loaded");
                        continue;
                    }
                },
            };
            for h in &rec.hostnames {
                match h.strip_prefix("*.") {
                    Some(suffix) => t.wildcard.insert(suffix.to_string(), key.clone()),
                    None => t.exact.insert(h.clone(), key.clone()),
                };
            }
            t.parsed.insert(name.clone(), (rec.clone(), key));
        }
        metrics::gauge!("skein_proxy_certificates").set(t.parsed.len() as f64);
        self.table.store(Arc::new(t));
    }

    /// How many certificates have been parsed since start (unchanged ones are
    /// not parsed again on a catalog change).
    pub fn parses(&self) -> u64 {
        self.parses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Certificates loaded.
    pub fn len(&self) -> usize {
        self.table.load().parsed.len()
    }

    /// True if none is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The certificate for a name, as a handshake would get it.
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = normalize_host(sni);
        let t = self.table.load();
        if let Some(k) = t.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = t.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        let routes = self.routes.load();
        match routes.app(&name) {
            Some(app) if app.allow_self_signed => self.self_signed_for(&name),
            _ => {
                metrics::counter!("skein_proxy_certificate_misses_total", "reason" => "no_certificate").increment(1);
                None
            }
        }
    }

    fn self_signed_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.self_signed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(name) {
            return Some(k.clone());
        }
        let made = (|| -> Result<CertifiedKey, String> {
            let kp = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
            let mut params =
                rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.self_signed(&kp).map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::try_from(kp.serialize_der()).map_err(|e| e.to_string())?;
            CertifiedKey::from_der(vec![cert.der().clone()], key, &self.provider)
                .map_err(|e| e.to_string())
        })();
        match made {
            Ok(k) => {
                if cache.len() >= SELF_SIGNED_CACHE {
                    cache.clear();
                }
                let k = Arc::new(k);
                cache.insert(name.to_string(), k.clone());
                metrics::counter!("skein_proxy_self_signed_issued_total").increment(1);
                Some(k)
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "cannot generate a self-signed certificate");
                None
            }
        }
    }

    /// A server config over this store with the given ALPN protocols, sharing
    /// `resumption` with the others.
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
        resumption: &Resumption,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.session_storage = resumption.sessions.clone();
        cfg.ticketer = resumption.ticketer.clone();
        Ok(Arc::new(cfg))
    }
}

/// What TLS resumption needs: a session cache (TLS 1.2 ids, TLS 1.3 stateful
/// tickets) and a ticketer (stateless tickets).
pub struct Resumption {
    /// The session cache.
    pub sessions: Arc<dyn rustls::server::StoresServerSessions>,
    /// The ticket key rotation.
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

/// Session cache and ticketer shared by every server config of a proxy.
pub fn resumption() -> Result<Resumption, rustls::Error> {
    Ok(Resumption {
        sessions: ServerSessionMemoryCache::new(50_000),
        ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
    })
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        if sni.is_none() {
            // No name, or one rustls refused (an IP address): the default
            // hostname's certificate, if there is one.
            metrics::counter!("skein_proxy_handshakes_without_sni_total").increment(1);
        }
        match sni.or(self.default_name.as_deref()) {
            Some(name) => self.lookup(name),
            None => {
                metrics::counter!("skein_proxy_certificate_misses_total", "reason" => "no_sni")
                    .increment(1);
                None
            }
        }
    }
}
