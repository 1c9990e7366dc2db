//! Kubernetes: the cluster's Services, with the ready endpoints of their
//! EndpointSlices, as the catalog's `k8s_services` (the [`Source::Kubernetes`]
//! layer), watched with kube-rs.
//!
//! Every pod is a machine: an endpoint names its machine by the pod it targets
//! (a machine's `metadata.pod` and `metadata.namespace`; else the Pod's
//! `service.skein.dev/machine` annotation; else the Pod's IPv6 addresses) or,
//! failing that, by its own address (a machine's 6PN address). An endpoint whose pod is no machine
//! the catalog knows is left out and counted, and placed as soon as the machine
//! arrives. A ClusterIP service's address must be a flycast address of the
//! cluster's network: the catalog checks it, and a service it refuses is held
//! back alone, named in the log and in `skein_k8s_held`.
//!
//! A Service annotated `service.skein.dev/hostnames` is also served by the
//! edge proxy: the layer gets an app whose machines are the Service's ready
//! endpoints (see [`exposed`] for every annotation).
//!
//! The watches are kube-runtime's `watcher`: a watch that the API server ends
//! with 410 Gone (the resource version was compacted away) turns into a new
//! list, and the layer is replaced from it whole, so nothing deleted in the gap
//! lingers.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::index::{Catalog, Source};
use crate::model::{
    App, BackendProtocol, Concurrency, ConcurrencyKind, Document, Handler, K8sEndpoint, K8sPort,
    K8sProtocol, K8sService, K8sServiceKind, Port, Protocol, Service as ServiceDef,
};
use crate::sources::publish_layer;
use crate::store::{Snapshot, Store, stopped};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `[kubernetes]` in the daemon's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    /// Follow a cluster. Off by default.
    #[serde(default)]
    pub enabled: bool,
    /// The API server's URL. Absent: in-cluster service account, else
    /// `$KUBECONFIG` / `~/.kube/config`, as kubectl finds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Only this namespace (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The catalog network the cluster's pods live in.
    #[serde(default)]
    pub network: String,
    /// The cluster's DNS zone.
    #[serde(default = "default_cluster")]
    pub cluster: String,
}

fn default_cluster() -> String {
    "cluster.local".into()
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            enabled: false,
            api: None,
            namespace: None,
            network: String::new(),
            cluster: default_cluster(),
        }
    }
}

impl KubeConfig {
    /// Problems as (field path, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.enabled {
            return out;
        }
        if self.network.is_empty() {
            out.push((
                "kubernetes.network".into(),
                "names the catalog network the cluster's pods live in; required".into(),
            ));
        }
        if let Some(api) = &self.api
            && api
                .parse::<http::Uri>()
                .map_or(true, |u| u.scheme().is_none())
        {
            out.push((
                "kubernetes.api".into(),
                format!("{api:?} is not a URL like https://10.0.0.1:6443"),
            ));
        }
        if self.cluster.is_empty() {
            out.push(("kubernetes.cluster".into(), "must not be empty".into()));
        }
        out
    }

    /// A client for the configured API server.
    pub async fn client(&self) -> Result<Client, String> {
        let config = match &self.api {
            Some(url) => kube::Config::new(
                url.parse::<http::Uri>()
                    .map_err(|e| format!("kubernetes.api {url:?}: {e}"))?,
            ),
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes API server found: {e}"))?,
        };
        Client::try_from(config).map_err(|e| format!("a Kubernetes client: {e}"))
    }
}

/// How the source stands, for `/readyz` and tests.
#[derive(Debug, Default)]
pub struct KubeStatus {
    synced: AtomicBool,
    events: AtomicU64,
    relists: AtomicU64,
    errors: AtomicU64,
    unmapped: AtomicU64,
    held: Mutex<Vec<String>>,
}

impl KubeStatus {
    /// Both watches have listed once and the layer is published.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
    /// Watch events applied.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// Lists after the first (a watch ended with 410 Gone, or failed).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }
    /// Watch errors seen (each is retried with backoff).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// Endpoints left out because no machine is their pod.
    pub fn unmapped(&self) -> u64 {
        self.unmapped.load(Ordering::Relaxed)
    }
    /// Services the catalog refuses, with why.
    pub fn held(&self) -> Vec<String> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// One line for `/readyz`.
    pub fn line(&self) -> String {
        let held = self.held().len();
        format!(
            "kubernetes: {}, {} event(s), {} relist(s), {held} service(s) held back, {} endpoint(s) without a machine",
            if self.synced() { "synced" } else { "listing" },
            self.events(),
            self.relists(),
            self.unmapped()
        )
    }
}

