//! The catalog's records, as they are written in a catalog file, sent to the admin
//! API and stored. Every struct denies unknown fields so that a typo is an error
//! with a path, never a silently ignored setting.
//!
//! Records are plain data. What makes a set of them valid together (references,
//! uniqueness, addresses inside their networks) is checked by [`crate::validate`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skein_sixpn::{HostId, NetId, SixPn};

/// A whole catalog document: what one source (the file, the admin API, etcd…)
/// contributes. Every list may be empty or absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Regions and the round-trip times between them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Region>,
    /// Hosts running a skein daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Host>,
    /// Organization networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<Network>,
    /// Apps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<App>,
    /// Machines (every Kubernetes pod is one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
    /// TLS certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
    /// Kubernetes Services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub k8s_services: Vec<K8sService>,
}

/// A region (an IATA-style code such as `ams`) and its measured round-trip times
/// to other regions, which the proxy uses to find the closest machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Lowercase code, 2 to 8 letters or digits.
    pub code: String,
    /// Human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Round-trip time in milliseconds to other regions, by code. Symmetric: one
    /// side is enough; when both give one, they must agree.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rtt_ms: BTreeMap<String, u32>,
}

/// What a host does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRole {
    /// Takes public traffic only.
    Edge,
    /// Runs machines only.
    Worker,
    /// Both.
    #[default]
    EdgeWorker,
}

/// A server in a region that runs one skein daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The 32-bit host id used in 6PN addresses, written `hi:lo` in hex (`a7b:7d`)
    /// or as a plain hex number. 0 and 1 are reserved.
    #[serde(with = "id32::host")]
    pub id: HostId,
    /// Unique name.
    pub name: String,
    /// Region code.
    pub region: String,
    /// Edge, worker or both.
    #[serde(default)]
    pub role: HostRole,
    /// The address other hosts reach it on (the WireGuard underlay).
    pub underlay: IpAddr,
    /// Its WireGuard identity, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<HostWireguard>,
}

/// A host's WireGuard identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostWireguard {
    /// Curve25519 public key, base64 (44 characters).
    pub public_key: String,
    /// UDP port.
    #[serde(default = "default_wg_port")]
    pub port: u16,
}

fn default_wg_port() -> u16 {
    51820
}

/// An organization network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The 32-bit network id used in 6PN addresses (`0:18` or `18`). 0 is reserved.
    #[serde(with = "id32::net")]
    pub id: NetId,
    /// Unique name; apps and services refer to the network by it.
    pub name: String,
    /// The organization that owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

/// An app: a named group of machines that serve the same services.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Unique name (a DNS label).
    pub name: String,
    /// The network's name.
    pub network: String,
    /// Public hostnames that route to this app (matched against SNI and Host).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Its private proxied address, `fdaa:<net>:0:1::<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flycast: Option<Ipv6Addr>,
    /// Other networks (by name) whose machines may reach the flycast address
    /// too: their guards let them through to it (and to nothing else of this
    /// network), the proxy on their host serves them, and `<app>.flycast`
    /// resolves in their view. A shared service (a database, a queue) offered
    /// to another organization without joining the networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flycast_from: Vec<String>,
    /// Services: which public ports lead to which internal port, and how.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// TLS options.
    #[serde(default, skip_serializing_if = "TlsOptions::is_default")]
    pub tls: TlsOptions,
    /// Its machines are the ready endpoints of this Kubernetes Service
    /// (`namespace/name`), not the machines whose `app` it is: how a Service
    /// annotated `service.skein.dev/hostnames` is served by the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_service: Option<String>,
}

/// An app's TLS options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// Serve a self-signed certificate when no issued or imported one matches.
    #[serde(default)]
    pub allow_self_signed: bool,
}

impl TlsOptions {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// Transport of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// How the proxy speaks HTTP to the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 over cleartext (prior knowledge).
    H2c,
}

/// A service of an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// The port the machine listens on.
    pub internal_port: u16,
    /// The public ports and what the proxy does on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Per-machine concurrency limits.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// HTTP version spoken to the machine when a port has the `http` handler.
    #[serde(default)]
    pub backend_protocol: BackendProtocol,
    /// Health checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

/// What the proxy does with a connection on a public port. Handlers stack in
/// order: `["tls", "http"]` terminates TLS and then speaks HTTP; no handler at all is
/// raw TCP passthrough.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    /// Terminate TLS.
    Tls,
    /// Speak HTTP (HTTP/1.1 and h2 to clients).
    Http,
    /// Send a PROXY protocol header to the machine.
    ProxyProto,
}

/// PROXY protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtoVersion {
    /// Text header.
    #[default]
    V1,
    /// Binary header.
    V2,
}

/// A public port of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The port number.
    pub port: u16,
    /// Handlers, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<Handler>,
    /// Redirect plain HTTP to HTTPS (needs `http` without `tls`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_https: bool,
    /// Version of the PROXY protocol header when the `proxy_proto` handler is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_proto_version: Option<ProxyProtoVersion>,
}

/// What a concurrency limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyKind {
    /// Open connections.
    #[default]
    Connections,
    /// In-flight HTTP requests.
    Requests,
}

