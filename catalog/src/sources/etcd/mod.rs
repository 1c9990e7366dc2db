//! etcd: how hosts share one catalog.
//!
//! Two things run against the cluster on every host:
//!
//! - [`follow::Follower`] reads everything under the prefix and then watches it,
//!   feeding it to the store as the [`Source::Etcd`] layer. When etcd goes away
//!   the layer in force stays in force (the host keeps serving what it knew), the
//!   [`Status`] says so, and the watch resumes from the last revision applied: no
//!   event is missed or applied twice. A resume that etcd has compacted away
//!   turns into a full read.
//! - [`publish::Publisher`] writes the machines this host runs (the worker is
//!   their source of truth) under a lease it keeps alive. A host that dies stops
//!   renewing; etcd drops its machines when the lease runs out, and every other
//!   host's follower sees them go.
//!
//! Keys (under the configured prefix, `/skein/` by default), values are the
//! records as JSON, as the admin API takes them:
//!
//! ```text
//! /skein/records/<kind>/<key>          operators' records: regions, hosts,
//!                                      networks, apps, certificates, k8s_services
//! /skein/machines/<host name>/<id>     a worker's machines, under its lease
//! ```
//!
//! A record from etcd that does not parse, or that the catalog refuses (it
//! names an unknown app, it is already defined by this host's file, another
//! worker published the same machine id first), is held back alone and counted
//! (`skein_etcd_quarantined`); everything else applies. It is tried again with
//! every change, so a machine that arrives before its app is admitted as soon
//! as the app is there.

pub mod follow;
pub mod publish;
pub mod wire;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Invalid, parse_json};
use crate::index::Source;
use crate::model::Document;
use crate::record::{Kind, Record};

pub use wire::{Client, Conn, Error};

/// `[etcd]` in the daemon's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members (`http://host:port`). Empty: etcd is
    /// not used.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Every key skein reads or writes starts with this.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This host's machines vanish from other hosts this long after it stops
    /// renewing its lease (whole seconds, at least 2).
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Time to connect to a member before trying the next.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time for one request.
    #[serde(default = "default_request", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_prefix() -> String {
    "/skein/".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_connect() -> Duration {
    Duration::from_secs(2)
}
fn default_request() -> Duration {
    Duration::from_secs(5)
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: default_prefix(),
            lease_ttl: default_ttl(),
            connect_timeout: default_connect(),
            request_timeout: default_request(),
        }
    }
}

impl EtcdConfig {
    /// True when endpoints are configured.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Every problem, as `(field, reason)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let ok = e
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                out.push((
                    format!("etcd.endpoints[{i}]"),
                    format!("{e:?} is not a client URL like http://127.0.0.1:2379"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            out.push((
                "etcd.prefix".into(),
                format!("{:?} must start and end with '/'", self.prefix),
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            out.push((
                "etcd.lease_ttl".into(),
                "must be whole seconds, at least 2s".into(),
            ));
        }
        for (f, d) in [
            ("etcd.connect_timeout", self.connect_timeout),
            ("etcd.request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                out.push((f.into(), "must be more than 0".into()));
            }
        }
        out
    }

    /// A client for the configured members.
    pub fn client(&self) -> Client {
        Client::new(
            self.endpoints.clone(),
            self.connect_timeout,
            self.request_timeout,
        )
    }

    /// The key layout under the configured prefix.
    pub fn layout(&self) -> Layout {
        Layout {
            prefix: self.prefix.clone(),
        }
    }
}

/// Where records live in etcd.
#[derive(Clone, Debug)]
pub struct Layout {
    prefix: String,
}

/// What an etcd key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// An operator's record.
    Record {
        /// Its kind.
        kind: Kind,
        /// Its key as text.
        key: String,
    },
    /// A machine published by a worker.
    Machine {
        /// The worker's host name.
        host: String,
        /// The machine id.
        id: String,
    },
    /// Coordination of the ACME clients (claims, challenge answers): not a
    /// record; handed to the follower's [`Subscriber`], never to the catalog.
    Acme {
        /// The key after `<prefix>acme/`.
        path: String,
    },
}

/// Told of the keys under `<prefix>acme/` that the follower sees (the
/// follower applies no catalog change for them). Calls come in etcd's order.
pub trait Subscriber: Send + Sync {
    /// Everything under the prefix after a full read: replaces what was known.
    fn reset(&self, keys: Vec<(String, Vec<u8>)>);
    /// A key was written.
    fn put(&self, path: &str, value: &[u8]);
    /// A key was deleted (or its lease ran out).
    fn delete(&self, path: &str);
}

impl Layout {
    /// A layout under `prefix` (which ends with `/`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Layout {
            prefix: prefix.into(),
        }
    }

