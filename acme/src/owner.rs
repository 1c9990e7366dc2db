//! Is a hostname the platform's to ask a certificate for?
//!
//! A hostname that a customer once pointed at the platform and then gave up
//! can be added to another customer's app. Ordering for it would hand the
//! second customer a certificate for a name whose DNS its real owner controls
//! now. So before an order the name must show that it is here today: every A
//! and AAAA record it resolves to lies in the platform's prefixes, or
//! `_skein-challenge.<hostname>` has a TXT record `skein-app=<app>` naming the
//! app that asks (for names that point elsewhere, such as behind another CDN).

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::OwnershipConfig;

/// An address prefix (`2a09:8280:1::/48`, `66.241.124.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// Parses `addr/len` (a bare address is a /32 or /128).
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: the length must be 0 to {max}"))?
        };
        Ok(Prefix { addr, len })
    }

    /// True if `ip` lies in it.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(a.to_bits()), u128::from(b.to_bits()), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
            (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
                Some(a) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
                None => return false,
            },
            (IpAddr::V4(_), IpAddr::V6(b)) => match b.to_ipv4_mapped() {
                Some(b) => return self.contains(IpAddr::V4(b)),
                None => return false,
            },
        };
        let len = u32::from(self.len).min(bits);
        if len == 0 {
            return true;
        }
        let shift = bits - len;
        (a >> shift) == (b >> shift)
    }
}

/// Checks hostnames against DNS.
pub struct Owner {
    resolver: TokioResolver,
    platform: Vec<Prefix>,
}

/// What the check saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every address of the name is the platform's.
    Points,
    /// The TXT record names the app.
    Txt,
    /// Neither: why.
    Refused(String),
}

impl Owner {
    /// A checker asking `cfg.resolvers` (the system's resolvers when empty).
    pub fn new(cfg: &OwnershipConfig) -> Result<Owner, String> {
        let platform = cfg
            .platform
            .iter()
            .map(|s| Prefix::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut opts = ResolverOpts::default();
        // Ownership must be judged on what DNS says now, not minutes ago.
        opts.cache_size = 0;
        opts.attempts = 2;
        opts.timeout = Duration::from_secs(3);
        opts.use_hosts_file = ResolveHosts::Never;
        let builder = if cfg.resolvers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("system resolvers: {e}"))?
        } else {
            let servers = cfg
                .resolvers
                .iter()
                .map(|a| {
                    let conn = |mut c: ConnectionConfig| {
                        c.port = a.port();
                        c
                    };
                    NameServerConfig::new(
                        a.ip(),
                        true,
                        vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                    )
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder
            .with_options(opts)
            .build()
            .map_err(|e| format!("resolver: {e}"))?;
        Ok(Owner { resolver, platform })
    }

    /// Judges `hostname` for `app`.
    pub async fn check(&self, hostname: &str, app: &str) -> Verdict {
        let fqdn = format!("{}.", hostname.trim_end_matches('.'));
        let addrs: Vec<IpAddr> = match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => l.iter().collect(),
            Err(_) => Vec::new(),
        };
        if !addrs.is_empty()
            && !self.platform.is_empty()
            && addrs
                .iter()
                .all(|ip| self.platform.iter().any(|p| p.contains(*ip)))
        {
            return Verdict::Points;
        }
        let want = format!("skein-app={app}");
        let txt_name = format!("_skein-challenge.{fqdn}");
        if let Ok(l) = self.resolver.txt_lookup(txt_name.as_str()).await {
            let found = l
                .answers()
                .iter()
                .any(|r| r.data.to_string().trim() == want);
            if found {
                return Verdict::Txt;
            }
        }
        let seen = if addrs.is_empty() {
            "has no A or AAAA record".to_string()
        } else {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            format!(
                "resolves to {}, not all of them the platform's",
                list.join(", ")
            )
        };
        Verdict::Refused(format!(
            "{hostname} {seen}, and {txt_name} has no TXT \"{want}\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p = Prefix::parse("2a09:8280:1::/48").unwrap();
        assert!(p.contains("2a09:8280:1:ffff::1".parse().unwrap()));
        assert!(!p.contains("2a09:8280:2::1".parse().unwrap()));
        assert!(!p.contains("10.0.0.1".parse().unwrap()));
        let p = Prefix::parse("127.0.0.0/8").unwrap();
        assert!(p.contains("127.9.9.9".parse().unwrap()));
        assert!(p.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.contains("128.0.0.1".parse().unwrap()));
        assert!(
            Prefix::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert_eq!(Prefix::parse("10.0.0.1").unwrap().len, 32);
        assert!(Prefix::parse("10.0.0.0/33").is_err());
        assert!(Prefix::parse("nope/8").is_err());
    }
}
