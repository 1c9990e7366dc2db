//! The daemon's own configuration (`skein.toml`): where it listens, where it keeps
//! state, which catalog file it follows, which planes run. Static: a change needs
//! a restart. The catalog (apps, machines…) is live and lives elsewhere: in the
//! catalog file named here and in the admin API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skein_catalog::Invalid;
use skein_catalog::error::parse_toml;
use skein_catalog::sources::client::Endpoint;

/// `skein.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host.
    #[serde(default)]
    pub host: HostConfig,
    /// The edge proxy.
    #[serde(default)]
    pub proxy: skein_proxy::ProxyConfig,
    /// The DNS server.
    #[serde(default)]
    pub dns: skein_dns::DnsConfig,
    /// The private network (WireGuard mesh and eBPF guards).
    #[serde(default)]
    pub mesh: skein_mesh::MeshConfig,
    /// etcd: the catalog shared by every host.
    #[serde(default)]
    pub etcd: skein_catalog::sources::etcd::EtcdConfig,
    /// Kubernetes: a cluster's Services as the catalog's `k8s_services`.
    #[serde(default)]
    pub kubernetes: skein_catalog::sources::kubernetes::KubeConfig,
    /// ACME: certificates for the catalog's hostnames.
    #[serde(default)]
    pub acme: skein_acme::AcmeConfig,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// The catalog file source.
    #[serde(default)]
    pub catalog: CatalogConfig,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The process itself.
    #[serde(default)]
    pub process: ProcessConfig,
}

/// `[process]`: how the daemon's process uses the machine.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Let the kernel back the heap with transparent huge pages. Off by
    /// default: the allocator asks for them on its arenas, and then every
    /// page it returns and touches again is a 2 MiB page zeroed in a fault,
    /// and each idle connection's few KiB sit in memory committed 2 MiB at a
    /// time (measured: 36 KiB of RSS per idle TLS connection with them, 24
    /// without).
    #[serde(default)]
    pub transparent_huge_pages: bool,
}

/// `[host]`: which host this daemon is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Its region code; the proxy measures closeness from here.
    #[serde(default)]
    pub region: String,
    /// Its name in the catalog's hosts (the mesh finds its own record by it).
    #[serde(default)]
    pub name: Option<String>,
}

/// `[admin]`: the admin API, `/metrics`, `/healthz`, `/readyz`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` (loopback unless `allow_remote`) or `unix:/path`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Accept a non-loopback TCP address (the token is then all that protects it).
    #[serde(default)]
    pub allow_remote: bool,
    /// File holding the bearer token; created with a random token (mode 0600) if
    /// missing. Default: `<state.dir>/admin.token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Most connections at once; more wait in the kernel's backlog.
    #[serde(default = "default_admin_conns")]
    pub max_connections: usize,
    /// Longest request body (bytes).
    #[serde(default = "default_admin_body")]
    pub max_body_bytes: usize,
    /// Most bytes of request headers.
    #[serde(default = "default_header_bytes")]
    pub max_header_bytes: usize,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a request may take in all.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}
fn default_admin_conns() -> usize {
    256
}
fn default_admin_body() -> usize {
    16 << 20
}
fn default_header_bytes() -> usize {
    64 << 10
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            allow_remote: false,
            token_file: None,
            max_connections: default_admin_conns(),
            max_body_bytes: default_admin_body(),
            max_header_bytes: default_header_bytes(),
            header_timeout: default_header_timeout(),
            request_timeout: default_request_timeout(),
        }
    }
}

/// `[state]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory for `catalog.db` (the admin API's records) and the token.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/skein")
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
        }
    }
}

/// `[catalog]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// The catalog file (relative to this config file). None: API only.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            file: None,
            poll_interval: default_poll(),
        }
    }
}

/// `[shutdown]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight work may take to finish after SIGTERM.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: default_drain(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Always JSON lines.
    Json,
    /// Always human.
    Human,
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Format.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `skein_catalog=debug,info`); `RUST_LOG` wins.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: default_level(),
        }
    }
}

