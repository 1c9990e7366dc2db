//! The proxy with real sockets: a rustls client, real HTTP backends on loopback,
//! the catalog driving routes and certificates live.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use skein_catalog::error::parse_toml;
use skein_catalog::{Document, Source, Store};
use skein_proxy::{ListenerConfig, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and certificates it signs.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "skein test CA");
        Pki {
            ca: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// (chain PEM, key PEM) for `names`.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }
}

/// A backend: answers with the headers it got, as JSON, after `?sleep=ms`.
async fn backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let h = h.clone();
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        if req.headers().contains_key("upgrade") {
                            return Ok(upgrade_echo(req));
                        }
                        // /from/<machine or *>/<directive with ! for = and , for ;>
                        let path = req.uri().path().to_string();
                        if let Some(rest) = path.strip_prefix("/from/")
                            && let Some((who, d)) = rest.split_once('/')
                            && (who == "*" || who == name)
                        {
                            let d = d.replace('!', "=").replace(',', ";");
                            let r = Response::builder()
                                .header("skein-replay", d)
                                .body(Full::new(Bytes::from("replay")))
                                .unwrap();
                            return Ok(r);
                        }
                        let q = req.uri().query().unwrap_or("").to_string();
                        if let Some(code) = q.strip_prefix("status=") {
                            let mut r = Response::new(Full::new(Bytes::from(name)));
                            *r.status_mut() = code.parse().unwrap_or(StatusCode::IM_A_TEAPOT);
                            return Ok(r);
                        }
                        if let Some(ms) = q.strip_prefix("sleep=") {
                            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0)))
                                .await;
                        }
                        let mut headers: HashMap<String, String> = HashMap::new();
                        for (k, v) in req.headers() {
                            headers.insert(k.to_string(), v.to_str().unwrap_or("").to_string());
                        }
                        let uri = req.uri().to_string();
                        let got = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let body = serde_json::json!({"machine": name, "headers": headers, "path": uri, "body": String::from_utf8_lossy(&got)});
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Answers an upgrade with 101, then echoes every byte, upper-cased.
fn upgrade_echo(mut req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut io = TokioIo::new(up);
        let mut buf = [0u8; 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A TCP server that speaks first (`hello <name>\n`), then reports the PROXY
/// header it got, if any, and echoes.
async fn tcp_backend(name: &'static str, expect_proxy: bool) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                if expect_proxy {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let hdr = if buf[..n].starts_with(b"PROXY ") {
                        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
                    } else if buf[..n].starts_with(&skein_proxy::proxy_proto::V2_SIGNATURE) {
                        format!("v2 {} bytes", n)
                    } else {
                        "none".to_string()
                    };
                    let _ = s.write_all(format!("proxy: {hdr}\n").as_bytes()).await;
                } else {
                    let _ = s.write_all(format!("hello {name}\n").as_bytes()).await;
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A closed port (bound, then released).
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Harness {
    stop: tokio::sync::watch::Sender<bool>,
    served: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    store: Arc<Store>,
    proxy: Arc<Proxy>,
    tls: SocketAddr,
    plain: SocketAddr,
    raw: SocketAddr,
    raw_pp: SocketAddr,
    pki: Arc<Pki>,
}

fn catalog(pki: &Pki, machines: &[(&str, &str, SocketAddr)], soft: u32, hard: u32) -> Document {
    catalog_with(pki, machines, soft, hard, "")
}

fn catalog_with(
    pki: &Pki,
    machines: &[(&str, &str, SocketAddr)],
    soft: u32,
    hard: u32,
    extra: &str,
) -> Document {
    let (chain, key) = pki.issue(&["app.example.com", "*.wild.example.com"]);
    let mut text = format!(
        r#"
        regions = [{{ code = "ams", rtt_ms = {{ iad = 80, syd = 250 }} }}, {{ code = "iad", rtt_ms = {{ syd = 200 }} }}, {{ code = "syd" }}]
        hosts = [
          {{ id = "0:2", name = "h-ams", region = "ams", underlay = "127.0.0.2" }},
          {{ id = "0:3", name = "h-iad", region = "iad", underlay = "127.0.0.3" }},
          {{ id = "0:4", name = "h-syd", region = "syd", underlay = "127.0.0.4" }},
        ]
        networks = [{{ id = "18", name = "n" }}]

        [[apps]]
        name = "app"
        network = "n"
        hostnames = ["app.example.com", "*.wild.example.com"]
        [[apps.services]]
        internal_port = 8080
        concurrency = {{ type = "requests", soft_limit = {soft}, hard_limit = {hard} }}
        ports = [{{ port = 443, handlers = ["tls", "http"] }}, {{ port = 80, handlers = ["http"] }}]

        [[apps]]
        name = "selfsigned"
        network = "n"
        hostnames = ["self.example.net"]
        tls = {{ allow_self_signed = true }}
        [[apps.services]]
        internal_port = 8080
        ports = [{{ port = 443, handlers = ["tls", "http"] }}, {{ port = 80, handlers = ["http"], force_https = true }}]

        [[certificates]]
        name = "app"
        chain_pem = '''{chain}'''
        key_pem = '''{key}'''
        "#
    );
    text.push_str(extra);
    for (id, region, addr) in machines {
        let host = match *region {
            "ams" => "0:2",
            "iad" => "0:3",
            _ => "0:4",
        };
        text.push_str(&format!(
            "\n[[machines]]\nid = \"{id}\"\napp = \"app\"\nregion = \"{region}\"\nhost = \"{host}\"\nstate = \"started\"\nendpoint = \"{addr}\"\n"
        ));
    }
    parse_toml(&text).unwrap()
}

impl Harness {
    async fn start(
        machines: &[(&str, &str, SocketAddr)],
        soft: u32,
        hard: u32,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        Self::start_with(machines, soft, hard, |_| String::new(), tweak).await
    }

    async fn start_with(
        machines: &[(&str, &str, SocketAddr)],
        soft: u32,
        hard: u32,
        extra: impl FnOnce(&Pki) -> String,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        let pki = Arc::new(Pki::new());
        let store = Arc::new(Store::new());
        let extra = extra(&pki);
        store
            .replace(
                Source::File,
                catalog_with(&pki, machines, soft, hard, &extra),
            )
            .unwrap();
        Harness::on_host(pki, store, None, "ams", tweak).await
    }

    /// A proxy on catalog host `host` in `region`, serving the catalog of
    /// `store` (several harnesses may share one, as hosts share a catalog).
    async fn on_host(
        pki: Arc<Pki>,
        store: Arc<Store>,
        host: Option<&str>,
        region: &str,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        let mut cfg = ProxyConfig {
            enabled: true,
            listeners: vec![
                ListenerConfig {
                    bind: "127.0.0.1:0".parse().unwrap(),
                    port: Some(443),
                },
                ListenerConfig {
                    bind: "127.0.0.1:0".parse().unwrap(),
                    port: Some(80),
                },
                ListenerConfig {
                    bind: "127.0.0.1:0".parse().unwrap(),
                    port: Some(7000),
                },
                ListenerConfig {
                    bind: "127.0.0.1:0".parse().unwrap(),
                    port: Some(7001),
                },
            ],
            queue_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        tweak(&mut cfg);
        let proxy = Proxy::on_host(
            cfg,
            region,
            host.map(str::to_string),
            Arc::new(skein_proxy::acme::Challenges::default()),
        )
        .unwrap();
        // The tables first: the backhaul listener's address is in the host's record.
        proxy.apply(&store.snapshot());
        let bound = proxy.bind().unwrap();
        let (tls, plain, raw, raw_pp) = (
            bound[0].local,
            bound[1].local,
            bound[2].local,
            bound[3].local,
        );
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(proxy.clone().follow(store.subscribe(), stop.clone()));
        tokio::spawn(skein_proxy::health::run(proxy.clone(), stop.clone()));
        let served = tokio::spawn(proxy.clone().serve(bound, stop, Duration::from_secs(3)));
        proxy.apply(&store.snapshot());
        Harness {
            stop: stop_tx,
            served: std::sync::Mutex::new(Some(served)),
            store,
            proxy,
            tls,
            plain,
            raw,
            raw_pp,
            pki,
        }
    }

    async fn tls_stream(
        &self,
        sni: &str,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let connector = tokio_rustls::TlsConnector::from(self.pki.client(alpn));
        let tcp = TcpStream::connect(self.tls)
            .await
            .map_err(|e| e.to_string())?;
        connector
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    }

    /// A kept-alive HTTPS/1.1 connection with `sni` and the task driving it.
    async fn h1_client(
        &self,
        sni: &str,
    ) -> (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let tls = self.tls_stream(sni, &[b"http/1.1"]).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        (tx, tokio::spawn(conn))
    }

    /// One request over a fresh TLS connection with `sni`; returns status,
    /// headers and body, and the negotiated ALPN.
    async fn https(
        &self,
        sni: &str,
        path: &str,
        headers: &[(&str, &str)],
        h2: bool,
    ) -> Result<(StatusCode, hyper::HeaderMap, String), String> {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = self.tls_stream(sni, alpn).await?;
        let negotiated_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        assert_eq!(negotiated_h2, h2);
        let mut req = Request::builder().uri(format!("https://{sni}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            tx.send_request(req.body(Empty::<Bytes>::new()).unwrap())
                .await
                .map_err(|e| e.to_string())?
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = req.header("host", sni).body(Empty::<Bytes>::new()).unwrap();
            tx.send_request(req).await.map_err(|e| e.to_string())?
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }

    async fn plain_get(&self, host: &str, path: &str) -> (StatusCode, hyper::HeaderMap, String) {
        let tcp = TcpStream::connect(self.plain).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }
}

fn machine_of(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["machine"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn certificates_are_chosen_by_sni_exact_wildcard_and_self_signed() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let (st, _, body) = h.https("app.example.com", "/", &[], false).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(machine_of(&body), "ams1");
    // The wildcard certificate, and the wildcard route.
    let (st, _, _) = h
        .https("x.wild.example.com", "/", &[], false)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    // No certificate at all: the handshake fails.
    let err = h
        .https("unknown.example.org", "/", &[], false)
        .await
        .unwrap_err();
    assert!(err.contains("handshake"), "{err}");
    // The self-signed fallback is served, but our CA does not trust it.
    let err = h
        .https("self.example.net", "/", &[], false)
        .await
        .unwrap_err();
    assert!(
        err.contains("handshake") && err.to_lowercase().contains("unknown"),
        "{err}"
    );
    let served = h.proxy.certs.lookup("self.example.net").unwrap();
    assert_eq!(served.cert.len(), 1);
}

#[tokio::test]
async fn h1_and_h2_with_the_platform_headers() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    for h2 in [false, true] {
        let forged = [
            ("skein-client-ip", "6.6.6.6"),
            ("x-forwarded-for", "10.9.9.9"),
        ];
        let (st, headers, body) = h
            .https("app.example.com", "/p?q=1", &forged, h2)
            .await
            .unwrap();
        assert_eq!(st, StatusCode::OK, "h2={h2} {body}");
        assert_eq!(headers["via"], "1.1 skein");
        assert_eq!(headers["skein-machine"], "ams1");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let got = &v["headers"];
        assert_eq!(
            got["skein-client-ip"], "127.0.0.1",
            "a client cannot forge its address"
        );
        assert_eq!(got["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
        assert_eq!(got["x-forwarded-proto"], "https");
        assert_eq!(got["x-forwarded-port"], "443");
        assert_eq!(got["skein-region"], "ams");
        assert_eq!(got["host"], "app.example.com");
        assert_eq!(got["skein-request-id"].as_str().unwrap().len(), 24);
        assert_eq!(v["path"], "/p?q=1");
    }
}

#[tokio::test]
async fn plain_http_ports_redirects_and_refusals() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let (st, _, body) = h.plain_get("app.example.com", "/x").await;
    assert_eq!(
        (st, machine_of(&body)),
        (StatusCode::OK, "ams1".to_string())
    );
    let (st, headers, _) = h.plain_get("self.example.net", "/a?b").await;
    assert_eq!(st, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(headers["location"], "https://self.example.net/a?b");
    let (st, headers, _) = h.plain_get("nothing.example.com", "/").await;
    assert_eq!(
        (st, &headers["skein-error"]),
        (
            StatusCode::NOT_FOUND,
            &"no_app".parse::<hyper::header::HeaderValue>().unwrap()
        )
    );
}

#[tokio::test]
async fn closest_region_first_then_spill_when_soft_limits_fill() {
    let (a, a_hits) = backend("ams1").await;
    let (i, _) = backend("iad1").await;
    let (s, s_hits) = backend("syd1").await;
    let h = Arc::new(
        Harness::start(
            &[("ams1", "ams", a), ("iad1", "iad", i), ("syd1", "syd", s)],
            2,
            10,
            |_| {},
        )
        .await,
    );
    let (_, _, body) = h.https("app.example.com", "/", &[], true).await.unwrap();
    assert_eq!(machine_of(&body), "ams1");
    // The client's region hint.
    let (_, _, body) = h
        .https(
            "app.example.com",
            "/",
            &[("skein-prefer-region", "syd")],
            true,
        )
        .await
        .unwrap();
    assert_eq!(machine_of(&body), "syd1");
    let before = (a_hits.load(Ordering::SeqCst), s_hits.load(Ordering::SeqCst));
    // Six slow requests at once: ams takes 2 (its soft limit), iad 2, syd 2.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            machine_of(
                &h.https("app.example.com", "/?sleep=400", &[], false)
                    .await
                    .unwrap()
                    .2,
            )
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut got: Vec<String> = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    got.sort();
    assert_eq!(got, ["ams1", "ams1", "iad1", "iad1", "syd1", "syd1"]);
    assert_eq!(a_hits.load(Ordering::SeqCst) - before.0, 2);
    assert_eq!(s_hits.load(Ordering::SeqCst) - before.1, 2);
}

#[tokio::test]
async fn hard_limit_then_queue_then_503() {
    let (a, _) = backend("ams1").await;
    let h = Arc::new(
        Harness::start(&[("ams1", "ams", a)], 1, 2, |c| {
            c.queue_timeout = Duration::from_millis(300)
        })
        .await,
    );
    let slow = |h: Arc<Harness>, ms: u64| {
        tokio::spawn(async move {
            h.https("app.example.com", &format!("/?sleep={ms}"), &[], false)
                .await
                .unwrap()
        })
    };
    // Two hold the machine's two slots for 1.5 s.
    let holders = [slow(h.clone(), 1500), slow(h.clone(), 1500)];
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The third waits in the queue, gives up after 300 ms.
    let started = Instant::now();
    let (st, headers, _) = h.https("app.example.com", "/", &[], false).await.unwrap();
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["skein-error"], "capacity");
    assert!(started.elapsed() >= Duration::from_millis(250));
    for t in holders {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    // A queued request is served as soon as a slot frees.
    let holders = [slow(h.clone(), 200), slow(h.clone(), 200)];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let h2 = h.clone();
    let queued =
        tokio::spawn(async move { h2.https("app.example.com", "/", &[], false).await.unwrap() });
    let (st, _, _) = queued.await.unwrap();
    assert_eq!(st, StatusCode::OK, "the queued request got the freed slot");
    for t in holders {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_refused_connect_is_retried_on_another_machine_and_ejects_the_dead_one() {
    let (i, _) = backend("iad1").await;
    // The dead machine is the closest: it is tried first.
    let h = Harness::start(
        &[("ams1", "ams", dead_addr()), ("iad1", "iad", i)],
        20,
        25,
        |_| {},
    )
    .await;
    for _ in 0..5 {
        let (st, _, body) = h.https("app.example.com", "/", &[], false).await.unwrap();
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(machine_of(&body), "iad1");
    }
    let app = h.proxy.routes.load();
    let svc = &app.app("app.example.com").unwrap().services[0];
    let dead = svc.backends.iter().find(|b| &*b.machine == "ams1").unwrap();
    assert!(dead.load.is_ejected());
    // With no machine left at all: 502 after the retries.
    let h = Harness::start(&[("ams1", "ams", dead_addr())], 20, 25, |_| {}).await;
    let (st, headers, _) = h.https("app.example.com", "/", &[], false).await.unwrap();
    assert_eq!(
        (st, headers["skein-error"].to_str().unwrap()),
        (StatusCode::BAD_GATEWAY, "connect_failed")
    );
}

/// The process's Prometheus recorder (installed once for this test binary).
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    })
}

/// The value of the sample `name{labels}` in a Prometheus text rendering
/// (None when absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{')?;
        let mut got: Vec<(&str, &str)> = rest
            .strip_suffix('}')?
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let mut want = labels.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        (n == name && got == want).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn answers_and_failures_are_counted_per_service_and_per_machine() {
    let prom = prometheus();
    let (ok, _) = backend("mtok").await;
    let dead = dead_addr();
    // An app of its own, so that other tests' requests do not count here;
    // its dead machine is the closest, so it is tried first.
    let h = Harness::start_with(
        &[],
        20,
        25,
        |_| {
            format!(
                r#"
        [[apps]]
        name = "metered"
        network = "n"
        hostnames = ["metered.example.com"]
        [[apps.services]]
        internal_port = 8080
        ports = [{{ port = 80, handlers = ["http"] }}]
        [[machines]]
        id = "mtdead"
        app = "metered"
        region = "ams"
        host = "0:2"
        state = "started"
        endpoint = "{dead}"
        [[machines]]
        id = "mtok"
        app = "metered"
        region = "iad"
        host = "0:3"
        state = "started"
        endpoint = "{ok}"
        "#
            )
        },
        |c| c.response_timeout = Duration::from_millis(300),
    )
    .await;
    for _ in 0..3 {
        let (st, _, body) = h.plain_get("metered.example.com", "/").await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let (st, _, _) = h.plain_get("metered.example.com", "/?status=500").await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    let (st, headers, _) = h.plain_get("metered.example.com", "/?sleep=1500").await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["skein-error"], "upstream_timeout");
    let (st, _, _) = h.plain_get("nothing.example.com", "/").await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    let text = prom.render();
    let machine = |m: &str, extra: (&str, &str)| {
        sample(
            &text,
            if extra.0 == "reason" {
                "skein_proxy_machine_errors_total"
            } else {
                "skein_proxy_machine_requests_total"
            },
            &[("app", "metered"), ("machine", m), extra],
        )
    };
    // The machines' own answers, by machine: the dead one never answered.
    assert_eq!(machine("mtok", ("status", "2xx")), Some(3.0), "{text}");
    assert_eq!(machine("mtok", ("status", "5xx")), Some(1.0));
    assert_eq!(machine("mtdead", ("status", "2xx")), Some(0.0));
    // What went wrong, by machine and reason: one refused connect (then
    // ejected, so the later requests went straight to mt-ok), one timeout.
    assert_eq!(machine("mtdead", ("reason", "connect")), Some(1.0));
    assert_eq!(machine("mtok", ("reason", "timeout")), Some(1.0));
    assert_eq!(machine("mtok", ("reason", "connect")), Some(0.0));
    assert_eq!(machine("mtok", ("reason", "upstream")), Some(0.0));
    // The service counts every answer its requests got, the proxy's own 504
    // with the machine's 500; the app the same; a request for no app counts
    // for no app.
    let svc = |class| {
        sample(
            &text,
            "skein_proxy_service_requests_total",
            &[("app", "metered"), ("port", "8080"), ("status", class)],
        )
    };
    assert_eq!((svc("2xx"), svc("5xx")), (Some(3.0), Some(2.0)));
    let app = |class| {
        sample(
            &text,
            "skein_proxy_app_requests_total",
            &[("app", "metered"), ("status", class)],
        )
    };
    assert_eq!(
        (app("2xx"), app("4xx"), app("5xx")),
        (Some(3.0), Some(0.0), Some(2.0))
    );
}

#[tokio::test]
async fn catalog_changes_reach_new_requests_without_failing_any() {
    let (a, _) = backend("ams1").await;
    let (b, _) = backend("ams2").await;
    let h = Arc::new(Harness::start(&[("ams1", "ams", a)], 100, 200, |_| {}).await);
    // Load runs while the catalog flips between one and two machines.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (h, stop) = (h.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut seen) = (0, std::collections::BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                let (st, _, body) = h.https("app.example.com", "/", &[], false).await.unwrap();
                assert_eq!(st, StatusCode::OK, "{body}");
                seen.insert(machine_of(&body));
                ok += 1;
            }
            (ok, seen)
        }));
    }
    let pki_doc = |two: bool| {
        let mut m = vec![("ams1", "ams", a)];
        if two {
            m.push(("ams2", "ams", b));
        }
        catalog(&h.pki, &m, 100, 200)
    };
    for i in 0..20 {
        h.store.replace(Source::File, pki_doc(i % 2 == 0)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A change is visible to the next request within 100 ms.
    h.store.replace(Source::File, pki_doc(false)).unwrap();
    let changed = Instant::now();
    loop {
        let table = h.proxy.routes.load();
        if table.version == h.store.snapshot().version {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_millis(100),
            "route change took over 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut machines = std::collections::BTreeSet::new();
    for t in load {
        let (ok, seen) = t.await.unwrap();
        total += ok;
        machines.extend(seen);
    }
    assert!(total > 20, "only {total} requests ran");
    assert_eq!(machines.into_iter().collect::<Vec<_>>(), ["ams1", "ams2"]);
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_at_the_header_timeout() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.header_timeout = Duration::from_millis(300)
    })
    .await;
    let mut s = TcpStream::connect(h.plain).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // Keep dribbling bytes; the proxy must close anyway.
    let closed = loop {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => break true,
            Err(_) => {
                if s.write_all(b"a").await.is_err() {
                    break true;
                }
            }
        }
        if started.elapsed() > Duration::from_secs(3) {
            break false;
        }
    };
    assert!(closed, "the connection stayed open past the header timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A silent TLS client is cut off too.
    let mut s = TcpStream::connect(h.tls).await.unwrap();
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_kept_alive_connection_waits_its_keepalive_timeout_and_a_head_has_the_header_timeout() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.header_timeout = Duration::from_millis(400);
        c.keepalive_timeout = Duration::from_secs(3);
    })
    .await;
    let mut s = TcpStream::connect(h.plain).await.unwrap();
    let get = b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n";
    s.write_all(get).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // Quiet for longer than the header timeout, well within the keep-alive
    // one: the connection is still there, and the next head, sent in two
    // parts, has the header timeout from its first byte.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(&get[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    s.write_all(&get[20..]).await.unwrap();
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn plain_http_on_a_tls_port_is_refused() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let tcp = TcpStream::connect(h.tls).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/")
        .header("host", "app.example.com")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["skein-error"], "tls_required");
}

