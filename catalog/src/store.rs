//! The live catalog: versioned immutable snapshots behind an `ArcSwap`.
//!
//! Readers call [`Store::snapshot`] (one atomic load, no lock) and keep the `Arc`
//! as long as they like; a snapshot never changes. Writers are serialized by a
//! mutex that readers never touch: each write takes the documents of all sources,
//! applies its edit to one of them, validates the whole, and either publishes a
//! new snapshot or changes nothing. Subscribers get the newest snapshot through a
//! `tokio::sync::watch`; a subscriber that was slow sees only the latest, and
//! [`Changes::between`] the one it last applied and that one tells it everything
//! that changed meanwhile.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::error::Invalid;
use crate::index::{Catalog, MachinePatch, Source, build};
use crate::model::Document;
use crate::record::{Kind, Record};

/// One version of the catalog. Immutable.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one with every published change; 0 is the empty catalog.
    pub version: u64,
    /// The catalog.
    pub catalog: Catalog,
    /// When it was published.
    pub published: Option<SystemTime>,
}

/// What changed in one kind between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff<K> {
    /// Keys only in the newer one.
    pub added: Vec<K>,
    /// Keys only in the older one.
    pub removed: Vec<K>,
    /// Keys in both whose records differ.
    pub changed: Vec<K>,
}

impl<K> Diff<K> {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl<K: Ord + Clone> Diff<K> {
    /// Compares two maps of records. Unchanged records share their `Arc`, so most
    /// comparisons are one pointer compare.
    pub fn of<V: PartialEq>(old: &BTreeMap<K, Arc<V>>, new: &BTreeMap<K, Arc<V>>) -> Self {
        let mut d = Diff {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        };
        // Both maps iterate in key order: one merge walk, no lookups.
        let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
        loop {
            match (o.peek(), n.peek()) {
                (None, None) => return d,
                (Some((ok, _)), None) => {
                    d.removed.push((*ok).clone());
                    o.next();
                }
                (None, Some((nk, _))) => {
                    d.added.push((*nk).clone());
                    n.next();
                }
                (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                    std::cmp::Ordering::Less => {
                        d.removed.push((*ok).clone());
                        o.next();
                    }
                    std::cmp::Ordering::Greater => {
                        d.added.push((*nk).clone());
                        n.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(ov, nv) && ***ov != ***nv {
                            d.changed.push((*nk).clone());
                        }
                        o.next();
                        n.next();
                    }
                },
            }
        }
    }
}

/// Everything that changed between two snapshots, kind by kind, keys as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// Older version.
    pub from: u64,
    /// Newer version.
    pub to: u64,
    /// Per kind; kinds without changes are left out.
    pub kinds: BTreeMap<Kind, Diff<String>>,
}

impl Changes {
    /// What changed from `old` to `new`.
    pub fn between(old: &Snapshot, new: &Snapshot) -> Changes {
        fn text<T: Record>(old: &Catalog, new: &Catalog) -> Diff<String> {
            let d = Diff::of(T::map(old), T::map(new));
            let s = |v: Vec<T::Key>| v.into_iter().map(|k| k.to_string()).collect();
            Diff {
                added: s(d.added),
                removed: s(d.removed),
                changed: s(d.changed),
            }
        }
        let (o, n) = (&old.catalog, &new.catalog);
        let mut kinds = BTreeMap::new();
        let all = [
            (Kind::Regions, text::<crate::model::Region>(o, n)),
            (Kind::Hosts, text::<crate::model::Host>(o, n)),
            (Kind::Networks, text::<crate::model::Network>(o, n)),
            (Kind::Apps, text::<crate::model::App>(o, n)),
            (Kind::Machines, text::<crate::model::Machine>(o, n)),
            (Kind::Certificates, text::<crate::model::Certificate>(o, n)),
            (Kind::K8sServices, text::<crate::model::K8sService>(o, n)),
        ];
        for (k, d) in all {
            if !d.is_empty() {
                kinds.insert(k, d);
            }
        }
        Changes {
            from: old.version,
            to: new.version,
            kinds,
        }
    }

    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

/// Why a write did not publish.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    /// The result would be invalid; nothing changed.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The edit or the commit hook refused; nothing changed.
    #[error("{0}")]
    Refused(E),
}

/// The outcome of a write that did not fail.
#[derive(Debug, Clone)]
pub struct Written {
    /// The snapshot in force after the write.
    pub snapshot: Arc<Snapshot>,
    /// False if the write left the catalog as it was (no new version).
    pub changed: bool,
}

/// The live catalog. Cheap to share (`Arc<Store>`).
pub struct Store {
    current: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Each source's document, shared with the copy a write edits: a write
    /// clones only the document it edits.
    layers: Mutex<BTreeMap<Source, Arc<Document>>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty catalog at version 0.
    pub fn new() -> Self {
        let empty = Arc::new(Snapshot::default());
        let (tx, _) = watch::channel(empty.clone());
        Store {
            current: ArcSwap::new(empty),
            tx,
            layers: Mutex::new(BTreeMap::new()),
        }
    }

