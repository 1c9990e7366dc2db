//! Routing tables: what the proxy derives from a catalog snapshot. Immutable;
//! a new one is built for every catalog version and swapped in whole.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use skein_catalog::model::{BackendProtocol, ConcurrencyKind, Handler, ProxyProtoVersion};
use skein_catalog::{Snapshot, Touched};

use crate::load::{Loads, MachineLoad, ServiceQueue};

/// A machine as one service of its app sees it.
#[derive(Debug)]
pub struct Backend {
    /// Machine id.
    pub machine: Arc<str>,
    /// The same as a header value (`skein-machine` on its responses), made
    /// once per table rather than per response; None if the id cannot be one.
    pub machine_header: Option<http::HeaderValue>,
    /// Its region.
    pub region: Arc<str>,
    /// The machine's own address (its endpoint or 6PN address and port).
    pub addr: SocketAddr,
    /// The backhaul listener of the machine's host, when the machine lives on
    /// another host and the proxy backhauls: the request goes there, and that
    /// host's proxy delivers it to `addr`.
    pub via: Option<SocketAddr>,
    /// Round-trip time from this edge's region, in ms.
    pub rtt_ms: u32,
    /// Live load (outlives the table).
    pub load: Arc<MachineLoad>,
}

impl Backend {
    /// Counts the machine's answer, on the host that delivers to it: a
    /// backhauled request is counted by the worker alone (an edge sees its
    /// worker, not the machine), so a sum over hosts counts each request once.
    pub fn answered(&self, status: http::StatusCode) {
        if self.via.is_none() {
            self.load.answered(status);
        }
    }

    /// Counts a request the machine did not answer, on the host that
    /// delivers to it (as [`Backend::answered`]).
    pub fn failed(&self, why: crate::load::MachineError) {
        if self.via.is_none() {
            self.load.failed(why);
        }
    }
}

/// A service of an app: its machines and limits.
#[derive(Debug)]
pub struct ServiceRoute {
    /// Port on the machines.
    pub internal_port: u16,
    /// What the limits count.
    pub kind: ConcurrencyKind,
    /// Soft limit per machine.
    pub soft: u32,
    /// Hard limit per machine.
    pub hard: u32,
    /// HTTP version to the machines.
    pub backend_protocol: BackendProtocol,
    /// Routable machines, closest first.
    pub backends: Vec<Backend>,
    /// Where requests wait when all are full.
    pub queue: Arc<ServiceQueue>,
    /// Rotates the choice among equally good machines.
    pub rr: AtomicUsize,
    /// Active health checks of the machines.
    pub checks: Vec<skein_catalog::model::Check>,
    /// A hostname of the app, for the Host header of HTTP checks.
    pub check_host: Option<Arc<str>>,
}

/// What the proxy does on one public port of an app.
#[derive(Debug, Clone)]
pub struct PortRoute {
    /// Index into [`AppRoute::services`].
    pub service: usize,
    /// Terminate TLS.
    pub tls: bool,
    /// Speak HTTP.
    pub http: bool,
    /// Redirect to HTTPS.
    pub force_https: bool,
    /// PROXY protocol header to the machine.
    pub proxy_proto: Option<ProxyProtoVersion>,
}

/// An app as the proxy sees it.
#[derive(Debug)]
pub struct AppRoute {
    /// Name.
    pub name: Arc<str>,
    /// Its network (replays stay inside it).
    pub network: Arc<str>,
    /// Public port -> what to do.
    pub ports: HashMap<u16, PortRoute>,
    /// Services.
    pub services: Vec<ServiceRoute>,
    /// Serve a generated certificate when none matches.
    pub allow_self_signed: bool,
    /// Its metric handles.
    pub metrics: crate::http::AppMetrics,
}

/// Every app by hostname, for one catalog version.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Catalog version it was built from.
    pub version: u64,
    exact: HashMap<String, Arc<AppRoute>>,
    wildcard: HashMap<String, Arc<AppRoute>>,
    /// Public ports of apps that have no hostnames and speak raw TCP there (no
    /// tls, no http handler): such a connection has no name to route by.
    raw_ports: HashMap<u16, Arc<AppRoute>>,
    /// Every app by name.
    by_name: HashMap<String, Arc<AppRoute>>,
    /// Flycast addresses: an app's, or a Kubernetes ClusterIP Service's.
    flycast: HashMap<std::net::Ipv6Addr, Arc<AppRoute>>,
    /// The routes of ClusterIP Services, by Service key (`namespace/name`),
    /// with the records they were built from (kept while those stay the same).
    k8s: HashMap<String, K8sRoute>,
    rtt: HashMap<String, HashMap<String, u32>>,
}