/// Objects of one kind as the watch has them, by (namespace, name).
struct Objects<K> {
    live: BTreeMap<(String, String), K>,
    /// A list in progress: it replaces `live` whole when done.
    listing: Option<BTreeMap<(String, String), K>>,
    listed: bool,
    kind: &'static str,
}

impl<K: kube::Resource> Objects<K> {
    fn new(kind: &'static str) -> Self {
        Objects {
            live: BTreeMap::new(),
            listing: None,
            listed: false,
            kind,
        }
    }

    fn key(o: &K) -> (String, String) {
        (o.namespace().unwrap_or_default(), o.name_any())
    }

    /// Takes one event; true if the objects in force changed.
    fn take(&mut self, ev: Event<K>, status: &KubeStatus) -> bool {
        status.events.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("skein_k8s_events_total", "kind" => self.kind).increment(1);
        match ev {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                if let Some(l) = &mut self.listing {
                    l.insert(Self::key(&o), o);
                }
                false
            }
            Event::InitDone => {
                if let Some(l) = self.listing.take() {
                    self.live = l;
                }
                if self.listed {
                    status.relists.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("skein_k8s_relists_total", "kind" => self.kind).increment(1);
                    tracing::info!(kind = self.kind, "relisted");
                }
                self.listed = true;
                true
            }
            Event::Apply(o) => {
                self.live.insert(Self::key(&o), o);
                self.listed
            }
            Event::Delete(o) => {
                self.live.remove(&Self::key(&o));
                self.listed
            }
        }
    }
}

/// Follows a cluster into the store.
pub struct KubeSource {
    client: Client,
    cfg: KubeConfig,
    store: Arc<Store>,
    status: Arc<KubeStatus>,
}

impl KubeSource {
    /// A source on `client` feeding `store`.
    pub fn new(
        client: Client,
        cfg: KubeConfig,
        store: Arc<Store>,
        status: Arc<KubeStatus>,
    ) -> Self {
        KubeSource {
            client,
            cfg,
            store,
            status,
        }
    }

