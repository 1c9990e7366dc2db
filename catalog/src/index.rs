//! The validated catalog: every record keyed, every reference resolved, every
//! machine with an address. Built from the documents of all sources at once, so a
//! set of records is either valid together or rejected together.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use skein_sixpn::{HostId, MachineSlot, NetId, SixPn};

use crate::check;
use crate::error::{Invalid, Problems};
use crate::model::*;
use crate::record::{Kind, Record, ServiceKey};

/// Where a record came from. A record is owned by exactly one source: a key
/// defined by two sources is an error, so that no source silently overrides
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The catalog file.
    File,
    /// The admin API (persisted in SQLite).
    Api,
    /// etcd.
    Etcd,
    /// Kubernetes.
    Kubernetes,
    /// Built in (the demo).
    Builtin,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::File => "the catalog file",
            Source::Api => "the admin API",
            Source::Etcd => "etcd",
            Source::Kubernetes => "Kubernetes",
            Source::Builtin => "the built-in demo",
        })
    }
}

/// A validated catalog. Records are behind `Arc`s that are shared with the
/// previous catalog when unchanged, so building is cheap on memory and
/// [`crate::Changes`] can compare by pointer.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// Regions by code.
    pub regions: BTreeMap<String, Arc<Region>>,
    /// Hosts by id.
    pub hosts: BTreeMap<HostId, Arc<Host>>,
    /// Networks by name.
    pub networks: BTreeMap<String, Arc<Network>>,
    /// Apps by name.
    pub apps: BTreeMap<String, Arc<App>>,
    /// Machines by id; every one has its `address`.
    pub machines: BTreeMap<String, Arc<Machine>>,
    /// Certificates by name; every one has its `hostnames`.
    pub certificates: BTreeMap<String, Arc<Certificate>>,
    /// Kubernetes Services by namespace/name.
    pub k8s_services: BTreeMap<ServiceKey, Arc<K8sService>>,
    /// Which source owns each record, by kind and key text.
    pub owners: Arc<BTreeMap<(Kind, String), Source>>,
}

impl Catalog {
    /// The network an app is on.
    pub fn app_network(&self, app: &App) -> Option<&Network> {
        self.networks.get(&app.network).map(|n| &**n)
    }

    /// Round-trip time between two regions in ms (0 for the same region), as
    /// declared by either side.
    pub fn rtt_ms(&self, a: &str, b: &str) -> Option<u32> {
        if a == b {
            return Some(0);
        }
        let from = |x: &str, y: &str| self.regions.get(x).and_then(|r| r.rtt_ms.get(y).copied());
        from(a, b).or_else(|| from(b, a))
    }

    /// The whole catalog as one document (records sorted by key).
    pub fn to_document(&self) -> Document {
        fn all<T: Record>(m: &BTreeMap<T::Key, Arc<T>>) -> Vec<T> {
            m.values().map(|v| (**v).clone()).collect()
        }
        Document {
            regions: all(&self.regions),
            hosts: all(&self.hosts),
            networks: all(&self.networks),
            apps: all(&self.apps),
            machines: all(&self.machines),
            certificates: all(&self.certificates),
            k8s_services: all(&self.k8s_services),
        }
    }

    /// Number of records of a kind.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Regions => self.regions.len(),
            Kind::Hosts => self.hosts.len(),
            Kind::Networks => self.networks.len(),
            Kind::Apps => self.apps.len(),
            Kind::Machines => self.machines.len(),
            Kind::Certificates => self.certificates.len(),
            Kind::K8sServices => self.k8s_services.len(),
        }
    }
}

/// A record on its way in: where it is, who owns it.
struct Entry<T> {
    /// Its position in its source's document (the path is written only when
    /// a problem names it: most builds name none).
    idx: usize,
    source: Source,
    rec: T,
}

impl<T: Record> Entry<T> {
    fn path(&self) -> String {
        path_of(self.source, self.idx, &self.rec)
    }
}

type Gathered<T> = BTreeMap<<T as Record>::Key, Entry<T>>;

/// The path of the `idx`th record of a kind in a source's document: by index in a
/// file, by key elsewhere (API and etcd records have no stable position).
fn path_of<T: Record>(source: Source, idx: usize, rec: &T) -> String {
    match source {
        Source::File | Source::Builtin => format!("{}[{idx}]", T::KIND),
        _ => format!("{}[\"{}\"]", T::KIND, rec.key()),
    }
}

