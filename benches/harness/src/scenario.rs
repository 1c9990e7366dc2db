//! A scenario file: what load to make, against which targets.
//!
//! ```toml
//! name = "platform-mix"
//! hostnames = 1000            # h0.bench.test .. h999.bench.test
//! domain = "bench.test"
//! zipf = 1.0                  # popularity exponent (0: uniform)
//! duration = "10s"
//! rate = 2000                 # open loop, requests per second; or
//! # connections = 64          # closed loop: this many clients back to back
//! path = "/"
//! [mix]                       # how each request travels
//! keepalive = 0.8             # over a kept connection
//! new_tls = 0.1               # a new connection with a full TLS handshake
//! resumed_tls = 0.1           # a new connection resuming a TLS session
//! h2 = 0.5                    # share of requests over h2 (the rest HTTP/1.1)
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How each request travels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// Over a connection kept open between requests.
    #[serde(default = "one")]
    pub keepalive: f64,
    /// A new connection with a full TLS handshake.
    #[serde(default)]
    pub new_tls: f64,
    /// A new connection resuming an earlier TLS session.
    #[serde(default)]
    pub resumed_tls: f64,
    /// Share of requests over h2 (needs TLS with ALPN).
    #[serde(default)]
    pub h2: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            keepalive: 1.0,
            new_tls: 0.0,
            resumed_tls: 0.0,
            h2: 0.0,
        }
    }
}

/// `[idle]`: `connections` HTTPS/1.1 connections opened and kept, each
/// sending one request every `request_every` (as browsers and API clients
/// hold connections open between requests); the target's memory per
/// connection is measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Idle {
    /// Connections held.
    pub connections: usize,
    /// Time between two requests on one connection.
    #[serde(with = "humantime_serde", default = "default_request_every")]
    pub request_every: Duration,
}

fn default_request_every() -> Duration {
    Duration::from_secs(1)
}

/// A load scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name in the report.
    pub name: String,
    /// How many hostnames: `h<i>.<domain>`.
    #[serde(default = "default_hostnames")]
    pub hostnames: usize,
    /// The domain under which they are.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// One fixed hostname instead (`hostnames` must be 1): an existing app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Zipf exponent of hostname popularity.
    #[serde(default = "one")]
    pub zipf: f64,
    /// How long to load, warm-up included.
    #[serde(with = "humantime_serde", default = "default_duration")]
    pub duration: Duration,
    /// The first part of the run, left out of the summary figures (caches,
    /// connection pools and TLS sessions fill then); still drawn over time.
    #[serde(with = "humantime_serde", default = "default_warmup")]
    pub warmup: Duration,
    /// Open loop: requests per second, sent on schedule whatever the answers do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Closed loop: clients sending back to back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// The request path.
    #[serde(default = "default_path")]
    pub path: String,
    /// How requests travel.
    #[serde(default)]
    pub mix: Mix,
    /// Most requests in flight at once in open loop; beyond it a request is
    /// counted as `overflow` (the target is too slow for the rate).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Seed of the draws.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A DNS scenario instead of HTTP: lookups as pods make them, `rate` a
    /// second, against `udp://` targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsMix>,
    /// Many mostly idle connections instead of a request rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Idle>,
    /// Catalog changes while loading (targets with an admin API only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::churn::Churn>,
}