    /// Watches until `stop`. A failed watch is retried with backoff (the
    /// catalog keeps the layer it has meanwhile); the layer is published
    /// once both kinds have been listed, then on every change, and again
    /// when the catalog's machines change (an endpoint may now have one).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let (services_api, slices_api, pods_api): (Api<Service>, Api<EndpointSlice>, Api<Pod>) =
            match &self.cfg.namespace {
                Some(ns) => (
                    Api::namespaced(self.client.clone(), ns),
                    Api::namespaced(self.client.clone(), ns),
                    Api::namespaced(self.client.clone(), ns),
                ),
                None => (
                    Api::all(self.client.clone()),
                    Api::all(self.client.clone()),
                    Api::all(self.client.clone()),
                ),
            };
        let mut services_watch = watcher::watcher(services_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut slices_watch = watcher::watcher(slices_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut pods_watch = watcher::watcher(pods_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut services = Objects::<Service>::new("services");
        let mut pods = Objects::<Pod>::new("pods");
        let mut slices = Objects::<EndpointSlice>::new("endpointslices");
        let mut snaps = self.store.subscribe();
        let mut published: Option<(Document, Vec<String>)> = None;
        loop {
            let mut changed = tokio::select! {
                _ = stopped(&mut stop) => return,
                ev = services_watch.next() => match ev {
                    Some(ev) => self.take(&mut services, ev),
                    None => return,
                },
                ev = slices_watch.next() => match ev {
                    Some(ev) => self.take(&mut slices, ev),
                    None => return,
                },
                ev = pods_watch.next() => match ev {
                    Some(ev) => self.take(&mut pods, ev),
                    None => return,
                },
                r = snaps.changed() => {
                    if r.is_err() {
                        return;
                    }
                    true
                }
            };
            // Take whatever else is ready, so a burst is one publish.
            loop {
                if let Some(Some(ev)) = services_watch.next().now_or_never() {
                    changed |= self.take(&mut services, ev);
                } else if let Some(Some(ev)) = slices_watch.next().now_or_never() {
                    changed |= self.take(&mut slices, ev);
                } else if let Some(Some(ev)) = pods_watch.next().now_or_never() {
                    changed |= self.take(&mut pods, ev);
                } else {
                    break;
                }
            }
            if !changed || !services.listed || !slices.listed || !pods.listed {
                continue;
            }
            let snap = snaps.borrow_and_update().clone();
            let (doc, unmapped, notes) =
                layer(&self.cfg, &services.live, &slices.live, &pods.live, &snap);
            self.status.unmapped.store(unmapped, Ordering::Relaxed);
            metrics::gauge!("skein_k8s_unmapped_endpoints").set(unmapped as f64);
            let next = (doc, notes);
            if published.as_ref() == Some(&next) {
                continue;
            }
            published = Some(next.clone());
            self.publish(next.0, next.1).await;
        }
    }

    fn take<K: kube::Resource>(
        &self,
        objects: &mut Objects<K>,
        ev: Result<Event<K>, watcher::Error>,
    ) -> bool {
        match ev {
            Ok(ev) => objects.take(ev, &self.status),
            Err(e) => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("skein_k8s_watch_errors_total", "kind" => objects.kind)
                    .increment(1);
                tracing::warn!(kind = objects.kind, error = %e, "kubernetes watch failed; retrying");
                false
            }
        }
    }

    /// Publishes the layer; `notes` are the services whose annotations are
    /// wrong (published without the app they ask for).
    async fn publish(&self, doc: Document, notes: Vec<String>) {
        let store = self.store.clone();
        let outcome =
            tokio::task::spawn_blocking(move || publish_layer(&store, Source::Kubernetes, doc))
                .await;
        let mut held = notes;
        match outcome {
            Err(e) => held.push(format!("applying the kubernetes layer failed: {e}")),
            Ok(o) => {
                // (each problem's path names the service)
                for (_, _, problems) in o.refused {
                    held.push(problems.join("; "));
                }
                held.extend(o.stuck);
            }
        }
        if held != self.status.held() {
            for h in &held {
                tracing::warn!(problem = %h, "kubernetes service held back");
            }
        }
        metrics::gauge!("skein_k8s_held").set(held.len() as f64);
        *self.status.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.status.synced.store(true, Ordering::Relaxed);
        metrics::gauge!("skein_k8s_synced").set(1.0);
    }
}

/// The Kubernetes layer: every Service, with the endpoints of its slices
/// mapped to machines, and an app for each exposed one. Returns it, the
/// number of endpoints left out for want of a machine, and what is wrong
/// with annotations.
fn layer(
    cfg: &KubeConfig,
    services: &BTreeMap<(String, String), Service>,
    slices: &BTreeMap<(String, String), EndpointSlice>,
    pods: &BTreeMap<(String, String), Pod>,
    snap: &Snapshot,
) -> (Document, u64, Vec<String>) {
    let mut notes = Vec::new();
    let machines = MachineIndex::of(&snap.catalog, pods);
    // Slices by the service they serve.
    let mut of_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), s) in slices {
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            of_service
                .entry((ns.as_str(), svc.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut unmapped = 0;
    let mut doc = Document::default();
    for ((ns, name), svc) in services {
        let Some(spec) = &svc.spec else { continue };
        match exposed(cfg, ns, name, svc) {
            Ok(Some(app)) => doc.apps.push(app),
            Ok(None) => {}
            Err(e) => notes.push(format!("service {ns}/{name}: {e}")),
        }
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            K8sServiceKind::ExternalName
        } else if spec.cluster_ip.as_deref() == Some("None") {
            K8sServiceKind::Headless
        } else {
            K8sServiceKind::ClusterIp
        };
        let cluster_ip = match kind {
            K8sServiceKind::ClusterIp => spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .find_map(|ip| ip.parse::<Ipv6Addr>().ok()),
            _ => None,
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(K8sPort {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port: u16::try_from(p.port).ok()?,
                    protocol: match p.protocol.as_deref() {
                        Some("UDP") => K8sProtocol::Udp,
                        Some("SCTP") => K8sProtocol::Sctp,
                        _ => K8sProtocol::Tcp,
                    },
                    target_port: match &p.target_port {
                        Some(IntOrString::Int(i)) => u16::try_from(*i).ok(),
                        _ => None,
                    },
                })
            })
            .collect();
        // One endpoint per machine; ready if any slice says so.
        let mut endpoints: BTreeMap<String, K8sEndpoint> = BTreeMap::new();
        if kind != K8sServiceKind::ExternalName {
            for slice in of_service
                .get(&(ns.as_str(), name.as_str()))
                .into_iter()
                .flatten()
            {
                for ep in &slice.endpoints {
                    let Some(machine) = machines.find(ns, ep) else {
                        unmapped += 1;
                        continue;
                    };
                    // A nil `ready` is to be taken as ready.
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    let e = endpoints
                        .entry(machine.to_string())
                        .or_insert_with(|| K8sEndpoint {
                            machine: machine.to_string(),
                            hostname: ep.hostname.clone(),
                            ready,
                        });
                    e.ready |= ready;
                }
            }
        }
        doc.k8s_services.push(K8sService {
            name: name.clone(),
            namespace: ns.clone(),
            cluster: cfg.cluster.clone(),
            network: cfg.network.clone(),
            kind,
            cluster_ip,
            external_name: match kind {
                K8sServiceKind::ExternalName => spec.external_name.clone(),
                _ => None,
            },
            ports,
            endpoints: endpoints.into_values().collect(),
        });
    }
    (doc, unmapped, notes)
}