/// A ClusterIP Service's route and what it was built from.
#[derive(Debug, Clone)]
struct K8sRoute {
    record: Arc<skein_catalog::model::K8sService>,
    machines: Vec<Arc<skein_catalog::model::Machine>>,
    route: Arc<AppRoute>,
}

/// Where the proxy stands: its region (distances are measured from there),
/// its host (machines elsewhere are reached through their host's proxy when
/// the backhaul is on).
#[derive(Debug, Clone, Default)]
pub struct Locality {
    /// This edge's region.
    pub region: String,
    /// This host's name in the catalog.
    pub host: Option<String>,
    /// The backhaul, when enabled.
    pub backhaul: Option<crate::config::BackhaulConfig>,
}

impl Locality {
    /// An edge in `region` that dials every machine directly.
    pub fn region(region: &str) -> Locality {
        Locality {
            region: region.to_string(),
            ..Default::default()
        }
    }

    /// The backhaul listener through which `m` is reached, or None when it is
    /// dialled directly: no backhaul, the machine is on this host, or this
    /// proxy does not know its own host (then nothing is "elsewhere").
    fn via(
        &self,
        cat: &skein_catalog::Catalog,
        m: &skein_catalog::model::Machine,
    ) -> Option<SocketAddr> {
        let b = self.backhaul.as_ref().filter(|b| b.enabled)?;
        let me = self.host.as_deref()?;
        let host = cat.hosts.get(&m.host)?;
        (host.name != me).then(|| b.address_of(host))
    }
}

/// RTT assumed between regions the catalog has no figure for.
pub const UNKNOWN_RTT_MS: u32 = 1_000;

