//! Certificates from an ACME CA (RFC 8555) for every hostname the platform
//! terminates TLS for.
//!
//! One [`manager::Manager`] runs on a host. It reads the live catalog: every
//! hostname of an app with a `tls` port needs a certificate; one that no
//! imported certificate covers and that has no issued certificate, or whose
//! issued certificate ends within `renew_before`, is due. For each due name,
//! bounded in number and in rate, it checks that the name is the platform's
//! to ask for ([`owner`]), orders a certificate with the account this host
//! keeps ([`account`]), answers the CA's challenge through the proxy's own
//! listeners (`skein_proxy::acme::Challenges`: TLS-ALPN-01 on the TLS port,
//! HTTP-01 on plain HTTP), and writes the chain and key into the catalog as
//! an `issued` certificate, where every edge's proxy picks it up live. A
//! failure is retried with exponential backoff and jitter; what each name is
//! doing is in [`status::AcmeStatus`] (the admin API's `/v1/acme`).

pub mod account;
pub mod manager;
pub mod owner;
pub mod plan;
pub mod shared;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use manager::{Manager, Sink};
pub use status::AcmeStatus;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// A challenge type skein can answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChallengeKind {
    /// RFC 8737: a handshake on the TLS port with ALPN `acme-tls/1`.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// RFC 8555 8.3: a file under `/.well-known/acme-challenge/` on plain HTTP.
    #[serde(rename = "http-01")]
    Http01,
}

impl ChallengeKind {
    /// The name the CA uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
}

/// `[acme]` in the daemon's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Order certificates.
    #[serde(default)]
    pub enabled: bool,
    /// The CA's directory URL.
    #[serde(default = "default_directory")]
    pub directory: String,
    /// A PEM file of the CA certificate that the ACME server's own HTTPS
    /// certificate chains to, for a private or test CA; the system's roots
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// Challenge types in order of preference; after a failure the next one
    /// is tried.
    #[serde(default = "default_challenges")]
    pub challenges: Vec<ChallengeKind>,
    /// Renew an issued certificate when less than this is left.
    #[serde(default = "default_renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    /// Orders in flight at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// At most this many new orders per `rate_window` (Let's Encrypt allows
    /// 300 new orders per account per 3 hours).
    #[serde(default = "default_max_orders")]
    pub max_orders: u32,
    /// The window of `max_orders`.
    #[serde(default = "default_rate_window", with = "humantime_serde")]
    pub rate_window: Duration,
    /// First wait after a failed order; it doubles with each failure.
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest wait between two attempts for one name.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Time for one order, from the request to the certificate.
    #[serde(default = "default_order_timeout", with = "humantime_serde")]
    pub order_timeout: Duration,
    /// With etcd: how long the other edges get to take a challenge answer
    /// before the CA is told to validate (any edge may take the validation).
    #[serde(default = "default_share_wait", with = "humantime_serde")]
    pub share_wait: Duration,
    /// How often the catalog is looked over when nothing changes (renewals).
    #[serde(default = "default_scan_interval", with = "humantime_serde")]
    pub scan_interval: Duration,
    /// Who may get a certificate.
    #[serde(default)]
    pub ownership: OwnershipConfig,
}

/// `[acme.ownership]`: a hostname is ordered only when it is the platform's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnershipConfig {
    /// Check before ordering. Turn off only where every hostname in the
    /// catalog is trusted.
    #[serde(default = "yes")]
    pub check: bool,
    /// The platform's public address prefixes (`2a09:8280:1::/48`,
    /// `66.241.124.0/24`): a hostname whose A or AAAA records all lie in them
    /// passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platform: Vec<String>,
    /// Resolvers to ask (`ip:port`); the system's otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolvers: Vec<SocketAddr>,
}

fn yes() -> bool {
    true
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            check: true,
            platform: Vec::new(),
            resolvers: Vec::new(),
        }
    }
}

fn default_directory() -> String {
    LETS_ENCRYPT.into()
}
fn default_challenges() -> Vec<ChallengeKind> {
    vec![ChallengeKind::TlsAlpn01, ChallengeKind::Http01]
}
fn default_renew_before() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_max_in_flight() -> usize {
    8
}
fn default_max_orders() -> u32 {
    300
}
fn default_rate_window() -> Duration {
    Duration::from_secs(3 * 3600)
}
fn default_retry_min() -> Duration {
    Duration::from_secs(60)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_order_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_share_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_scan_interval() -> Duration {
    Duration::from_secs(3600)
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            enabled: false,
            directory: default_directory(),
            ca_file: None,
            contact: Vec::new(),
            challenges: default_challenges(),
            renew_before: default_renew_before(),
            max_in_flight: default_max_in_flight(),
            max_orders: default_max_orders(),
            rate_window: default_rate_window(),
            retry_min: default_retry_min(),
            retry_max: default_retry_max(),
            order_timeout: default_order_timeout(),
            share_wait: default_share_wait(),
            scan_interval: default_scan_interval(),
            ownership: OwnershipConfig::default(),
        }
    }
}

impl AcmeConfig {
    /// What is wrong with it, as (field under `acme.`, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |f: &str, why: String| p.push((f.to_string(), why));
        if !(self.directory.starts_with("https://") || self.directory.starts_with("http://")) {
            bad(
                "directory",
                format!("{:?} is not an http(s) URL", self.directory),
            );
        }
        if let Some(f) = &self.ca_file
            && !f.is_file()
        {
            bad("ca_file", format!("{} is not a file", f.display()));
        }
        for (i, c) in self.contact.iter().enumerate() {
            if !c.contains(':') {
                bad(
                    &format!("contact[{i}]"),
                    format!("{c:?} is not a URL (mailto:…)"),
                );
            }
        }
        if self.challenges.is_empty() {
            bad("challenges", "names no challenge type".into());
        }
        if self.max_in_flight == 0 {
            bad("max_in_flight", "must be at least 1".into());
        }
        if self.max_orders == 0 {
            bad("max_orders", "must be at least 1".into());
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            bad(
                "retry_min",
                "must be above zero and at most retry_max".into(),
            );
        }
        if self.order_timeout.is_zero() {
            bad("order_timeout", "must be above zero".into());
        }
        for (i, s) in self.ownership.platform.iter().enumerate() {
            if let Err(e) = owner::Prefix::parse(s) {
                bad(&format!("ownership.platform[{i}]"), e);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_problems_name_the_field() {
        let c = AcmeConfig {
            directory: "ftp://x".into(),
            challenges: vec![],
            ownership: OwnershipConfig {
                platform: vec!["10.0.0.0/33".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["directory", "challenges", "ownership.platform[0]"]);
        assert!(AcmeConfig::default().problems().is_empty());
    }
}