    /// The snapshot in force: one atomic load, never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Tells of every new snapshot (the latest when several came at once).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The document a source contributes now.
    pub fn layer(&self, source: Source) -> Document {
        self.lock()
            .get(&source)
            .map(|d| Document::clone(d))
            .unwrap_or_default()
    }

    /// Replaces a source's whole document.
    pub fn replace(&self, source: Source, doc: Document) -> Result<Written, Invalid> {
        self.replace_shared(source, Arc::new(doc))
    }

    /// [`Store::replace`] with a shared document: a caller that keeps its
    /// `Arc` gets it back unshared when the catalog refuses it, to edit in
    /// place and try again.
    pub fn replace_shared(&self, source: Source, doc: Arc<Document>) -> Result<Written, Invalid> {
        self.transact::<std::convert::Infallible>(
            source_label(source),
            |layers| {
                layers.insert(source, doc);
                Ok(())
            },
            |_, _| Ok(()),
        )
        .map_err(|e| match e {
            WriteError::Invalid(i) => i,
            WriteError::Refused(never) => match never {},
        })
    }

    /// Applies a change to a source's machines alone without rebuilding the
    /// catalog (see [`crate::index::patch_machines`]). `None` when the change
    /// needs a full build: the caller then replaces the whole document.
    pub fn patch_machines(
        &self,
        source: Source,
        patch: &MachinePatch,
    ) -> Option<Result<Written, Invalid>> {
        let label = source_label(source);
        let mut layers = self.lock();
        let prev = self.current.load_full();
        let catalog = match crate::index::patch_machines(&prev.catalog, source, patch)? {
            Ok(c) => c,
            Err(invalid) => {
                metrics::counter!("skein_catalog_writes_total", "source" => label, "result" => "invalid").increment(1);
                return Some(Err(invalid));
            }
        };
        // The layer takes the same change, so a later full build agrees. Its
        // document is shared only with a caller that still holds it.
        let doc = Arc::make_mut(layers.entry(source).or_default());
        let gone: std::collections::HashSet<&str> = patch
            .deletes
            .iter()
            .chain(patch.puts.iter().map(|m| &m.id))
            .map(String::as_str)
            .collect();
        doc.machines.retain(|m| !gone.contains(m.id.as_str()));
        doc.machines.extend(patch.puts.iter().cloned());
        // Still under the writers' lock: no other write lands in between.
        let written = self.publish(prev, catalog, label);
        drop(layers);
        Some(Ok(written))
    }

    /// Applies `edit` to a source's document, validates the result with every
    /// other source's, runs `commit` (for example a durable write) with the new
    /// catalog and the edited document, and publishes. If any step fails, nothing
    /// changes. Writers run one at a time; readers are never blocked.
    pub fn write<E>(
        &self,
        source: Source,
        edit: impl FnOnce(&mut Document) -> Result<(), E>,
        commit: impl FnOnce(&Catalog, &Document) -> Result<(), E>,
    ) -> Result<Written, WriteError<E>> {
        self.transact(
            source_label(source),
            |layers| edit(Arc::make_mut(layers.entry(source).or_default())),
            |cat, layers| match layers.get(&source) {
                Some(doc) => commit(cat, doc),
                None => Ok(()),
            },
        )
    }

    /// Replaces the documents of several sources at once (as at start, when the
    /// file's records may refer to the API's and the reverse).
    pub fn replace_all(&self, docs: Vec<(Source, Document)>) -> Result<Written, Invalid> {
        self.transact::<std::convert::Infallible>(
            "startup",
            |layers| {
                layers.extend(docs.into_iter().map(|(s, d)| (s, Arc::new(d))));
                Ok(())
            },
            |_, _| Ok(()),
        )
        .map_err(|e| match e {
            WriteError::Invalid(i) => i,
            WriteError::Refused(never) => match never {},
        })
    }

    fn transact<E>(
        &self,
        label: &'static str,
        edit: impl FnOnce(&mut BTreeMap<Source, Arc<Document>>) -> Result<(), E>,
        commit: impl FnOnce(&Catalog, &BTreeMap<Source, Arc<Document>>) -> Result<(), E>,
    ) -> Result<Written, WriteError<E>> {
        let mut layers = self.lock();
        let mut next_layers = layers.clone();
        edit(&mut next_layers).map_err(WriteError::Refused)?;
        let prev = self.current.load_full();
        let view: Vec<(Source, &Document)> = next_layers.iter().map(|(s, d)| (*s, &**d)).collect();
        let catalog = match build(&view, &prev.catalog) {
            Ok(c) => c,
            Err(invalid) => {
                metrics::counter!("skein_catalog_writes_total", "source" => label, "result" => "invalid").increment(1);
                return Err(WriteError::Invalid(invalid));
            }
        };
        commit(&catalog, &next_layers).map_err(WriteError::Refused)?;
        *layers = next_layers;
        Ok(self.publish(prev, catalog, label))
    }