/// Lowercases, strips a port and a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let h = match host.rsplit_once(':') {
        // Not an IPv6 literal without brackets.
        Some((h, port))
            if (!h.contains(':') || h.ends_with(']'))
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h
        }
        _ => host,
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl RouteTable {
    /// Builds the table for `snap` as seen from `at`.
    pub fn build(snap: &Snapshot, at: &Locality, loads: &Loads) -> RouteTable {
        RouteTable::assemble(snap, at, loads, None)
    }

    /// Builds the table for `snap`, keeping from `self` (built from
    /// `prev_snap`) the route of every app the change did not touch: its
    /// backends, round-robin position and metric handles stay as they were,
    /// and only the touched apps are built again. Also returns the backend
    /// addresses the touched apps no longer route to.
    pub fn update(
        &self,
        prev_snap: &Snapshot,
        snap: &Snapshot,
        at: &Locality,
        loads: &Loads,
    ) -> (RouteTable, Option<Vec<SocketAddr>>) {
        let touched = Touched::between(&prev_snap.catalog, &snap.catalog);
        // Hosts decide which machines are backhauled, and through where.
        let hosts_changed = at.backhaul.as_ref().is_some_and(|b| b.enabled)
            && prev_snap.catalog.hosts != snap.catalog.hosts;
        if touched.regions || hosts_changed {
            return (RouteTable::assemble(snap, at, loads, None), None);
        }
        // Regions and hosts unchanged: a ClusterIP route whose Service and
        // endpoint machines are the same records can be kept too.
        let t = RouteTable::assemble(snap, at, loads, Some((self, &touched.apps)));
        let addrs = |table: &RouteTable| -> HashSet<SocketAddr> {
            touched
                .apps
                .iter()
                .filter_map(|a| table.by_name.get(a))
                .flat_map(|a| a.services.iter())
                .flat_map(|s| s.backends.iter().map(|b| b.addr))
                .collect()
        };
        let now = addrs(&t);
        let gone = addrs(self)
            .into_iter()
            .filter(|a| !now.contains(a))
            .collect();
        (t, Some(gone))
    }

    fn assemble(
        snap: &Snapshot,
        at: &Locality,
        loads: &Loads,
        keep: Option<(&RouteTable, &BTreeSet<String>)>,
    ) -> RouteTable {
        let cat = &snap.catalog;
        let build = Build { cat, at, loads };
        let rebuild = |app: &str| keep.is_none_or(|(_, touched)| touched.contains(app));
        let mut by_app: HashMap<&str, Vec<&skein_catalog::model::Machine>> = HashMap::new();
        for m in cat.machines.values() {
            if m.is_routable() && rebuild(&m.app) {
                by_app.entry(m.app.as_str()).or_default().push(m);
            }
        }
        let mut t = RouteTable {
            version: snap.version,
            ..Default::default()
        };
        for app in cat.apps.values() {
            let kept = match keep {
                Some((prev, touched)) if !touched.contains(&app.name) => {
                    prev.by_name.get(&app.name).cloned()
                }
                _ => None,
            };
            let route = match kept {
                Some(r) => r,
                None => {
                    let served = app.k8s_service.as_ref().map(|k| k8s_machines(cat, k));
                    let machines = match &served {
                        Some(m) => m.as_slice(),
                        None => by_app
                            .get(app.name.as_str())
                            .map(Vec::as_slice)
                            .unwrap_or(&[]),
                    };
                    app_route(&build, app, machines)
                }
            };
            // An app without hostnames is reached by its port alone; one with
            // hostnames and no handler is TLS passthrough, routed by SNI.
            for (p, r) in route.ports.iter().filter(|_| app.hostnames.is_empty()) {
                if !r.tls && !r.http {
                    match t.raw_ports.get(p) {
                        Some(other) => tracing::warn!(
                            port = p,
                            app = %app.name,
                            other = %other.name,
                            "two apps want raw TCP on one port; the first keeps it"
                        ),
                        None => {
                            t.raw_ports.insert(*p, route.clone());
                        }
                    }
                }
            }
            t.by_name.insert(app.name.clone(), route.clone());
            for h in &app.hostnames {
                match h.strip_prefix("*.") {
                    Some(suffix) => t.wildcard.insert(suffix.to_string(), route.clone()),
                    None => t.exact.insert(h.clone(), route.clone()),
                };
            }
        }
        for app in cat.apps.values() {
            if let (Some(ip), Some(route)) = (app.flycast, t.by_name.get(&app.name)) {
                t.flycast.insert(ip, route.clone());
            }
        }
        t.k8s = k8s_routes(&build, keep.map(|(prev, _)| prev));
        for r in t.k8s.values() {
            if let Some(ip) = r.record.cluster_ip {
                // An app that names the address itself (with its own handlers) wins.
                t.flycast.entry(ip).or_insert_with(|| r.route.clone());
            }
        }
        for a in cat.regions.keys() {
            for b in cat.regions.keys() {
                t.rtt
                    .entry(a.clone())
                    .or_default()
                    .insert(b.clone(), build.rtt(a, b));
            }
        }
        loads.prune();
        t
    }

    /// The app serving `host` (exact name first, then a one-label wildcard).
    /// `host` must already be normalized.
    pub fn app(&self, host: &str) -> Option<&Arc<AppRoute>> {
        self.exact.get(host).or_else(|| {
            let (_, parent) = host.split_once('.')?;
            self.wildcard.get(parent)
        })
    }

    /// Every app once.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppRoute>> {
        self.by_name.values()
    }

    /// The app (or ClusterIP Service) that owns a flycast address.
    pub fn flycast(&self, addr: std::net::Ipv6Addr) -> Option<&Arc<AppRoute>> {
        self.flycast.get(&addr)
    }

    /// Every route once: the apps, then the ClusterIP Services (health checks
    /// and metrics walk these).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<AppRoute>> {
        self.by_name
            .values()
            .chain(self.k8s.values().map(|k| &k.route))
    }

    /// Every address the table connects to: machines, and the backhaul
    /// listeners of the hosts it reaches them through.
    pub fn addresses(&self) -> std::collections::HashSet<SocketAddr> {
        self.routes()
            .flat_map(|a| a.services.iter())
            .flat_map(|s| s.backends.iter().map(|b| b.via.unwrap_or(b.addr)))
            .collect()
    }

    /// An app by name.
    pub fn app_by_name(&self, name: &str) -> Option<&Arc<AppRoute>> {
        self.by_name.get(name)
    }

    /// The raw-TCP app of a public port, if one claims it.
    pub fn raw_port(&self, port: u16) -> Option<&Arc<AppRoute>> {
        self.raw_ports.get(&port)
    }

    /// Round-trip time between two regions.
    pub fn rtt(&self, a: &str, b: &str) -> u32 {
        if a == b {
            return 0;
        }
        self.rtt
            .get(a)
            .and_then(|m| m.get(b))
            .copied()
            .unwrap_or(UNKNOWN_RTT_MS)
    }

    /// Number of hostnames routed.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// True if no hostname is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The routable machines behind the ready endpoints of a Kubernetes Service
