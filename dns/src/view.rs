//! Per-network views, built from a catalog snapshot: every name a network may
//! see, with its answers pre-encoded in wire form, so a query is one hash lookup
//! and one copy. Another network's names are simply not in the view.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use skein_catalog::model::{App, K8sProtocol, K8sService, K8sServiceKind, Machine};
use skein_catalog::sixpn::SixPn;
use skein_catalog::{Catalog, Snapshot, Touched};

use crate::names::{Entry, NameTable};
use crate::wire::{Answer, Records, encode_name, rtype, wire_name};

/// A zone this server is the authority for, in one view.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The apex name, wire form, lowercased.
    pub apex: Vec<u8>,
    /// The SOA record after its owner: type, class, TTL, RDLENGTH, RDATA.
    pub soa: Vec<u8>,
}

/// What a view says about a question.
pub enum Lookup<'a> {
    /// Records of the asked type (or a CNAME).
    Answer(Answer<'a>),
    /// The name exists, not with this type.
    NoData(&'a Zone),
    /// The name does not exist in a zone we serve.
    NxDomain(&'a Zone),
    /// Not a zone we serve.
    NotOurs,
}

/// One network's names.
#[derive(Debug, Default)]
pub struct View {
    /// Names while the view is built; [`View::freeze`] moves them to `table`.
    names: FxHashMap<Vec<u8>, Entry>,
    /// Names as questions find them.
    table: NameTable,
    zones: Vec<Zone>,
    /// For `top<N>.nearest.of.<app>.internal`: per app, its machines' AAAA
    /// records sorted by round-trip time from each region (and unsorted under
    /// ""). Every record has the same size, so the first N are a prefix.
    nearest: FxHashMap<String, FxHashMap<String, Records>>,
}

/// Size of one pre-encoded AAAA record owned by the question name.
const AAAA_RECORD: usize = 2 + 2 + 2 + 4 + 2 + 16;

/// `top<N>.nearest.of.<app>.internal` in lowercased wire form: (N, app).
pub fn parse_nearest(qname: &[u8]) -> Option<(usize, &str)> {
    // Every AAAA question comes here: the rest only for a first label `top…`.
    if qname.get(1..4) != Some(b"top".as_slice()) {
        return None;
    }
    let mut labels = Vec::with_capacity(6);
    let mut i = 0;
    while i < qname.len() {
        let len = usize::from(qname[i]);
        if len == 0 {
            break;
        }
        labels.push(qname.get(i + 1..i + 1 + len)?);
        i += len + 1;
    }
    match labels.as_slice() {
        [top, b"nearest", b"of", app, b"internal"] => {
            let n: usize = std::str::from_utf8(top.strip_prefix(b"top")?)
                .ok()?
                .parse()
                .ok()?;
            Some((n, std::str::from_utf8(app).ok()?))
        }
        _ => None,
    }
}

impl View {
    /// The first `n` machines of `app` by round-trip time from `region`.
    pub fn nearest(&self, app: &str, region: Option<&str>, n: usize) -> Option<Records> {
        let per = self.nearest.get(app)?;
        let r = region.and_then(|r| per.get(r)).or_else(|| per.get(""))?;
        let n = n.min(usize::from(r.count));
        Some(Records {
            count: n as u16,
            bytes: r.bytes[..n * AAAA_RECORD].to_vec(),
        })
    }

    /// Answers a question (`qname` lowercased wire form).
    pub fn lookup(&self, qname: &[u8], qtype: u16) -> Lookup<'_> {
        match self.table.get(qname) {
            Some(e) => {
                // A CNAME answers every type, its own included.
                if let Some(c) = e.cname() {
                    return Lookup::Answer(c);
                }
                match e.get(qtype) {
                    Some(r) => Lookup::Answer(r),
                    None => match self.zone_of(qname) {
                        Some(z) => Lookup::NoData(z),
                        None => Lookup::NotOurs,
                    },
                }
            }
            None => match self.zone_of(qname) {
                Some(z) => Lookup::NxDomain(z),
                None => Lookup::NotOurs,
            },
        }
    }

    /// The zone a name falls in (label-aligned suffix match).
    pub fn zone_of(&self, qname: &[u8]) -> Option<&Zone> {
        let mut pos = 0;
        while pos < qname.len() {
            let rest = &qname[pos..];
            if let Some(z) = self.zones.iter().find(|z| z.apex == rest) {
                return Some(z);
            }
            pos += usize::from(qname[pos]) + 1;
        }
        None
    }

    fn add(&mut self, name: &str, rtype: u16, ttl: u32, rdata: &[u8]) {
        let e = self.names.entry(wire_name(name)).or_default();
        match e.types.iter_mut().find(|(t, _)| *t == rtype) {
            Some((_, r)) => r.push(rtype, ttl, rdata),
            None => {
                let mut r = Records::default();
                r.push(rtype, ttl, rdata);
                e.types.push((rtype, r));
            }
        }
    }

    fn add_ptr(&mut self, addr: &[u8; 16], ttl: u32, target: &str) {
        let mut rdata = Vec::new();
        encode_name(&target.to_ascii_lowercase(), &mut rdata);
        self.add(&ptr_name(addr), rtype::PTR, ttl, &rdata);
    }

    fn add_cname(&mut self, name: &str, ttl: u32, target: &str) {
        let mut rdata = Vec::new();
        encode_name(&target.to_ascii_lowercase(), &mut rdata);
        let mut r = Records::default();
        r.push(rtype::CNAME, ttl, &rdata);
        self.names.entry(wire_name(name)).or_default().cname = Some(r);
    }

    /// Adds a zone; false if it was there already.
    fn add_zone(&mut self, apex: &str, ttl: u32) -> bool {
        let apex_wire = wire_name(apex);
        if self.zones.iter().any(|z| z.apex == apex_wire) {
            return false;
        }
        let mut rdata = Vec::new();
        encode_name(&format!("ns.dns.{apex}"), &mut rdata);
        encode_name(&format!("hostmaster.{apex}"), &mut rdata);
        for v in [1u32, 3600, 600, 86400, ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        let mut soa = Vec::new();
        soa.extend_from_slice(&rtype::SOA.to_be_bytes());
        soa.extend_from_slice(&1u16.to_be_bytes());
        soa.extend_from_slice(&ttl.to_be_bytes());
        soa.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        soa.extend_from_slice(&rdata);
        self.add(apex, rtype::SOA, ttl, &rdata);
        self.zones.push(Zone {
            apex: apex_wire,
            soa,
        });
        true
    }

    /// A Kubernetes cluster zone, with its `dns-version` record.
    fn add_cluster_zone(&mut self, apex: &str, ttl: u32) {
        if self.add_zone(apex, ttl) {
            self.add(
                &format!("dns-version.{apex}"),
                rtype::TXT,
                ttl,
                &txt(&["1.1.0".to_string()]),
            );
        }
    }

    /// Names between a record and its zone's apex exist (empty non-terminals):
    /// they answer NODATA, not NXDOMAIN.
    fn fill_empty_non_terminals(&mut self) {
        // Walk up from each name until an ancestor is known: a name's own
        // walk covers its ancestors, so each node is visited about once (a
        // reverse name is 32 labels deep).
        let mut missing: rustc_hash::FxHashSet<&[u8]> = rustc_hash::FxHashSet::default();
        for name in self.names.keys() {
            let Some(z) = self.zone_of(name) else {
                continue;
            };
            let mut pos = usize::from(name[0]) + 1;
            while pos < name.len() && name.len() - pos > z.apex.len() {
                let parent = &name[pos..];
                if self.names.contains_key(parent) || !missing.insert(parent) {
                    break;
                }
                pos += usize::from(name[pos]) + 1;
            }
        }
        let missing: Vec<Vec<u8>> = missing.into_iter().map(<[u8]>::to_vec).collect();
        for m in missing {
            self.names.entry(m).or_default();
        }
    }

    /// Lays the names out for answering (every view is frozen before use).
    fn freeze(&mut self) {
        let (table, skipped) = NameTable::build(std::mem::take(&mut self.names));
        if skipped > 0 {
            tracing::error!(
                skipped,
                "names too long for a DNS answer table were left out"
            );
        }
        self.table = table;
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True if it has no names.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

fn txt(strings: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in strings {
        let b = &s.as_bytes()[..s.len().min(255)];
        v.push(b.len() as u8);
        v.extend_from_slice(b);
    }
    v
}

/// Splits a long comma list into TXT strings of at most 255 bytes.
fn txt_list(items: &[String]) -> Vec<u8> {
    let mut strings = vec![String::new()];
    for it in items {
        let cur = strings.last_mut().map(|s| s.len()).unwrap_or(0);
        if cur > 0 && cur + 1 + it.len() > 255 {
            strings.push(String::new());
        }
        if let Some(s) = strings.last_mut() {
            if !s.is_empty() {
                s.push(',');
            }
            s.push_str(it);
        }
    }
    txt(&strings)
}

/// The reverse name of an IPv6 address: 32 nibbles, low first, then `ip6.arpa`.
pub fn ptr_name(a: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(72);
    for b in a.iter().rev() {
        s.push(HEX[usize::from(b & 0xf)] as char);
        s.push('.');
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push('.');
    }
    s.push_str("ip6.arpa");
    s
}

/// The reverse zone of 6PN (`fdaa::/16`).
const REVERSE_ZONE: &str = "a.a.d.f.ip6.arpa";

fn aaaa(m: &Machine) -> Option<[u8; 16]> {
    m.address.map(|a| a.octets())
}

/// Every network's view for one catalog version.
#[derive(Debug, Default)]
pub struct Views {
    /// Catalog version.
    pub version: u64,
    by_net: FxHashMap<u32, Arc<View>>,
    /// The view for askers outside any network (loopback, the host).
    default: Arc<View>,
    /// For askers of an unknown network: it knows no names at all.
    empty: Arc<View>,
    /// Each host's region, to find an asker's region from its address.
    host_regions: FxHashMap<u32, String>,
}

impl Views {
    /// The region of an asker inside the mesh (by the host in its address).
    pub fn region_of(&self, ip: IpAddr) -> Option<&str> {
        let IpAddr::V6(v6) = ip else { return None };
        let a = SixPn::try_from(v6).ok()?;
        self.host_regions.get(&a.host().0).map(String::as_str)
    }

    /// The view for an asker.
    pub fn for_source(&self, ip: IpAddr) -> &View {
        let v6 = match ip {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => return &self.default,
        };
        if v6.to_ipv4_mapped().is_some() {
            return &self.default;
        }
        match SixPn::try_from(v6) {
            Ok(a) => self
                .by_net
                .get(&a.net().0)
                .map(|v| &**v)
                .unwrap_or(&self.empty),
            Err(_) => &self.default,
        }
    }

    /// Builds the views. `default_network` names the network whose view
    /// askers outside any network get; `ttl` is every record's TTL.
    pub fn build(snap: &Snapshot, default_network: Option<&str>, ttl: u32) -> Views {
        Views::assemble(snap, None, default_network, ttl)
    }

    /// Builds the views for `snap`, keeping from `prev` (built from `prev_snap`)
    /// every network's view that nothing in the change touched: a machine that
    /// flips health rebuilds its own network's names, not the platform's.
    pub fn update(
        prev: &Views,
        prev_snap: &Snapshot,
        snap: &Snapshot,
        default_network: Option<&str>,
        ttl: u32,
    ) -> Views {
        let t = Touched::between(&prev_snap.catalog, &snap.catalog);
        if t.regions {
            return Views::assemble(snap, None, default_network, ttl);
        }
        Views::assemble(snap, Some((prev, &t.networks)), default_network, ttl)
    }

    fn assemble(
        snap: &Snapshot,
        keep: Option<(&Views, &BTreeSet<String>)>,
        default_network: Option<&str>,
        ttl: u32,
    ) -> Views {
        let cat = &snap.catalog;
        let rebuild = |net: &str| keep.is_none_or(|(_, dirty)| dirty.contains(net));
        // One pass over each kind, grouped by network, for the networks to build.
        let mut apps_of: FxHashMap<&str, Vec<&App>> = FxHashMap::default();
        for app in cat.apps.values().filter(|a| rebuild(&a.network)) {
            apps_of.entry(app.network.as_str()).or_default().push(app);
        }
        let mut machines_of: FxHashMap<&str, Vec<&Machine>> = FxHashMap::default();
        for m in cat.machines.values().filter(|m| m.is_routable()) {
            if let Some(app) = cat.apps.get(&m.app)
                && rebuild(&app.network)
            {
                machines_of.entry(m.app.as_str()).or_default().push(m);
            }
        }
        // Apps of other networks whose flycast address a network may reach.
        let mut shared_of: FxHashMap<&str, Vec<&App>> = FxHashMap::default();
        for app in cat.apps.values().filter(|a| a.flycast.is_some()) {
            for n in app.flycast_from.iter().filter(|n| rebuild(n)) {
                shared_of.entry(n.as_str()).or_default().push(app);
            }
        }
        let mut k8s_of: FxHashMap<&str, Vec<&K8sService>> = FxHashMap::default();
        for s in cat.k8s_services.values().filter(|s| rebuild(&s.network)) {
            k8s_of.entry(s.network.as_str()).or_default().push(s);
        }
        let mut out = Views {
            version: snap.version,
            host_regions: cat
                .hosts
                .values()
                .map(|h| (h.id.0, h.region.clone()))
                .collect(),
            ..Default::default()
        };
        for n in cat.networks.values() {
            let kept = match keep {
                Some((prev, dirty)) if !dirty.contains(&n.name) => {
                    prev.by_net.get(&n.id.0).cloned()
                }
                _ => None,
            };
            let v = kept.unwrap_or_else(|| {
                let none = Vec::new();
                Arc::new(View::of_network(
                    cat,
                    apps_of.get(n.name.as_str()).unwrap_or(&none),
                    shared_of.get(n.name.as_str()).unwrap_or(&none),
                    &machines_of,
                    k8s_of
                        .get(n.name.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                    ttl,
                ))
            });
            if Some(n.name.as_str()) == default_network {
                out.default = v.clone();
            }
            out.by_net.insert(n.id.0, v);
        }
        let mut empty = View::default();
        empty.add_zone("internal", ttl);
        empty.add_zone("flycast", ttl);
        empty.add_cluster_zone("cluster.local", ttl);
        empty.add_zone(REVERSE_ZONE, ttl);
        empty.freeze();
        if default_network.is_none() || out.default.zones.is_empty() {
            out.default = Arc::new(View {
                names: FxHashMap::default(),
                table: empty.table.clone(),
                zones: empty.zones.clone(),
                nearest: FxHashMap::default(),
            });
        }
        out.empty = Arc::new(empty);
        out
    }
}

impl View {
    /// One network's names: its apps and their machines under `.internal` and
    /// `.flycast` (and the `.flycast` names other networks' apps share with
    /// it), its Kubernetes services under their cluster domain, and the
    /// reverse names of its addresses.
    fn of_network(
        cat: &Catalog,
        apps: &[&App],
        shared: &[&App],
        machines_of: &FxHashMap<&str, Vec<&Machine>>,
        k8s: &[&K8sService],
        ttl: u32,
    ) -> View {
        let mut v = View::default();
        v.add_zone("internal", ttl);
        v.add_zone("flycast", ttl);
        v.add_cluster_zone("cluster.local", ttl);
        v.add_zone(REVERSE_ZONE, ttl);
        // `<app>.flycast`: its own apps', and those other networks share with it.
        for app in apps.iter().chain(shared) {
            if let Some(f) = app.flycast {
                v.add(
                    &format!("{}.flycast", app.name),
                    rtype::AAAA,
                    ttl,
                    &f.octets(),
                );
            }
        }
        let mut app_names = Vec::with_capacity(apps.len());
        for app in apps {
            app_names.push(app.name.clone());
            let machines: &[&Machine] = machines_of
                .get(app.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            // Nearest-N: each region's order, closest first.
            let mut per_region: FxHashMap<String, Records> = FxHashMap::default();
            for from in cat.regions.keys().map(String::as_str).chain([""]) {
                let mut sorted: Vec<&&Machine> =
                    machines.iter().filter(|m| m.address.is_some()).collect();
                if !from.is_empty() {
                    let rtt = |m: &Machine| cat.rtt_ms(from, &m.region).unwrap_or(u32::MAX);
                    sorted.sort_by(|a, b| (rtt(a), &a.id).cmp(&(rtt(b), &b.id)));
                }
                let mut r = Records::default();
                for m in sorted {
                    if let Some(addr) = aaaa(m) {
                        r.push(rtype::AAAA, ttl, &addr);
                    }
                }
                per_region.insert(from.to_string(), r);
            }
            v.nearest.insert(app.name.clone(), per_region);
            let mut regions = BTreeSet::new();
            let mut vms = Vec::new();
            for m in machines {
                let Some(addr) = aaaa(m) else { continue };
                let a = &app.name;
                v.add(&format!("{a}.internal"), rtype::AAAA, ttl, &addr);
                v.add(&format!("global.{a}.internal"), rtype::AAAA, ttl, &addr);
                v.add(
                    &format!("{}.{a}.internal", m.region),
                    rtype::AAAA,
                    ttl,
                    &addr,
                );
                v.add(
                    &format!("{}.vm.{a}.internal", m.id),
                    rtype::AAAA,
                    ttl,
                    &addr,
                );
                v.add_ptr(&addr, ttl, &format!("{}.vm.{a}.internal", m.id));
                let group = m.metadata.process_group.as_deref().unwrap_or("app");
                v.add(
                    &format!("{group}.process.{a}.internal"),
                    rtype::AAAA,
                    ttl,
                    &addr,
                );
                regions.insert(m.region.clone());
                vms.push(format!("{} {}", m.id, m.region));
                let inst = format!(
                    "instance={};app={a};ip={};region={}",
                    m.id,
                    Ipv6Addr::from(addr),
                    m.region
                );
                v.add("_instances.internal", rtype::TXT, ttl, &txt(&[inst]));
            }
            if !machines.is_empty() {
                v.add(
                    &format!("vms.{}.internal", app.name),
                    rtype::TXT,
                    ttl,
                    &txt_list(&vms),
                );
                let regions: Vec<String> = regions.into_iter().collect();
                v.add(
                    &format!("regions.{}.internal", app.name),
                    rtype::TXT,
                    ttl,
                    &txt_list(&regions),
                );
            }
        }
        if !app_names.is_empty() {
            v.add("_apps.internal", rtype::TXT, ttl, &txt_list(&app_names));
        }
        // Kubernetes (the kubernetes/dns specification, IPv6).
        for s in k8s {
            v.add_cluster_zone(&s.cluster, ttl);
            let name = format!("{}.{}.svc.{}", s.name, s.namespace, s.cluster);
            match s.kind {
                K8sServiceKind::ClusterIp => {
                    if let Some(ip) = s.cluster_ip {
                        v.add(&name, rtype::AAAA, ttl, &ip.octets());
                        v.add_ptr(&ip.octets(), ttl, &name);
                    }
                }
                K8sServiceKind::Headless => {
                    for ep in s.endpoints.iter().filter(|e| e.ready) {
                        let Some(addr) = cat.machines.get(&ep.machine).and_then(|m| aaaa(m)) else {
                            continue;
                        };
                        v.add(&name, rtype::AAAA, ttl, &addr);
                        if let Some(h) = &ep.hostname {
                            v.add(&format!("{h}.{name}"), rtype::AAAA, ttl, &addr);
                        }
                    }
                }
                K8sServiceKind::ExternalName => {
                    if let Some(target) = &s.external_name {
                        v.add_cname(&name, ttl, target);
                    }
                }
            }
            for p in &s.ports {
                let Some(port_name) = &p.name else { continue };
                let proto = match p.protocol {
                    K8sProtocol::Tcp => "tcp",
                    K8sProtocol::Udp => "udp",
                    K8sProtocol::Sctp => "sctp",
                };
                let mut rdata = Vec::new();
                rdata.extend_from_slice(&0u16.to_be_bytes());
                rdata.extend_from_slice(&100u16.to_be_bytes());
                rdata.extend_from_slice(&p.port.to_be_bytes());
                encode_name(&name, &mut rdata);
                v.add(
                    &format!("_{port_name}._{proto}.{name}"),
                    rtype::SRV,
                    ttl,
                    &rdata,
                );
            }
        }
        v.fill_empty_non_terminals();
        v.freeze();
        v
    }
}