impl Config {
    /// Reads and checks a config file; paths in it become absolute.
    pub fn load(path: &Path) -> Result<Config, Invalid> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Invalid::one("", format!("cannot read {}: {e}", path.display())))?;
        let mut cfg: Config = parse_toml(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(f) = &cfg.catalog.file
            && f.is_relative()
        {
            cfg.catalog.file = Some(base.join(f));
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks what types alone do not.
    pub fn check(&self) -> Result<(), Invalid> {
        let mut problems = Vec::new();
        let mut bad = |path: &str, msg: String| {
            problems.push(skein_catalog::Problem {
                path: path.into(),
                message: msg,
            })
        };
        match self.admin.listen.parse::<Endpoint>() {
            Err(e) => bad("admin.listen", e),
            Ok(Endpoint::Tcp(a)) => match a.parse::<std::net::SocketAddr>() {
                Err(_) => bad("admin.listen", format!("{a:?} is not ip:port")),
                Ok(sa) if !sa.ip().is_loopback() && !self.admin.allow_remote => bad(
                    "admin.listen",
                    format!(
                        "{sa} is not loopback; set admin.allow_remote = true to expose the admin API"
                    ),
                ),
                Ok(_) => {}
            },
            Ok(Endpoint::Unix(_)) => {}
        }
        if self.proxy.enabled {
            if self.host.region.is_empty() {
                bad("host.region", "the proxy needs this edge's region".into());
            }
            if self.proxy.listeners.is_empty() && !self.proxy.steer.enabled() {
                bad(
                    "proxy.listeners",
                    "the proxy is enabled but has no listener (and steers nothing)".into(),
                );
            }
            if self.proxy.max_connections == 0 {
                bad("proxy.max_connections", "must be at least 1".into());
            }
            if self.proxy.requests_per_turn == 0 {
                bad("proxy.requests_per_turn", "must be at least 1".into());
            }
            if self.proxy.max_header_bytes < 1024 {
                bad("proxy.max_header_bytes", "must be at least 1024".into());
            }
            if let Some(c) = &self.proxy.multiplexed_congestion
                && let Err(why) = congestion_available(c)
            {
                bad("proxy.multiplexed_congestion", why);
            }
            let b = &self.proxy.backhaul;
            if b.enabled && self.host.name.is_none() {
                bad(
                    "proxy.backhaul.enabled",
                    "the backhaul needs host.name: which machines are this host's own".into(),
                );
            }
            if b.enabled && b.max_connections == 0 {
                bad(
                    "proxy.backhaul.max_connections",
                    "must be at least 1".into(),
                );
            }
        }
        if self.dns.enabled && self.dns.listen.is_empty() {
            bad(
                "dns.listen",
                "the DNS server is enabled but has no address".into(),
            );
        }
        if self.mesh.enabled {
            if self.host.name.as_deref().unwrap_or("").is_empty() {
                bad(
                    "host.name",
                    "the mesh needs this host's name in the catalog".into(),
                );
            }
            let i = &self.mesh.interface;
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                bad(
                    "mesh.interface",
                    format!("{i:?}: 1 to 15 characters, no '/' or space"),
                );
            }
            if !(1280..=65535).contains(&self.mesh.mtu) {
                bad(
                    "mesh.mtu",
                    format!(
                        "{} is outside 1280..=65535 (IPv6 needs 1280)",
                        self.mesh.mtu
                    ),
                );
            }
        }
        for (path, msg) in self.etcd.problems() {
            bad(&path, msg);
        }
        for (path, msg) in self.kubernetes.problems() {
            bad(&path, msg);
        }
        if self.acme.enabled {
            for (path, msg) in self.acme.problems() {
                bad(&format!("acme.{path}"), msg);
            }
            if !self.proxy.enabled {
                bad(
                    "acme.enabled",
                    "the proxy answers the CA's challenges: enable the proxy too".into(),
                );
            }
        }
        if self.admin.max_connections == 0 {
            bad("admin.max_connections", "must be at least 1".into());
        }
        if self.admin.max_header_bytes < 1024 {
            bad("admin.max_header_bytes", "must be at least 1024".into());
        }
        if self.catalog.poll_interval < Duration::from_millis(50) {
            bad("catalog.poll_interval", "must be at least 50ms".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Invalid { problems })
        }
    }

    /// The token file path.
    pub fn token_file(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.state.dir.join("admin.token"))
    }
}

/// Reads the admin token, creating the file (mode 0600) with a fresh random token
/// if it does not exist.
pub fn ensure_token(path: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    Ok(token)
}

/// Whether `name` is a TCP congestion control this kernel has loaded (the
/// list is read where the kernel publishes it; without it, the name's form
/// alone is checked).
fn congestion_available(name: &str) -> Result<(), String> {
    if skein_proxy::upstream::Congestion::new(name).is_none() {
        return Err(format!(
            "{name:?} is not an algorithm name (1 to 15 letters, digits or '_')"
        ));
    }
    let Ok(list) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
    else {
        return Ok(());
    };
    if list.split_whitespace().any(|a| a == name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not loaded in this kernel (available: {})",
            list.trim()
        ))
    }
}