/// (`namespace/name`).
fn k8s_machines<'a>(
    cat: &'a skein_catalog::Catalog,
    key: &str,
) -> Vec<&'a skein_catalog::model::Machine> {
    use skein_catalog::Record as _;
    skein_catalog::model::K8sService::parse_key(key)
        .and_then(|k| cat.k8s_services.get(&k))
        .map(|s| {
            s.endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| cat.machines.get(&e.machine))
                .filter(|m| m.is_routable())
                .map(|m| &**m)
                .collect()
        })
        .unwrap_or_default()
}

/// The routes of ClusterIP Services: each Service port is a raw TCP port of
/// the route (the proxy balances connections, as kube-proxy does), to the
/// target port of its ready endpoints. A route is kept from `prev` while its
/// Service record and endpoint machines are the same `Arc`s.
fn k8s_routes(b: &Build<'_>, prev: Option<&RouteTable>) -> HashMap<String, K8sRoute> {
    use skein_catalog::model::{K8sProtocol, K8sServiceKind};
    let (cat, loads) = (b.cat, b.loads);
    let mut out = HashMap::new();
    for s in cat.k8s_services.values() {
        if s.kind != K8sServiceKind::ClusterIp || s.cluster_ip.is_none() {
            continue;
        }
        let key = format!("{}/{}", s.namespace, s.name);
        let machines: Vec<Arc<skein_catalog::model::Machine>> = s
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| cat.machines.get(&e.machine))
            .filter(|m| m.is_routable())
            .cloned()
            .collect();
        let same = prev.and_then(|p| p.k8s.get(&key)).filter(|old| {
            Arc::ptr_eq(&old.record, s)
                && old.machines.len() == machines.len()
                && old
                    .machines
                    .iter()
                    .zip(&machines)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        });
        if let Some(old) = same {
            out.insert(key, old.clone());
            continue;
        }
        let name = format!("k8s:{key}");
        let refs: Vec<&skein_catalog::model::Machine> = machines.iter().map(|m| &**m).collect();
        let mut services = Vec::new();
        let mut ports = HashMap::new();
        for p in s.ports.iter().filter(|p| p.protocol == K8sProtocol::Tcp) {
            let internal = p.target_port.unwrap_or(p.port);
            let queue = loads.queue(&name, internal);
            let backends = b.backends(&refs, internal, &name, &queue);
            ports.insert(
                p.port,
                PortRoute {
                    service: services.len(),
                    tls: false,
                    http: false,
                    force_https: false,
                    proxy_proto: None,
                },
            );
            services.push(ServiceRoute {
                internal_port: internal,
                kind: ConcurrencyKind::Connections,
                // Kubernetes Services carry no limits: spread by load only.
                soft: u32::MAX,
                hard: u32::MAX,
                backend_protocol: BackendProtocol::Http1,
                backends,
                queue,
                rr: AtomicUsize::new(0),
                checks: Vec::new(),
                check_host: None,
            });
        }
        let route = Arc::new(AppRoute {
            name: Arc::from(name.as_str()),
            network: Arc::from(s.network.as_str()),
            ports,
            services,
            allow_self_signed: false,
            metrics: crate::http::AppMetrics::new(&name),
        });
        out.insert(
            key,
            K8sRoute {
                record: s.clone(),
                machines,
                route,
            },
        );
    }
    out
}

/// What the routes of one table build are made from.
struct Build<'a> {
    cat: &'a skein_catalog::Catalog,
    at: &'a Locality,
    loads: &'a Loads,
}

