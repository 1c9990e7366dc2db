//! The mesh agent: keeps this host's WireGuard device, routes and eBPF maps in step
//! with the catalog.
//!
//! - **Device**: skein's own ([`crate::Device`]) or any device that serves the UAPI
//!   socket (wireguard-go, boringtun-cli). Either way the agent configures it through
//!   the UAPI, so there is one path and `wg show` sees what the agent did.
//! - **Peers**: every other host with a WireGuard key, at its underlay address, with
//!   one AllowedIPs entry `fdaa:<host>::/48` (host-first form). Changes go out as a
//!   diff, so a peer that did not change keeps its session.
//! - **Machines** of this host that are started and name their host-side interface:
//!   a `/112` route to that interface, the guard on its ingress, and an entry in the
//!   mesh's local-machine map. The host side also gets `fe80::1`, the gateway
//!   machines route `fdaa::/16` through.
//! - **Host**: `fdaa::/16` routes into the mesh device; the rewrite programs sit on it;
//!   the host's own address `fdaa:0:0:<host>::1` is on it.
//!
//! [`Agent::stop`] takes all of it away again (the device's interface and the TCX
//! links go with their file descriptors; routes and addresses on machine interfaces
//! are deleted explicitly), and restores IPv6 forwarding to what it was.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use skein_catalog::{Snapshot, model::MachineState};
use skein_ebpf::Datapath;
use skein_sixpn::{HostId, MachineSlot, NetId, SixPn};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    Device, DeviceConfig, Key,
    control::{Control, ControlError},
    netlink::Netlink,
    uapi::{self, DeviceUpdate, PeerUpdate, Prefix},
};

/// Which WireGuard device carries the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The kernel's where this kernel has WireGuard, else skein's own.
    #[default]
    Auto,
    /// The kernel's WireGuard interface, created by the daemon and configured
    /// with `wg` (wireguard-tools); an error where the kernel has none.
    Kernel,
    /// skein's own userspace device, created by the daemon.
    Skein,
    /// A device someone else runs that serves the UAPI socket (wireguard-go,
    /// boringtun-cli); the agent only configures it.
    Uapi,
}

/// `[mesh]` in the daemon config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Run the mesh plane (needs root: TUN, routes, eBPF).
    #[serde(default)]
    pub enabled: bool,
    /// The WireGuard interface.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Its UDP port; the catalog's host record should say the same.
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// The private key file (created, mode 0600, if missing). Default:
    /// `<state.dir>/wireguard.key`.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `skein` (default) or `uapi` (configure a device that already runs).
    #[serde(default)]
    pub device: DeviceKind,
    /// Where UAPI sockets live.
    #[serde(default = "default_uapi_dir")]
    pub uapi_dir: PathBuf,
    /// MTU of the mesh interface (1420 leaves room for WireGuard over IPv6).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Attach the eBPF guard and rewrite (off only to measure their cost).
    #[serde(default = "yes")]
    pub ebpf: bool,
    /// Persistent keepalive to every peer, seconds (0: off).
    #[serde(default)]
    pub persistent_keepalive: u16,
    /// Take in, on `lo`, what machines of this host are given locally: the
    /// resolver `fdaa::3`, and the flycast addresses of their networks
    /// (`fdaa:<net>:0:1::/80`, served by the proxy's steering). Off: the
    /// operator routes them.
    #[serde(default = "yes")]
    pub local_services: bool,
    /// Have the kernel time every run of the eBPF programs, published as
    /// `skein_ebpf_run_nanoseconds_total` and `skein_ebpf_runs_total`: what they
    /// cost (two clock reads per run; for measuring, off by default).
    #[serde(default)]
    pub ebpf_stats: bool,
    /// Pin the eBPF links on a bpf filesystem so that a daemon that dies
    /// without stopping leaves the guards in force (fail closed); the next
    /// daemon replaces them. Off: the guards go with the process.
    #[serde(default = "yes")]
    pub fail_closed: bool,
    /// Where the links are pinned (a directory on a bpf filesystem; under
    /// `/sys/fs/bpf` the filesystem is mounted if it is not).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