    /// Everything skein keeps.
    pub fn root(&self) -> &str {
        &self.prefix
    }

    /// The key of an operator's record.
    pub fn record(&self, kind: Kind, key: &str) -> String {
        format!("{}records/{}/{key}", self.prefix, kind.as_str())
    }

    /// Where a worker's machines are.
    pub fn machines_of(&self, host: &str) -> String {
        format!("{}machines/{host}/", self.prefix)
    }

    /// Where the ACME clients coordinate.
    pub fn acme(&self) -> String {
        format!("{}acme/", self.prefix)
    }

    /// The key of one machine of a worker.
    pub fn machine(&self, host: &str, id: &str) -> String {
        format!("{}{id}", self.machines_of(host))
    }

    /// What a key names; `None` for keys skein does not know (left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Place> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.prefix.as_str())?;
        if let Some(path) = rest.strip_prefix("acme/") {
            return Some(Place::Acme {
                path: path.to_string(),
            });
        }
        if let Some(r) = rest.strip_prefix("records/") {
            let (kind, key) = r.split_once('/')?;
            let kind = Kind::parse(kind)?;
            if key.is_empty() || kind == Kind::Machines {
                return None;
            }
            return Some(Place::Record {
                kind,
                key: key.to_string(),
            });
        }
        let (host, id) = rest.strip_prefix("machines/")?.split_once('/')?;
        if host.is_empty() || id.is_empty() || id.contains('/') {
            return None;
        }
        Some(Place::Machine {
            host: host.to_string(),
            id: id.to_string(),
        })
    }
}

/// One record of any kind, parsed from etcd.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyRecord {
    /// A region.
    Region(crate::model::Region),
    /// A host.
    Host(crate::model::Host),
    /// A network.
    Network(crate::model::Network),
    /// An app.
    App(crate::model::App),
    /// A machine.
    Machine(crate::model::Machine),
    /// A certificate.
    Certificate(crate::model::Certificate),
    /// A Kubernetes Service.
    K8sService(crate::model::K8sService),
}

impl AnyRecord {
    /// Parses the JSON value of a key of `kind` whose key text is `key`; the
    /// record's own key must be the one its etcd key names.
    pub fn parse(kind: Kind, key: &str, json: &[u8]) -> Result<AnyRecord, Invalid> {
        fn one<T: Record>(key: &str, json: &[u8]) -> Result<T, Invalid> {
            let r: T = parse_json(json)?;
            if r.key().to_string() != key {
                return Err(Invalid::one(
                    "",
                    format!(
                        "the value is {} {:?} but the key names {key:?}",
                        T::KIND,
                        r.key().to_string()
                    ),
                ));
            }
            Ok(r)
        }
        Ok(match kind {
            Kind::Regions => AnyRecord::Region(one(key, json)?),
            Kind::Hosts => AnyRecord::Host(one(key, json)?),
            Kind::Networks => AnyRecord::Network(one(key, json)?),
            Kind::Apps => AnyRecord::App(one(key, json)?),
            Kind::Machines => AnyRecord::Machine(one(key, json)?),
            Kind::Certificates => AnyRecord::Certificate(one(key, json)?),
            Kind::K8sServices => AnyRecord::K8sService(one(key, json)?),
        })
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            AnyRecord::Region(_) => Kind::Regions,
            AnyRecord::Host(_) => Kind::Hosts,
            AnyRecord::Network(_) => Kind::Networks,
            AnyRecord::App(_) => Kind::Apps,
            AnyRecord::Machine(_) => Kind::Machines,
            AnyRecord::Certificate(_) => Kind::Certificates,
            AnyRecord::K8sService(_) => Kind::K8sServices,
        }
    }

    /// Its key as text.
    pub fn key(&self) -> String {
        match self {
            AnyRecord::Region(r) => r.key().to_string(),
            AnyRecord::Host(r) => r.key().to_string(),
            AnyRecord::Network(r) => r.key().to_string(),
            AnyRecord::App(r) => r.key().to_string(),
            AnyRecord::Machine(r) => r.key().to_string(),
            AnyRecord::Certificate(r) => r.key().to_string(),
            AnyRecord::K8sService(r) => r.key().to_string(),
        }
    }

    /// Adds it to a document.
    pub fn push_into(&self, doc: &mut Document) {
        match self.clone() {
            AnyRecord::Region(r) => doc.regions.push(r),
            AnyRecord::Host(r) => doc.hosts.push(r),
            AnyRecord::Network(r) => doc.networks.push(r),
            AnyRecord::App(r) => doc.apps.push(r),
            AnyRecord::Machine(r) => doc.machines.push(r),
            AnyRecord::Certificate(r) => doc.certificates.push(r),
            AnyRecord::K8sService(r) => doc.k8s_services.push(r),
        }
    }
}

