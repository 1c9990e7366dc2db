//! One trait over the seven kinds of record, so that gathering, diffing, storing and
//! serving them over the API is written once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use skein_sixpn::HostId;

use crate::index::Catalog;
use crate::model::{App, Certificate, Document, Host, K8sService, Machine, Network, Region};

/// The kinds of record, in the order they are validated (a kind only refers to
/// kinds before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`Region`]
    Regions,
    /// [`Host`]
    Hosts,
    /// [`Network`]
    Networks,
    /// [`App`]
    Apps,
    /// [`Machine`]
    Machines,
    /// [`Certificate`]
    Certificates,
    /// [`K8sService`]
    K8sServices,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Regions,
        Kind::Hosts,
        Kind::Networks,
        Kind::Apps,
        Kind::Machines,
        Kind::Certificates,
        Kind::K8sServices,
    ];

    /// The name used in documents, paths and API routes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Regions => "regions",
            Kind::Hosts => "hosts",
            Kind::Networks => "networks",
            Kind::Apps => "apps",
            Kind::Machines => "machines",
            Kind::Certificates => "certificates",
            Kind::K8sServices => "k8s_services",
        }
    }

    /// Parses [`Kind::as_str`].
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind of record: how to find its list in a [`Document`] and its map in a
/// [`Catalog`], and what its key is.
pub trait Record:
    Clone + PartialEq + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Its kind.
    const KIND: Kind;
    /// Its key, unique within the kind.
    type Key: Ord + Clone + fmt::Display + fmt::Debug + Send + Sync;
    /// The key of this record.
    fn key(&self) -> Self::Key;
    /// Parses a key from its text form (as in an API path).
    fn parse_key(s: &str) -> Option<Self::Key>;
    /// The records of this kind in a document.
    fn list(doc: &Document) -> &Vec<Self>;
    /// The same, mutable.
    fn list_mut(doc: &mut Document) -> &mut Vec<Self>;
    /// The records of this kind in a catalog.
    fn map(cat: &Catalog) -> &BTreeMap<Self::Key, Arc<Self>>;
}

macro_rules! string_keyed {
    ($t:ty, $kind:expr, $field:ident, $key:ident) => {
        impl Record for $t {
            const KIND: Kind = $kind;
            type Key = String;
            fn key(&self) -> String {
                self.$key.clone()
            }
            fn parse_key(s: &str) -> Option<String> {
                Some(s.to_string())
            }
            fn list(doc: &Document) -> &Vec<Self> {
                &doc.$field
            }
            fn list_mut(doc: &mut Document) -> &mut Vec<Self> {
                &mut doc.$field
            }
            fn map(cat: &Catalog) -> &BTreeMap<String, Arc<Self>> {
                &cat.$field
            }
        }
    };
}

string_keyed!(Region, Kind::Regions, regions, code);
string_keyed!(Network, Kind::Networks, networks, name);
string_keyed!(App, Kind::Apps, apps, name);
string_keyed!(Machine, Kind::Machines, machines, id);
string_keyed!(Certificate, Kind::Certificates, certificates, name);

impl Record for Host {
    const KIND: Kind = Kind::Hosts;
    type Key = HostId;
    fn key(&self) -> HostId {
        self.id
    }
    fn parse_key(s: &str) -> Option<HostId> {
        skein_sixpn::parse_field(s).ok().map(HostId)
    }
    fn list(doc: &Document) -> &Vec<Self> {
        &doc.hosts
    }
    fn list_mut(doc: &mut Document) -> &mut Vec<Self> {
        &mut doc.hosts
    }
    fn map(cat: &Catalog) -> &BTreeMap<HostId, Arc<Self>> {
        &cat.hosts
    }
}

/// A Kubernetes Service is keyed by `namespace/name` (and its cluster zone, which
/// is part of the text form only when it is not `cluster.local`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Record for K8sService {
    const KIND: Kind = Kind::K8sServices;
    type Key = ServiceKey;
    fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
    fn parse_key(s: &str) -> Option<ServiceKey> {
        let (namespace, name) = s.split_once('/')?;
        Some(ServiceKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
    fn list(doc: &Document) -> &Vec<Self> {
        &doc.k8s_services
    }
    fn list_mut(doc: &mut Document) -> &mut Vec<Self> {
        &mut doc.k8s_services
    }
    fn map(cat: &Catalog) -> &BTreeMap<ServiceKey, Arc<Self>> {
        &cat.k8s_services
    }
}