/// Collects one kind from every layer, runs its local check and catches keys
/// defined twice.
fn gather<T: Record>(
    layers: &[(Source, &Document)],
    p: &mut Problems,
    mut local: impl FnMut(&mut T, &str, &mut Problems),
) -> Gathered<T> {
    let mut out: Gathered<T> = BTreeMap::new();
    for (source, doc) in layers {
        for (idx, rec) in T::list(doc).iter().enumerate() {
            let mut rec = rec.clone();
            // Checked with an empty path; a problem gets the record's path
            // in front (every check path starts with `at`).
            let mut found = Problems::default();
            local(&mut rec, "", &mut found);
            let path = || path_of(*source, idx, &rec);
            if !found.0.is_empty() {
                let at = path();
                for f in found.0 {
                    p.add(format!("{at}{}", f.path), f.message);
                }
            }
            match out.get(&rec.key()) {
                Some(first) if first.source == *source => {
                    p.add(
                        path(),
                        format!(
                            "duplicate {} {:?}, first at {}",
                            singular(T::KIND),
                            rec.key().to_string(),
                            first.path()
                        ),
                    );
                }
                Some(first) => p.add(
                    path(),
                    format!(
                        "{} {:?} is already defined by {} ({}); a record has one owner",
                        singular(T::KIND),
                        rec.key().to_string(),
                        first.source,
                        first.path()
                    ),
                ),
                None => {
                    out.insert(
                        rec.key(),
                        Entry {
                            idx,
                            source: *source,
                            rec,
                        },
                    );
                }
            }
        }
    }
    out
}

fn singular(k: Kind) -> &'static str {
    match k {
        Kind::Regions => "region",
        Kind::Hosts => "host",
        Kind::Networks => "network",
        Kind::Apps => "app",
        Kind::Machines => "machine",
        Kind::Certificates => "certificate",
        Kind::K8sServices => "service",
    }
}

/// Keeps the previous catalog's `Arc` when the record did not change.
fn intern<T: Record>(
    g: Gathered<T>,
    prev: &BTreeMap<T::Key, Arc<T>>,
    owners: &mut BTreeMap<(Kind, String), Source>,
) -> BTreeMap<T::Key, Arc<T>> {
    g.into_iter()
        .map(|(k, e)| {
            owners.insert((T::KIND, k.to_string()), e.source);
            let arc = match prev.get(&k) {
                Some(old) if **old == e.rec => old.clone(),
                _ => Arc::new(e.rec),
            };
            (k, arc)
        })
        .collect()
}

/// Validates the documents of all sources together and builds the catalog.
/// `prev` is the catalog in force: unchanged records share its `Arc`s and a
/// machine without an address keeps the one it had.
pub fn build(layers: &[(Source, &Document)], prev: &Catalog) -> Result<Catalog, Invalid> {
    build_at(layers, prev, SystemTime::now())
}