fn default_pin_dir() -> PathBuf {
    "/sys/fs/bpf/skein".into()
}

fn default_interface() -> String {
    "skein0".into()
}
fn default_port() -> u16 {
    51820
}
fn default_uapi_dir() -> PathBuf {
    uapi::SOCKET_DIR.into()
}
fn default_mtu() -> u32 {
    1420
}
fn yes() -> bool {
    true
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: false,
            interface: default_interface(),
            listen_port: default_port(),
            private_key_file: None,
            device: DeviceKind::default(),
            uapi_dir: default_uapi_dir(),
            mtu: default_mtu(),
            ebpf: true,
            persistent_keepalive: 0,
            local_services: true,
            ebpf_stats: false,
            fail_closed: true,
            pin_dir: default_pin_dir(),
        }
    }
}

/// The 6PN prefix routed into the mesh.
const SIXPN: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, 0), 16);
/// The gateway address machines use on their link.
const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A peer host's AllowedIPs entry: `fdaa:<host>::/48` in host-first form.
pub fn peer_prefix(host: HostId) -> Prefix {
    let o = SixPn::new(NetId(0), host, MachineSlot(0)).to_host_first();
    Prefix {
        addr: IpAddr::V6(Ipv6Addr::from(o)),
        len: 48,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantPeer {
    /// Its host's underlay address and WireGuard port.
    pub endpoint: SocketAddr,
    /// `fdaa:<host>::/48` in host-first form (one entry whatever the host
    /// carries); without the rewrite, the host's address and each of its
    /// machines' `/112`, as they are.
    pub allowed: Vec<Prefix>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantMachine {
    /// Its host-side interface.
    pub interface: String,
    /// Its 6PN address.
    pub address: SixPn,
}

/// What the mesh of one host should hold for a catalog: a peer per other
/// host with a WireGuard key, a route and guard per started machine of this
/// host with an interface. A pure function of the catalog, so its cost at
/// scale is measured apart from the kernel work (benches/catalog_scale.rs).
#[derive(Debug, Default)]
pub struct Desired {
    /// Peers by public key.
    pub peers: BTreeMap<Key, WantPeer>,
    /// This host's machines by id.
    pub machines: BTreeMap<String, WantMachine>,
    /// The networks of those machines (their flycast ranges are taken in here).
    pub networks: BTreeSet<NetId>,
    /// Flycast addresses of other networks that one of those networks may
    /// reach (an app's `flycast_from`): `(asker's network, address)`.
    pub shared_flycast: BTreeSet<(NetId, SixPn)>,
    /// Hosts whose WireGuard key does not parse.
    pub bad_keys: Vec<String>,
}

/// [`Desired`] for host `me`, whose own key is `own`. `rewrite`: the eBPF
/// programs swap net and host on the mesh device, so a peer needs one
/// AllowedIPs entry; without them (`mesh.ebpf = false`, to measure what they
/// cost) a peer gets its host address and every started machine's `/112`.
pub fn desired(cat: &skein_catalog::Catalog, me: HostId, own: &Key, rewrite: bool) -> Desired {
    let mut d = Desired::default();
    let mut machines_of: BTreeMap<HostId, Vec<Prefix>> = BTreeMap::new();
    if !rewrite {
        for m in cat.machines.values() {
            if let (MachineState::Started, Some(a)) = (m.state, m.address) {
                machines_of.entry(m.host).or_default().push(Prefix {
                    addr: IpAddr::V6(Ipv6Addr::from(skein_sixpn::policy::machine_key(
                        &a.octets(),
                    ))),
                    len: 112,
                });
            }
        }
    }
    for h in cat.hosts.values() {
        if h.id == me {
            continue;
        }
        let Some(w) = &h.wireguard else { continue };
        let Ok(k) = Key::from_base64(&w.public_key) else {
            d.bad_keys.push(h.name.clone());
            continue;
        };
        if k == *own {
            continue;
        }
        d.peers.insert(
            k,
            WantPeer {
                endpoint: SocketAddr::new(h.underlay, w.port),
                allowed: if rewrite {
                    vec![peer_prefix(h.id)]
                } else {
                    let mut v = vec![Prefix {
                        addr: IpAddr::V6(SixPn::host_address(h.id).into()),
                        len: 128,
                    }];
                    v.extend(machines_of.remove(&h.id).unwrap_or_default());
                    v
                },
            },
        );
    }
    for m in cat.machines.values() {
        if m.host != me || m.state != MachineState::Started {
            continue;
        }
        let (Some(interface), Some(address)) = (&m.interface, m.address) else {
            continue;
        };
        d.networks.insert(address.net());
        d.machines.insert(
            m.id.clone(),
            WantMachine {
                interface: interface.clone(),
                address,
            },
        );
    }
    for app in cat.apps.values() {
        let Some(f) = app.flycast.and_then(|f| SixPn::try_from(f).ok()) else {
            continue;
        };
        for name in &app.flycast_from {
            if let Some(n) = cat.networks.get(name)
                && d.networks.contains(&n.id)
            {
                d.shared_flycast.insert((n.id, f));
            }
        }
    }
    d
}

/// The flycast range of a network, `fdaa:<net>:0:1::/80`.
pub fn flycast_range(net: NetId) -> (Ipv6Addr, u8) {
    (SixPn::flycast(net, 0).into(), 80)
}

/// The running agent. Owns the device and the eBPF programs.
pub struct Agent {
    cfg: MeshConfig,
    host_name: String,
    key: Key,
    device: Option<Device>,
    control: Control,
    nl: Netlink,
    mesh_index: u32,
    datapath: Option<Datapath>,
    host: Option<HostId>,
    peers: BTreeMap<Key, WantPeer>,
    machines: BTreeMap<String, (WantMachine, u32)>,
    /// IPv6 forwarding before the first skein changed it, and the file that
    /// remembers it.
    forwarding_was: Option<(String, PathBuf)>,
    /// `lo`, where local services are taken in.
    lo: u32,
    /// Networks with a machine here: their gateway address is on `lo`
    /// (and their flycast range routed there, with `local_services`).
    networks: BTreeSet<NetId>,
    /// Other networks' flycast addresses a local network may reach: allowed
    /// in the guard's map and taken in on `lo` (the proxy here serves them).
    shared: BTreeSet<(NetId, SixPn)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("interface", &self.cfg.interface)
            .field("peers", &self.peers.len())
            .field("machines", &self.machines.len())
            .finish()
    }
}

/// What stops the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key file.
    #[error(transparent)]
    Key(#[from] crate::key::KeyFileError),
    /// The device or its socket.
    #[error("mesh device {interface}: {source}")]
    Device {
        /// The interface.
        interface: String,
        /// Why.
        source: std::io::Error,
    },
    /// Configuring the device.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Netlink.
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    /// The eBPF programs.
    #[error(transparent)]
    Ebpf(#[from] skein_ebpf::Error),
    /// Anything else, said plainly.
    #[error("{0}")]
    Other(String),
}

/// Reads the private key file (creating it) and returns the public key: what an
/// operator puts in the host's catalog record.
pub fn public_key(cfg: &MeshConfig, state_dir: &Path) -> Result<Key, crate::key::KeyFileError> {
    Ok(crate::key::load_or_create(&key_file(cfg, state_dir))?.public())
}

fn key_file(cfg: &MeshConfig, state_dir: &Path) -> PathBuf {
    cfg.private_key_file
        .clone()
        .unwrap_or_else(|| state_dir.join("wireguard.key"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Agent {
    /// Brings the mesh device up (creating it unless `device = "uapi"`), gives it its
    /// key, routes 6PN into it and attaches the rewrite.
    /// skein's own device runs its data path on `datapath`, a TUN queue and
    /// a socket per runtime (the serving threads the proxy runs on, so the
    /// two hand packets over without waking another thread).
    pub async fn start(
        cfg: &MeshConfig,
        host_name: &str,
        state_dir: &Path,
        datapath: &[tokio::runtime::Handle],
    ) -> Result<Agent, StartError> {
        let key = crate::key::load_or_create(&key_file(cfg, state_dir))?;
        let nl = Netlink::connect().map_err(|source| StartError::Device {
            interface: cfg.interface.clone(),
            source,
        })?;
        let kernel = match cfg.device {
            DeviceKind::Kernel => {
                nl.add_wireguard(&cfg.interface).await?;
                true
            }
            DeviceKind::Auto => match nl.add_wireguard(&cfg.interface).await {
                Ok(()) => true,
                Err(e) => {
                    info!(reason = %e, "no WireGuard in this kernel: skein's userspace device");
                    false
                }
            },
            DeviceKind::Skein | DeviceKind::Uapi => false,
        };
        let (device, control) = match cfg.device {
            _ if kernel => (None, Control::Kernel(cfg.interface.clone())),
            DeviceKind::Uapi => (
                None,
                Control::Uapi(uapi::socket_path(&cfg.uapi_dir, &cfg.interface)),
            ),
            _ => {
                let dc = DeviceConfig {
                    name: cfg.interface.clone(),
                    listen_port: cfg.listen_port,
                    uapi_dir: cfg.uapi_dir.clone(),
                };
                let d = Device::create(&dc, datapath).map_err(|source| StartError::Device {
                    interface: cfg.interface.clone(),
                    source,
                })?;
                let p = d.uapi_path().to_owned();
                (Some(d), Control::Uapi(p))
            }
        };
        let update = DeviceUpdate {
            private_key: Some(Some(key)),
            listen_port: Some(cfg.listen_port),
            ..Default::default()
        };
        let c = control.clone();
        blocking(move || c.set(&update)).await?;
        let Some(mesh_index) = nl.index(&cfg.interface).await? else {
            return Err(StartError::Other(format!(
                "mesh interface {} does not exist",
                cfg.interface
            )));
        };
        nl.up(mesh_index, Some(cfg.mtu)).await?;
        nl.add_route(SIXPN.0, SIXPN.1, mesh_index, None).await?;
        // What forwarding was before any skein touched it: remembered in the
        // state dir while the mesh runs, so that a daemon that follows one that
        // died restores the host's own setting, not the dead daemon's "1".
        let remembered = state_dir.join("ipv6-forwarding.was");
        let forwarding_was = match std::fs::read_to_string(&remembered) {
            Ok(was) => Some(was),
            Err(_) => {
                let was = std::fs::read_to_string(FORWARDING).ok();
                if let Some(w) = &was {
                    std::fs::write(&remembered, w).map_err(|e| {
                        StartError::Other(format!("writing {}: {e}", remembered.display()))
                    })?;
                }
                was
            }
        };
        if std::fs::read_to_string(FORWARDING)
            .ok()
            .as_deref()
            .map(str::trim)
            != Some("1")
        {
            std::fs::write(FORWARDING, "1").map_err(|e| {
                StartError::Other(format!("enabling IPv6 forwarding ({FORWARDING}): {e}"))
            })?;
        }
        let Some(lo) = nl.index("lo").await? else {
            return Err(StartError::Other("no loopback interface".into()));
        };
        if cfg.local_services {
            nl.add_address(lo, skein_sixpn::RESOLVER, 128).await?;
        }
        let datapath = if cfg.ebpf {
            let mut d = Datapath::load()?;
            if cfg.fail_closed {
                let adopted = d.pin_links(&cfg.pin_dir)?;
                if adopted > 0 {
                    warn!(
                        links = adopted,
                        dir = %cfg.pin_dir.display(),
                        "an earlier daemon did not stop cleanly; its guards stay in force until replaced"
                    );
                }
            }
            if cfg.ebpf_stats {
                d.time_runs()?;
            }
            d.attach_mesh(&cfg.interface)?;
            Some(d)
        } else {
            None
        };
        info!(
            interface = %cfg.interface,
            public_key = %key.public().to_base64(),
            device = ?cfg.device,
            ebpf = cfg.ebpf,
            "mesh up"
        );
        Ok(Agent {
            cfg: cfg.clone(),
            host_name: host_name.to_owned(),
            key,
            device,
            control,
            nl,
            mesh_index,
            datapath,
            host: None,
            peers: BTreeMap::new(),
            machines: BTreeMap::new(),
            forwarding_was: forwarding_was.map(|was| (was, remembered)),
            lo,
            networks: BTreeSet::new(),
            shared: BTreeSet::new(),
        })
    }

    /// This host's public key.
    pub fn public_key(&self) -> Key {
        self.key.public()
    }

    /// Where the device's configuration goes.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Brings peers, routes and maps in step with `snap`. Work that cannot be done
    /// yet (a machine interface that does not exist yet) is retried next time.
    pub async fn apply(&mut self, snap: &Snapshot) {
        let cat = &snap.catalog;
        let me = cat.hosts.values().find(|h| h.name == self.host_name);
        let Some(me) = me else {
            warn!(host = %self.host_name, "this host is not in the catalog; the mesh waits");
            metrics::gauge!("skein_mesh_host_known").set(0.0);
            return;
        };
        metrics::gauge!("skein_mesh_host_known").set(1.0);
        let mine = self.key.public().to_base64();
        match &me.wireguard {
            Some(w) if w.public_key != mine => warn!(
                catalog = %w.public_key,
                ours = %mine,
                "the catalog has another WireGuard key for this host; peers will not reach it"
            ),
            None => warn!(public_key = %mine, "this host's catalog record has no WireGuard key"),
            _ => {}
        }
        if self.host != Some(me.id) {
            self.set_host(me.id).await;
        }

        let want = desired(cat, me.id, &self.key.public(), self.datapath.is_some());
        for host in &want.bad_keys {
            warn!(host = %host, "bad WireGuard key in the catalog");
        }
        self.sync_peers(want.peers).await;
        // Networks before machines: a machine's route names its network's
        // gateway address as its source, which must exist first.
        self.sync_networks(want.networks, me.id).await;
        self.sync_shared(want.shared_flycast).await;
        self.sync_machines(want.machines).await;
        self.export_counters();
    }

    /// For every network with a machine here: the host's gateway address in
    /// it on `lo`, and (with `local_services`) its flycast range routed to
    /// `lo`. Networks that left lose both: a range left routed would take
    /// traffic in for nothing.
    async fn sync_networks(&mut self, want: BTreeSet<NetId>, host: HostId) {
        let gone: Vec<NetId> = self.networks.difference(&want).copied().collect();
        for net in gone {
            self.drop_network(net, host).await;
            self.networks.remove(&net);
        }
        for net in want {
            if self.networks.contains(&net) {
                continue;
            }
            let gw = SixPn::gateway(net, host);
            if let Err(e) = self.nl.add_address(self.lo, gw.into(), 128).await {
                warn!(error = %e, %gw, "the host's address in a network");
                continue;
            }
            if self.cfg.local_services {
                let (a, len) = flycast_range(net);
                if let Err(e) = self.nl.add_local_route(a.into(), len, self.lo).await {
                    warn!(error = %e, "taking a flycast range in");
                    continue;
                }
            }
            self.networks.insert(net);
        }
    }

    async fn sync_shared(&mut self, want: BTreeSet<(NetId, SixPn)>) {
        let gone: Vec<(NetId, SixPn)> = self.shared.difference(&want).copied().collect();
        for pair in gone {
            self.unshare(pair).await;
        }
        for (net, f) in want {
            if self.shared.contains(&(net, f)) {
                continue;
            }
            if self.cfg.local_services
                && !self.shared.iter().any(|(_, g)| *g == f)
                && let Err(e) = self
                    .nl
                    .add_local_route(Ipv6Addr::from(f).into(), 128, self.lo)
                    .await
            {
                warn!(error = %e, %f, "taking a shared flycast address in");
                continue;
            }
            if let Some(d) = &mut self.datapath
                && let Err(e) = d.allow_flycast(net.0, f)
            {
                warn!(error = %e, %f, "allowing a shared flycast address");
                continue;
            }
            info!(network = %net, address = %f, "another network's flycast address is open to this one");
            self.shared.insert((net, f));
        }
    }

    async fn unshare(&mut self, (net, f): (NetId, SixPn)) {
        self.shared.remove(&(net, f));
        if let Some(d) = &mut self.datapath {
            d.disallow_flycast(net.0, f);
        }
        if self.cfg.local_services
            && !self.shared.iter().any(|(_, g)| *g == f)
            && let Err(e) = self
                .nl
                .del_local_route(Ipv6Addr::from(f).into(), 128, self.lo)
                .await
        {
            warn!(error = %e, %f, "removing a shared flycast address");
        }
    }

    async fn drop_network(&mut self, net: NetId, host: HostId) {
        if self.cfg.local_services {
            let (a, len) = flycast_range(net);
            if let Err(e) = self.nl.del_local_route(a.into(), len, self.lo).await {
                warn!(error = %e, "removing a flycast range");
            }
        }
        let gw = SixPn::gateway(net, host);
        if let Err(e) = self.nl.del_address(self.lo, gw.into()).await {
            warn!(error = %e, %gw, "removing the host's address in a network");
        }
    }

    async fn set_host(&mut self, id: HostId) {
        if let Some(old) = self.host
            && let Some(d) = &mut self.datapath
        {
            d.remove_local(SixPn::host_address(old));
        }
        let addr = SixPn::host_address(id);
        if let Err(e) = self.nl.add_address(self.mesh_index, addr.into(), 128).await {
            warn!(error = %e, "host mesh address");
        }
        if let Some(d) = &mut self.datapath
            && let Err(e) = d.add_local(addr)
        {
            warn!(error = %e, "host mesh address in the local map");
        }
        self.host = Some(id);
    }

    async fn sync_peers(&mut self, want: BTreeMap<Key, WantPeer>) {
        let mut update = DeviceUpdate::default();
        for k in self.peers.keys() {
            if !want.contains_key(k) {
                let mut p = PeerUpdate::new(*k);
                p.remove = true;
                update.peers.push(p);
            }
        }
        for (k, w) in &want {
            if self.peers.get(k) == Some(w) {
                continue;
            }
            let mut p = PeerUpdate::new(*k);
            p.endpoint = Some(w.endpoint);
            p.replace_allowed_ips = true;
            p.allowed_ips = w.allowed.clone();
            p.persistent_keepalive = Some(self.cfg.persistent_keepalive);
            update.peers.push(p);
        }
        if update.peers.is_empty() {
            return;
        }
        let n = update.peers.len();
        let c = self.control.clone();
        match blocking(move || c.set(&update)).await {
            Ok(()) => {
                info!(changed = n, peers = want.len(), "mesh peers updated");
                metrics::gauge!("skein_mesh_peers").set(want.len() as f64);
                self.peers = want;
            }
            Err(e) => warn!(error = %e, "updating mesh peers failed; retrying on the next change"),
        }
    }

    async fn sync_machines(&mut self, want: BTreeMap<String, WantMachine>) {
        let gone: Vec<String> = self
            .machines
            .iter()
            .filter(|(id, (w, _))| want.get(*id) != Some(w))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((w, index)) = self.machines.remove(&id) {
                self.remove_machine(&id, &w, index).await;
            }
        }
        let wanted: BTreeSet<String> = want.values().map(|w| w.interface.clone()).collect();
        for (id, w) in want {
            if self.machines.contains_key(&id) {
                continue;
            }
            match self.add_machine(&id, &w).await {
                Ok(index) => {
                    self.machines.insert(id, (w, index));
                }
                Err(e) => warn!(machine = %id, interface = %w.interface, error = %e,
                    "machine not wired into the mesh yet; retrying"),
            }
        }
        metrics::gauge!("skein_mesh_machines").set(self.machines.len() as f64);
        // An earlier daemon's guards on interfaces no machine wants any more
        // go now; those of machines still being wired stay until replaced.
        if let Some(d) = &mut self.datapath
            && d.stale_links() > 0
        {
            for (iface, program) in d.retire_stale(|i| wanted.contains(i)) {
                info!(%iface, %program, "retired a link an earlier daemon left");
            }
        }
    }

    async fn add_machine(&mut self, id: &str, w: &WantMachine) -> Result<u32, String> {
        let index = self
            .nl
            .index(&w.interface)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("interface {} does not exist", w.interface))?;
        let net = Ipv6Addr::from(skein_sixpn::policy::machine_key(&w.address.octets()));
        // guard first: no packet of the machine is forwarded unguarded
        if let Some(d) = &mut self.datapath {
            d.attach_guard(&w.interface, w.address)
                .map_err(|e| e.to_string())?;
            d.add_local(w.address).map_err(|e| e.to_string())?;
        }
        self.nl
            .add_address(index, GATEWAY, 64)
            .await
            .map_err(|e| e.to_string())?;
        self.nl.up(index, None).await.map_err(|e| e.to_string())?;
        // The host speaks to the machine from its own address in the machine's
        // network, so the replies pass the guard.
        let src = SixPn::gateway(w.address.net(), w.address.host());
        self.nl
            .add_route(net, 112, index, Some(src.into()))
            .await
            .map_err(|e| e.to_string())?;
        // And a /128 for the machine's own address: it is the first address of
        // its /112, which Linux takes for the subnet-router anycast address
        // (RFC 4291 2.6.1) of a connected /112 route and so never sends an ICMP
        // error to. Without it the machine gets no Packet Too Big when what it
        // sends does not fit the mesh, and its large packets vanish.
        self.nl
            .add_route(w.address.into(), 128, index, Some(src.into()))
            .await
            .map_err(|e| e.to_string())?;
        info!(machine = %id, interface = %w.interface, address = %w.address, "machine joined the mesh");
        Ok(index)
    }

    async fn remove_machine(&mut self, id: &str, w: &WantMachine, index: u32) {
        let net = Ipv6Addr::from(skein_sixpn::policy::machine_key(&w.address.octets()));
        for (dst, len) in [(Ipv6Addr::from(w.address), 128), (net, 112)] {
            if let Err(e) = self.nl.del_route(dst, len, index).await {
                warn!(machine = %id, error = %e, "removing the machine's route");
            }
        }
        if let Err(e) = self.nl.del_address(index, GATEWAY).await {
            warn!(machine = %id, error = %e, "removing the gateway address");
        }
        if let Some(d) = &mut self.datapath {
            d.remove_local(w.address);
            d.detach_guard(&w.interface);
        }
        info!(machine = %id, interface = %w.interface, "machine left the mesh");
    }

    /// Publishes the eBPF counters as `skein_ebpf_packets_total`.
    pub fn export_counters(&self) {
        let Some(d) = &self.datapath else { return };
        match d.counters() {
            Ok(cs) => {
                for (r, n) in cs {
                    let verdict = if r.is_drop() { "drop" } else { "pass" };
                    metrics::counter!("skein_ebpf_packets_total",
                        "program" => r.program(), "reason" => r.name(), "verdict" => verdict)
                    .absolute(n);
                }
            }
            Err(e) => warn!(error = %e, "reading eBPF counters"),
        }
        if self.cfg.ebpf_stats {
            for (program, time, runs) in d.run_stats() {
                metrics::counter!("skein_ebpf_run_nanoseconds_total", "program" => program)
                    .absolute(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX));
                metrics::counter!("skein_ebpf_runs_total", "program" => program).absolute(runs);
            }
        }
    }

    /// The eBPF datapath, if attached (tests read its counters).
    pub fn datapath(&self) -> Option<&Datapath> {
        self.datapath.as_ref()
    }

    /// Takes everything away: machine routes and guards, the rewrite, the device,
    /// and IPv6 forwarding back to what it was.
    pub async fn stop(mut self) {
        let machines = std::mem::take(&mut self.machines);
        for (id, (w, index)) in machines {
            self.remove_machine(&id, &w, index).await;
        }
        let _ = self.nl.del_route(SIXPN.0, SIXPN.1, self.mesh_index).await;
        for pair in self.shared.clone() {
            self.unshare(pair).await;
        }
        if let Some(h) = self.host {
            for net in std::mem::take(&mut self.networks) {
                self.drop_network(net, h).await;
            }
        }
        if self.cfg.local_services {
            let _ = self.nl.del_address(self.lo, skein_sixpn::RESOLVER).await;
        }
        if let Some(h) = self.host {
            // on a device that outlives us (device = "uapi") the address would stay
            let _ = self
                .nl
                .del_address(self.mesh_index, SixPn::host_address(h).into())
                .await;
        }
        if let Some(mut d) = self.datapath.take() {
            d.detach_all();
        }
        if let Some((was, remembered)) = &self.forwarding_was {
            if was.trim() != "1" {
                let _ = std::fs::write(FORWARDING, was.trim());
            }
            let _ = std::fs::remove_file(remembered);
        }
        match self.device.take() {
            Some(dev) => blocking(move || drop(dev)).await,
            None => {
                // a device that outlives us forgets the peers we gave it
                let mut update = DeviceUpdate::default();
                for k in self.peers.keys() {
                    let mut p = PeerUpdate::new(*k);
                    p.remove = true;
                    update.peers.push(p);
                }
                let c = self.control.clone();
                if let Err(e) = blocking(move || c.set(&update)).await {
                    warn!(error = %e, "removing peers from the mesh device");
                }
                // a kernel interface is ours: it goes, peers and all
                if let Control::Kernel(name) = &self.control
                    && let Err(e) = self.nl.del_link(name).await
                {
                    warn!(error = %e, "removing the kernel WireGuard interface");
                }
            }
        }
        info!(interface = %self.cfg.interface, "mesh down");
    }
}

/// Follows the catalog until `stop`, then stops the agent. Also re-applies every
/// few seconds, which retries machines whose interface was late and refreshes the
/// counters.
pub async fn run(
    mut agent: Agent,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let snap = rx.borrow_and_update().clone();
        agent.apply(&snap).await;
        tokio::select! {
            _ = skein_catalog::store::stopped(&mut stop) => break,
            r = rx.changed() => if r.is_err() { break },
            _ = tick.tick() => {}
        }
    }
    agent.stop().await;
}

/// Which interfaces (name) have something attached; for status output.
pub fn attached(agent: &Agent) -> BTreeSet<String> {
    agent
        .datapath
        .as_ref()
        .map(|d| d.attached().into_iter().map(|(i, _)| i).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn catalog(flycast_from: &str) -> skein_catalog::Catalog {
        let text = format!(
            r#"
regions = [{{ code = "ams" }}]
networks = [{{ id = "0:18", name = "alpha" }}, {{ id = "0:19", name = "beta" }}, {{ id = "0:20", name = "gamma" }}]
hosts = [{{ id = "0:2", name = "h2", region = "ams", underlay = "fd00::2" }},
         {{ id = "0:3", name = "h3", region = "ams", underlay = "fd00::3" }}]
[[apps]]
name = "db"
network = "alpha"
flycast = "fdaa:0:18:0:1::7"
flycast_from = [{flycast_from}]
[[apps]]
name = "b"
network = "beta"
[[machines]]
id = "b1"
app = "b"
region = "ams"
host = "0:2"
state = "started"
address = "fdaa:0:19:0:2:0:1:0"
interface = "vb1"
"#
        );
        let store = skein_catalog::Store::new();
        store
            .replace(
                skein_catalog::Source::File,
                skein_catalog::error::parse_toml(&text).unwrap(),
            )
            .unwrap();
        store.snapshot().catalog.clone()
    }

    #[test]
    fn a_shared_flycast_address_is_opened_where_an_asking_network_has_a_machine() {
        let own = Key::generate();
        let f = SixPn::try_from("fdaa:0:18:0:1::7".parse::<Ipv6Addr>().unwrap()).unwrap();
        // beta has a machine on h2: h2 opens db's address to beta
        let d = desired(&catalog(r#""beta", "gamma""#), HostId(2), &own, true);
        assert_eq!(
            d.shared_flycast.into_iter().collect::<Vec<_>>(),
            [(NetId(0x19), f)]
        );
        // nothing of beta on h3: nothing to open there
        let d = desired(&catalog(r#""beta""#), HostId(3), &own, true);
        assert!(d.shared_flycast.is_empty());
        // not shared: not opened
        let d = desired(&catalog(""), HostId(2), &own, true);
        assert!(d.shared_flycast.is_empty());
    }
}