/// Every record of a document (except machines, which workers publish) as
/// `(etcd key, JSON value)`, for an operator loading records into etcd.
pub fn operator_records(layout: &Layout, doc: &Document) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn all<T: Record>(
        layout: &Layout,
        doc: &Document,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), String> {
        for r in T::list(doc) {
            let json = serde_json::to_vec(r).map_err(|e| e.to_string())?;
            out.push((layout.record(T::KIND, &r.key().to_string()), json));
        }
        Ok(())
    }
    let mut out = Vec::new();
    all::<crate::model::Region>(layout, doc, &mut out)?;
    all::<crate::model::Host>(layout, doc, &mut out)?;
    all::<crate::model::Network>(layout, doc, &mut out)?;
    all::<crate::model::App>(layout, doc, &mut out)?;
    all::<crate::model::Certificate>(layout, doc, &mut out)?;
    all::<crate::model::K8sService>(layout, doc, &mut out)?;
    if !doc.machines.is_empty() {
        return Err(
            "machines are published by the worker that runs them, not loaded by operators".into(),
        );
    }
    Ok(out)
}

/// Writes operators' records into etcd, 128 keys per transaction (etcd's
/// default `--max-txn-ops`). Returns the number of keys written.
pub async fn put_records(conn: &Conn, records: Vec<(String, Vec<u8>)>) -> Result<usize, Error> {
    let n = records.len();
    let mut ops: Vec<wire::RequestOp> = records
        .into_iter()
        .map(|(k, v)| {
            wire::PutRequest {
                key: k.into_bytes(),
                value: v,
                lease: 0,
            }
            .into()
        })
        .collect();
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(TXN_OPS));
        let batch = std::mem::replace(&mut ops, rest);
        conn.txn(wire::TxnRequest {
            compare: Vec::new(),
            success: batch,
            failure: Vec::new(),
        })
        .await?;
    }
    Ok(n)
}

/// Operations per transaction (etcd's default `--max-txn-ops`).
pub const TXN_OPS: usize = 128;

/// How this host stands with etcd, for `/readyz` and logs. Shared by the
/// follower and the publisher.
#[derive(Debug, Default)]
pub struct Status {
    connected: AtomicBool,
    revision: AtomicI64,
    events: AtomicU64,
    resyncs: AtomicU64,
    quarantined: AtomicUsize,
    leased: AtomicBool,
    published: AtomicUsize,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default)]
struct Detail {
    endpoint: String,
    down_since: Option<Instant>,
    last_error: String,
    quarantine: Vec<String>,
}

impl Status {
    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn up(&self, endpoint: &str) {
        self.connected.store(true, Ordering::Relaxed);
        let mut d = self.detail();
        d.endpoint = endpoint.to_string();
        d.down_since = None;
        metrics::gauge!("skein_etcd_connected").set(1.0);
    }

    pub(crate) fn down(&self, why: &str) {
        self.connected.store(false, Ordering::Relaxed);
        let mut d = self.detail();
        d.down_since.get_or_insert_with(Instant::now);
        d.last_error = why.to_string();
        metrics::gauge!("skein_etcd_connected").set(0.0);
    }

    pub(crate) fn applied(&self, revision: i64, events: u64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        metrics::gauge!("skein_etcd_revision").set(revision as f64);
    }

