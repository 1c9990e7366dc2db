//! Certificates in the catalog: what is refused (with the field and the
//! reason) and which overlap is allowed (an imported certificate over an
//! issued one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use skein_catalog::model::{CertSource, Certificate, Document};
use skein_catalog::{Source, Store};

/// A self-signed pair; `expired_days_ago` makes it one that ended that long ago.
fn issue(names: &[&str], expired_days_ago: Option<u64>) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    if let Some(days) = expired_days_ago {
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(86_400 * (days + 1))).into();
        params.not_after = (now - std::time::Duration::from_secs(86_400 * days)).into();
    }
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn cert(name: &str, (chain_pem, key_pem): (String, String), source: CertSource) -> Certificate {
    Certificate {
        name: name.into(),
        hostnames: vec![],
        chain_pem,
        key_pem,
        source,
    }
}

fn build(certs: Vec<Certificate>) -> Result<(), String> {
    let doc = Document {
        certificates: certs,
        ..Default::default()
    };
    Store::new()
        .replace(Source::File, doc)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn a_key_that_is_not_the_leafs_is_refused() {
    let (chain, _) = issue(&["a.example.com"], None);
    let (_, other_key) = issue(&["a.example.com"], None);
    let err = build(vec![cert("a", (chain, other_key), CertSource::Imported)]).unwrap_err();
    assert!(err.contains("certificates[0].key_pem"), "{err}");
    assert!(err.contains("does not match the leaf"), "{err}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let pair = issue(&["a.example.com"], Some(2));
    let err = build(vec![cert("a", pair, CertSource::Imported)]).unwrap_err();
    assert!(err.contains("certificates[0].chain_pem"), "{err}");
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn an_imported_certificate_may_cover_an_issued_ones_name_but_not_another_imported() {
    let imported = cert(
        "mine",
        issue(&["a.example.com"], None),
        CertSource::Imported,
    );
    let issued = cert("acme", issue(&["a.example.com"], None), CertSource::Issued);
    build(vec![imported.clone(), issued]).unwrap();

    let again = cert(
        "mine2",
        issue(&["a.example.com"], None),
        CertSource::Imported,
    );
    let err = build(vec![imported, again]).unwrap_err();
    assert!(err.contains("already served by"), "{err}");
}