/// Reads until `n` newlines have arrived (or 5 s pass).
async fn read_lines<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.iter().filter(|b| **b == b'\n').count() < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => out.extend_from_slice(&buf[..k]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn websockets_are_tunnelled_after_the_machines_101() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let mut s = h
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_lines(&mut s, 4).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_lowercase().contains("upgrade: websocket"), "{head}");
    let head_end = head.find("\r\n\r\n").map(|i| i + 4).unwrap_or(head.len());
    let mut got = head[head_end..].to_string();
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut buf = [0u8; 64];
    while got.len() < 20 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "tunnel closed");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(got, "PING OVER THE TUNNEL");
}

fn raw_apps(pass_addr: SocketAddr, raw_addr: SocketAddr, pp_addr: SocketAddr) -> String {
    let m = |id: &str, app: &str, addr: SocketAddr| {
        format!(
            "\n[[machines]]\nid = \"{id}\"\napp = \"{app}\"\nregion = \"ams\"\nhost = \"0:2\"\nstate = \"started\"\nendpoint = \"{addr}\"\n"
        )
    };
    format!(
        r#"
        [[apps]]
        name = "raw"
        network = "n"
        services = [{{ internal_port = 7000, ports = [{{ port = 7000 }}] }}]
        [[apps]]
        name = "rawpp"
        network = "n"
        services = [{{ internal_port = 7001, ports = [{{ port = 7001, handlers = ["proxy_proto"] }}] }}]
        [[apps]]
        name = "tlsraw"
        network = "n"
        hostnames = ["tlsraw.example.com"]
        services = [{{ internal_port = 9000, ports = [{{ port = 443, handlers = ["tls", "proxy_proto"], proxy_proto_version = "v2" }}] }}]
        [[apps]]
        name = "pass"
        network = "n"
        hostnames = ["pass.example.com"]
        services = [{{ internal_port = 9443, ports = [{{ port = 443 }}] }}]
        {}{}{}{}"#,
        m("raw1", "raw", raw_addr),
        m("pp1", "rawpp", pp_addr),
        m("tr1", "tlsraw", pp_addr),
        m("pass1", "pass", pass_addr)
    )
}

