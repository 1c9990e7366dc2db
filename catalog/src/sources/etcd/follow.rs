//! Reads the catalog from etcd and follows it: the [`Source::Etcd`] layer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio::sync::watch;
use tracing::Instrument as _;

use super::wire::{self, Event, WatchCreateRequest, WatchOp, WatchRequest};
use super::{AnyRecord, Backoff, Conn, Error, Layout, Place, Status, Subscriber};
use crate::index::MachinePatch;
use crate::index::Source;
use crate::model::Document;
use crate::record::Kind;
use crate::sources::publish_layer;
use crate::store::{Store, stopped};

/// Keys per page of a full read.
const PAGE: i64 = 2000;

/// One key as last seen.
#[derive(Clone, Debug)]
struct Held {
    create_revision: i64,
    value: Result<AnyRecord, String>,
}

/// What the follower knows: every key under the prefix (but this host's own
/// machines) at `revision`.
#[derive(Debug, Default)]
struct Mirror {
    keys: BTreeMap<Vec<u8>, Held>,
    /// Every change up to and including this revision is in `keys`.
    revision: i64,
    /// The next session starts with a full read.
    resync: bool,
}

/// Follows the prefix into the store.
pub struct Follower {
    client: wire::Client,
    layout: Layout,
    store: Arc<Store>,
    /// This host's name: its own machines come from its local sources, not back
    /// from etcd.
    host: Option<String>,
    status: Arc<Status>,
    mirror: Mirror,
    /// The machine keys changed since the layer was last published, when
    /// only machine keys changed (`None`: publish the whole layer).
    pending: Option<BTreeSet<Vec<u8>>>,
    /// Told of the keys under `acme/`.
    subscriber: Option<Arc<dyn Subscriber>>,
}

/// Why a session ended.
enum End {
    Stopped,
    Compacted(i64),
    Failed(Error),
}

impl Follower {
    /// A follower of `layout` on `client`, feeding `store`.
    pub fn new(
        client: wire::Client,
        layout: Layout,
        store: Arc<Store>,
        host: Option<String>,
        status: Arc<Status>,
    ) -> Self {
        Follower {
            client,
            layout,
            store,
            host,
            status,
            mirror: Mirror::default(),
            pending: None,
            subscriber: None,
        }
    }

    /// Hands the keys under `<prefix>acme/` to `s` (they are not records).
    pub fn with_subscriber(mut self, s: Arc<dyn Subscriber>) -> Self {
        self.subscriber = Some(s);
        self
    }

    /// Reads everything under the prefix once and publishes it, before the
    /// local sources are loaded at start (they may refer to etcd's records).
    /// [`Follower::run`] then watches from there.
    pub async fn load(&mut self) -> Result<usize, Error> {
        let conn = self.client.connect().await?;
        match self.read_all(&conn).await {
            Ok(()) => Ok(self.mirror.keys.len()),
            Err(e) => {
                conn.failed();
                Err(e)
            }
        }
    }

    async fn read_all(&mut self, conn: &Conn) -> Result<(), Error> {
        let t = Instant::now();
        let (kvs, revision) = conn
            .range_prefix(self.layout.root().as_bytes(), PAGE)
            .await?;
        let first = self.mirror.revision == 0;
        self.mirror.keys.clear();
        self.pending = None;
        let mut acme = Vec::new();
        for kv in kvs {
            match self.layout.parse(&kv.key) {
                Some(Place::Acme { path }) => acme.push((path, kv.value)),
                _ => self.absorb_put(kv),
            }
        }
        if let Some(s) = &self.subscriber {
            s.reset(acme);
        }
        self.mirror.revision = revision;
        self.mirror.resync = false;
        if !first {
            self.status.resynced();
        }
        self.apply().await;
        self.status.applied(revision, 0);
        tracing::info!(
            revision,
            keys = self.mirror.keys.len(),
            ms = t.elapsed().as_millis() as u64,
            "read the catalog from etcd"
        );
        Ok(())
    }

