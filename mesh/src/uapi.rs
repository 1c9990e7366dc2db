//! The WireGuard cross-platform userspace API (wireguard.com/xplatform): the text
//! protocol on `/var/run/wireguard/<iface>.sock` that `wg`, wireguard-go and
//! skein's own device speak. Both sides live here: [`DeviceUpdate`] (`set=1`) and
//! [`DeviceInfo`] (`get=1`) parse and encode, and [`get`]/[`set`] are the client.
//! The mesh agent configures every device through this one path, skein's own and
//! wireguard-go alike.

use std::{
    fmt,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, SystemTime},
};

use crate::key::Key;

/// Where the UAPI sockets live (wg and wireguard-go hard-code it).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The socket of interface `iface` under `dir`.
pub fn socket_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{iface}.sock"))
}

/// An IP prefix (an AllowedIPs entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// The address (host bits may be set; [`Prefix::contains`] masks them).
    pub addr: IpAddr,
    /// Its length.
    pub len: u8,
}

impl Prefix {
    /// True if `ip` lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let len = u32::from(self.len.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let len = u32::from(self.len.min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: no /length"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s}: bad address"))?;
        let len: u8 = l.parse().map_err(|_| format!("{s}: bad length"))?;
        let max = if addr.is_ipv6() { 128 } else { 32 };
        if len > max {
            return Err(format!("{s}: length above {max}"));
        }
        Ok(Prefix { addr, len })
    }
}

/// One peer's part of a `set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer.
    pub public_key: Key,
    /// Remove it.
    pub remove: bool,
    /// Only change it if it exists.
    pub update_only: bool,
    /// `Some(None)` clears the preshared key.
    pub preshared_key: Option<Option<Key>>,
    /// Its endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds (0 turns it off).
    pub persistent_keepalive: Option<u16>,
    /// Replace, rather than add to, its allowed IPs.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add.
    pub allowed_ips: Vec<Prefix>,
}