    pub(crate) fn resynced(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_quarantine(&self, held: Vec<String>) {
        self.quarantined.store(held.len(), Ordering::Relaxed);
        metrics::gauge!("skein_etcd_quarantined").set(held.len() as f64);
        self.detail().quarantine = held;
    }

    pub(crate) fn set_lease(&self, leased: bool, published: usize) {
        self.leased.store(leased, Ordering::Relaxed);
        self.published.store(published, Ordering::Relaxed);
        metrics::gauge!("skein_etcd_lease_held").set(if leased { 1.0 } else { 0.0 });
        metrics::gauge!("skein_etcd_published_machines").set(published as f64);
    }

    /// The watch is open.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The last revision applied to the catalog.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// Watch events applied since start (each change once).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Full reads after the start (compaction).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Keys held back, each with why.
    pub fn quarantine(&self) -> Vec<String> {
        self.detail().quarantine.clone()
    }

    /// This host's lease is alive and its machines are published.
    pub fn leased(&self) -> bool {
        self.leased.load(Ordering::Relaxed)
    }

    /// One line for `/readyz`.
    pub fn line(&self) -> String {
        let d = self.detail();
        let rev = self.revision();
        let mut s = if self.connected() {
            format!("etcd: watching {} at revision {rev}", d.endpoint)
        } else {
            let since = d
                .down_since
                .map(|t| format!(" for {}s", t.elapsed().as_secs()))
                .unwrap_or_default();
            format!(
                "etcd: disconnected{since} ({}); serving the catalog as of revision {rev}",
                d.last_error
            )
        };
        if !d.quarantine.is_empty() {
            s.push_str(&format!("; {} record(s) held back", d.quarantine.len()));
        }
        s
    }
}

/// Exponential backoff with jitter, for reconnecting.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay: the current step plus up to half of it again.
    pub(crate) fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = step.mul_f64(f64::from(nanos % 1000) / 2000.0);
        step + jitter
    }
}

/// The source label used in logs and metrics.
pub const SOURCE: Source = Source::Etcd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_records_and_machines() {
        let l = Layout::new("/skein/");
        assert_eq!(l.record(Kind::Apps, "web"), "/skein/records/apps/web");
        assert_eq!(
            l.parse(b"/skein/records/apps/web"),
            Some(Place::Record {
                kind: Kind::Apps,
                key: "web".into()
            })
        );
        assert_eq!(
            l.parse(b"/skein/records/k8s_services/default/api"),
            Some(Place::Record {
                kind: Kind::K8sServices,
                key: "default/api".into()
            })
        );
        assert_eq!(
            l.parse(format!("{}claims/a.example.com", l.acme()).as_bytes()),
            Some(Place::Acme {
                path: "claims/a.example.com".into()
            })
        );
        assert_eq!(
            l.parse(l.machine("h1", "m1").as_bytes()),
            Some(Place::Machine {
                host: "h1".into(),
                id: "m1".into()
            })
        );
        for bad in [
            &b"/skein/records/apps/"[..],
            b"/skein/records/nope/x",
            b"/skein/records/machines/m1",
            b"/skein/machines/h1/",
            b"/skein/machines/h1/a/b",
            b"/other/records/apps/web",
            b"/skein/\xff",
        ] {
            assert_eq!(l.parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_value_must_be_the_record_its_key_names() {
        let ok = AnyRecord::parse(Kind::Networks, "acme", br#"{"name":"acme","id":7}"#);
        assert_eq!(ok.map(|r| r.key()).ok(), Some("acme".to_string()));
        let other = AnyRecord::parse(Kind::Networks, "beta", br#"{"name":"acme","id":7}"#);
        let e = other.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("key names \"beta\""), "{e}");
        let junk = AnyRecord::parse(Kind::Networks, "acme", b"{\"name\":");
        assert!(junk.is_err());
    }

    #[test]
    fn config_names_bad_fields() {
        let c = EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "skein".into(),
            lease_ttl: Duration::from_millis(1500),
            ..Default::default()
        };
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["etcd.endpoints[0]", "etcd.prefix", "etcd.lease_ttl"]
        );
        assert!(EtcdConfig::default().problems().is_empty());
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] < Duration::from_millis(151));
        assert!(d[5] >= Duration::from_secs(1) && d[5] < Duration::from_millis(1501));
        b.reset();
        assert!(b.next() < Duration::from_millis(151));
    }
}