    /// Runs until `stop`: connect, read, watch; on any failure keep the layer in
    /// force and reconnect with backoff, resuming after the last revision applied.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let span = tracing::info_span!("etcd_follow", prefix = self.layout.root());
        async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            if self.mirror.revision == 0 {
                self.status.down("connecting");
            }
            loop {
                if *stop.borrow() {
                    return;
                }
                let conn = tokio::select! {
                    _ = stopped(&mut stop) => return,
                    c = self.client.connect() => c,
                };
                let end = match conn {
                    Ok(conn) => {
                        let end = self.session(&conn, &mut stop, &mut backoff).await;
                        if matches!(end, End::Failed(_)) {
                            conn.failed();
                        }
                        end
                    }
                    Err(e) => End::Failed(e),
                };
                match end {
                    End::Stopped => return,
                    End::Compacted(at) => {
                        tracing::warn!(
                            resume = self.mirror.revision + 1,
                            compacted = at,
                            "etcd compacted past the watch; reading everything again"
                        );
                        metrics::counter!("skein_etcd_resyncs_total", "reason" => "compacted")
                            .increment(1);
                        self.mirror.resync = true;
                    }
                    End::Failed(e) => {
                        let why = e.to_string();
                        if self.status.connected() {
                            tracing::warn!(error = %why, revision = self.mirror.revision, "etcd lost; serving the catalog as of the last revision");
                        } else {
                            tracing::debug!(error = %why, "etcd unreachable");
                        }
                        self.status.down(&why);
                        metrics::counter!("skein_etcd_reconnects_total").increment(1);
                        let wait = backoff.next();
                        tokio::select! {
                            _ = stopped(&mut stop) => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn session(
        &mut self,
        conn: &Conn,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> End {
        if (self.mirror.revision == 0 || self.mirror.resync)
            && let Err(e) = self.read_all(conn).await
        {
            return End::Failed(e);
        }

        let create = WatchRequest {
            request_union: Some(WatchOp::Create(WatchCreateRequest {
                key: self.layout.root().as_bytes().to_vec(),
                range_end: wire::prefix_end(self.layout.root().as_bytes()),
                start_revision: self.mirror.revision + 1,
                progress_notify: true,
            })),
        };
        // The sender stays alive with the stream: dropping it would end the
        // request side, and etcd would end the watch.
        let (_tx, mut stream) = match conn.watch(create).await {
            Ok(s) => s,
            Err(e) => return End::Failed(e),
        };
        loop {
            let msg = tokio::select! {
                _ = stopped(stop) => return End::Stopped,
                m = stream.message() => m,
            };
            let mut resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return End::Failed(Error::Protocol("the watch ended".into())),
                Err(s) => return End::Failed(Error::Status(s)),
            };
            // Take whatever else has already arrived, so a burst of writes
            // becomes one new catalog.
            let mut events = 0u64;
            loop {
                if resp.compact_revision != 0 {
                    return End::Compacted(resp.compact_revision);
                }
                if resp.canceled {
                    return End::Failed(Error::Protocol(format!(
                        "the watch was canceled: {}",
                        resp.cancel_reason
                    )));
                }
                if resp.created {
                    self.status.up(conn.endpoint());
                    backoff.reset();
                    tracing::info!(
                        endpoint = conn.endpoint(),
                        from = self.mirror.revision + 1,
                        "watching etcd"
                    );
                }
                events += self.absorb(resp);
                match stream.message().now_or_never() {
                    Some(Ok(Some(next))) => resp = next,
                    Some(Ok(None)) | None => break,
                    Some(Err(s)) => {
                        if events > 0 {
                            self.apply().await;
                            self.status.applied(self.mirror.revision, events);
                        }
                        return End::Failed(Error::Status(s));
                    }
                }
            }
            if events > 0 {
                self.apply().await;
            }
            self.status.applied(self.mirror.revision, events);
        }
    }

    /// Takes one watch response into the mirror, in order; returns the events
    /// applied.
    fn absorb(&mut self, resp: wire::WatchResponse) -> u64 {
        let header_rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        if resp.events.is_empty() {
            // A progress notification (or the create answer): nothing under the
            // prefix changed up to the header's revision.
            if !resp.created && header_rev > self.mirror.revision {
                self.mirror.revision = header_rev;
            }
            return 0;
        }
        let from = self.mirror.revision;
        let mut last = from;
        let mut n = 0;
        for ev in resp.events {
            let Some(kv) = ev.kv else {
                metrics::counter!("skein_etcd_events_total", "type" => "malformed").increment(1);
                continue;
            };
            if kv.mod_revision <= from {
                // Already applied (a resumed watch can repeat its start).
                metrics::counter!("skein_etcd_events_total", "type" => "duplicate").increment(1);
                continue;
            }
            last = last.max(kv.mod_revision);
            // Coordination keys change no record: no catalog work for them.
            if let Some(Place::Acme { path }) = self.layout.parse(&kv.key) {
                if let Some(s) = &self.subscriber {
                    if ev.r#type == Event::DELETE {
                        s.delete(&path);
                    } else {
                        s.put(&path, &kv.value);
                    }
                }
                continue;
            }
            n += 1;
            self.note(&kv.key);
            if ev.r#type == Event::DELETE {
                metrics::counter!("skein_etcd_events_total", "type" => "delete").increment(1);
                self.mirror.keys.remove(&kv.key);
            } else {
                metrics::counter!("skein_etcd_events_total", "type" => "put").increment(1);
                self.absorb_put(kv);
            }
        }
        self.mirror.revision = last;
        n
    }

    fn absorb_put(&mut self, kv: wire::KeyValue) {
        let value = match self.layout.parse(&kv.key) {
            None | Some(Place::Acme { .. }) => return,
            Some(Place::Machine { host, .. }) if self.host.as_deref() == Some(host.as_str()) => {
                return;
            }
            Some(Place::Machine { id, .. }) => AnyRecord::parse(Kind::Machines, &id, &kv.value),
            Some(Place::Record { kind, key }) => AnyRecord::parse(kind, &key, &kv.value),
        }
        .map_err(|e| e.to_string());
        self.mirror.keys.insert(
            kv.key,
            Held {
                create_revision: kv.create_revision,
                value,
            },
        );
    }

    /// Remembers a changed key for the next publish.
    fn note(&mut self, key: &[u8]) {
        match self.layout.parse(key) {
            Some(Place::Machine { host, .. }) if self.host.as_deref() == Some(host.as_str()) => {}
            Some(Place::Machine { .. }) => {
                if let Some(keys) = &mut self.pending {
                    keys.insert(key.to_vec());
                }
            }
            _ => self.pending = None,
        }
    }

    /// The change since the last publish as a patch to the machines, when it
    /// is one: only machine keys changed, each the sole claim on its id, and
    /// nothing is held back (a held record may be admitted by any change).
    fn patch(&mut self) -> Option<MachinePatch> {
        let keys = self.pending.take()?;
        if keys.is_empty() || !self.status.quarantine().is_empty() {
            return None;
        }
        let snap = self.store.snapshot();
        let cat = &snap.catalog;
        let mut patch = MachinePatch::default();
        for key in &keys {
            let Some(Place::Machine { host, id }) = self.layout.parse(key) else {
                return None;
            };
            // The machine in force must be this key's: a second claim on an
            // id goes the full way, where the first claim wins.
            if let Some(m) = cat.machines.get(&id)
                && cat.hosts.get(&m.host).map(|h| h.name.as_str()) != Some(host.as_str())
            {
                return None;
            }
            match self.mirror.keys.get(key) {
                None => patch.deletes.push(id),
                Some(Held {
                    value: Ok(AnyRecord::Machine(m)),
                    ..
                }) => patch.puts.push(m.clone()),
                Some(_) => return None,
            }
        }
        Some(patch)
    }

    /// Publishes what changed: as a patch to the machines when it is one and
    /// the catalog takes it, else the whole layer.
    async fn apply(&mut self) {
        let t = Instant::now();
        if let Some(patch) = self.patch() {
            let store = self.store.clone();
            let done = tokio::task::spawn_blocking(move || {
                matches!(store.patch_machines(Source::Etcd, &patch), Some(Ok(_)))
            })
            .await
            .unwrap_or(false);
            if done {
                self.pending = Some(BTreeSet::new());
                metrics::histogram!("skein_etcd_apply_seconds", "how" => "patch")
                    .record(t.elapsed().as_secs_f64());
                return;
            }
        }
        self.apply_layer().await;
        self.pending = Some(BTreeSet::new());
        metrics::histogram!("skein_etcd_apply_seconds", "how" => "layer")
            .record(t.elapsed().as_secs_f64());
    }

    /// Builds the layer from the mirror and publishes it, holding back the
    /// records the catalog refuses: each round leaves out the records the
    /// problems name, so one bad record never blocks the others.
    async fn apply_layer(&self) {
        let (doc, mut held) = self.mirror.layer();
        let store = self.store.clone();
        let outcome =
            tokio::task::spawn_blocking(move || publish_layer(&store, Source::Etcd, doc)).await;
        match outcome {
            Err(e) => held.push(format!("applying the etcd layer failed: {e}")),
            Ok(o) => {
                for (kind, key, problems) in o.refused {
                    let at = self
                        .mirror
                        .key_of(kind, &key)
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_else(|| format!("{kind}[{key:?}]"));
                    held.push(format!("{at}: {}", problems.join("; ")));
                }
                held.extend(o.stuck);
            }
        }
        if held != self.status.quarantine() {
            for h in &held {
                tracing::warn!(problem = %h, "etcd record held back");
            }
        }
        self.status.set_quarantine(held);
    }
}

impl Mirror {
    /// The etcd layer: every record that parsed, once. Two keys for one
    /// machine (two workers claim one id): the one created first wins, on
    /// every host alike, and the other is held back. Only machines can be
    /// claimed twice: a record's key under `records/` names it.
    fn layer(&self) -> (Document, Vec<String>) {
        let mut held = Vec::new();
        let mut winner: HashMap<&str, (i64, &[u8])> = HashMap::new();
        let claimed = |held: &mut Vec<String>, k: &[u8], id: &str| {
            held.push(format!(
                "{}: machine {id:?} is already published by another key",
                String::from_utf8_lossy(k)
            ))
        };
        for (k, h) in &self.keys {
            if let Ok(AnyRecord::Machine(m)) = &h.value {
                match winner.get(m.id.as_str()) {
                    Some((rev, _)) if *rev <= h.create_revision => claimed(&mut held, k, &m.id),
                    other => {
                        if let Some((_, loser)) = other {
                            claimed(&mut held, loser, &m.id);
                        }
                        winner.insert(&m.id, (h.create_revision, k));
                    }
                }
            }
        }
        let mut doc = Document::default();
        for (k, h) in &self.keys {
            match &h.value {
                Err(e) => held.push(format!("{}: {e}", String::from_utf8_lossy(k))),
                Ok(AnyRecord::Machine(m)) => {
                    if winner.get(m.id.as_str()).map(|(_, w)| *w) == Some(k.as_slice()) {
                        doc.machines.push(m.clone());
                    }
                }
                Ok(r) => r.push_into(&mut doc),
            }
        }
        (doc, held)
    }

    /// The etcd key a record of the layer came from.
    fn key_of(&self, kind: Kind, key: &str) -> Option<&[u8]> {
        self.keys
            .iter()
            .filter(|(_, h)| {
                h.value
                    .as_ref()
                    .is_ok_and(|r| r.kind() == kind && r.key() == key)
            })
            .min_by_key(|(_, h)| h.create_revision)
            .map(|(k, _)| k.as_slice())
    }
}