impl PeerUpdate {
    /// An update of `public_key` that changes nothing yet.
    pub fn new(public_key: Key) -> PeerUpdate {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A `set=1` request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// `Some(None)` removes the private key.
    pub private_key: Option<Option<Key>>,
    /// UDP port.
    pub listen_port: Option<u16>,
    /// Socket mark (0 clears it).
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers`.
    pub replace_peers: bool,
    /// Per-peer changes, in order.
    pub peers: Vec<PeerUpdate>,
}

/// A malformed request; the device answers it with this errno.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("uapi: {reason} (errno {errno})")]
pub struct UapiError {
    /// The errno the protocol answers with.
    pub errno: i32,
    /// What was wrong.
    pub reason: String,
}

fn invalid(reason: impl Into<String>) -> UapiError {
    UapiError {
        errno: libc::EINVAL,
        reason: reason.into(),
    }
}

fn parse_key(v: &str) -> Result<Key, UapiError> {
    Key::from_hex(v).map_err(|e| invalid(e.to_string()))
}

fn parse_endpoint(v: &str) -> Result<SocketAddr, UapiError> {
    v.parse()
        .map_err(|_| invalid(format!("endpoint {v}: not ip:port or [ip6]:port")))
}

fn parse_bool(k: &str, v: &str) -> Result<bool, UapiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!("{k}={v}: expected true or false"))),
    }
}

fn parse_num<T: FromStr>(k: &str, v: &str) -> Result<T, UapiError> {
    v.parse()
        .map_err(|_| invalid(format!("{k}={v}: not a number in range")))
}

impl DeviceUpdate {
    /// Parses the body of a `set=1` request (the lines after `set=1`).
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<DeviceUpdate, UapiError> {
        let mut u = DeviceUpdate::default();
        for line in lines {
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| invalid(format!("line {line:?}: no key=value")))?;
            if k == "public_key" {
                u.peers.push(PeerUpdate::new(parse_key(v)?));
                continue;
            }
            if let Some(p) = u.peers.last_mut() {
                match k {
                    "remove" => p.remove = parse_bool(k, v)?,
                    "update_only" => p.update_only = parse_bool(k, v)?,
                    "preshared_key" => {
                        let key = parse_key(v)?;
                        p.preshared_key = Some((!key.is_zero()).then_some(key));
                    }
                    "endpoint" => p.endpoint = Some(parse_endpoint(v)?),
                    "persistent_keepalive_interval" => {
                        p.persistent_keepalive = Some(parse_num(k, v)?)
                    }
                    "replace_allowed_ips" => p.replace_allowed_ips = parse_bool(k, v)?,
                    "allowed_ip" => p.allowed_ips.push(v.parse().map_err(invalid)?),
                    "protocol_version" if v == "1" => {}
                    _ => return Err(invalid(format!("unknown peer key {k}={v}"))),
                }
                continue;
            }
            match k {
                "private_key" => {
                    let key = parse_key(v)?;
                    u.private_key = Some((!key.is_zero()).then_some(key));
                }
                "listen_port" => u.listen_port = Some(parse_num(k, v)?),
                "fwmark" => u.fwmark = Some(parse_num(k, v)?),
                "replace_peers" => u.replace_peers = parse_bool(k, v)?,
                _ => return Err(invalid(format!("unknown device key {k}={v}"))),
            }
        }
        Ok(u)
    }

    /// The request as the protocol writes it (`set=1` … blank line).
    pub fn encode(&self) -> String {
        let mut s = String::from("set=1\n");
        match self.private_key {
            Some(Some(k)) => s.push_str(&format!("private_key={}\n", k.to_hex())),
            Some(None) => s.push_str(&format!("private_key={}\n", Key([0; 32]).to_hex())),
            None => {}
        }
        if let Some(p) = self.listen_port {
            s.push_str(&format!("listen_port={p}\n"));
        }
        if let Some(m) = self.fwmark {
            s.push_str(&format!("fwmark={m}\n"));
        }
        if self.replace_peers {
            s.push_str("replace_peers=true\n");
        }
        for p in &self.peers {
            s.push_str(&format!("public_key={}\n", p.public_key.to_hex()));
            if p.remove {
                s.push_str("remove=true\n");
                continue;
            }
            if p.update_only {
                s.push_str("update_only=true\n");
            }
            match p.preshared_key {
                Some(Some(k)) => s.push_str(&format!("preshared_key={}\n", k.to_hex())),
                Some(None) => s.push_str(&format!("preshared_key={}\n", Key([0; 32]).to_hex())),
                None => {}
            }
            if let Some(e) = p.endpoint {
                s.push_str(&format!("endpoint={e}\n"));
            }
            if let Some(k) = p.persistent_keepalive {
                s.push_str(&format!("persistent_keepalive_interval={k}\n"));
            }
            if p.replace_allowed_ips {
                s.push_str("replace_allowed_ips=true\n");
            }
            for a in &p.allowed_ips {
                s.push_str(&format!("allowed_ip={a}\n"));
            }
        }
        s.push('\n');
        s
    }
}

/// One peer as `get=1` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer.
    pub public_key: Key,
    /// Its preshared key.
    pub preshared_key: Option<Key>,
    /// Its current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// The last completed handshake (wall clock).
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Persistent keepalive in seconds (0 = off).
    pub persistent_keepalive: u16,
    /// Its allowed IPs.
    pub allowed_ips: Vec<Prefix>,
}

/// A `get=1` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's private key.
    pub private_key: Option<Key>,
    /// UDP port.
    pub listen_port: u16,
    /// Socket mark.
    pub fwmark: u32,
    /// Its peers.
    pub peers: Vec<PeerInfo>,
}

impl DeviceInfo {
    /// The public key of the private key, if any.
    pub fn public_key(&self) -> Option<Key> {
        self.private_key.map(|k| k.public())
    }

    /// The answer as the protocol writes it, `errno=0` and blank line included.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if let Some(k) = self.private_key {
            s.push_str(&format!("private_key={}\n", k.to_hex()));
        }
        s.push_str(&format!("listen_port={}\n", self.listen_port));
        if self.fwmark != 0 {
            s.push_str(&format!("fwmark={}\n", self.fwmark));
        }
        for p in &self.peers {
            s.push_str(&format!("public_key={}\n", p.public_key.to_hex()));
            if let Some(k) = p.preshared_key {
                s.push_str(&format!("preshared_key={}\n", k.to_hex()));
            }
            s.push_str("protocol_version=1\n");
            if let Some(e) = p.endpoint {
                s.push_str(&format!("endpoint={e}\n"));
            }
            let t = p
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or_default();
            s.push_str(&format!("last_handshake_time_sec={}\n", t.as_secs()));
            s.push_str(&format!("last_handshake_time_nsec={}\n", t.subsec_nanos()));
            s.push_str(&format!("tx_bytes={}\n", p.tx_bytes));
            s.push_str(&format!("rx_bytes={}\n", p.rx_bytes));
            s.push_str(&format!(
                "persistent_keepalive_interval={}\n",
                p.persistent_keepalive
            ));
            for a in &p.allowed_ips {
                s.push_str(&format!("allowed_ip={a}\n"));
            }
        }
        s.push_str("errno=0\n\n");
        s
    }

    /// Parses a `get=1` answer; unknown keys are skipped (implementations add some).
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<DeviceInfo, UapiError> {
        let mut d = DeviceInfo::default();
        let mut secs: Option<u64> = None;
        for line in lines {
            if line.is_empty() {
                break;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(invalid(format!("line {line:?}: no key=value")));
            };
            match (k, d.peers.last_mut()) {
                ("errno", _) => {
                    let e: i32 = parse_num(k, v)?;
                    if e != 0 {
                        return Err(UapiError {
                            errno: e,
                            reason: "get failed".into(),
                        });
                    }
                }
                ("public_key", _) => {
                    secs = None;
                    d.peers.push(PeerInfo {
                        public_key: parse_key(v)?,
                        preshared_key: None,
                        endpoint: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        persistent_keepalive: 0,
                        allowed_ips: Vec::new(),
                    });
                }
                ("private_key", None) => d.private_key = Some(parse_key(v)?),
                ("listen_port", None) => d.listen_port = parse_num(k, v)?,
                ("fwmark", None) => d.fwmark = parse_num(k, v)?,
                ("preshared_key", Some(p)) => {
                    let key = parse_key(v)?;
                    p.preshared_key = (!key.is_zero()).then_some(key);
                }
                ("endpoint", Some(p)) => p.endpoint = Some(parse_endpoint(v)?),
                ("last_handshake_time_sec", Some(_)) => secs = Some(parse_num(k, v)?),
                ("last_handshake_time_nsec", Some(p)) => {
                    let ns: u32 = parse_num(k, v)?;
                    let s = secs.unwrap_or(0);
                    p.last_handshake =
                        (s != 0 || ns != 0).then(|| SystemTime::UNIX_EPOCH + Duration::new(s, ns));
                }
                ("tx_bytes", Some(p)) => p.tx_bytes = parse_num(k, v)?,
                ("rx_bytes", Some(p)) => p.rx_bytes = parse_num(k, v)?,
                ("persistent_keepalive_interval", Some(p)) => {
                    p.persistent_keepalive = parse_num(k, v)?
                }
                ("allowed_ip", Some(p)) => p.allowed_ips.push(v.parse().map_err(invalid)?),
                _ => {}
            }
        }
        Ok(d)
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be used.
    #[error("uapi socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The device refused or answered nonsense.
    #[error("uapi socket {path}: {source}")]
    Protocol {
        /// The socket.
        path: String,
        /// Why.
        source: UapiError,
    },
}

fn exchange(path: &Path, request: &str) -> Result<Vec<String>, ClientError> {
    let p = path.display().to_string();
    let io = |source| ClientError::Io {
        path: p.clone(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(request.as_bytes()).map_err(io)?;
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.map_err(io)?;
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    Ok(lines)
}

/// `get=1` against the socket at `path`.
pub fn get(path: &Path) -> Result<DeviceInfo, ClientError> {
    let lines = exchange(path, "get=1\n\n")?;
    DeviceInfo::parse(lines.iter().map(String::as_str)).map_err(|source| ClientError::Protocol {
        path: path.display().to_string(),
        source,
    })
}

/// `set=1` against the socket at `path`.
pub fn set(path: &Path, update: &DeviceUpdate) -> Result<(), ClientError> {
    let lines = exchange(path, &update.encode())?;
    let errno = lines
        .iter()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|v| v.parse::<i32>().ok());
    match errno {
        Some(0) => Ok(()),
        Some(e) => Err(ClientError::Protocol {
            path: path.display().to_string(),
            source: UapiError {
                errno: e,
                reason: "set refused".into(),
            },
        }),
        None => Err(ClientError::Protocol {
            path: path.display().to_string(),
            source: invalid("no errno in the answer"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips() {
        let mut p = PeerUpdate::new(Key::generate());
        p.endpoint = Some("[fd00::2]:51820".parse().unwrap());
        p.replace_allowed_ips = true;
        p.allowed_ips = vec!["fdaa:0:2::/48".parse().unwrap()];
        p.persistent_keepalive = Some(25);
        let mut gone = PeerUpdate::new(Key::generate());
        gone.remove = true;
        let u = DeviceUpdate {
            private_key: Some(Some(Key::generate())),
            listen_port: Some(51820),
            fwmark: None,
            replace_peers: true,
            peers: vec![p, gone],
        };
        let text = u.encode();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("set=1"));
        assert_eq!(DeviceUpdate::parse(lines).unwrap(), u);
    }

    #[test]
    fn get_round_trips_and_skips_unknown_keys() {
        let d = DeviceInfo {
            private_key: Some(Key::generate()),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: Key::generate(),
                preshared_key: None,
                endpoint: Some("10.0.0.2:51820".parse().unwrap()),
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: 0,
                allowed_ips: vec!["fdaa:0:2::/48".parse().unwrap()],
            }],
        };
        let text = d.encode();
        assert!(text.ends_with("errno=0\n\n"));
        let with_extra = text.replace("listen_port", "own_public_key=00\nlisten_port");
        assert_eq!(DeviceInfo::parse(with_extra.lines()).unwrap(), d);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let e = DeviceUpdate::parse(["listen_port=99999"]).unwrap_err();
        assert!(e.reason.contains("listen_port"), "{e}");
        let e = DeviceUpdate::parse(["public_key=zz"]).unwrap_err();
        assert_eq!(e.errno, libc::EINVAL);
        let k = Key::generate().to_hex();
        let e = DeviceUpdate::parse([format!("public_key={k}").as_str(), "allowed_ip=fdaa::/200"])
            .unwrap_err();
        assert!(e.reason.contains("length above 128"), "{e}");
        assert!(DeviceUpdate::parse(["bogus=1"]).is_err());
    }

    #[test]
    fn prefixes_contain() {
        let p: Prefix = "fdaa:0:2::/48".parse().unwrap();
        assert!(p.contains("fdaa:0:2:0:18::1".parse().unwrap()));
        assert!(!p.contains("fdaa:0:3::1".parse().unwrap()));
        assert!(!p.contains("10.0.0.1".parse().unwrap()));
        let all: Prefix = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        let v4: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(v4.contains("10.1.2.3".parse().unwrap()));
    }
}