    /// Makes `catalog` the one in force (unless nothing changed) and tells
    /// the followers.
    fn publish(&self, prev: Arc<Snapshot>, catalog: Catalog, label: &'static str) -> Written {
        let next = Snapshot {
            version: prev.version + 1,
            catalog,
            published: Some(SystemTime::now()),
        };
        if Changes::between(&prev, &next).is_empty() && prev.catalog.owners == next.catalog.owners {
            metrics::counter!("skein_catalog_writes_total", "source" => label, "result" => "unchanged").increment(1);
            return Written {
                snapshot: prev,
                changed: false,
            };
        }
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.tx.send_replace(next.clone());
        metrics::counter!("skein_catalog_writes_total", "source" => label, "result" => "published")
            .increment(1);
        metrics::gauge!("skein_catalog_version").set(next.version as f64);
        for kind in Kind::ALL {
            metrics::gauge!("skein_catalog_records", "kind" => kind.as_str())
                .set(next.catalog.count(kind) as f64);
        }
        tracing::info!(version = next.version, source = label, "catalog published");
        Written {
            snapshot: next,
            changed: true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Source, Arc<Document>>> {
        // A writer that panicked left the layers as they were before its edit
        // (edits work on a copy), so the data behind a poisoned lock is sound.
        self.layers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a change from one catalog to another touched, for a plane that
/// rebuilds only that: a machine that flips health touches its app and its
/// app's network, not the 9,999 other apps.
#[derive(Debug, Default, PartialEq)]
pub struct Touched {
    /// The regions changed: every round-trip order may have, so everything
    /// that sorts by distance must be rebuilt.
    pub regions: bool,
    /// Apps whose record or whose machines changed (by name, old and new).
    pub apps: std::collections::BTreeSet<String>,
    /// Networks whose record, apps, machines or Kubernetes services changed.
    pub networks: std::collections::BTreeSet<String>,
}

impl Touched {
    /// Compares two catalogs; unchanged records share their `Arc`, so this
    /// is mostly pointer compares.
    pub fn between(old: &Catalog, new: &Catalog) -> Touched {
        let mut t = Touched {
            regions: !Diff::of(&old.regions, &new.regions).is_empty(),
            ..Default::default()
        };
        let d = Diff::of(&old.networks, &new.networks);
        t.networks
            .extend(d.added.into_iter().chain(d.removed).chain(d.changed));
        let d = Diff::of(&old.apps, &new.apps);
        t.apps
            .extend(d.added.into_iter().chain(d.removed).chain(d.changed));
        let d = Diff::of(&old.machines, &new.machines);
        let mut moved = std::collections::BTreeSet::new();
        for k in d.added.iter().chain(&d.removed).chain(&d.changed) {
            moved.insert(k.as_str());
            for c in [old, new] {
                if let Some(m) = c.machines.get(k) {
                    t.apps.insert(m.app.clone());
                }
            }
        }
        for a in &t.apps {
            for c in [old, new] {
                if let Some(app) = c.apps.get(a) {
                    t.networks.insert(app.network.clone());
                    // they resolve its flycast name too
                    t.networks.extend(app.flycast_from.iter().cloned());
                }
            }
        }
        let d = Diff::of(&old.k8s_services, &new.k8s_services);
        let mut services = std::collections::BTreeSet::new();
        for k in d.added.iter().chain(&d.removed).chain(&d.changed) {
            services.insert(k.to_string());
            for c in [old, new] {
                if let Some(s) = c.k8s_services.get(k) {
                    t.networks.insert(s.network.clone());
                }
            }
        }
        // A headless service answers with its pods' addresses.
        if !moved.is_empty() {
            for (k, s) in &new.k8s_services {
                if s.endpoints
                    .iter()
                    .any(|e| moved.contains(e.machine.as_str()))
                {
                    t.networks.insert(s.network.clone());
                    services.insert(k.to_string());
                }
            }
        }
        // An app served by a Kubernetes Service follows its endpoints.
        if !services.is_empty() {
            for c in [old, new] {
                for a in c.apps.values() {
                    if a.k8s_service.as_ref().is_some_and(|k| services.contains(k)) {
                        t.apps.insert(a.name.clone());
                        t.networks.insert(a.network.clone());
                    }
                }
            }
        }
        t
    }
}

/// A static label for metrics.
pub fn source_label(s: Source) -> &'static str {
    match s {
        Source::File => "file",
        Source::Api => "api",
        Source::Etcd => "etcd",
        Source::Kubernetes => "kubernetes",
        Source::Builtin => "builtin",
    }
}

/// Resolves once `stop` turns true. (The guard `wait_for` returns is not `Send`;
/// it is dropped here, so callers can `select!` on this in spawned tasks.)
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Calls `apply` with the snapshot in force, then with every newer one, until
/// `stop` turns true. A plane derives its tables this way; the work runs on the
/// blocking pool (building tables or parsing certificates is CPU work), and a
/// plane that falls behind skips to the newest snapshot.
pub async fn follow(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut stop: watch::Receiver<bool>,
    apply: impl Fn(&Arc<Snapshot>) + Send + Sync + 'static,
) {
    let apply = Arc::new(apply);
    let first = rx.borrow_and_update().clone();
    apply(&first);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let snap = rx.borrow_and_update().clone();
        let f = apply.clone();
        let _ = tokio::task::spawn_blocking(move || f(&snap)).await;
    }
}