/// [`build`] with the clock given (certificate validity is checked against it).
pub fn build_at(
    layers: &[(Source, &Document)],
    prev: &Catalog,
    now: SystemTime,
) -> Result<Catalog, Invalid> {
    let mut p = Problems::default();
    let regions = gather::<Region>(layers, &mut p, |r, at, p| check::region(r, at, p));
    let hosts = gather::<Host>(layers, &mut p, |r, at, p| check::host(r, at, p));
    let networks = gather::<Network>(layers, &mut p, |r, at, p| check::network(r, at, p));
    let apps = gather::<App>(layers, &mut p, |r, at, p| check::app(r, at, p));
    let mut machines = gather::<Machine>(layers, &mut p, |r, at, p| check::machine(r, at, p));
    // Parsing PEM is the costly check: a certificate whose PEM (and any given
    // hostnames) equal the one in force is taken as it was checked then, so a
    // change to one of 100,000 certificates parses one.
    let certificates = gather::<Certificate>(layers, &mut p, |r, at, p| {
        match prev.certificates.get(&r.name) {
            Some(old)
                if old.chain_pem == r.chain_pem
                    && old.key_pem == r.key_pem
                    && old.source == r.source
                    && (r.hostnames.is_empty() || r.hostnames == old.hostnames) =>
            {
                r.hostnames = old.hostnames.clone();
            }
            _ => check::certificate(r, at, p, now),
        }
    });
    let services = gather::<K8sService>(layers, &mut p, |r, at, p| check::k8s_service(r, at, p));

    // Regions: round-trip times name known regions and agree both ways.
    for e in regions.values() {
        for (other, ms) in &e.rec.rtt_ms {
            match regions.get(other) {
                None => p.add(
                    format!("{}.rtt_ms.{other}", e.path()),
                    format!("unknown region {other:?}"),
                ),
                Some(o) => {
                    if let Some(back) = o.rec.rtt_ms.get(&e.rec.code)
                        && back != ms
                    {
                        p.add(
                            format!("{}.rtt_ms.{other}", e.path()),
                            format!(
                                "{ms} disagrees with {}.rtt_ms.{} = {back}",
                                o.path(),
                                e.rec.code
                            ),
                        );
                    }
                }
            }
        }
    }

    let region_known = |p: &mut Problems, path: String, code: &str| {
        if !regions.contains_key(code) {
            p.add(path, format!("unknown region {code:?}"));
        }
    };

    // Hosts: known region, unique names.
    let mut host_names: HashMap<&str, &Entry<Host>> = HashMap::new();
    for e in hosts.values() {
        region_known(&mut p, format!("{}.region", e.path()), &e.rec.region);
        if let Some(first) = host_names.insert(&e.rec.name, e) {
            p.add(
                format!("{}.name", e.path()),
                format!("{:?} is also the name of {}", e.rec.name, first.path()),
            );
        }
    }

    // Networks: unique ids.
    let mut net_ids: HashMap<NetId, &Entry<Network>> = HashMap::new();
    for e in networks.values() {
        if let Some(first) = net_ids.insert(e.rec.id, e) {
            p.add(
                format!("{}.id", e.path()),
                format!("{} is also the id of {}", e.rec.id, first.path()),
            );
        }
    }

    // Flycast addresses identify one app or one service.
    let mut flycasts: HashMap<SixPn, String> = HashMap::new();
    let mut flycast =
        |p: &mut Problems, path: String, addr: std::net::Ipv6Addr, net: Option<&Network>| {
            let Ok(a) = SixPn::try_from(addr) else {
                return p.add(path, format!("{addr} is not a 6PN address"));
            };
            if !a.is_flycast() {
                return p.add(
                    path,
                    format!("{addr} is not a flycast address (fdaa:<net>:0:1::<n>)"),
                );
            }
            if let Some(net) = net
                && a.net() != net.id
            {
                return p.add(
                    path,
                    format!(
                        "{addr} is outside network {:?} (fdaa:{}::/48)",
                        net.name, net.id
                    ),
                );
            }
            if let Some(first) = flycasts.insert(a, path.clone()) {
                p.add(
                    path,
                    format!("{addr} is also the flycast address of {first}"),
                );
            }
        };

    // Apps: known network, hostnames owned by one app, flycast in the network.
    let mut hostnames: HashMap<&str, &Entry<App>> = HashMap::new();
    for e in apps.values() {
        let net = networks.get(&e.rec.network).map(|n| &n.rec);
        if net.is_none() {
            p.add(
                format!("{}.network", e.path()),
                format!("unknown network {:?}", e.rec.network),
            );
        }
        for (i, h) in e.rec.hostnames.iter().enumerate() {
            if let Some(first) = hostnames.insert(h, e) {
                p.add(
                    format!("{}.hostnames[{i}]", e.path()),
                    format!("{h:?} already routes to {}", first.path()),
                );
            }
        }
        if let Some(f) = e.rec.flycast {
            flycast(&mut p, format!("{}.flycast", e.path()), f, net);
        }
        for (i, other) in e.rec.flycast_from.iter().enumerate() {
            let path = format!("{}.flycast_from[{i}]", e.path());
            if e.rec.flycast.is_none() {
                p.add(path, "the app has no flycast address to share");
            } else if !networks.contains_key(other) {
                p.add(path, format!("unknown network {other:?}"));
            } else if *other == e.rec.network {
                p.add(path, "the app's own network reaches it anyway");
            }
        }
    }

    // Machines: known app, host and region; addresses consistent and unique.
    let mut slots: HashMap<(HostId, MachineSlot), &Entry<Machine>> = HashMap::new();
    for e in machines.values() {
        let m = &e.rec;
        let app_net = apps
            .get(&m.app)
            .map(|a| networks.get(&a.rec.network).map(|n| n.rec.id));
        machine_refs(
            m,
            &|| e.path(),
            app_net,
            regions.contains_key(&m.region),
            hosts.get(&m.host).map(|h| &h.rec),
            &mut p,
        );
        if let Some(a) = m.address
            && let Some(first) = slots.insert((a.host(), a.machine()), e)
        {
            p.add(
                format!("{}.address", e.path()),
                format!(
                    "{a}: slot {} on host {} is taken by {}",
                    a.machine(),
                    a.host(),
                    first.path()
                ),
            );
        }
    }

    // Certificates: one per hostname, except that an imported certificate
    // may cover a name skein issued one for (the imported one is served; the
    // ACME client then retires the issued one).
    let mut cert_names: HashMap<(&str, CertSource), &Entry<Certificate>> = HashMap::new();
    for e in certificates.values() {
        for (i, h) in e.rec.hostnames.iter().enumerate() {
            if let Some(first) = cert_names.insert((h, e.rec.source), e) {
                p.add(
                    format!("{}.hostnames[{i}]", e.path()),
                    format!("{h:?} is already served by {}", first.path()),
                );
            }
        }
    }

    // Kubernetes Services: known network, ClusterIP a flycast of it, endpoints
    // machines of that network.
    for e in services.values() {
        let s = &e.rec;
        let net = networks.get(&s.network).map(|n| &n.rec);
        if net.is_none() {
            p.add(
                format!("{}.network", e.path()),
                format!("unknown network {:?}", s.network),
            );
        }
        if let Some(ip) = s.cluster_ip {
            flycast(&mut p, format!("{}.cluster_ip", e.path()), ip, net);
        }
        for (i, ep) in s.endpoints.iter().enumerate() {
            let at = format!("{}.endpoints[{i}].machine", e.path());
            match machines.get(&ep.machine) {
                None => p.add(at, format!("unknown machine {:?}", ep.machine)),
                Some(m) => {
                    // (an app on an unknown network is reported once, at the app)
                    let m_net = apps
                        .get(&m.rec.app)
                        .map(|a| &a.rec.network)
                        .filter(|n| networks.contains_key(*n));
                    if net.is_some() && m_net.is_some_and(|n| n != &s.network) {
                        p.add(
                            at,
                            format!("machine {:?} is not on network {:?}", ep.machine, s.network),
                        );
                    }
                }
            }
        }
    }

    // Apps served by a Kubernetes Service: it exists, on the app's network.
    for e in apps.values() {
        let Some(k) = &e.rec.k8s_service else {
            continue;
        };
        match K8sService::parse_key(k).and_then(|key| services.get(&key)) {
            None => p.add(
                format!("{}.k8s_service", e.path()),
                format!("unknown Kubernetes service {k:?} (namespace/name)"),
            ),
            Some(s) if s.rec.network != e.rec.network => p.add(
                format!("{}.k8s_service", e.path()),
                format!(
                    "{k:?} is on network {:?}, the app on {:?}",
                    s.rec.network, e.rec.network
                ),
            ),
            Some(_) => {}
        }
    }

    if !p.0.is_empty() {
        return Err(Invalid { problems: p.0 });
    }

    let mut taken: HashSet<(HostId, MachineSlot)> = slots.into_keys().collect();
    allocate(&mut machines, &apps, &networks, prev, &mut taken, &mut p);
    let mut owners = BTreeMap::new();
    let cat = Catalog {
        regions: intern(regions, &prev.regions, &mut owners),
        hosts: intern(hosts, &prev.hosts, &mut owners),
        networks: intern(networks, &prev.networks, &mut owners),
        apps: intern(apps, &prev.apps, &mut owners),
        machines: intern(machines, &prev.machines, &mut owners),
        certificates: intern(certificates, &prev.certificates, &mut owners),
        k8s_services: intern(services, &prev.k8s_services, &mut owners),
        owners: if *prev.owners == owners {
            prev.owners.clone()
        } else {
            Arc::new(owners)
        },
    };
    p.into_result(cat)
}

