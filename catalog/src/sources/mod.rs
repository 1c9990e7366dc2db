//! Sources of catalog documents.
//!
//! How they combine: each source contributes one [`Document`](crate::Document)
//! (a layer), and the catalog in force is all layers validated together. A record
//! (kind and key) is owned by exactly one source: the file cannot override an API
//! record or the reverse; the second definition is rejected with a path naming
//! both. The API refuses to change or delete a record the file owns (409), so
//! the file stays the truth for what it declares and the API for what it wrote.

pub mod api;
pub mod client;
pub mod etcd;
pub mod file;
pub mod kubernetes;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::index::Source;
use crate::model::Document;
use crate::record::{Kind, Record};
use crate::store::Store;

/// What became of a layer published by [`publish_layer`].
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// Records left out, with the problems that named them.
    pub refused: Vec<(Kind, String, Vec<String>)>,
    /// Why the layer in force stayed, if it did.
    pub stuck: Option<String>,
}

/// Publishes a followed source's whole layer, leaving out the records the
/// catalog refuses: each round drops the records the problems name (paths
/// such as `machines["m9"].app`), so one bad record never blocks the others'
/// changes. A problem in another source's record (one that refers to a record
/// of this layer that went, say) keeps the layer in force. Blocking.
pub(crate) fn publish_layer(store: &Store, source: Source, doc: Document) -> Published {
    let mut out = Published::default();
    let mut doc = Arc::new(doc);
    // Each round leaves out at least one record, so this ends; the bound only
    // caps the work a pathological layer can cost.
    for _ in 0..16 {
        let invalid = match store.replace_shared(source, doc.clone()) {
            Ok(_) => return out,
            Err(invalid) => invalid,
        };
        let mut why: BTreeMap<(Kind, String), Vec<String>> = BTreeMap::new();
        for p in &invalid.problems {
            if let Some(id) = named(&p.path) {
                why.entry(id).or_default().push(p.to_string());
            }
        }
        if why.is_empty() {
            out.stuck = Some(format!(
                "the catalog refuses the {source} layer because of other sources' records: {invalid}"
            ));
            return out;
        }
        // The store dropped its copy: this edits in place.
        let d = Arc::make_mut(&mut doc);
        for ((kind, key), problems) in why {
            leave_out(d, kind, &key);
            out.refused.push((kind, key, problems));
        }
    }
    out.stuck = Some("too many refused records; the layer in force stays".into());
    out
}

/// The record a problem path names (`apps["web"].network`), if any.
fn named(path: &str) -> Option<(Kind, String)> {
    let (kind, rest) = path.split_once("[\"")?;
    let (key, _) = rest.split_once("\"]")?;
    Some((Kind::parse(kind)?, key.to_string()))
}

/// Leaves a record out of a document.
fn leave_out(doc: &mut Document, kind: Kind, key: &str) {
    fn drop_key<T: Record>(doc: &mut Document, key: &str) {
        T::list_mut(doc).retain(|r| r.key().to_string() != key);
    }
    match kind {
        Kind::Regions => drop_key::<crate::model::Region>(doc, key),
        Kind::Hosts => drop_key::<crate::model::Host>(doc, key),
        Kind::Networks => drop_key::<crate::model::Network>(doc, key),
        Kind::Apps => drop_key::<crate::model::App>(doc, key),
        Kind::Machines => drop_key::<crate::model::Machine>(doc, key),
        Kind::Certificates => drop_key::<crate::model::Certificate>(doc, key),
        Kind::K8sServices => drop_key::<crate::model::K8sService>(doc, key),
    }
}