/// A TLS server with its own certificate for pass.example.com, greeting first.
async fn tls_backend(chain: String, key: String) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(b"hello from the machine's own TLS\n").await;
                    let _ = tls.flush().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn raw_tcp_tls_passthrough_tls_to_tcp_and_proxy_protocol() {
    let (a, _) = backend("ams1").await;
    let raw_addr = tcp_backend("raw1", false).await;
    let pp_addr = tcp_backend("pp1", true).await;
    let pki_pass = std::sync::Mutex::new(None);
    let h = Harness::start_with(
        &[("ams1", "ams", a)],
        20,
        25,
        |pki| {
            let (chain, key) = pki.issue(&["pass.example.com"]);
            *pki_pass.lock().unwrap() = Some((chain, key));
            String::new()
        },
        |_| {},
    )
    .await;
    let (chain, key) = pki_pass.lock().unwrap().take().unwrap();
    let pass_addr = tls_backend(chain, key).await;
    let mut doc = catalog(&h.pki, &[("ams1", "ams", a)], 20, 25);
    let extra: Document = parse_toml(&raw_apps(pass_addr, raw_addr, pp_addr)).unwrap();
    doc.apps.extend(extra.apps);
    doc.machines.extend(extra.machines);
    let (chain_pem, key_pem) = h.pki.issue(&["tlsraw.example.com"]);
    doc.certificates.push(skein_catalog::model::Certificate {
        name: "tlsraw".into(),
        hostnames: vec![],
        chain_pem,
        key_pem,
        source: Default::default(),
    });
    h.store.replace(Source::File, doc).unwrap();
    h.proxy.apply(&h.store.snapshot());

    // Raw TCP where the machine speaks first: nothing waits for the client.
    let mut s = TcpStream::connect(h.raw).await.unwrap();
    assert_eq!(read_lines(&mut s, 1).await, "hello raw1\n");
    s.write_all(b"echo me\n").await.unwrap();
    assert_eq!(read_lines(&mut s, 1).await, "echo me\n");

    // PROXY v1 in front of the client's bytes.
    let mut s = TcpStream::connect(h.raw_pp).await.unwrap();
    let local = s.local_addr().unwrap();
    let line = read_lines(&mut s, 1).await;
    assert_eq!(
        line,
        format!(
            "proxy: PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\n",
            local.port(),
            h.raw_pp.port()
        )
    );

    // TLS terminated here, plaintext and a PROXY v2 header to the machine.
    let mut s = h.tls_stream("tlsraw.example.com", &[]).await.unwrap();
    assert_eq!(read_lines(&mut s, 1).await, "proxy: v2 28 bytes\n");
    s.write_all(b"secret\n").await.unwrap();
    assert_eq!(read_lines(&mut s, 1).await, "secret\n");

    // TLS passthrough by SNI: the client verifies the machine's own certificate.
    let mut s = h.tls_stream("pass.example.com", &[]).await.unwrap();
    assert_eq!(
        read_lines(&mut s, 1).await,
        "hello from the machine's own TLS\n"
    );

    // HTTP on the same port still works beside them.
    let (st, _, _) = h.https("app.example.com", "/", &[], false).await.unwrap();
    assert_eq!(st, StatusCode::OK);
}