/// The annotations' prefix.
const ANNOTATION: &str = "service.skein.dev/";

/// The app through which the proxy serves a Service, if its annotations
/// ask for one:
///
/// | annotation | meaning | default |
/// |---|---|---|
/// | `service.skein.dev/hostnames` | comma list; exposes the Service | (not exposed) |
/// | `service.skein.dev/app` | the app's name | `<name>-<namespace>` |
/// | `service.skein.dev/ports` | `port:handler+handler`, comma list; no handler is raw TCP | `443:tls+http,80:http` |
/// | `service.skein.dev/force-https` | `true`: plain-HTTP ports redirect | `false` |
/// | `service.skein.dev/concurrency` | `requests` or `connections` | `connections` |
/// | `service.skein.dev/soft-limit`, `hard-limit` | per machine | 20, 25 |
/// | `service.skein.dev/backend-protocol` | `http1` or `h2c` | `http1` |
/// | `service.skein.dev/target-port` | the pods' port | the first port's `targetPort` |
pub fn exposed(
    cfg: &KubeConfig,
    ns: &str,
    name: &str,
    svc: &Service,
) -> Result<Option<App>, String> {
    let ann = svc.annotations();
    let get = |k: &str| ann.get(&format!("{ANNOTATION}{k}")).map(|v| v.trim());
    let Some(hosts) = get("hostnames") else {
        return Ok(None);
    };
    let bad = |k: &str, v: &str, why: &str| format!("annotation {ANNOTATION}{k}: {v:?} {why}");
    let number = |k: &str| -> Result<Option<u32>, String> {
        get(k)
            .map(|v| v.parse::<u32>().map_err(|_| bad(k, v, "is not a number")))
            .transpose()
    };
    let hostnames: Vec<String> = hosts
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    if hostnames.is_empty() {
        return Err(bad("hostnames", hosts, "names no hostname"));
    }
    let force_https = match get("force-https") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(bad("force-https", v, "is not true or false")),
    };
    let mut ports = Vec::new();
    for item in get("ports").unwrap_or("443:tls+http,80:http").split(',') {
        let item = item.trim();
        let (port, handlers) = item.split_once(':').unwrap_or((item, ""));
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| bad("ports", item, "is not port:handler+handler"))?;
        let handlers = handlers
            .split('+')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| match h {
                "tls" => Ok(Handler::Tls),
                "http" => Ok(Handler::Http),
                "proxy_proto" => Ok(Handler::ProxyProto),
                _ => Err(bad(
                    "ports",
                    item,
                    "names a handler other than tls, http, proxy_proto",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        ports.push(Port {
            port,
            force_https: force_https && handlers == [Handler::Http],
            handlers,
            proxy_proto_version: None,
        });
    }
    let mut concurrency = Concurrency::default();
    match get("concurrency") {
        None => {}
        Some("requests") => concurrency.kind = ConcurrencyKind::Requests,
        Some("connections") => concurrency.kind = ConcurrencyKind::Connections,
        Some(v) => return Err(bad("concurrency", v, "is not requests or connections")),
    }
    if let Some(n) = number("soft-limit")? {
        concurrency.soft_limit = n;
    }
    if let Some(n) = number("hard-limit")? {
        concurrency.hard_limit = n;
    }
    let backend_protocol = match get("backend-protocol") {
        None | Some("http1") => BackendProtocol::Http1,
        Some("h2c") => BackendProtocol::H2c,
        Some(v) => return Err(bad("backend-protocol", v, "is not http1 or h2c")),
    };
    let first = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first());
    let internal_port = match number("target-port")? {
        Some(p) => {
            u16::try_from(p).map_err(|_| bad("target-port", &p.to_string(), "is not a port"))?
        }
        None => match first {
            Some(p) => match &p.target_port {
                Some(IntOrString::Int(t)) => u16::try_from(*t).unwrap_or(0),
                Some(IntOrString::String(_)) => {
                    return Err(format!(
                        "its first port's targetPort is named; say {ANNOTATION}target-port"
                    ));
                }
                None => u16::try_from(p.port).unwrap_or(0),
            },
            None => return Err(format!("it has no port; say {ANNOTATION}target-port")),
        },
    };
    Ok(Some(App {
        name: get("app")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{name}-{ns}")),
        network: cfg.network.clone(),
        hostnames,
        flycast: None,
        flycast_from: Vec::new(),
        services: vec![ServiceDef {
            protocol: Protocol::Tcp,
            internal_port,
            ports,
            concurrency,
            backend_protocol,
            checks: Vec::new(),
        }],
        tls: Default::default(),
        k8s_service: Some(format!("{ns}/{name}")),
    }))
}

