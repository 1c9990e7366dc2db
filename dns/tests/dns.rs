//! The DNS server over real UDP and TCP sockets, with hickory-proto as the
//! client's wire codec: every name form, views, errors, truncation, live updates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use skein_catalog::error::parse_toml;
use skein_catalog::{Document, Source, Store};
use skein_dns::{Dns, DnsConfig};

const CATALOG: &str = r#"
regions = [{ code = "ams", rtt_ms = { iad = 80 } }, { code = "iad" }]
hosts = [
  { id = "0:2", name = "h-ams", region = "ams", underlay = "10.0.0.2" },
  { id = "0:3", name = "h-iad", region = "iad", underlay = "10.0.0.3" },
]
networks = [{ id = "0:18", name = "acme" }, { id = "0:19", name = "other" }]

[[apps]]
name = "web"
network = "acme"
flycast = "fdaa:0:18:0:1::5"
[[apps]]
name = "db"
network = "other"

[[machines]]
id = "m1"
app = "web"
region = "ams"
host = "0:2"
state = "started"
address = "fdaa:0:18:0:2:0:1:0"
metadata = { process_group = "worker" }
[[machines]]
id = "m2"
app = "web"
region = "iad"
host = "0:3"
state = "started"
address = "fdaa:0:18:0:3:0:1:0"
[[machines]]
id = "m3"
app = "web"
region = "iad"
host = "0:3"
state = "stopped"
[[machines]]
id = "d1"
app = "db"
region = "ams"
host = "0:2"
state = "started"

[[k8s_services]]
name = "web"
namespace = "default"
network = "acme"
cluster_ip = "fdaa:0:18:0:1::10"
ports = [{ name = "http", port = 80, target_port = 8080 }, { port = 9090 }]
[[k8s_services]]
name = "pg"
namespace = "data"
network = "acme"
type = "headless"
ports = [{ name = "pg", port = 5432 }]
endpoints = [{ machine = "m1", hostname = "pg-0" }, { machine = "m2", ready = false }]
[[k8s_services]]
name = "ext"
namespace = "default"
network = "acme"
type = "external_name"
external_name = "example.org"
"#;

struct Server {
    store: Arc<Store>,
    dns: Arc<Dns>,
    addr: SocketAddr,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start(doc: Document) -> Server {
    start_with(doc, |_| {}).await
}

async fn start_with(doc: Document, tweak: impl FnOnce(&mut DnsConfig)) -> Server {
    let store = Arc::new(Store::new());
    store.replace(Source::File, doc).unwrap();
    let mut cfg = DnsConfig {
        enabled: true,
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        default_network: Some("acme".into()),
        threads: Some(2),
        ..Default::default()
    };
    tweak(&mut cfg);
    let dns = Dns::new(cfg);
    let bound = dns.bind().unwrap();
    let addr = bound[0].local;
    let (stop, rx) = tokio::sync::watch::channel(false);
    dns.apply(&store.snapshot());
    tokio::spawn(dns.clone().follow(store.subscribe(), rx.clone()));
    tokio::spawn(dns.clone().serve(bound, rx));
    Server {
        store,
        dns,
        addr,
        _stop: stop,
    }
}

fn query_bytes(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        m.edns = Some(Default::default());
    }
    m.to_vec().unwrap()
}