/// Sends raw bytes on the plaintext port; returns what came back until the
/// proxy closed the connection (or 3 s passed).
async fn raw_exchange(h: &Harness, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(h.plain).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn request_smuggling_forms_are_refused_and_the_connection_closed() {
    let (a, hits) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    // Content-Length with Transfer-Encoding: hyper frames the body by
    // Transfer-Encoding alone, drops Content-Length and closes the connection
    // after the response (RFC 9112 6.1 allows this instead of a 400). What
    // matters: the bytes after the chunked body never become a request.
    let before = hits.load(Ordering::SeqCst);
    let (resp, closed) = raw_exchange(
        &h,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
    )
    .await;
    assert!(closed, "CL+TE: the connection stayed open");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "CL+TE: {resp}");
    assert!(!resp.contains("smuggled"), "{resp}");
    assert_eq!(hits.load(Ordering::SeqCst), before + 1);
    let cases: [(&str, &[u8]); 7] = [
        ("two different CL", b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        ("CL list", b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4, 5\r\n\r\nabcde"),
        ("bad CL", b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: +4\r\n\r\nabcd"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-A: a\r\n  folded\r\n\r\n"),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("TE not ending in chunked", b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length : 0\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let before = hits.load(Ordering::SeqCst);
        let (resp, closed) = raw_exchange(&h, bytes).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{name}: {resp:?}");
        assert!(closed, "{name}: the connection stayed open");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "{name}: a second response: {resp:?}"
        );
        // A bad chunk is seen only after the request went on: the machine may
        // have been reached, but never by a smuggled second request.
        if name != "bad chunk size" {
            assert_eq!(
                hits.load(Ordering::SeqCst),
                before,
                "{name}: the machine saw it"
            );
        }
    }
    // A well-formed request on the same port still works.
    let (resp, _) = raw_exchange(
        &h,
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// Answers `/healthz` with 200 or 503 as `healthy` says, anything else with
/// its name.
async fn health_backend(
    name: &'static str,
    healthy: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let ok = healthy.load(Ordering::SeqCst);
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "{{\"machine\":\"{name}\"}}"
                        ))));
                        if req.uri().path() == "/healthz" && !ok {
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_failing_health_check_takes_a_machine_out_until_it_passes() {
    let ams_ok = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let a = health_backend("ams1", ams_ok.clone()).await;
    let i = health_backend("iad1", Arc::new(std::sync::atomic::AtomicBool::new(true))).await;
    let h = Harness::start(&[("ams1", "ams", a), ("iad1", "iad", i)], 20, 25, |_| {}).await;
    let mut doc = catalog(&h.pki, &[("ams1", "ams", a), ("iad1", "iad", i)], 20, 25);
    doc.apps[0].services[0]
        .checks
        .push(skein_catalog::model::Check {
            kind: skein_catalog::model::CheckKind::Http,
            port: None,
            path: Some("/healthz".into()),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(80),
        });
    h.store.replace(Source::File, doc).unwrap();
    let machine =
        || async { machine_of(&h.https("app.example.com", "/", &[], false).await.unwrap().2) };
    let wait_for = |want: &'static str| async move {
        let start = Instant::now();
        loop {
            if machine().await == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "never routed to {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_for("ams1").await;
    ams_ok.store(false, Ordering::SeqCst);
    wait_for("iad1").await;
    // Out means out: every request goes elsewhere while the check fails.
    for _ in 0..10 {
        assert_eq!(machine().await, "iad1");
    }
    ams_ok.store(true, Ordering::SeqCst);
    wait_for("ams1").await;
}

#[tokio::test]
async fn a_machine_can_ask_for_the_request_to_be_replayed_elsewhere() {
    let (a1, _) = backend("ams1").await;
    let (a2, _) = backend("ams2").await;
    let (i1, _) = backend("iad1").await;
    let (s1, _) = backend("syd1").await;
    let (o1, _) = backend("other1").await;
    let machines = [
        ("ams1", "ams", a1),
        ("ams2", "ams", a2),
        ("iad1", "iad", i1),
        ("syd1", "syd", s1),
    ];
    let h = Harness::start(&machines, 20, 25, |_| {}).await;
    let mut doc = catalog(&h.pki, &machines, 20, 25);
    let other: Document = parse_toml(&format!(
        r#"
        [[apps]]
        name = "other"
        network = "n"
        services = [{{ internal_port = 8080, ports = [{{ port = 443, handlers = ["tls", "http"] }}] }}]
        [[machines]]
        id = "other1"
        app = "other"
        region = "iad"
        host = "0:3"
        state = "started"
        endpoint = "{o1}"
        "#
    ))
    .unwrap();
    doc.apps.extend(other.apps);
    doc.machines.extend(other.machines);
    h.store.replace(Source::File, doc).unwrap();
    h.proxy.apply(&h.store.snapshot());
    let get = |path: &'static str| {
        let h = &h;
        async move { h.https("app.example.com", path, &[], false).await.unwrap() }
    };
    // ams1 is the closest; each directive moves the request.
    assert_eq!(machine_of(&get("/from/ams1/region!iad").await.2), "iad1");
    assert_eq!(machine_of(&get("/from/ams1/instance!syd1").await.2), "syd1");
    assert_eq!(machine_of(&get("/from/ams1/app!other").await.2), "other1");
    let (st, headers, body) = get("/from/ams1/elsewhere!true").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(machine_of(&body), "ams2");
    assert!(
        !headers.contains_key("skein-replay"),
        "the client never sees the directive"
    );
    // Combined: another app, in a region where it has no machine.
    let (st, headers, _) = get("/from/ams1/app!other,region!syd").await;
    assert_eq!(
        (st, headers["skein-error"].to_str().unwrap()),
        (StatusCode::SERVICE_UNAVAILABLE, "no_machines")
    );
    // A loop is cut with a clear error.
    let (st, headers, _) = get("/from/*/elsewhere!true").await;
    assert_eq!(
        (st, headers["skein-error"].to_str().unwrap()),
        (StatusCode::LOOP_DETECTED, "replay_loop")
    );
    // The body goes along.
    let tls = h
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/from/ams1/region!iad")
        .header("host", "app.example.com")
        .body(Full::new(Bytes::from_static(b"the payload")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["machine"].as_str(), v["body"].as_str()),
        (Some("iad1"), Some("the payload"))
    );
}

#[test]
fn replay_directives_parse() {
    use skein_proxy::http::Replay;
    let r = Replay::parse("region=iad; app=web ;elsewhere=true").unwrap();
    assert_eq!(
        (r.region.as_deref(), r.app.as_deref(), r.elsewhere),
        (Some("iad"), Some("web"), true)
    );
    assert!(Replay::parse("").is_none());
    assert!(Replay::parse("colour=blue").is_none());
    assert!(Replay::parse("region").is_none());
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_refused_with_413() {
    let (a, hits) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.max_request_body_bytes = 1000
    })
    .await;
    let big = "x".repeat(5000);
    let announced =
        format!("POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 5000\r\n\r\n{big}");
    let (resp, closed) = raw_exchange(&h, announced.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(closed);
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n{big}\r\n0\r\n\r\n"
    );
    let (resp, closed) = raw_exchange(&h, chunked.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(closed);
    let before = hits.load(Ordering::SeqCst);
    let small = "POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let (resp, _) = raw_exchange(&h, small.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(hits.load(Ordering::SeqCst), before + 1);
}

/// An h2c server that answers like a gRPC server: a body, then trailers.
async fn h2c_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let version =
                            format!("{:?} te={:?}", req.version(), req.headers().get("te"));
                        let got = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "ok".parse().unwrap());
                        let frames = vec![
                            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(format!(
                                "{version} got {}",
                                got.len()
                            )))),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h2_to_h2c_keeps_trailers_end_to_end_like_grpc() {
    let (a, _) = backend("ams1").await;
    let g = h2c_backend().await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let mut doc = catalog(&h.pki, &[("ams1", "ams", a)], 20, 25);
    let extra: Document = parse_toml(&format!(
        r#"
        [[apps]]
        name = "grpc"
        network = "n"
        hostnames = ["grpc.wild.example.com"]
        services = [{{ internal_port = 50051, backend_protocol = "h2c", ports = [{{ port = 443, handlers = ["tls", "http"] }}] }}]
        [[machines]]
        id = "g1"
        app = "grpc"
        region = "ams"
        host = "0:2"
        state = "started"
        endpoint = "{g}"
        "#
    ))
    .unwrap();
    doc.apps.extend(extra.apps);
    doc.machines.extend(extra.machines);
    h.store.replace(Source::File, doc).unwrap();
    h.proxy.apply(&h.store.snapshot());
    let tls = h
        .tls_stream("grpc.wild.example.com", &[b"h2"])
        .await
        .unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("https://grpc.wild.example.com/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x05hello")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        collected.to_bytes(),
        "HTTP/2.0 te=Some(\"trailers\") got 10"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
    let (a, _) = backend("ams1").await;
    let h = Arc::new(Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await);
    let h2 = h.clone();
    let slow =
        tokio::spawn(async move { h2.https("app.example.com", "/?sleep=800", &[], false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.stop.send(true).unwrap();
    let served = h.served.lock().unwrap().take().unwrap();
    // New connections are refused once the listeners are closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(h.tls).await.is_err(),
        "still accepting after shutdown"
    );
    // The request under way completes.
    let (st, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(
        (st, machine_of(&body)),
        (StatusCode::OK, "ams1".to_string())
    );
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("drained in time")
        .unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_client_is_closed() {
    let (a, _) = backend("ams1").await;
    // The keep-alive timeout, not the (default, 10 s) header timeout.
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.keepalive_timeout = Duration::from_millis(300)
    })
    .await;
    let mut s = TcpStream::connect(h.plain).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now say nothing: the connection must not be held open for ever.
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection not closed: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

/// Stops the proxy and waits (up to 800 ms) for its connections to be drained.
async fn drained_in_time(h: &Harness) {
    h.stop.send(true).unwrap();
    let served = h.served.lock().unwrap().take().unwrap();
    tokio::time::timeout(Duration::from_millis(800), served)
        .await
        .expect("drained in time")
        .unwrap();
}

/// Waits up to 3 s for `ok`.
async fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return String::from_utf8_lossy(&out[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_rest_and_keep_serving() {
    let (a, hits) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.rest_after = Duration::from_millis(30);
        c.header_timeout = Duration::from_millis(1500);
        c.keepalive_timeout = Duration::from_millis(1500);
    })
    .await;
    // A kept-alive HTTPS/1.1 connection goes quiet: it rests.
    let (mut tx, client) = h.h1_client("app.example.com").await;
    let get = |q: &str| {
        Request::builder()
            .uri(format!("/{q}"))
            .header("host", "app.example.com")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = tx.send_request(get("")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    eventually("the idle connection to rest", || {
        h.proxy.connections_resting() == 1
    })
    .await;
    // The same connection serves the next requests, one of them slower than
    // `rest_after`: a request in flight never makes its connection rest.
    for q in ["", "?sleep=300", ""] {
        tx.ready().await.expect("the connection is still open");
        let resp = tx.send_request(get(q)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{q}");
        assert!(
            resp.headers().get("connection").is_none(),
            "keep-alive lost on {q}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(machine_of(&String::from_utf8_lossy(&body)), "ams1");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    eventually("the connection to rest again", || {
        h.proxy.connections_resting() == 1
    })
    .await;

    // A request head that arrives in two parts, the connection resting in
    // between, and two pipelined requests after a rest.
    let mut raw = h
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    raw.write_all(b"GET /?one HTTP/1.1\r\nHost: app.exa")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write_all(b"mple.com\r\n\r\n").await.unwrap();
    let r = read_response(&mut raw).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("/?one"), "{r}");
    eventually("both connections to rest", || {
        h.proxy.connections_resting() == 2
    })
    .await;
    raw.write_all(b"GET /?two HTTP/1.1\r\nHost: app.example.com\r\n\r\nGET /?three HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        .await
        .unwrap();
    let (two, three) = (read_response(&mut raw).await, read_response(&mut raw).await);
    assert!(
        two.starts_with("HTTP/1.1 200") && two.contains("/?two"),
        "{two}"
    );
    assert!(
        three.starts_with("HTTP/1.1 200") && three.contains("/?three"),
        "{three}"
    );

    // Part of a head, then silence: closed at the header timeout, resting or
    // not.
    eventually("both connections to rest", || {
        h.proxy.connections_resting() == 2
    })
    .await;
    let quiet = Instant::now();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: app").await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    let took = quiet.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "a slow head outlived the header timeout: {took:?}"
    );

    // The first connection, resting past the keep-alive timeout, was closed
    // as any idle keep-alive connection is.
    tokio::time::timeout(Duration::from_secs(2), client)
        .await
        .expect("the idle connection was closed")
        .unwrap()
        .unwrap();
    assert_eq!(h.proxy.connections_resting(), 0);

    // A drain closes resting connections at once.
    let (mut tx, client) = h.h1_client("app.example.com").await;
    let resp = tx.send_request(get("")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    eventually("the connection to rest", || {
        h.proxy.connections_resting() == 1
    })
    .await;
    drained_in_time(&h).await;
    tokio::time::timeout(Duration::from_secs(1), client)
        .await
        .expect("the client saw its connection end")
        .unwrap()
        .unwrap();
    assert_eq!(h.proxy.connections_resting(), 0);
}

#[tokio::test]
async fn a_certificate_change_parses_only_that_certificate() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    let mut doc = catalog(&h.pki, &[("ams1", "ams", a)], 20, 25);
    for i in 0..20 {
        let (chain_pem, key_pem) = h.pki.issue(&[&format!("h{i}.example.org")]);
        doc.certificates.push(skein_catalog::model::Certificate {
            name: format!("c{i}"),
            hostnames: vec![],
            chain_pem,
            key_pem,
            source: Default::default(),
        });
    }
    // Only the proxy's own catalog follower applies changes here.
    h.store.replace(Source::File, doc.clone()).unwrap();
    settled(&h).await;
    assert_eq!(h.proxy.certs.len(), 21);
    let before = h.proxy.certs.parses();
    let (chain_pem, key_pem) = h.pki.issue(&["h7.example.org"]);
    doc.certificates[8].chain_pem = chain_pem;
    doc.certificates[8].key_pem = key_pem;
    h.store.replace(Source::File, doc).unwrap();
    settled(&h).await;
    assert_eq!(
        h.proxy.certs.parses() - before,
        1,
        "only the changed certificate is parsed again"
    );
    assert!(h.proxy.certs.lookup("h7.example.org").is_some());
}

/// Waits until the proxy's tables are at the store's version.
async fn settled(h: &Harness) {
    let want = h.store.snapshot().version;
    let start = Instant::now();
    while h.proxy.routes.load().version != want {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The certificate table is swapped right after the routes.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A port free on the three hosts' loopback underlays (127.0.0.2-4).
fn backhaul_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if ["127.0.0.3", "127.0.0.4"]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
}

/// Proxies sharing one catalog as the hosts `(name, region)`, each with the
/// backhaul on, reached at its underlay (loopback here).
async fn hosts(doc: Document, pki: Arc<Pki>, hosts: &[(&str, &str)]) -> Vec<Harness> {
    hosts_with(doc, pki, hosts, |_| {}).await
}

/// [`hosts`], each proxy's configuration changed by `tweak` too.
async fn hosts_with(
    doc: Document,
    pki: Arc<Pki>,
    hosts: &[(&str, &str)],
    tweak: impl Fn(&mut ProxyConfig),
) -> Vec<Harness> {
    let store = Arc::new(Store::new());
    store.replace(Source::File, doc).unwrap();
    let port = backhaul_port();
    let mut out = Vec::new();
    for (name, region) in hosts {
        out.push(
            Harness::on_host(pki.clone(), store.clone(), Some(name), region, |c| {
                c.backhaul = skein_proxy::config::BackhaulConfig {
                    enabled: true,
                    port,
                    via: skein_proxy::config::BackhaulVia::Underlay,
                    ..Default::default()
                };
                tweak(c);
            })
            .await,
        );
    }
    out
}

#[tokio::test]
async fn an_edge_reaches_a_machine_on_another_host_through_that_hosts_proxy() {
    let (i, _) = backend("iad1").await;
    let pp_addr = tcp_backend("pp1", true).await;
    let pki = Arc::new(Pki::new());
    let extra = r#"
        [[apps]]
        name = "rawpp"
        network = "n"
        services = [{ internal_port = 7001, ports = [{ port = 7001, handlers = ["proxy_proto"] }] }]
    "#;
    let mut doc = catalog_with(&pki, &[("iad1", "iad", i)], 20, 25, extra);
    let pp: Document = parse_toml(&format!(
        "[[machines]]\nid = \"pp1\"\napp = \"rawpp\"\nregion = \"iad\"\nhost = \"0:3\"\nstate = \"started\"\nendpoint = \"{pp_addr}\"\n"
    ))
    .unwrap();
    doc.machines.extend(pp.machines);
    let hs = hosts(doc, pki, &[("h-ams", "ams"), ("h-iad", "iad")]).await;
    let (edge, worker) = (&hs[0], &hs[1]);
    // The edge sends it to the worker's proxy, not to the machine.
    let route = edge.proxy.routes.load();
    let b = &route.app("app.example.com").unwrap().services[0].backends[0];
    assert_eq!(
        b.via.map(|a| a.ip().to_string()).as_deref(),
        Some("127.0.0.3"),
        "h-iad's underlay"
    );
    let worker_route = worker.proxy.routes.load();
    assert_eq!(
        worker_route.app("app.example.com").unwrap().services[0].backends[0].via,
        None,
        "the worker delivers its own machine itself"
    );
    for h2 in [false, true] {
        let forged = [("skein-backhaul-machine", "elsewhere")];
        let (st, headers, body) = edge
            .https("app.example.com", "/p?q=1", &forged, h2)
            .await
            .unwrap();
        assert_eq!(st, StatusCode::OK, "h2={h2} {body}");
        assert_eq!(machine_of(&body), "iad1");
        assert_eq!(headers["skein-machine"], "iad1");
        // Two proxies on the way: the edge and the worker.
        let via: Vec<_> = headers.get_all("via").iter().collect();
        assert_eq!(via.len(), 2, "{via:?}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let got = v["headers"].as_object().unwrap();
        assert_eq!(
            got["skein-client-ip"], "127.0.0.1",
            "the client, not the edge"
        );
        assert_eq!(got["skein-region"], "ams", "the edge's region");
        assert_eq!(got["x-forwarded-proto"], "https");
        assert!(
            got.keys().all(|k| !k.starts_with("skein-backhaul")),
            "no backhaul header reaches the machine: {got:?}"
        );
        assert_eq!(v["path"], "/p?q=1");
    }
    // A websocket rides its own upgraded backhaul stream.
    let mut s = edge
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_lines(&mut s, 4).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"across hosts").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"ACROSS HOSTS");
    // Raw TCP: its own stream; the worker writes the PROXY header with the
    // client's address and the edge's port, as if the machine were local.
    let mut s = TcpStream::connect(edge.raw_pp).await.unwrap();
    let local = s.local_addr().unwrap();
    assert_eq!(
        read_lines(&mut s, 1).await,
        format!(
            "proxy: PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\n",
            local.port(),
            edge.raw_pp.port()
        )
    );
    s.write_all(b"raw bytes\n").await.unwrap();
    assert_eq!(read_lines(&mut s, 1).await, "raw bytes\n");
}

#[tokio::test]
async fn the_backhauls_connection_uses_the_configured_congestion_control_at_both_ends() {
    let (i, _) = backend("iad1").await;
    let pki = Arc::new(Pki::new());
    let doc = catalog_with(&pki, &[("iad1", "iad", i)], 20, 25, "");
    // One the system does not use by default, so the test sees the setting.
    let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    let chosen = if system.trim() == "reno" {
        "cubic"
    } else {
        "reno"
    };
    let hs = hosts_with(doc, pki, &[("h-ams", "ams"), ("h-iad", "iad")], |c| {
        c.multiplexed_congestion = Some(chosen.to_string());
    })
    .await;
    let (st, _, body) = hs[0]
        .https("app.example.com", "/", &[], false)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(machine_of(&body), "iad1", "over the backhaul");
    // Both ends of the backhaul's h2 connection: the edge's (dialled) and
    // the worker's (accepted, inheriting its listener's).
    let port = hs[0].proxy.cfg.backhaul.port;
    let out = std::process::Command::new("ss")
        .args(["-Htin", "state", "established"])
        .arg(format!("( sport = :{port} or dport = :{port} )"))
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let algorithms: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(algorithms, [chosen, chosen], "{text}");
}

/// A replay sends the head as the last hop had it: written by skein's own
/// HTTP/1.1 to a local machine, then sent over the backhaul's h2 (and the
/// other way round), with the body along and the same request id.
#[tokio::test]
async fn a_replay_moves_between_a_local_machine_and_another_hosts() {
    let (a, _) = backend("ams1").await;
    let (i, _) = backend("iad1").await;
    let pki = Arc::new(Pki::new());
    let doc = catalog(&pki, &[("ams1", "ams", a), ("iad1", "iad", i)], 20, 25);
    let hs = hosts(doc, pki, &[("h-ams", "ams"), ("h-iad", "iad")]).await;
    let edge = &hs[0];
    // ams1 is the edge's own machine; a client preferring iad gets iad1.
    for (path, prefer, lands) in [
        ("/from/ams1/region!iad", "ams", "iad1"),
        ("/from/iad1/instance!ams1", "iad", "ams1"),
    ] {
        for h2 in [false, true] {
            let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
            let tls = edge.tls_stream("app.example.com", alpn).await.unwrap();
            let req = Request::post(path)
                .header("host", "app.example.com")
                .header("skein-prefer-region", prefer)
                .body(Full::new(Bytes::from_static(b"the payload")))
                .unwrap();
            let resp = if h2 {
                let (mut tx, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                tx.send_request(req).await.unwrap()
            } else {
                let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                tx.send_request(req).await.unwrap()
            };
            assert_eq!(resp.status(), StatusCode::OK, "{path} h2={h2}");
            assert!(!resp.headers().contains_key("skein-replay"));
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (
                    v["machine"].as_str(),
                    v["body"].as_str(),
                    v["path"].as_str()
                ),
                (Some(lands), Some("the payload"), Some(path)),
                "h2={h2}"
            );
            let got = v["headers"].as_object().unwrap();
            assert_eq!(got["host"], "app.example.com", "h2={h2}");
            assert_eq!(got["skein-region"], "ams", "the edge's region");
            assert_eq!(got["skein-request-id"].as_str().map(str::len), Some(24));
            assert!(
                got.keys().all(|k| !k.starts_with("skein-backhaul")),
                "no backhaul header reaches the machine: {got:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_worker_holds_a_machines_hard_limit_for_every_edge() {
    // iad1 takes one request at a time; ams1 is the way out.
    let (i, _) = backend("iad1").await;
    let (a, _) = backend("ams1").await;
    let pki = Arc::new(Pki::new());
    let doc = catalog(&pki, &[("iad1", "iad", i), ("ams1", "ams", a)], 1, 1);
    // Two edges (syd, and iad's worker serving as an edge too) and ams's host.
    let hs = Arc::new(
        hosts(
            doc,
            pki,
            &[("h-syd", "syd"), ("h-iad", "iad"), ("h-ams", "ams")],
        )
        .await,
    );
    let (syd, iad) = (0, 1);
    // The iad edge fills iad1 (its own machine, closest to it).
    let hold = {
        let hs = hs.clone();
        tokio::spawn(async move {
            hs[iad]
                .https("app.example.com", "/?sleep=1500", &[], false)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The syd edge counts nothing on iad1 and picks it (closest: 200 ms
    // against 250); iad's proxy refuses, and the request goes to ams1.
    let (st, headers, body) = hs[syd]
        .https("app.example.com", "/", &[], false)
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(machine_of(&body), "ams1");
    assert!(!headers.contains_key("skein-backhaul-refused"));
    let (st, _, body) = hold.await.unwrap();
    assert_eq!((st, machine_of(&body).as_str()), (StatusCode::OK, "iad1"));
    // With iad1 free again, syd's requests land there.
    let (st, _, body) = hs[syd]
        .https("app.example.com", "/", &[], false)
        .await
        .unwrap();
    assert_eq!((st, machine_of(&body).as_str()), (StatusCode::OK, "iad1"));
}

#[tokio::test]
async fn a_refusal_with_nowhere_else_to_go_reaches_the_client() {
    let (i, _) = backend("iad1").await;
    let pki = Arc::new(Pki::new());
    let doc = catalog(&pki, &[("iad1", "iad", i)], 1, 1);
    let hs = Arc::new(hosts(doc, pki, &[("h-syd", "syd"), ("h-iad", "iad")]).await);
    let hold = {
        let hs = hs.clone();
        tokio::spawn(async move {
            hs[1]
                .https("app.example.com", "/?sleep=1000", &[], false)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, headers, _) = hs[0]
        .https("app.example.com", "/", &[], false)
        .await
        .unwrap();
    assert_eq!(
        (st, headers["skein-error"].to_str().unwrap()),
        (StatusCode::SERVICE_UNAVAILABLE, "capacity"),
        "the worker's reason, not a connect failure"
    );
    assert_eq!(hold.await.unwrap().0, StatusCode::OK);
}

/// A client stream whose first write stops after `first` bytes and whose next
/// one waits `pause`: the h2 preface arrives in two pieces.
struct SlowStart {
    inner: TcpStream,
    first: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    sent: usize,
}

impl tokio::io::AsyncRead for SlowStart {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowStart {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.sent >= self.first
            && let Some(p) = self.pause.as_mut()
        {
            std::task::ready!(p.as_mut().poll(cx));
            self.pause = None;
        }
        let cap = if self.sent < self.first {
            (self.first - self.sent).min(buf.len())
        } else {
            buf.len()
        };
        let n = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..cap]))?;
        self.sent += n;
        std::task::Poll::Ready(Ok(n))
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_and_drained_with_its_request_in_flight() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    // The preface in two pieces, 150 ms apart: still h2, not HTTP/1.1.
    let tcp = TcpStream::connect(h.plain).await.unwrap();
    let io = SlowStart {
        inner: tcp,
        first: 10,
        pause: Some(Box::pin(tokio::time::sleep(Duration::from_millis(150)))),
        sent: 0,
    };
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        Request::builder()
            .uri(format!("http://app.example.com{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = tx.send_request(get("/")).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(machine_of(&String::from_utf8_lossy(&body)), "ams1");

    // A stop while a request is under way on the connection: that request
    // finishes, the connection is closed (GOAWAY), the proxy is done in time.
    let slow = tx.send_request(get("/?sleep=600"));
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.stop.send(true).unwrap();
    let served = h.served.lock().unwrap().take().unwrap();
    let resp = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(machine_of(&String::from_utf8_lossy(&body)), "ams1");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("drained in time")
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the proxy closed the h2 connection");
    assert!(ended.is_ok());
    assert!(
        tx.send_request(get("/")).await.is_err(),
        "served after the drain"
    );
}

#[tokio::test]
async fn requests_are_served_whether_they_ride_the_handshake_or_carry_bodies() {
    let (a, hits) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |_| {}).await;
    // The request goes out with the client's last handshake flight (rustls
    // sends what was written before the handshake ended right after its
    // Finished): the proxy reads it along with the handshake, and must not
    // wait on the socket for bytes it already has.
    let config = h.pki.client(&[b"http/1.1"]);
    let addr = h.tls;
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let name = ServerName::try_from("app.example.com").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        conn.writer()
            .write_all(
                b"GET /?first HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(
        text.contains("/?first") && text.contains("connection: close"),
        "{text}"
    );

    // On one connection: requests skein reads itself, one with a body (hyper
    // reads it), more after it, and more again once the connection has rested.
    let mut raw = h
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    let steps: [(&str, &str); 4] = [
        ("GET /?a HTTP/1.1\r\nHost: app.example.com\r\n\r\n", "/?a"),
        (
            "POST /?b HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 5\r\n\r\nhello",
            "/?b",
        ),
        ("GET /?c HTTP/1.1\r\nHost: app.example.com\r\n\r\n", "/?c"),
        ("HEAD /?d HTTP/1.1\r\nHost: app.example.com\r\n\r\n", ""),
    ];
    for (req, path) in steps {
        raw.write_all(req.as_bytes()).await.unwrap();
        let r = if req.starts_with("HEAD") {
            // A length, and no body.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                assert_eq!(raw.read(&mut b).await.unwrap(), 1, "closed");
                head.push(b[0]);
            }
            String::from_utf8_lossy(&head).into_owned()
        } else {
            read_response(&mut raw).await
        };
        assert!(r.starts_with("HTTP/1.1 200"), "{req}: {r}");
        assert!(r.contains(path), "{req}: {r}");
        assert!(!r.contains("connection: close"), "{req}: {r}");
    }
    eventually("the connection to rest", || {
        h.proxy.connections_resting() == 1
    })
    .await;
    raw.write_all(b"GET /?e HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut raw).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("/?e"), "{r}");
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_drain_ends_a_connection_hyper_serves_even_with_resting_off() {
    let (a, _) = backend("ams1").await;
    let h = Harness::start(&[("ams1", "ams", a)], 20, 25, |c| {
        c.rest_after = Duration::ZERO;
    })
    .await;
    // A request with a body: hyper serves it, and the connection stays with
    // hyper (it never rests).
    let mut raw = h
        .tls_stream("app.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    raw.write_all(b"POST /?b HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let r = read_response(&mut raw).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("/?b"), "{r}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.proxy.connections_resting(), 0, "resting is off");
    drained_in_time(&h).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), raw.read(&mut buf))
        .await
        .expect("the connection ended");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}
