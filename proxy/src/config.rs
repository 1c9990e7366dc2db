//! `[proxy]` in skein.toml.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One listening socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// The public port this socket stands for in the catalog (default: the bound
    /// port). Lets a test or an unprivileged demo bind 8443 for port 443.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `[proxy]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Run the proxy.
    #[serde(default)]
    pub enabled: bool,
    /// Listening sockets.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// The hostname whose app and certificate serve clients that send no SNI, or
    /// a Host that names no app (an IP literal, say): nginx's `default_server`.
    /// None: such clients get no certificate and a 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_hostname: Option<String>,
    /// Threads serving clients, each with its own runtime and sockets
    /// (default: one per available core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Most client connections per listener and thread; more wait in the backlog.
    #[serde(default = "d_max_conns")]
    pub max_connections: usize,
    /// Time a client has for its TLS handshake and request headers (slowloris).
    #[serde(default = "d_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// h2: a client connection with no stream for this long is closed with
    /// GOAWAY (checked at this interval, so within twice it), and every
    /// connection is pinged this often (dropped when the pong takes over
    /// 20 s). HTTP/1.1: see `keepalive_timeout`.
    #[serde(default = "d_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// An HTTP/1.1 client connection that hyper serves (from a request with a
    /// body or an upgrade on; skein serves the others itself and holds no
    /// buffer between them) and that has moved no byte for this long, with no
    /// request in flight, rests: hyper's buffers and state are freed and the
    /// connection waits for its next byte holding only its socket and TLS
    /// state (checked at this interval, backing off to 2 s while busy). `0s`
    /// keeps such a connection with hyper, and its buffers, for its whole life.
    #[serde(default = "d_rest_after", with = "humantime_serde")]
    pub rest_after: Duration,
    /// New HTTP/1.1 requests a serving thread starts in one turn of its loop
    /// while others wait: the rest wait, first come first served, behind the
    /// upstream answers that turn brought in (see `admit`). Not a cap on
    /// requests in flight.
    #[serde(default = "d_per_turn")]
    pub requests_per_turn: u32,
    /// An HTTP/1.1 keep-alive connection with no request for this long after
    /// its last response is closed (its next head, once begun, has
    /// `header_timeout`).
    #[serde(default = "d_keepalive", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Most bytes of request headers.
    #[serde(default = "d_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body (bytes); larger ones get 413.
    #[serde(default = "d_body")]
    pub max_request_body_bytes: u64,
    /// Most request header fields.
    #[serde(default = "d_headers")]
    pub max_headers: usize,
    /// Most concurrent h2 streams per client connection.
    #[serde(default = "d_streams")]
    pub h2_max_streams: u32,
    /// Time a connect to a machine may take.
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a machine has to start its response.
    #[serde(default = "d_response", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Other machines tried after a failed connect.
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// A machine that refused a connect is skipped this long.
    #[serde(default = "d_eject", with = "humantime_serde")]
    pub eject_for: Duration,
    /// Longest wait for a free machine when all are at their hard limit.
    #[serde(default = "d_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Most requests waiting per service.
    #[serde(default = "d_queue_depth")]
    pub queue_depth: usize,
    /// Idle upstream connections are closed after this.
    #[serde(default = "d_idle", with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Most idle upstream connections per machine.
    #[serde(default = "d_max_idle")]
    pub upstream_max_idle: usize,
    /// TCP congestion control of multiplexed connections: the backhaul, both
    /// the edge's and those its listener accepts, and h2c machines' (default:
    /// the system's). One such connection carries many clients' requests at
    /// a high rate; BBR paces it, and without the `fq` qdisc the kernel paces
    /// with a timer per burst, costly where timers are (a virtual machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplexed_congestion: Option<String>,
    /// How this proxy reaches machines on other hosts, and serves other
    /// edges' traffic for its own.
    #[serde(default)]
    pub backhaul: BackhaulConfig,
    /// Addresses served by steering (eBPF `sk_lookup`) rather than by bound
    /// listeners.
    #[serde(default)]
    pub steer: SteerConfig,
}

/// `[proxy.steer]`: one socket per address family serves every address of the
/// anycast prefixes on every port (routed by the port, then SNI or Host, as on
/// any listener), and every flycast address (routed by the address: the app,
/// or the Kubernetes Service, that owns it). Needs the eBPF programs; the
/// fallback without them is a listener per port on the wildcard address with
/// the prefixes routed to `lo` (`ip route add local <prefix> dev lo`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerConfig {
    /// Anycast prefixes this edge serves (the daemon routes them to `lo` and
    /// steers them to the proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anycast: Vec<ipnet::IpNet>,
    /// Serve flycast addresses: machines on this host reach their network's
    /// apps and ClusterIP Services through this proxy.
    #[serde(default)]
    pub flycast: bool,
    /// Announce the anycast prefixes to a BGP speaker while this proxy serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceConfig>,
}