/// Per-machine concurrency limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// What is counted.
    #[serde(default, rename = "type")]
    pub kind: ConcurrencyKind,
    /// Above this a machine is only chosen when no machine is under its own.
    pub soft_limit: u32,
    /// Never more than this.
    pub hard_limit: u32,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            kind: ConcurrencyKind::Connections,
            soft_limit: 20,
            hard_limit: 25,
        }
    }
}

/// Kind of health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET that must answer 2xx.
    Http,
}

/// A health check of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// TCP or HTTP.
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port on the machine (defaults to the service's internal port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path for HTTP checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between checks.
    #[serde(with = "humantime_serde", default = "default_check_interval")]
    pub interval: Duration,
    /// Time one check may take; must be shorter than the interval.
    #[serde(with = "humantime_serde", default = "default_check_timeout")]
    pub timeout: Duration,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Lifecycle state of a machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Created, not yet started.
    #[default]
    Created,
    /// Starting.
    Starting,
    /// Running.
    Started,
    /// Stopping.
    Stopping,
    /// Stopped.
    Stopped,
    /// Gone for good.
    Destroyed,
}

/// Health of a machine, from its checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No check has run yet (a machine without checks is taken as passing).
    #[default]
    Unknown,
    /// All checks pass.
    Passing,
    /// Some check warns.
    Warning,
    /// A check fails.
    Critical,
}

/// Metadata of a machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMeta {
    /// Kubernetes pod name, when the machine is a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Process group (`app` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_group: Option<String>,
}

/// One running instance of an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Unique id: 1 to 32 lowercase letters and digits.
    pub id: String,
    /// The app's name.
    pub app: String,
    /// Region code; must be its host's region.
    pub region: String,
    /// The host it runs on.
    #[serde(with = "id32::host")]
    pub host: HostId,
    /// Lifecycle state.
    #[serde(default)]
    pub state: MachineState,
    /// Health.
    #[serde(default)]
    pub health: Health,
    /// Pod, namespace, process group.
    #[serde(default, skip_serializing_if = "is_default_meta")]
    pub metadata: MachineMeta,
    /// Its 6PN address. Allocated by the catalog when absent: the address it had
    /// before if any, else the lowest free machine slot on its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SixPn>,
    /// Where the proxy reaches it when not through its 6PN address (single-host
    /// setups without a mesh, the demo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// The host-side network interface of the machine (its veth or tap), set by the
    /// worker that runs it. The mesh routes the machine's `/112` to it and guards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

fn is_default_meta(m: &MachineMeta) -> bool {
    m == &MachineMeta::default()
}

impl Machine {
    /// Started and passing (or unchecked): the machines that take traffic.
    pub fn is_routable(&self) -> bool {
        self.state == MachineState::Started
            && matches!(self.health, Health::Passing | Health::Unknown)
    }
}

/// Where a certificate came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// Imported by an operator; takes precedence.
    #[default]
    Imported,
    /// Issued by skein through ACME.
    Issued,
}

/// A TLS certificate chain and its key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Unique name.
    pub name: String,
    /// Hostnames it is served for (exact or `*.` wildcard). Defaults to the leaf's
    /// DNS names; each must be covered by the leaf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// PEM chain, leaf first.
    pub chain_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// Imported or issued.
    #[serde(default)]
    pub source: CertSource,
}

/// Kind of a Kubernetes Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum K8sServiceKind {
    /// A virtual address (here a flycast address served by the proxy).
    #[default]
    ClusterIp,
    /// No virtual address: names resolve to the ready endpoints.
    Headless,
    /// A CNAME to another name.
    ExternalName,
}

/// Transport of a Kubernetes Service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum K8sProtocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A port of a Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPort {
    /// Name (a DNS label); named ports get SRV records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Service port.
    pub port: u16,
    /// Transport.
    #[serde(default)]
    pub protocol: K8sProtocol,
    /// Port on the pods (defaults to `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

/// An endpoint of a Kubernetes Service: a pod, which is a machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sEndpoint {
    /// The machine's id.
    pub machine: String,
    /// Hostname of the pod inside a headless service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Ready to take traffic.
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

/// A Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sService {
    /// Name (a DNS label).
    pub name: String,
    /// Namespace (a DNS label).
    pub namespace: String,
    /// The cluster's DNS zone.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// The network the cluster's pods live in.
    pub network: String,
    /// ClusterIP, headless or ExternalName.
    #[serde(default, rename = "type")]
    pub kind: K8sServiceKind,
    /// For ClusterIP: a flycast address of the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv6Addr>,
    /// For ExternalName: the target name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<K8sPort>,
    /// Endpoints (pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<K8sEndpoint>,
}

fn default_cluster() -> String {
    "cluster.local".to_string()
}

/// Serde for 32-bit 6PN ids: accepts `"a7b:7d"`, `"18"` (hex) or an integer, and
/// writes the `hi:lo` form.
pub(crate) mod id32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u32),
        Text(String),
    }

    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(v) => Ok(v),
            Raw::Text(s) => {
                skein_sixpn::parse_field(&s).map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
            }
        }
    }

    pub mod host {
        use super::*;
        use skein_sixpn::HostId;
        pub fn serialize<S: Serializer>(v: &HostId, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(v)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HostId, D::Error> {
            read(d).map(HostId)
        }
    }

    pub mod net {
        use super::*;
        use skein_sixpn::NetId;
        pub fn serialize<S: Serializer>(v: &NetId, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(v)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NetId, D::Error> {
            read(d).map(NetId)
        }
    }
}