fn udp(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(bytes, addr).unwrap();
    let mut buf = vec![0u8; 65535];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn ask(addr: SocketAddr, name: &str, t: RecordType) -> Message {
    Message::from_vec(&udp(addr, &query_bytes(name, t, true)).expect("an answer")).unwrap()
}

fn tcp(addr: SocketAddr, bytes: &[u8]) -> Message {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

fn aaaa(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn txt(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_and_flycast_names() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let a = s.addr;
    let m = ask(a, "web.internal.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(
        aaaa(&m),
        ["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"],
        "stopped machines are left out"
    );
    assert_eq!(
        aaaa(&ask(a, "global.web.internal.", RecordType::AAAA)).len(),
        2
    );
    assert_eq!(
        aaaa(&ask(a, "iad.web.internal.", RecordType::AAAA)),
        ["fdaa:0:18:0:3:0:1:0"]
    );
    assert_eq!(
        aaaa(&ask(a, "m1.vm.web.internal.", RecordType::AAAA)),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    assert_eq!(
        aaaa(&ask(a, "worker.process.web.internal.", RecordType::AAAA)),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    assert_eq!(
        aaaa(&ask(a, "app.process.web.internal.", RecordType::AAAA)),
        ["fdaa:0:18:0:3:0:1:0"]
    );
    assert_eq!(
        aaaa(&ask(a, "web.flycast.", RecordType::AAAA)),
        ["fdaa:0:18:0:1::5"]
    );
    assert_eq!(txt(&ask(a, "_apps.internal.", RecordType::TXT)), ["web"]);
    assert_eq!(
        txt(&ask(a, "vms.web.internal.", RecordType::TXT)),
        ["m1 ams,m2 iad"]
    );
    assert_eq!(
        txt(&ask(a, "regions.web.internal.", RecordType::TXT)),
        ["ams,iad"]
    );
    assert_eq!(
        txt(&ask(a, "_instances.internal.", RecordType::TXT)).len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_names() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let a = s.addr;
    assert_eq!(
        aaaa(&ask(a, "web.default.svc.cluster.local.", RecordType::AAAA)),
        ["fdaa:0:18:0:1::10"]
    );
    let m = ask(
        a,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(
        (srv.port, srv.target.to_ascii().as_str()),
        (80, "web.default.svc.cluster.local.")
    );
    // Unnamed ports get no SRV record.
    let m = ask(
        a,
        "_9090._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Headless: ready endpoints only, and their hostnames.
    assert_eq!(
        aaaa(&ask(a, "pg.data.svc.cluster.local.", RecordType::AAAA)),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    assert_eq!(
        aaaa(&ask(a, "pg-0.pg.data.svc.cluster.local.", RecordType::AAAA)),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    let m = ask(a, "ext.default.svc.cluster.local.", RecordType::AAAA);
    let RData::CNAME(c) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(c.0.to_ascii(), "example.org.");
    assert_eq!(
        txt(&ask(a, "dns-version.cluster.local.", RecordType::TXT)),
        ["1.1.0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers_carry_the_soa_and_case_is_kept() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let a = s.addr;
    let m = ask(a, "nope.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(m.authorities[0].name.to_ascii(), "cluster.local.");
    // NODATA: the name exists without this type.
    let m = ask(a, "web.default.svc.cluster.local.", RecordType::TXT);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    // Empty non-terminals exist.
    let m = ask(a, "default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let m = ask(a, "WEB.Default.SVC.cluster.LOCAL.", RecordType::AAAA);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "WEB.Default.SVC.cluster.LOCAL."
    );
    assert_eq!(aaaa(&m), ["fdaa:0:18:0:1::10"]);
    // Not ours: refused (forwarding comes later).
    assert_eq!(
        ask(a, "example.com.", RecordType::AAAA)
            .metadata
            .response_code,
        ResponseCode::Refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_network_sees_only_its_own_names() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    // The function each socket loop calls, with the asker's address as the
    // kernel would give it (sending from fdaa addresses needs root).
    let answer = |src: &str, name: &str| {
        let q = query_bytes(name, RecordType::AAAA, false);
        let mut out = Vec::new();
        let src = src.parse::<IpAddr>().unwrap();
        let outcome = s.dns.handle(&s.dns.views(), src, &q, &mut out, true);
        assert!(matches!(outcome, skein_dns::Outcome::Reply));
        Message::from_vec(&out).unwrap()
    };
    let from_other = "fdaa:0:19:0:2:0:1:0";
    assert_eq!(
        answer(from_other, "web.internal.").metadata.response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        answer(from_other, "web.default.svc.cluster.local.")
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(aaaa(&answer(from_other, "db.internal.")).len(), 1);
    assert_eq!(
        answer(from_other, "web.flycast.").metadata.response_code,
        ResponseCode::NXDomain
    );
    // acme shares web's flycast address with `other`: that one name (and
    // nothing else of acme) appears in other's view, live.
    let mut doc: Document = parse_toml(CATALOG).unwrap();
    doc.apps[0].flycast_from = vec!["other".into()];
    s.store.replace(Source::File, doc).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while aaaa(&answer(from_other, "web.flycast.")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the shared flycast name never showed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        aaaa(&answer(from_other, "web.flycast.")),
        ["fdaa:0:18:0:1::5"]
    );
    assert_eq!(
        answer(from_other, "web.internal.").metadata.response_code,
        ResponseCode::NXDomain
    );
    let from_acme = "fdaa:0:18:0:3:0:1:0";
    assert_eq!(
        answer(from_acme, "db.internal.").metadata.response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(aaaa(&answer(from_acme, "web.internal.")).len(), 2);
    // A network the catalog does not know sees nothing.
    assert_eq!(
        answer("fdaa:0:99::1", "web.internal.")
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_truncation_and_hostile_packets() {
    let mut doc: Document = parse_toml(CATALOG).unwrap();
    let template = doc.machines[1].clone();
    for i in 0..60 {
        let mut m = template.clone();
        m.id = format!("x{i}");
        m.address = None;
        doc.machines.push(m);
    }
    let s = start(doc).await;
    let a = s.addr;
    // 62 AAAA records do not fit in 512 bytes: TC over UDP, all over TCP.
    let m =
        Message::from_vec(&udp(a, &query_bytes("web.internal.", RecordType::AAAA, false)).unwrap())
            .unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let m = tcp(a, &query_bytes("web.internal.", RecordType::AAAA, false));
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 62);
    // Garbage with a header: FORMERR. Too short or a response: no answer.
    let mut junk = query_bytes("web.internal.", RecordType::AAAA, false);
    junk[5] = 3; // three questions
    let r = Message::from_vec(&udp(a, &junk).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let pointer_loop = [0u8, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 28, 0, 1];
    let r = Message::from_vec(&udp(a, &pointer_loop).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert!(udp(a, &[1, 2, 3]).is_none());
    let mut answer = query_bytes("web.internal.", RecordType::AAAA, false);
    answer[2] |= 0x80;
    assert!(udp(a, &answer).is_none());
    // Good queries are still answered.
    assert_eq!(
        ask(a, "web.flycast.", RecordType::AAAA)
            .metadata
            .response_code,
        ResponseCode::NoError
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_change_shows_within_100_ms() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let mut doc: Document = parse_toml(CATALOG).unwrap();
    doc.machines[2].state = skein_catalog::model::MachineState::Started;
    let changed = Instant::now();
    s.store.replace(Source::File, doc).unwrap();
    let a = s.addr;
    loop {
        if aaaa(&ask(a, "web.internal.", RecordType::AAAA)).len() == 3 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_millis(100),
            "not visible after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A real upstream: another skein DNS server, authoritative for a cluster zone
/// (`corp.example`) that the forwarding server does not serve.
async fn upstream() -> Server {
    let doc: Document = parse_toml(
        r#"
        networks = [{ id = "0:18", name = "acme" }]
        [[k8s_services]]
        name = "db"
        namespace = "prod"
        cluster = "corp.example"
        network = "acme"
        cluster_ip = "fdaa:0:18:0:1::77"
        "#,
    )
    .unwrap();
    start(doc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_cached_and_rate_limited() {
    let up = upstream().await;
    let s = start_with(parse_toml(CATALOG).unwrap(), |c| {
        c.upstreams = vec![up.addr];
        c.forward_rate_limit = 1000;
    })
    .await;
    let m = ask(s.addr, "DB.prod.svc.corp.example.", RecordType::AAAA);
    assert_eq!(aaaa(&m), ["fdaa:0:18:0:1::77"]);
    assert_eq!(m.queries[0].name().to_ascii(), "DB.prod.svc.corp.example.");
    assert!(!m.metadata.authoritative, "a forwarded answer is not ours");
    let m = ask(s.addr, "nope.prod.svc.corp.example.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Over TCP too.
    assert_eq!(
        aaaa(&tcp(
            s.addr,
            &query_bytes("db.prod.svc.corp.example.", RecordType::AAAA, false)
        )),
        ["fdaa:0:18:0:1::77"]
    );
    // The upstream goes away: answers and negative answers come from the cache.
    up._stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        aaaa(&ask(s.addr, "db.prod.svc.corp.example.", RecordType::AAAA)),
        ["fdaa:0:18:0:1::77"]
    );
    assert_eq!(
        ask(s.addr, "nope.prod.svc.corp.example.", RecordType::AAAA)
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    // A cached answer promises only the time it has left.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let m = ask(s.addr, "db.prod.svc.corp.example.", RecordType::AAAA);
    assert!(
        m.answers[0].ttl < 5,
        "ttl {} was not aged",
        m.answers[0].ttl
    );
    // Our own names are still ours.
    assert_eq!(
        aaaa(&ask(s.addr, "web.flycast.", RecordType::AAAA)),
        ["fdaa:0:18:0:1::5"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_gives_servfail_quickly() {
    let dead = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s = start_with(parse_toml(CATALOG).unwrap(), |c| {
        c.upstreams = vec![dead];
        c.forward_timeout = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let m = ask(s.addr, "example.com.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // A silent upstream (it reads and never answers): SERVFAIL at the timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = start_with(parse_toml(CATALOG).unwrap(), |c| {
        c.upstreams = vec![silent.local_addr().unwrap()];
        c.forward_timeout = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    assert_eq!(
        ask(s.addr, "example.com.", RecordType::AAAA)
            .metadata
            .response_code,
        ResponseCode::ServFail
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250)
            && started.elapsed() < Duration::from_secs(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_answers_are_rate_limited_per_client_network() {
    let up = upstream().await;
    let s = start_with(parse_toml(CATALOG).unwrap(), |c| {
        c.upstreams = vec![up.addr];
        c.forward_rate_limit = 3;
    })
    .await;
    // Thirty questions at once from one client, then count the answers (at
    // most two one-second windows can be involved).
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..30 {
        sock.send_to(
            &query_bytes("db.prod.svc.corp.example.", RecordType::AAAA, false),
            s.addr,
        )
        .unwrap();
    }
    let mut buf = [0u8; 2048];
    let mut answered = 0;
    while sock.recv(&mut buf).is_ok() {
        answered += 1;
    }
    assert!((1..=6).contains(&answered), "{answered} of 30 answered");
    // Authoritative answers are not limited.
    for _ in 0..10 {
        assert_eq!(
            ask(s.addr, "web.flycast.", RecordType::AAAA)
                .metadata
                .response_code,
            ResponseCode::NoError
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_names_for_cluster_ips_and_machines() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let ptr = |ip: &str| {
        let a: std::net::Ipv6Addr = ip.parse().unwrap();
        let name = skein_dns::view::ptr_name(&a.octets());
        let m = ask(s.addr, &format!("{name}."), RecordType::PTR);
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ptr("fdaa:0:18:0:1::10"), ["web.default.svc.cluster.local."]);
    assert_eq!(ptr("fdaa:0:18:0:2:0:1:0"), ["m1.vm.web.internal."]);
    // Another network's machine has no reverse name in this view.
    let name = skein_dns::view::ptr_name(
        &"fdaa:0:19:0:2:0:1:0"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    assert_eq!(
        ask(s.addr, &format!("{name}."), RecordType::PTR)
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_machines_from_the_askers_region() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let answer = |src: &str, name: &str| {
        let q = query_bytes(name, RecordType::AAAA, false);
        let mut out = Vec::new();
        let src = src.parse::<IpAddr>().unwrap();
        assert!(matches!(
            s.dns.handle(&s.dns.views(), src, &q, &mut out, true),
            skein_dns::Outcome::Reply
        ));
        Message::from_vec(&out).unwrap()
    };
    // A machine on the iad host asks: iad's machine first.
    let from_iad = "fdaa:0:18:0:3:0:9:0";
    let m = answer(from_iad, "top1.nearest.of.web.internal.");
    assert_eq!(aaaa(&m), ["fdaa:0:18:0:3:0:1:0"]);
    let from_ams = "fdaa:0:18:0:2:0:9:0";
    assert_eq!(
        aaaa(&answer(from_ams, "top1.nearest.of.web.internal.")),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    assert_eq!(
        answer(from_ams, "top5.nearest.of.web.internal.")
            .answers
            .len(),
        2
    );
    // Another network's app does not exist for this asker.
    assert_eq!(
        answer(from_ams, "top1.nearest.of.db.internal.")
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_rebuilds_only_the_networks_it_touches() {
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let acme: IpAddr = "fdaa:0:18:0:3:0:1:0".parse().unwrap();
    let other: IpAddr = "fdaa:0:19:0:2:0:1:0".parse().unwrap();
    let names = [
        "web.internal.",
        "db.internal.",
        "iad.web.internal.",
        "_instances.internal.",
        "pg-0.pg.data.svc.cluster.local.",
        "web.default.svc.cluster.local.",
        "top1.nearest.of.web.internal.",
        "0.0.0.0.1.0.0.0.2.0.0.0.0.0.0.0.8.1.0.0.0.0.0.0.a.a.d.f.ip6.arpa.",
    ];
    // Every answer a view gives for `names`, as bytes on the wire.
    let answers = |dns: &Dns, src: IpAddr| -> Vec<Vec<u8>> {
        let views = dns.views();
        names
            .iter()
            .flat_map(|n| [RecordType::AAAA, RecordType::TXT, RecordType::PTR].map(|t| (n, t)))
            .map(|(n, t)| {
                let mut out = Vec::new();
                dns.handle(&views, src, &query_bytes(n, t, false), &mut out, true);
                out
            })
            .collect()
    };
    // The same catalog built from scratch answers the same.
    let fresh = |store: &Store| {
        let d = Dns::new(DnsConfig {
            default_network: Some("acme".into()),
            ..Default::default()
        });
        d.apply(&store.snapshot());
        d
    };
    // Publishes a document and waits for the views built from it.
    let publish = |doc: Document| {
        let version = s.store.replace(Source::File, doc).unwrap().snapshot.version;
        let dns = s.dns.clone();
        async move {
            while dns.views().version < version {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            dns.views()
        }
    };
    // The same view object for an asker in both versions (kept, not rebuilt).
    let kept = |a: &skein_dns::view::Views, b: &skein_dns::view::Views, src: IpAddr| {
        std::ptr::eq(a.for_source(src), b.for_source(src))
    };

    // d1 (network "other") stops: only "other" is rebuilt.
    let before = s.dns.views();
    let mut doc: Document = parse_toml(CATALOG).unwrap();
    doc.machines[3].state = skein_catalog::model::MachineState::Stopped;
    let after = publish(doc.clone()).await;
    assert!(kept(&before, &after, acme));
    assert!(!kept(&before, &after, other));
    let mut q = Vec::new();
    s.dns.handle(
        &after,
        other,
        &query_bytes("db.internal.", RecordType::AAAA, false),
        &mut q,
        true,
    );
    assert!(aaaa(&Message::from_vec(&q).unwrap()).is_empty());
    let full = fresh(&s.store);
    for src in [acme, other] {
        assert_eq!(answers(&s.dns, src), answers(&full, src));
    }

    // m1 (network "acme") joins another process group: "acme" is rebuilt,
    // "other" is kept.
    doc.machines[0].metadata.process_group = Some("cron".into());
    let later = publish(doc.clone()).await;
    assert!(!kept(&after, &later, acme));
    assert!(kept(&after, &later, other));
    // m1, pg-0 of a headless service, moves: its answers everywhere match a
    // full build.
    doc.machines[0].address = Some("fdaa:0:18:0:2:0:2:0".parse().unwrap());
    let later = publish(doc.clone()).await;
    let full = fresh(&s.store);
    for src in [acme, other] {
        assert_eq!(answers(&s.dns, src), answers(&full, src));
    }

    // A round-trip time changes: every nearest order may change, all rebuilt.
    doc.regions[0].rtt_ms.insert("iad".into(), 5);
    let last = publish(doc).await;
    assert!(!kept(&later, &last, other));
    let full = fresh(&s.store);
    for src in [acme, other] {
        assert_eq!(answers(&s.dns, src), answers(&full, src));
    }
}

/// `dig @addr` (Debian's dnsutils) with `args`; its `+short` answer lines.
fn dig(addr: SocketAddr, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args([
            "-p",
            &addr.port().to_string(),
            "+short",
            "+time=2",
            "+tries=1",
        ])
        .args(args)
        .output()
        .expect("dig runs");
    assert!(
        out.status.success(),
        "dig {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_every_name_form() {
    if std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("skipped: needs dig (dnsutils): dig_gets_every_name_form");
        return;
    }
    let s = start(parse_toml(CATALOG).unwrap()).await;
    let a = s.addr;
    let d = move |args: &'static [&'static str]| tokio::task::spawn_blocking(move || dig(a, args));
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["web.internal", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"],
        ),
        (
            &["global.web.internal", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"],
        ),
        (&["iad.web.internal", "AAAA"], &["fdaa:0:18:0:3:0:1:0"]),
        (
            &["top1.nearest.of.web.internal", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0"],
        ),
        (&["m1.vm.web.internal", "AAAA"], &["fdaa:0:18:0:2:0:1:0"]),
        (
            &["worker.process.web.internal", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0"],
        ),
        (&["web.flycast", "AAAA"], &["fdaa:0:18:0:1::5"]),
        (&["_apps.internal", "TXT"], &["\"web\""]),
        (&["vms.web.internal", "TXT"], &["\"m1 ams,m2 iad\""]),
        (&["regions.web.internal", "TXT"], &["\"ams,iad\""]),
        (
            &["web.default.svc.cluster.local", "AAAA"],
            &["fdaa:0:18:0:1::10"],
        ),
        (
            &["_http._tcp.web.default.svc.cluster.local", "SRV"],
            &["0 100 80 web.default.svc.cluster.local."],
        ),
        (
            &["pg.data.svc.cluster.local", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0"],
        ),
        (
            &["pg-0.pg.data.svc.cluster.local", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0"],
        ),
        (
            &["ext.default.svc.cluster.local", "CNAME"],
            &["example.org."],
        ),
        (
            &["-x", "fdaa:0:18:0:1::10"],
            &["web.default.svc.cluster.local."],
        ),
        (&["-x", "fdaa:0:18:0:2:0:1:0"], &["m1.vm.web.internal."]),
        // Over TCP too, and case is kept in the question but matched without it.
        (
            &["+tcp", "WEB.Internal", "AAAA"],
            &["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"],
        ),
    ];
    for (args, want) in cases {
        let got = d(args).await.unwrap();
        assert_eq!(got, *want, "dig {args:?}");
    }
    // The instances: one TXT string per machine.
    let inst = d(&["_instances.internal", "TXT"]).await.unwrap();
    assert_eq!(inst.len(), 2, "{inst:?}");
    assert!(
        inst[0].contains("instance=m1;app=web;ip=fdaa:0:18:0:2:0:1:0;region=ams"),
        "{inst:?}"
    );
    let version = d(&["dns-version.cluster.local", "TXT"]).await.unwrap();
    assert_eq!(version.len(), 1, "{version:?}");
    // A name that does not exist: NXDOMAIN with the SOA; a type that does not: NODATA.
    let status = |args: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("dig")
                .arg(format!("@{}", a.ip()))
                .args(["-p", &a.port().to_string(), "+time=2", "+tries=1"])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    let nx = status(&["nope.internal", "AAAA"]).await.unwrap();
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("SOA"),
        "{nx}"
    );
    let nodata = status(&["web.internal", "MX"]).await.unwrap();
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hickory_resolver_resolves_like_a_pod() {
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    };
    use hickory_resolver::net::runtime::TokioRuntimeProvider;

    let s = start(parse_toml(CATALOG).unwrap()).await;
    // A pod's resolv.conf: the server, the search path of namespace
    // "default", ndots:5; no hosts file, no cache.
    let conn = |mut c: ConnectionConfig| {
        c.port = s.addr.port();
        c
    };
    let server = NameServerConfig::new(
        s.addr.ip(),
        true,
        vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
    );
    let search = [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ]
    .map(|n| Name::from_ascii(n).unwrap())
    .to_vec();
    let mut opts = ResolverOpts::default();
    opts.ndots = 5;
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(2);
    opts.use_hosts_file = ResolveHosts::Never;
    let r = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, search, vec![server]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .unwrap();

    let ips = |l: hickory_resolver::lookup_ip::LookupIp| {
        let mut v: Vec<String> = l.iter().map(|ip| ip.to_string()).collect();
        v.sort();
        v
    };
    // A Service by its short name, through the search path.
    assert_eq!(
        ips(r.lookup_ip("web").await.unwrap()),
        ["fdaa:0:18:0:1::10"]
    );
    assert_eq!(
        ips(r.lookup_ip("pg.data").await.unwrap()),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    // Machines by .internal names.
    assert_eq!(
        ips(r.lookup_ip("web.internal.").await.unwrap()),
        ["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"]
    );
    assert_eq!(
        ips(r.lookup_ip("top1.nearest.of.web.internal.").await.unwrap()),
        ["fdaa:0:18:0:2:0:1:0"]
    );
    // TXT, SRV, PTR: the answers' data as text.
    let data = |l: hickory_resolver::lookup::Lookup| -> Vec<String> {
        l.answers().iter().map(|rec| rec.data.to_string()).collect()
    };
    assert_eq!(
        data(r.txt_lookup("_apps.internal.").await.unwrap()),
        ["web"]
    );
    assert_eq!(
        data(
            r.srv_lookup("_http._tcp.web.default.svc.cluster.local.")
                .await
                .unwrap()
        ),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    let cluster_ip: IpAddr = "fdaa:0:18:0:1::10".parse().unwrap();
    assert_eq!(
        data(r.reverse_lookup(cluster_ip).await.unwrap()),
        ["web.default.svc.cluster.local."]
    );
    // A name nobody has.
    assert!(r.lookup_ip("nope.internal.").await.is_err());
}

/// `dig` from inside a namespace: (status line, answer lines).
fn dig_in(ns: &skein_testkit::Netns, server: &str, port: u16, name: &str) -> (String, Vec<String>) {
    let out = ns.run(&[
        "dig",
        &format!("@{server}"),
        "-p",
        &port.to_string(),
        "+time=2",
        "+tries=1",
        name,
        "AAAA",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .lines()
        .find(|l| l.contains("status:"))
        .unwrap_or_default()
        .to_string();
    let mut answers: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    answers.sort();
    (status, answers)
}

/// Two machines of two networks ask the same server from their own 6PN
/// addresses (network namespaces joined by veth): each sees its own network's
/// names and nothing of the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_of_two_networks_see_only_their_own_names() {
    if !skein_testkit::require_root("machines_of_two_networks_see_only_their_own_names") {
        return;
    }
    if std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_err()
    {
        println!(
            "skipped: needs dig (dnsutils): machines_of_two_networks_see_only_their_own_names"
        );
        return;
    }
    use skein_testkit::{Netns, veth};
    let host = Netns::new("dh");
    let acme = Netns::new("da");
    let other = Netns::new("do");
    veth(&host, "a0", &acme, "a1");
    veth(&host, "b0", &other, "b1");
    host.ip("addr add fdaa:0:18:0:3::1/64 dev a0 nodad");
    acme.ip("addr add fdaa:0:18:0:3:0:1:0/64 dev a1 nodad");
    host.ip("addr add fdaa:0:19:0:2::1/64 dev b0 nodad");
    other.ip("addr add fdaa:0:19:0:2:0:1:0/64 dev b1 nodad");

    let store = Arc::new(Store::new());
    store
        .replace(Source::File, parse_toml(CATALOG).unwrap())
        .unwrap();
    let dns = Dns::new(DnsConfig {
        enabled: true,
        listen: vec!["[::]:0".parse().unwrap()],
        default_network: Some("acme".into()),
        threads: Some(1),
        ..Default::default()
    });
    // The sockets are made inside the host's namespace; they stay there.
    let bound = std::thread::scope(|s| {
        s.spawn(|| {
            host.enter();
            dns.bind().unwrap()
        })
        .join()
        .unwrap()
    });
    let port = bound[0].local.port();
    dns.apply(&store.snapshot());
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(dns.clone().serve(bound, rx));

    let ask = |ns: &Netns, server: &str, name: &str| {
        let (status, answers) = dig_in(ns, server, port, name);
        assert!(!status.is_empty(), "no answer to {name} from {}", ns.name());
        (status, answers)
    };
    let (status, web) = ask(&acme, "fdaa:0:18:0:3::1", "web.internal");
    assert!(status.contains("NOERROR"), "{status}");
    assert_eq!(web, ["fdaa:0:18:0:2:0:1:0", "fdaa:0:18:0:3:0:1:0"]);
    let (status, _) = ask(&acme, "fdaa:0:18:0:3::1", "db.internal");
    assert!(
        status.contains("NXDOMAIN"),
        "acme must not see db: {status}"
    );
    let (status, _) = ask(&other, "fdaa:0:19:0:2::1", "web.internal");
    assert!(
        status.contains("NXDOMAIN"),
        "other must not see web: {status}"
    );
    let (status, _) = ask(&other, "fdaa:0:19:0:2::1", "web.default.svc.cluster.local");
    assert!(
        status.contains("NXDOMAIN"),
        "other must not see acme's services: {status}"
    );
    let (status, _) = ask(&other, "fdaa:0:19:0:2::1", "db.internal");
    assert!(status.contains("NOERROR"), "{status}");
}