/// `[proxy.steer.announce]`: while the proxy serves, every anycast prefix is a
/// route in kernel table `table` on `interface`, a TUN device the daemon owns.
/// A BGP speaker exports what it learns from that table (BIRD: `protocol
/// kernel { kernel table 4242; learn; ... }`). The routes go before the
/// drain on shutdown; if the daemon dies, the kernel removes the device and
/// its routes, and the speaker withdraws without the daemon's help.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    /// The kernel routing table the speaker reads.
    #[serde(default = "d_announce_table")]
    pub table: u32,
    /// The device the routes point at.
    #[serde(default = "d_announce_interface")]
    pub interface: String,
}

fn d_announce_table() -> u32 {
    4242
}
fn d_announce_interface() -> String {
    "skein-anycast".into()
}

impl SteerConfig {
    /// True if anything is steered.
    pub fn enabled(&self) -> bool {
        self.flycast || !self.anycast.is_empty()
    }
}

/// Where a worker's backhaul listener is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackhaulVia {
    /// The worker's address on the mesh, `fdaa:0:0:<host>::1` (WireGuard
    /// carries it; machines cannot send to it).
    #[default]
    Mesh,
    /// The worker's catalog `underlay` address, in clear: for hosts joined by
    /// a network that is private already, and for tests on loopback.
    Underlay,
}

/// `[proxy.backhaul]`: an edge sends the traffic for a machine on another host
/// to that host's proxy (HTTP multiplexed over h2, each raw TCP connection as
/// its own upgraded stream), which delivers it and enforces the machine's hard
/// limit: the worker is where every edge's traffic for its machines meets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackhaulConfig {
    /// Route through the workers' proxies (else every machine is dialled
    /// directly, as on a single host).
    #[serde(default)]
    pub enabled: bool,
    /// The backhaul port on every host.
    #[serde(default = "d_backhaul_port")]
    pub port: u16,
    /// Where other hosts' backhaul listeners are.
    #[serde(default)]
    pub via: BackhaulVia,
    /// This host's backhaul listener (default: its mesh address, or its
    /// underlay with `via = "underlay"`, on `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// Most backhaul connections from other edges (they multiplex: a handful
    /// per edge).
    #[serde(default = "d_backhaul_conns")]
    pub max_connections: usize,
}

fn d_backhaul_port() -> u16 {
    4280
}
fn d_backhaul_conns() -> usize {
    4_096
}

impl Default for BackhaulConfig {
    fn default() -> Self {
        BackhaulConfig {
            enabled: false,
            port: d_backhaul_port(),
            via: BackhaulVia::default(),
            bind: None,
            max_connections: d_backhaul_conns(),
        }
    }
}

impl BackhaulConfig {
    /// Where the backhaul listener of `host` is.
    pub fn address_of(&self, host: &skein_catalog::model::Host) -> SocketAddr {
        let ip = match self.via {
            BackhaulVia::Mesh => {
                std::net::IpAddr::V6(skein_catalog::sixpn::SixPn::host_address(host.id).into())
            }
            BackhaulVia::Underlay => host.underlay,
        };
        SocketAddr::new(ip, self.port)
    }
}

fn d_max_conns() -> usize {
    10_000
}
fn d_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_idle() -> Duration {
    Duration::from_secs(60)
}
fn d_keepalive() -> Duration {
    Duration::from_secs(60)
}

pub(crate) fn d_per_turn() -> u32 {
    32
}
fn d_rest_after() -> Duration {
    Duration::from_millis(100)
}
fn d_header_bytes() -> usize {
    64 << 10
}
fn d_body() -> u64 {
    100 << 20
}
fn d_headers() -> usize {
    100
}
fn d_streams() -> u32 {
    100
}
fn d_connect() -> Duration {
    Duration::from_secs(2)
}
fn d_response() -> Duration {
    Duration::from_secs(60)
}
fn d_retries() -> u32 {
    2
}
fn d_eject() -> Duration {
    Duration::from_secs(5)
}
fn d_queue_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_queue_depth() -> usize {
    1_000
}
fn d_max_idle() -> usize {
    1_024
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: false,
            listeners: Vec::new(),
            default_hostname: None,
            threads: None,
            max_connections: d_max_conns(),
            header_timeout: d_header_timeout(),
            idle_timeout: d_idle(),
            rest_after: d_rest_after(),
            requests_per_turn: d_per_turn(),
            keepalive_timeout: d_keepalive(),
            max_header_bytes: d_header_bytes(),
            max_headers: d_headers(),
            max_request_body_bytes: d_body(),
            h2_max_streams: d_streams(),
            connect_timeout: d_connect(),
            response_timeout: d_response(),
            retries: d_retries(),
            eject_for: d_eject(),
            queue_timeout: d_queue_timeout(),
            queue_depth: d_queue_depth(),
            upstream_idle_timeout: d_idle(),
            upstream_max_idle: d_max_idle(),
            multiplexed_congestion: None,
            backhaul: BackhaulConfig::default(),
            steer: SteerConfig::default(),
        }
    }
}
