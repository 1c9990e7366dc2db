//! Which hostnames need a certificate ordered, and which issued certificates
//! are no longer needed. Pure: a catalog and a clock in, a plan out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use skein_catalog::Catalog;
use skein_catalog::model::{CertSource, Certificate, Handler};

/// The name of the catalog certificate skein issues for a hostname.
pub fn cert_name(hostname: &str) -> String {
    format!("acme-{hostname}")
}

/// A hostname to order a certificate for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The hostname.
    pub hostname: String,
    /// The app it belongs to.
    pub app: String,
    /// When its issued certificate ends, for a renewal; `None`: it has none.
    pub renews: Option<SystemTime>,
}

/// What to do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Names to order for: missing ones first, then renewals, soonest end first.
    pub due: Vec<Due>,
    /// Names with an issued certificate that is good for now, with its end.
    pub good: BTreeMap<String, (String, SystemTime)>,
    /// Issued certificates to delete: an imported one covers their name, or
    /// no app terminates TLS for it any more.
    pub retire: Vec<String>,
    /// Names skein cannot order for, with the reason (wildcards need DNS-01).
    pub skipped: Vec<(String, &'static str)>,
}

/// When a certificate ends, parsed once per record (keyed by the record's
/// `Arc`, so an unchanged certificate is not parsed again).
#[derive(Default)]
pub struct Ends {
    seen: HashMap<String, (Arc<Certificate>, Option<SystemTime>)>,
}

impl Ends {
    fn of(&mut self, name: &str, c: &Arc<Certificate>) -> Option<SystemTime> {
        if let Some((rec, end)) = self.seen.get(name)
            && Arc::ptr_eq(rec, c)
        {
            return *end;
        }
        let end = not_after(&c.chain_pem);
        self.seen.insert(name.to_string(), (c.clone(), end));
        end
    }

    fn retain(&mut self, cat: &Catalog) {
        self.seen.retain(|n, _| cat.certificates.contains_key(n));
    }
}

/// The leaf's notAfter.
pub fn not_after(chain_pem: &str) -> Option<SystemTime> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Plans against `cat` at `now`.
pub fn plan(cat: &Catalog, now: SystemTime, renew_before: Duration, ends: &mut Ends) -> Plan {
    ends.retain(cat);
    // What imported certificates cover, exact and wildcard.
    let mut imported_exact: HashSet<&str> = HashSet::new();
    let mut imported_wild: HashSet<&str> = HashSet::new();
    let mut issued: HashMap<&str, (&String, &Arc<Certificate>)> = HashMap::new();
    for (name, c) in &cat.certificates {
        for h in &c.hostnames {
            match (c.source, h.strip_prefix("*.")) {
                (CertSource::Imported, Some(parent)) => {
                    imported_wild.insert(parent);
                }
                (CertSource::Imported, None) => {
                    imported_exact.insert(h);
                }
                (CertSource::Issued, _) => {
                    issued.insert(h, (name, c));
                }
            }
        }
    }
    let covered = |h: &str| {
        imported_exact.contains(h)
            || h.split_once('.')
                .is_some_and(|(_, parent)| imported_wild.contains(parent))
    };

    let mut p = Plan::default();
    let mut wanted: HashSet<&str> = HashSet::new();
    for app in cat.apps.values() {
        let terminates = app
            .services
            .iter()
            .flat_map(|s| &s.ports)
            .any(|port| port.handlers.contains(&Handler::Tls));
        if !terminates {
            continue;
        }
        for h in &app.hostnames {
            if h.starts_with("*.") {
                p.skipped.push((
                    h.clone(),
                    "a wildcard needs DNS-01, which skein does not answer",
                ));
                continue;
            }
            if covered(h) {
                continue;
            }
            wanted.insert(h);
            let due = |renews| Due {
                hostname: h.clone(),
                app: app.name.clone(),
                renews,
            };
            match issued.get(h.as_str()) {
                None => p.due.push(due(None)),
                Some((name, c)) => match ends.of(name, c) {
                    Some(end) if end > now + renew_before => {
                        p.good.insert(h.clone(), (app.name.clone(), end));
                    }
                    end => p.due.push(due(Some(end.unwrap_or(now)))),
                },
            }
        }
    }
    for (name, c) in &cat.certificates {
        if c.source == CertSource::Issued
            && !c.hostnames.iter().any(|h| wanted.contains(h.as_str()))
        {
            p.retire.push(name.clone());
        }
    }
    p.due.sort_by(|a, b| {
        (a.renews.is_some(), a.renews, &a.hostname).cmp(&(
            b.renews.is_some(),
            b.renews,
            &b.hostname,
        ))
    });
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use skein_catalog::model::Document;
    use skein_catalog::{Source, Store};

    fn pair(names: &[&str], days: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(86_400 * days)).into();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn cert(name: &str, h: &str, days: u64, source: CertSource) -> Certificate {
        let (chain_pem, key_pem) = pair(&[h], days);
        Certificate {
            name: name.into(),
            hostnames: vec![],
            chain_pem,
            key_pem,
            source,
        }
    }

    const APPS: &str = r#"
[[networks]]
id = "1"
name = "n"

[[apps]]
name = "web"
network = "n"
hostnames = ["new.example.com", "soon.example.com", "fine.example.com", "mine.example.com", "x.wild.example.com", "*.star.example.com"]
[[apps.services]]
internal_port = 8080
ports = [{ port = 443, handlers = ["tls", "http"] }, { port = 80, handlers = ["http"] }]

[[apps]]
name = "plain"
network = "n"
hostnames = ["plain.example.com"]
[[apps.services]]
internal_port = 8080
ports = [{ port = 80, handlers = ["http"] }]
"#;

    #[test]
    fn what_is_due_what_is_good_what_retires() {
        let mut doc: Document = skein_catalog::error::parse_toml(APPS).unwrap();
        doc.certificates = vec![
            cert(
                "acme-soon.example.com",
                "soon.example.com",
                10,
                CertSource::Issued,
            ),
            cert(
                "acme-fine.example.com",
                "fine.example.com",
                80,
                CertSource::Issued,
            ),
            // An imported one covers mine: the issued one retires.
            cert(
                "acme-mine.example.com",
                "mine.example.com",
                80,
                CertSource::Issued,
            ),
            cert("own", "mine.example.com", 80, CertSource::Imported),
            cert("wild", "*.wild.example.com", 80, CertSource::Imported),
            // No app terminates TLS for it any more.
            cert(
                "acme-gone.example.com",
                "gone.example.com",
                80,
                CertSource::Issued,
            ),
        ];
        let store = Store::new();
        store.replace(Source::File, doc).unwrap();
        let snap = store.snapshot();
        let now = SystemTime::now();
        let p = plan(
            &snap.catalog,
            now,
            Duration::from_secs(30 * 86_400),
            &mut Ends::default(),
        );
        let due: Vec<(&str, bool)> = p
            .due
            .iter()
            .map(|d| (d.hostname.as_str(), d.renews.is_some()))
            .collect();
        assert_eq!(
            due,
            [("new.example.com", false), ("soon.example.com", true)]
        );
        assert_eq!(p.good.keys().collect::<Vec<_>>(), ["fine.example.com"]);
        assert_eq!(p.retire, ["acme-gone.example.com", "acme-mine.example.com"]);
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].0, "*.star.example.com");
    }
}
