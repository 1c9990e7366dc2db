//! How long the proxy takes to load N certificates from a catalog, and to apply
//! a change to one of them: `cargo run --release -p skein-proxy --example certs -- 100000`.
//! (A measurement, not a test.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use skein_catalog::model::Certificate;
use skein_catalog::{Document, Source, Store};
use skein_proxy::{Proxy, ProxyConfig};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let started = Instant::now();
    let certs: Vec<Certificate> = (0..n)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![format!("h{i}.example.com")])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            Certificate {
                name: format!("c{i}"),
                hostnames: vec![],
                chain_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                source: Default::default(),
            }
        })
        .collect();
    println!("generated {n} certificates in {:?}", started.elapsed());
    let store = Store::new();
    let mut doc = Document {
        certificates: certs,
        ..Default::default()
    };
    let t = Instant::now();
    store.replace(Source::File, doc.clone()).unwrap();
    println!("catalog validation of {n}: {:?}", t.elapsed());
    let proxy = Proxy::new(ProxyConfig::default(), "ams").unwrap();
    let t = Instant::now();
    proxy.apply(&store.snapshot());
    println!(
        "proxy load of {n}: {:?} ({} parsed)",
        t.elapsed(),
        proxy.certs.parses()
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["h0.example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    doc.certificates[0].chain_pem = cert.pem();
    doc.certificates[0].key_pem = key.serialize_pem();
    let t = Instant::now();
    store.replace(Source::File, doc).unwrap();
    let validated = t.elapsed();
    let before = proxy.certs.parses();
    let t = Instant::now();
    proxy.apply(&store.snapshot());
    println!(
        "one certificate changed: catalog {validated:?}, proxy tables {:?}, {} parsed",
        t.elapsed(),
        proxy.certs.parses() - before
    );
    let t = Instant::now();
    for i in 0..100_000 {
        let _ = proxy.certs.lookup(&format!("h{}.example.com", i % n));
    }
    println!("lookup: {:?} per name", t.elapsed() / 100_000);
}