impl Build<'_> {
    /// Round-trip time between two regions (unknown pairs are far).
    fn rtt(&self, a: &str, b: &str) -> u32 {
        self.cat.rtt_ms(a, b).unwrap_or(UNKNOWN_RTT_MS)
    }

    /// The backends of service port `port` of `app`: every machine with an
    /// address, closest first (ties by machine id).
    fn backends(
        &self,
        machines: &[&skein_catalog::model::Machine],
        port: u16,
        app: &str,
        queue: &Arc<ServiceQueue>,
    ) -> Vec<Backend> {
        let mut out: Vec<Backend> = machines
            .iter()
            .filter_map(|m| {
                let addr = match (m.endpoint, m.address) {
                    (Some(ep), _) => ep,
                    (None, Some(a)) => SocketAddr::new(IpAddr::V6(a.into()), port),
                    (None, None) => return None,
                };
                Some(Backend {
                    machine: Arc::from(m.id.as_str()),
                    machine_header: http::HeaderValue::from_str(&m.id).ok().map(|mut v| {
                        // One value per machine: on h2, an HPACK literal never
                        // indexed. Indexed, a proxy serving many apps would
                        // insert a new one into each client connection's table
                        // on most responses, evicting the headers that repeat.
                        v.set_sensitive(true);
                        v
                    }),
                    region: Arc::from(m.region.as_str()),
                    addr,
                    via: self.at.via(self.cat, m),
                    rtt_ms: self.rtt(&self.at.region, &m.region),
                    load: self.loads.machine(app, port, &m.id, queue),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            a.rtt_ms
                .cmp(&b.rtt_ms)
                .then_with(|| a.machine.cmp(&b.machine))
        });
        out
    }
}

/// One app's route: its services with their backends, closest first.
fn app_route(
    b: &Build<'_>,
    app: &skein_catalog::model::App,
    machines: &[&skein_catalog::model::Machine],
) -> Arc<AppRoute> {
    let mut services = Vec::with_capacity(app.services.len());
    let mut ports = HashMap::new();
    for (si, s) in app.services.iter().enumerate() {
        let queue = b.loads.queue(&app.name, s.internal_port);
        let backends = b.backends(machines, s.internal_port, &app.name, &queue);
        services.push(ServiceRoute {
            internal_port: s.internal_port,
            kind: s.concurrency.kind,
            soft: s.concurrency.soft_limit,
            hard: s.concurrency.hard_limit,
            backend_protocol: s.backend_protocol,
            backends,
            queue,
            rr: AtomicUsize::new(0),
            checks: s.checks.clone(),
            check_host: app
                .hostnames
                .iter()
                .find(|h| !h.starts_with("*."))
                .map(|h| Arc::from(h.as_str())),
        });
        for p in &s.ports {
            ports.insert(
                p.port,
                PortRoute {
                    service: si,
                    tls: p.handlers.contains(&Handler::Tls),
                    http: p.handlers.contains(&Handler::Http),
                    force_https: p.force_https,
                    proxy_proto: p
                        .handlers
                        .contains(&Handler::ProxyProto)
                        .then(|| p.proxy_proto_version.unwrap_or_default()),
                },
            );
        }
    }
    Arc::new(AppRoute {
        name: Arc::from(app.name.as_str()),
        network: Arc::from(app.network.as_str()),
        ports,
        services,
        allow_self_signed: app.tls.allow_self_signed,
        metrics: crate::http::AppMetrics::new(&app.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_catalog::{Source, Store};

    /// Each app's backends as (machine, address, rtt), closest first.
    type AppBackends = (String, Vec<(String, SocketAddr, u32)>);

    fn backends(t: &RouteTable) -> Vec<AppBackends> {
        let mut out: Vec<_> = t
            .apps()
            .map(|a| {
                let b = a.services[0]
                    .backends
                    .iter()
                    .map(|b| (b.machine.to_string(), b.addr, b.rtt_ms))
                    .collect();
                (a.name.to_string(), b)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn an_update_rebuilds_only_the_apps_it_touches() {
        let text = |rtt: u32, a1: &str| {
            format!(
                r#"
                regions = [{{ code = "ams", rtt_ms = {{ iad = {rtt} }} }}, {{ code = "iad" }}]
                hosts = [
                  {{ id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" }},
                  {{ id = "0:3", name = "h3", region = "iad", underlay = "10.0.0.3" }},
                ]
                networks = [{{ id = "0:18", name = "n" }}]
                [[apps]]
                name = "a"
                network = "n"
                hostnames = ["a.example.com"]
                services = [{{ internal_port = 80, ports = [{{ port = 443, handlers = ["tls", "http"] }}] }}]
                [[apps]]
                name = "b"
                network = "n"
                hostnames = ["b.example.com"]
                services = [{{ internal_port = 80, ports = [{{ port = 443, handlers = ["tls", "http"] }}] }}]
                [[machines]]
                id = "a1"
                app = "a"
                region = "ams"
                host = "0:2"
                state = "{a1}"
                [[machines]]
                id = "a2"
                app = "a"
                region = "iad"
                host = "0:3"
                state = "started"
                [[machines]]
                id = "b1"
                app = "b"
                region = "iad"
                host = "0:3"
                state = "started"
                "#
            )
        };
        let loads = Loads::default();
        let store = Store::new();
        let write = |rtt, a1| {
            store
                .replace(
                    Source::File,
                    skein_catalog::error::parse_toml(&text(rtt, a1)).unwrap(),
                )
                .unwrap()
                .snapshot
        };
        let s1 = write(80, "started");
        let t1 = RouteTable::build(&s1, &Locality::region("ams"), &loads);

        // a1 stops: "a" is built again, "b" keeps its route.
        let s2 = write(80, "stopped");
        let (t2, gone) = t1.update(&s1, &s2, &Locality::region("ams"), &loads);
        assert!(Arc::ptr_eq(
            t1.app_by_name("b").unwrap(),
            t2.app_by_name("b").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            t1.app_by_name("a").unwrap(),
            t2.app_by_name("a").unwrap()
        ));
        let b1 = &t1.app_by_name("a").unwrap().services[0].backends[0];
        let a1 = b1.addr;
        assert_eq!(gone, Some(vec![a1]));
        let named = b1.machine_header.as_ref().unwrap();
        assert_eq!(named.as_bytes(), b1.machine.as_bytes());
        assert!(named.is_sensitive(), "never indexed by HPACK");
        assert_eq!(
            backends(&t2),
            backends(&RouteTable::build(&s2, &Locality::region("ams"), &loads))
        );
        assert_eq!(
            t2.app("a.example.com").unwrap().services[0].backends.len(),
            1
        );

        // The round-trip time changes: everything is built again.
        let s3 = write(5, "stopped");
        let (t3, gone) = t2.update(&s2, &s3, &Locality::region("ams"), &loads);
        assert_eq!(gone, None);
        assert!(!Arc::ptr_eq(
            t2.app_by_name("b").unwrap(),
            t3.app_by_name("b").unwrap()
        ));
        assert_eq!(
            backends(&t3),
            backends(&RouteTable::build(&s3, &Locality::region("ams"), &loads))
        );
        assert_eq!(
            t3.app("b.example.com").unwrap().services[0].backends[0].rtt_ms,
            5
        );
    }

    #[test]
    fn machines_on_other_hosts_are_reached_through_their_hosts_mesh_address() {
        let text = |m2_host: &str| {
            format!(
                r#"
                regions = [{{ code = "ams" }}]
                hosts = [
                  {{ id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" }},
                  {{ id = "a7b:7d", name = "h3", region = "ams", underlay = "10.0.0.3" }},
                ]
                networks = [{{ id = "18", name = "n" }}]
                [[apps]]
                name = "web"
                network = "n"
                hostnames = ["web.example.com"]
                services = [{{ internal_port = 8080, ports = [{{ port = 80, handlers = ["http"] }}] }}]
                [[machines]]
                id = "m1"
                app = "web"
                region = "ams"
                host = "0:2"
                state = "started"
                [[machines]]
                id = "m2"
                app = "web"
                region = "ams"
                host = "{m2_host}"
                state = "started"
                "#
            )
        };
        let store = Store::new();
        let write = |h: &str| {
            store
                .replace(
                    Source::File,
                    skein_catalog::error::parse_toml(&text(h)).unwrap(),
                )
                .unwrap()
                .snapshot
        };
        let at = |host: Option<&str>, enabled: bool| Locality {
            region: "ams".into(),
            host: host.map(str::to_string),
            backhaul: Some(crate::config::BackhaulConfig {
                enabled,
                ..Default::default()
            }),
        };
        let via = |t: &RouteTable| -> Vec<(String, Option<SocketAddr>)> {
            t.app("web.example.com").unwrap().services[0]
                .backends
                .iter()
                .map(|b| (b.machine.to_string(), b.via))
                .collect()
        };
        let loads = Loads::default();
        let s1 = write("a7b:7d");
        let t = RouteTable::build(&s1, &at(Some("h2"), true), &loads);
        let mesh: SocketAddr = "[fdaa:0:0:a7b:7d::1]:4280".parse().unwrap();
        assert_eq!(
            via(&t),
            [("m1".to_string(), None), ("m2".to_string(), Some(mesh))]
        );
        // The worker's own table dials m2 directly.
        let t3 = RouteTable::build(&s1, &at(Some("h3"), true), &loads);
        assert_eq!(via(&t3)[1], ("m2".to_string(), None));
        // Backhaul off, or this host unknown: everything is dialled directly.
        for a in [at(Some("h2"), false), at(None, true)] {
            let t = RouteTable::build(&s1, &a, &loads);
            assert!(via(&t).iter().all(|(_, v)| v.is_none()));
        }
        // m2 moves to this host: an update routes it directly.
        let s2 = write("0:2");
        let (t2, _) = t.update(&s1, &s2, &at(Some("h2"), true), &loads);
        assert!(via(&t2).iter().all(|(_, v)| v.is_none()));
    }

    #[test]
    fn an_app_served_by_a_kubernetes_service_routes_to_its_ready_endpoints() {
        let text = |ready: bool| {
            format!(
                r#"
                regions = [{{ code = "ams" }}]
                hosts = [{{ id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" }}]
                networks = [{{ id = "0:18", name = "k8s" }}]
                [[apps]]
                name = "pods"
                network = "k8s"
                [[apps]]
                name = "shop"
                network = "k8s"
                hostnames = ["shop.example.com"]
                k8s_service = "default/shop"
                services = [{{ internal_port = 8080, ports = [{{ port = 443, handlers = ["tls", "http"] }}] }}]
                [[machines]]
                id = "p1"
                app = "pods"
                region = "ams"
                host = "0:2"
                state = "started"
                [[machines]]
                id = "p2"
                app = "pods"
                region = "ams"
                host = "0:2"
                state = "started"
                [[machines]]
                id = "p3"
                app = "pods"
                region = "ams"
                host = "0:2"
                state = "stopped"
                [[k8s_services]]
                name = "shop"
                namespace = "default"
                network = "k8s"
                cluster_ip = "fdaa:0:18:0:1::10"
                endpoints = [{{ machine = "p1" }}, {{ machine = "p2", ready = {ready} }}, {{ machine = "p3" }}]
                "#
            )
        };
        let loads = Loads::default();
        let store = Store::new();
        let write = |ready| {
            store
                .replace(
                    Source::File,
                    skein_catalog::error::parse_toml(&text(ready)).unwrap(),
                )
                .unwrap()
                .snapshot
        };
        let machines = |t: &RouteTable| -> Vec<String> {
            t.app("shop.example.com").unwrap().services[0]
                .backends
                .iter()
                .map(|b| b.machine.to_string())
                .collect()
        };
        let s1 = write(true);
        let t1 = RouteTable::build(&s1, &Locality::region("ams"), &loads);
        // p3 is an endpoint but not started.
        assert_eq!(machines(&t1), ["p1", "p2"]);
        let port = t1.app("shop.example.com").unwrap().services[0].backends[0]
            .addr
            .port();
        assert_eq!(port, 8080);
        // p2 stops being ready: the update (only the endpoints changed) drops it.
        let s2 = write(false);
        let (t2, _) = t1.update(&s1, &s2, &Locality::region("ams"), &loads);
        assert_eq!(machines(&t2), ["p1"]);
        assert!(Arc::ptr_eq(
            t1.app_by_name("pods").unwrap(),
            t2.app_by_name("pods").unwrap()
        ));

        // An app naming a service that does not exist is refused.
        let bad = text(true).replace(
            "k8s_service = \"default/shop\"",
            "k8s_service = \"default/nope\"",
        );
        let e = store
            .replace(
                Source::File,
                skein_catalog::error::parse_toml(&bad).unwrap(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("apps[1].k8s_service"), "{e}");
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Web.Example.com:8443"), "web.example.com");
        assert_eq!(normalize_host("web.example.com."), "web.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