/// A machine against the records it names (its app, and so its network; its
/// region; its host) and its address, if it has one, against them. The one
/// judge of a machine for [`build`] and [`patch_machines`] alike; slot
/// uniqueness is left to each, as they count slots differently. `app_net`:
/// `None` for an unknown app, `Some(None)` for an app on an unknown network.
fn machine_refs(
    m: &Machine,
    at: &dyn Fn() -> String,
    app_net: Option<Option<NetId>>,
    region_known: bool,
    host: Option<&Host>,
    p: &mut Problems,
) {
    if app_net.is_none() {
        p.add(format!("{}.app", at()), format!("unknown app {:?}", m.app));
    }
    if !region_known {
        p.add(
            format!("{}.region", at()),
            format!("unknown region {:?}", m.region),
        );
    }
    match host {
        None => p.add(format!("{}.host", at()), format!("unknown host {}", m.host)),
        Some(h) => {
            if h.region != m.region {
                p.add(
                    format!("{}.region", at()),
                    format!(
                        "{:?} is not the region of host {} ({:?})",
                        m.region, h.name, h.region
                    ),
                );
            }
            if h.role == HostRole::Edge {
                p.add(
                    format!("{}.host", at()),
                    format!("host {} is an edge and runs no machines", h.name),
                );
            }
        }
    }
    let Some(a) = m.address else { return };
    if let Some(Some(net)) = app_net
        && a.net() != net
    {
        p.add(
            format!("{}.address", at()),
            format!("{a} is outside the app's network fdaa:{net}::/48"),
        );
    }
    if a.host() != m.host {
        p.add(
            format!("{}.address", at()),
            format!(
                "{a} names host {}, the machine runs on {}",
                a.host(),
                m.host
            ),
        );
    }
    if a.machine().0 == 0 {
        p.add(
            format!("{}.address", at()),
            format!("{a} has machine slot 0, which is reserved"),
        );
    }
}