/// The annotation on a Pod that names its machine.
const POD_MACHINE: &str = "service.skein.dev/machine";

/// Machines by the pod they are and by address, and pods by what they say.
struct MachineIndex<'a> {
    by_pod: HashMap<(&'a str, &'a str), &'a str>,
    by_addr: HashMap<Ipv6Addr, &'a str>,
    pods: HashMap<(&'a str, &'a str), &'a Pod>,
    cat: &'a Catalog,
}

impl<'a> MachineIndex<'a> {
    fn of(cat: &'a Catalog, pods: &'a BTreeMap<(String, String), Pod>) -> Self {
        let mut by_pod = HashMap::new();
        let mut by_addr = HashMap::new();
        for m in cat.machines.values() {
            if let (Some(pod), Some(ns)) = (&m.metadata.pod, &m.metadata.namespace) {
                by_pod.insert((ns.as_str(), pod.as_str()), m.id.as_str());
            }
            if let Some(a) = m.address {
                by_addr.insert(Ipv6Addr::from(a), m.id.as_str());
            }
        }
        MachineIndex {
            by_pod,
            by_addr,
            pods: pods
                .iter()
                .map(|((ns, name), p)| ((ns.as_str(), name.as_str()), p))
                .collect(),
            cat,
        }
    }

    /// The machine an endpoint in namespace `ns` stands for.
    fn find(&self, ns: &str, ep: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<&'a str> {
        // The pod it targets, as (namespace, name).
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
            .and_then(|r| Some((r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?)));
        if let Some(pod) = pod
            && let Some(m) = self.by_pod.get(&pod)
        {
            return Some(m);
        }
        // The Pod itself: the machine it names, else its IPv6 addresses (an
        // IPv4 slice's endpoint finds its machine through them).
        if let Some(pod) = pod
            && let Some(p) = self.pods.get(&pod)
        {
            if let Some(id) = p.annotations().get(POD_MACHINE)
                && let Some((id, _)) = self.cat.machines.get_key_value(id)
            {
                return Some(id);
            }
            let status = p.status.as_ref();
            let ips = status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|ip| ip.ip.as_str())
                .chain(status.and_then(|s| s.pod_ip.as_deref()));
            for ip in ips {
                if let Ok(a) = ip.parse::<Ipv6Addr>()
                    && let Some(m) = self.by_addr.get(&a)
                {
                    return Some(m);
                }
            }
        }
        ep.addresses
            .iter()
            .filter_map(|a| a.parse::<Ipv6Addr>().ok())
            .find_map(|a| self.by_addr.get(&a).copied())
    }
}