fn default_hostnames() -> usize {
    1
}
fn default_domain() -> String {
    "bench.test".into()
}
fn default_duration() -> Duration {
    Duration::from_secs(10)
}
fn default_warmup() -> Duration {
    Duration::from_secs(2)
}
fn default_path() -> String {
    "/".into()
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_seed() -> u64 {
    1
}

impl Scenario {
    /// Parses a scenario file, naming the field at fault.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        let p = s.problems();
        if p.is_empty() {
            Ok(s)
        } else {
            Err(p.join("\n"))
        }
    }

    /// What is wrong with it, as `field: reason`.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.hostnames == 0 {
            p.push("hostnames: must be at least 1".to_string());
        }
        if !(0.0..=10.0).contains(&self.zipf) {
            p.push(format!("zipf: {} is outside 0..=10", self.zipf));
        }
        match (self.rate, self.connections) {
            _ if self.idle.as_ref().is_some_and(|i| i.connections == 0) => {
                p.push("idle.connections: must be at least 1".into())
            }
            _ if self.idle.is_some() => {}
            (Some(_), Some(_)) => {
                p.push("rate: give rate (open loop) or connections (closed loop), not both".into())
            }
            (None, None) => {
                p.push("rate: give rate (open loop) or connections (closed loop)".into())
            }
            (Some(r), None) if !(r > 0.0 && r.is_finite()) => {
                p.push(format!("rate: {r} is not a positive number"))
            }
            (None, Some(0)) => p.push("connections: must be at least 1".into()),
            _ => {}
        }
        let m = &self.mix;
        for (f, v) in [
            ("mix.keepalive", m.keepalive),
            ("mix.new_tls", m.new_tls),
            ("mix.resumed_tls", m.resumed_tls),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                p.push(format!("{f}: {v} is not a share (0 or more)"));
            }
        }
        if m.keepalive + m.new_tls + m.resumed_tls <= 0.0 {
            p.push("mix: keepalive, new_tls and resumed_tls are all zero".into());
        }
        if !(0.0..=1.0).contains(&m.h2) {
            p.push(format!("mix.h2: {} is outside 0..=1", m.h2));
        }
        if self.duration.is_zero() {
            p.push("duration: must be above zero".into());
        }
        if self.warmup >= self.duration {
            p.push(format!(
                "warmup: {:?} leaves nothing of duration {:?} to measure",
                self.warmup, self.duration
            ));
        }
        if self.dns.is_some() && self.rate.is_none() {
            p.push("rate: a DNS scenario is open loop: give rate (lookups per second)".into());
        }
        if let Some(c) = &self.churn
            && !(c.rate > 0.0 && c.rate.is_finite())
        {
            p.push(format!("churn.rate: {} is not a positive number", c.rate));
        }
        if self.host.is_some() && self.hostnames != 1 {
            p.push("host: one fixed hostname needs hostnames = 1".to_string());
        }
        if !self.path.starts_with('/') {
            p.push(format!("path: {:?} does not start with /", self.path));
        }
        p
    }

    /// The `i`th hostname.
    pub fn hostname(&self, i: usize) -> String {
        match &self.host {
            Some(h) => h.clone(),
            None => format!("h{i}.{}", self.domain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_parses_and_bad_ones_name_the_field() {
        let s = Scenario::parse(
            "name = \"x\"\nhostnames = 10\nrate = 100\nduration = \"3s\"\n[mix]\nkeepalive = 0.5\nnew_tls = 0.5\nh2 = 0.25\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.hostname(3), "h3.bench.test");
        assert_eq!(s.duration, Duration::from_secs(3));
        let e = Scenario::parse("name = \"x\"\nrate = 1\nconnections = 2\n").unwrap_err();
        assert!(e.contains("rate: give rate"), "{e}");
        let e =
            Scenario::parse("name = \"x\"\nrate = 1\n[mix]\nkeepalive = 0\nh2 = 2\n").unwrap_err();
        assert!(e.contains("mix: keepalive") && e.contains("mix.h2"), "{e}");
        let e = Scenario::parse("name = \"x\"\nrate = 1\nzipff = 1\n").unwrap_err();
        assert!(e.contains("zipff"), "{e}");
        // One fixed hostname: an existing app's.
        let s = Scenario::parse("name = \"x\"\nrate = 1\nhost = \"web.example.com\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.hostname(0), "web.example.com");
        let e =
            Scenario::parse("name = \"x\"\nrate = 1\nhost = \"a.b\"\nhostnames = 5\n").unwrap_err();
        assert!(e.contains("host: one fixed hostname"), "{e}");
    }
}