/// A change to one source's machines and nothing else, as a follower of
/// etcd sees one: whole records put, ids deleted.
#[derive(Clone, Debug, Default)]
pub struct MachinePatch {
    /// Machines added or replaced.
    pub puts: Vec<Machine>,
    /// Machines removed, by id.
    pub deletes: Vec<String>,
}

impl MachinePatch {
    /// True if it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// The catalog after `patch` to `source`'s machines, checked as [`build`]
/// would check it, without going over the records the patch leaves alone: a
/// machine's health flip among 100,000 costs a copy of the maps, not a
/// rebuild. `prev` is the catalog in force. `None` when the patch reaches
/// past the machines it names (another record's address to move, a
/// Kubernetes endpoint to check again, a source with positional paths): then
/// only a full [`build`] gives the same answer.
pub fn patch_machines(
    prev: &Catalog,
    source: Source,
    patch: &MachinePatch,
) -> Option<Result<Catalog, Invalid>> {
    if matches!(source, Source::File | Source::Builtin) {
        return None;
    }
    let mut touched: HashSet<&str> = patch.deletes.iter().map(String::as_str).collect();
    for m in &patch.puts {
        if !touched.insert(&m.id) {
            return None; // one id twice in a patch
        }
    }
    if prev.k8s_services.values().any(|s| {
        s.endpoints
            .iter()
            .any(|e| touched.contains(e.machine.as_str()))
    }) {
        return None;
    }
    let mut taken: HashSet<(HostId, MachineSlot)> = prev
        .machines
        .values()
        .filter(|m| !touched.contains(m.id.as_str()))
        .filter_map(|m| m.address)
        .map(|a| (a.host(), a.machine()))
        .collect();
    let mut p = Problems::default();
    let mut puts: Vec<Machine> = patch.puts.clone();
    puts.sort_by(|a, b| a.id.cmp(&b.id));
    // (net of its app) per put, for the allocation below.
    let mut nets = Vec::with_capacity(puts.len());
    for m in &puts {
        let at = path_of(source, 0, m);
        let mut found = Problems::default();
        check::machine(m, "", &mut found);
        for f in found.0 {
            p.add(format!("{at}{}", f.path), f.message);
        }
        if let Some(owner) = prev.owners.get(&(Kind::Machines, m.id.clone()))
            && *owner != source
        {
            p.add(
                &at,
                format!(
                    "machine {:?} is already defined by {owner}; a record has one owner",
                    m.id
                ),
            );
        }
        let app_net = prev
            .apps
            .get(&m.app)
            .map(|a| prev.networks.get(&a.network).map(|n| n.id));
        machine_refs(
            m,
            &|| at.clone(),
            app_net,
            prev.regions.contains_key(&m.region),
            prev.hosts.get(&m.host).map(|h| &**h),
            &mut p,
        );
        // A full build gives a taken slot to the explicit address and moves
        // whichever machine had it allocated.
        if let Some(a) = m.address
            && !taken.insert((a.host(), a.machine()))
        {
            return None;
        }
        nets.push(app_net.flatten());
    }
    if !p.0.is_empty() {
        return Some(Err(Invalid { problems: p.0 }));
    }
    // Addresses, as `allocate` gives them: the one a machine had when it
    // still fits, then the lowest free slots in id order.
    let mut pending = Vec::new();
    for (i, m) in puts.iter_mut().enumerate() {
        let Some(net) = nets[i] else { continue };
        if m.address.is_some() {
            continue;
        }
        let kept = prev
            .machines
            .get(&m.id)
            .and_then(|o| o.address)
            .filter(|a| {
                a.net() == net && a.host() == m.host && !taken.contains(&(a.host(), a.machine()))
            });
        match kept {
            Some(a) => {
                taken.insert((a.host(), a.machine()));
                m.address = Some(a);
            }
            None => pending.push(i),
        }
    }
    for i in pending {
        let (host, Some(net)) = (puts[i].host, nets[i]) else {
            continue;
        };
        let mut slot = 1u32;
        while taken.contains(&(host, MachineSlot(slot))) {
            if slot == u32::MAX {
                return Some(Err(Invalid {
                    problems: vec![crate::error::Problem {
                        path: format!("{}.address", path_of(source, 0, &puts[i])),
                        message: format!("host {host} has no free machine slot"),
                    }],
                }));
            }
            slot += 1;
        }
        taken.insert((host, MachineSlot(slot)));
        puts[i].address = Some(SixPn::new(net, host, MachineSlot(slot)));
    }

    let mut cat = prev.clone();
    for id in &patch.deletes {
        let key = (Kind::Machines, id.clone());
        if prev.owners.get(&key) == Some(&source) {
            cat.machines.remove(id);
            Arc::make_mut(&mut cat.owners).remove(&key);
        }
    }
    for m in puts {
        let key = (Kind::Machines, m.id.clone());
        if cat.owners.get(&key) != Some(&source) {
            Arc::make_mut(&mut cat.owners).insert(key, source);
        }
        let arc = match prev.machines.get(&m.id) {
            Some(old) if **old == m => old.clone(),
            _ => Arc::new(m),
        };
        cat.machines.insert(arc.id.clone(), arc);
    }
    Some(Ok(cat))
}

/// Gives every machine without an address one: the address it had in the
/// previous catalog when that still fits, else the lowest free slot on its host.
fn allocate(
    machines: &mut Gathered<Machine>,
    apps: &Gathered<App>,
    networks: &Gathered<Network>,
    prev: &Catalog,
    taken: &mut HashSet<(HostId, MachineSlot)>,
    p: &mut Problems,
) {
    let mut next: HashMap<HostId, u32> = HashMap::new();
    let mut pending: BTreeSet<String> = BTreeSet::new();
    for (id, e) in machines.iter_mut() {
        if e.rec.address.is_some() {
            continue;
        }
        let Some(net) = apps
            .get(&e.rec.app)
            .and_then(|a| networks.get(&a.rec.network))
            .map(|n| n.rec.id)
        else {
            continue; // reported above
        };
        let kept = prev.machines.get(id).and_then(|m| m.address).filter(|a| {
            a.net() == net && a.host() == e.rec.host && !taken.contains(&(a.host(), a.machine()))
        });
        match kept {
            Some(a) => {
                taken.insert((a.host(), a.machine()));
                e.rec.address = Some(a);
            }
            None => {
                pending.insert(id.clone());
            }
        }
    }
    for id in pending {
        let Some(e) = machines.get_mut(&id) else {
            continue;
        };
        let Some(net) = apps
            .get(&e.rec.app)
            .and_then(|a| networks.get(&a.rec.network))
            .map(|n| n.rec.id)
        else {
            continue;
        };
        let host = e.rec.host;
        let cursor = next.entry(host).or_insert(1);
        while taken.contains(&(host, MachineSlot(*cursor))) {
            if *cursor == u32::MAX {
                p.add(
                    format!("{}.address", e.path()),
                    format!("host {host} has no free machine slot"),
                );
                return;
            }
            *cursor += 1;
        }
        let slot = MachineSlot(*cursor);
        taken.insert((host, slot));
        e.rec.address = Some(SixPn::new(net, host, slot));
    }
}
