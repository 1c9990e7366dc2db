//! Checks of one record alone (syntax, ranges, combinations of its own fields).
//! Checks across records (references, uniqueness) live in [`crate::index`].

use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::Problems;
use crate::model::*;

/// A DNS label (RFC 1123): 1 to 63 of `[a-z0-9-]`, not starting or ending in `-`.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("{s:?} must be 1 to 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "{s:?} may hold only lowercase letters, digits and '-'"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{s:?} must not start or end with '-'"));
    }
    Ok(())
}

/// A hostname of two or more labels; `*.` in front when `wildcard` is allowed.
pub fn hostname(s: &str, wildcard: bool) -> Result<(), String> {
    let rest = match s.strip_prefix("*.") {
        Some(r) if wildcard => r,
        Some(_) => return Err(format!("{s:?}: wildcards are not allowed here")),
        None => s,
    };
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    if !rest.contains('.') {
        return Err(format!("{s:?} must have at least two labels"));
    }
    for label in rest.split('.') {
        dns_label(label).map_err(|e| format!("{s:?}: label {e}"))?;
    }
    Ok(())
}

/// True if `name` (exact) is covered by `pattern` (exact or `*.` wildcard of one
/// label, RFC 6125).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((first, rest))) => {
            !first.is_empty() && first != "*" && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

pub(crate) fn region(r: &Region, at: &str, p: &mut Problems) {
    let ok = (2..=8).contains(&r.code.len())
        && r.code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        p.add(
            format!("{at}.code"),
            format!("{:?} must be 2 to 8 lowercase letters or digits", r.code),
        );
    }
    if r.rtt_ms.contains_key(&r.code) {
        p.add(
            format!("{at}.rtt_ms.{}", r.code),
            "a region has no round-trip time to itself",
        );
    }
}

pub(crate) fn host(h: &Host, at: &str, p: &mut Problems) {
    if h.id.0 < skein_sixpn::FIRST_HOST_ID {
        p.add(
            format!("{at}.id"),
            format!("{} is reserved (host ids 0 and 1)", h.id),
        );
    }
    if let Err(e) = dns_label(&h.name) {
        p.add(format!("{at}.name"), e);
    }
    if h.underlay.is_unspecified() || h.underlay.is_multicast() {
        p.add(
            format!("{at}.underlay"),
            format!("{} is not a unicast address", h.underlay),
        );
    }
    if let Some(wg) = &h.wireguard {
        if let Err(e) = wg_key(&wg.public_key) {
            p.add(format!("{at}.wireguard.public_key"), e);
        }
        if wg.port == 0 {
            p.add(format!("{at}.wireguard.port"), "must not be 0");
        }
    }
}

/// A WireGuard key: 32 bytes in standard base64 (44 characters ending in `=`).
pub fn wg_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("a WireGuard key is 32 bytes, this one is {}", bytes.len()))
}

pub(crate) fn network(n: &Network, at: &str, p: &mut Problems) {
    if n.id.0 == 0 {
        p.add(
            format!("{at}.id"),
            "network 0 is reserved (the resolver lives there)",
        );
    }
    if let Err(e) = dns_label(&n.name) {
        p.add(format!("{at}.name"), e);
    }
}

pub(crate) fn app(a: &App, at: &str, p: &mut Problems) {
    if let Err(e) = dns_label(&a.name) {
        p.add(format!("{at}.name"), e);
    }
    for (i, h) in a.hostnames.iter().enumerate() {
        if let Err(e) = hostname(h, true) {
            p.add(format!("{at}.hostnames[{i}]"), e);
        }
    }
    let mut public: Vec<(Protocol, u16, usize)> = Vec::new();
    for (si, s) in a.services.iter().enumerate() {
        let sat = format!("{at}.services[{si}]");
        if s.internal_port == 0 {
            p.add(format!("{sat}.internal_port"), "must not be 0");
        }
        let c = &s.concurrency;
        if c.hard_limit == 0 {
            p.add(
                format!("{sat}.concurrency.hard_limit"),
                "must be at least 1",
            );
        } else if c.hard_limit < c.soft_limit {
            p.add(
                format!("{sat}.concurrency.hard_limit"),
                format!("{} is below soft_limit {}", c.hard_limit, c.soft_limit),
            );
        }
        for (pi, port) in s.ports.iter().enumerate() {
            let pat = format!("{sat}.ports[{pi}]");
            if port.port == 0 {
                p.add(format!("{pat}.port"), "must not be 0");
            }
            if let Some((_, _, other)) = public
                .iter()
                .find(|(pr, n, _)| *pr == s.protocol && *n == port.port)
            {
                p.add(
                    format!("{pat}.port"),
                    format!("{} is already used by services[{other}]", port.port),
                );
            }
            public.push((s.protocol, port.port, si));
            handlers(s, port, &pat, p);
            if c.kind == ConcurrencyKind::Requests && !port.handlers.contains(&Handler::Http) {
                p.add(
                    format!("{sat}.concurrency.type"),
                    format!(
                        "\"requests\" needs the http handler on every port; port {} has none",
                        port.port
                    ),
                );
            }
        }
        for (ci, chk) in s.checks.iter().enumerate() {
            let cat = format!("{sat}.checks[{ci}]");
            if chk.port == Some(0) {
                p.add(format!("{cat}.port"), "must not be 0");
            }
            match (chk.kind, &chk.path) {
                (CheckKind::Http, None) => {
                    p.add(format!("{cat}.path"), "an http check needs a path")
                }
                (CheckKind::Http, Some(path)) if !path.starts_with('/') => p.add(
                    format!("{cat}.path"),
                    format!("{path:?} must start with '/'"),
                ),
                (CheckKind::Tcp, Some(_)) => {
                    p.add(format!("{cat}.path"), "a tcp check has no path")
                }
                _ => {}
            }
            if chk.interval.as_millis() < 100 {
                p.add(format!("{cat}.interval"), "must be at least 100ms");
            }
            if chk.timeout >= chk.interval {
                p.add(
                    format!("{cat}.timeout"),
                    format!(
                        "{} is not shorter than interval {}",
                        humantime::format_duration(chk.timeout),
                        humantime::format_duration(chk.interval)
                    ),
                );
            }
        }
    }
}

fn handlers(s: &Service, port: &Port, at: &str, p: &mut Problems) {
    let hs = &port.handlers;
    for (i, h) in hs.iter().enumerate() {
        if hs[..i].contains(h) {
            p.add(
                format!("{at}.handlers[{i}]"),
                format!("{h:?} is listed twice"),
            );
        }
    }
    let pos = |h: Handler| hs.iter().position(|x| *x == h);
    if s.protocol == Protocol::Udp && !hs.is_empty() {
        p.add(format!("{at}.handlers"), "a udp service takes no handlers");
    }
    if let (Some(t), Some(h)) = (pos(Handler::Tls), pos(Handler::Http))
        && h < t
    {
        p.add(format!("{at}.handlers"), "tls must come before http");
    }
    if pos(Handler::ProxyProto).is_some() && pos(Handler::Http).is_some() {
        p.add(
            format!("{at}.handlers"),
            "proxy_proto passes bytes through and cannot be combined with http",
        );
    }
    if port.force_https && (pos(Handler::Http).is_none() || pos(Handler::Tls).is_some()) {
        p.add(
            format!("{at}.force_https"),
            "needs the http handler without tls",
        );
    }
    if port.proxy_proto_version.is_some() && pos(Handler::ProxyProto).is_none() {
        p.add(
            format!("{at}.proxy_proto_version"),
            "set without the proxy_proto handler",
        );
    }
}

pub(crate) fn machine(m: &Machine, at: &str, p: &mut Problems) {
    let ok = (1..=32).contains(&m.id.len())
        && m.id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        p.add(
            format!("{at}.id"),
            format!("{:?} must be 1 to 32 lowercase letters or digits", m.id),
        );
    }
    let meta = [
        ("pod", &m.metadata.pod),
        ("namespace", &m.metadata.namespace),
        ("process_group", &m.metadata.process_group),
    ];
    for (field, v) in meta {
        if let Some(v) = v
            && let Err(e) = dns_label(v)
        {
            p.add(format!("{at}.metadata.{field}"), e);
        }
    }
    if let Some(ep) = m.endpoint
        && ep.port() == 0
    {
        p.add(format!("{at}.endpoint"), "port must not be 0");
    }
    if let Some(i) = &m.interface {
        let ok = (1..=15).contains(&i.len())
            && i.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
        if !ok {
            p.add(
                format!("{at}.interface"),
                format!(
                    "{i:?} is not an interface name (1 to 15 characters, no '/', ':' or space)"
                ),
            );
        }
    }
}

/// Parses and checks a certificate's PEM; fills in its hostnames from the leaf when
/// none were given.
pub(crate) fn certificate(c: &mut Certificate, at: &str, p: &mut Problems, now: SystemTime) {
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(c.chain_pem.as_bytes()).collect() {
            Ok(v) => v,
            Err(e) => return p.add(format!("{at}.chain_pem"), format!("not PEM: {e}")),
        };
    let Some(leaf) = chain.first() else {
        return p.add(format!("{at}.chain_pem"), "holds no certificate");
    };
    match PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()) {
        Err(e) => p.add(format!("{at}.key_pem"), format!("no private key: {e}")),
        Ok(key) => {
            // The key must be the leaf's: a mismatched pair would fail every
            // handshake that picked it.
            use std::sync::OnceLock;
            static PROVIDER: OnceLock<rustls::crypto::CryptoProvider> = OnceLock::new();
            let provider = PROVIDER.get_or_init(rustls::crypto::aws_lc_rs::default_provider);
            match rustls::sign::CertifiedKey::from_der(chain.clone(), key, provider) {
                Ok(_) => {}
                Err(rustls::Error::InconsistentKeys(_)) => p.add(
                    format!("{at}.key_pem"),
                    "the private key does not match the leaf certificate",
                ),
                Err(e) => p.add(
                    format!("{at}.key_pem"),
                    format!("unusable private key: {e}"),
                ),
            }
        }
    }
    let cert = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => cert,
        Err(e) => return p.add(format!("{at}.chain_pem"), format!("leaf is not X.509: {e}")),
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let validity = cert.validity();
    if validity.not_after.timestamp() <= now {
        p.add(
            format!("{at}.chain_pem"),
            format!("leaf expired at {}", validity.not_after),
        );
    }
    if validity.not_before.timestamp() > now {
        p.add(
            format!("{at}.chain_pem"),
            format!("leaf is not valid before {}", validity.not_before),
        );
    }
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return p.add(
            format!("{at}.chain_pem"),
            "leaf has no DNS subject alternative names",
        );
    }
    if c.hostnames.is_empty() {
        c.hostnames = names;
        return;
    }
    for (i, h) in c.hostnames.iter().enumerate() {
        if let Err(e) = hostname(h, true) {
            p.add(format!("{at}.hostnames[{i}]"), e);
        } else if !names
            .iter()
            .any(|n| n == h || (!h.starts_with("*.") && name_matches(n, h)))
        {
            p.add(
                format!("{at}.hostnames[{i}]"),
                format!(
                    "{h:?} is not covered by the certificate (it names {})",
                    names.join(", ")
                ),
            );
        }
    }
}

pub(crate) fn k8s_service(s: &K8sService, at: &str, p: &mut Problems) {
    if let Err(e) = dns_label(&s.name) {
        p.add(format!("{at}.name"), e);
    }
    if let Err(e) = dns_label(&s.namespace) {
        p.add(format!("{at}.namespace"), e);
    }
    if let Err(e) = hostname(&s.cluster, false) {
        p.add(format!("{at}.cluster"), e);
    }
    match s.kind {
        K8sServiceKind::ClusterIp if s.cluster_ip.is_none() => {
            p.add(format!("{at}.cluster_ip"), "a cluster_ip service needs one")
        }
        K8sServiceKind::Headless | K8sServiceKind::ExternalName if s.cluster_ip.is_some() => p.add(
            format!("{at}.cluster_ip"),
            format!("a {:?} service has none", s.kind),
        ),
        _ => {}
    }
    match (&s.kind, &s.external_name) {
        (K8sServiceKind::ExternalName, None) => p.add(
            format!("{at}.external_name"),
            "an external_name service needs one",
        ),
        (K8sServiceKind::ExternalName, Some(n)) => {
            if let Err(e) = hostname(n.trim_end_matches('.'), false) {
                p.add(format!("{at}.external_name"), e);
            }
        }
        (_, Some(_)) => p.add(
            format!("{at}.external_name"),
            "only an external_name service has one",
        ),
        _ => {}
    }
    for (i, port) in s.ports.iter().enumerate() {
        let pat = format!("{at}.ports[{i}]");
        if port.port == 0 {
            p.add(format!("{pat}.port"), "must not be 0");
        }
        if let Some(name) = &port.name {
            // IANA service name, as Kubernetes requires for named ports.
            let ok = name.len() <= 15
                && dns_label(name).is_ok()
                && name.bytes().any(|b| b.is_ascii_lowercase())
                && !name.contains("--");
            if !ok {
                p.add(
                    format!("{pat}.name"),
                    format!("{name:?} must be at most 15 lowercase letters, digits and single '-', with a letter"),
                );
            }
            if s.ports[..i].iter().any(|o| o.name.as_ref() == Some(name)) {
                p.add(format!("{pat}.name"), format!("{name:?} is used twice"));
            }
        }
        if s.ports[..i]
            .iter()
            .any(|o| o.port == port.port && o.protocol == port.protocol)
        {
            p.add(
                format!("{pat}.port"),
                format!("{}/{:?} is used twice", port.port, port.protocol),
            );
        }
    }
    for (i, ep) in s.endpoints.iter().enumerate() {
        if let Some(h) = &ep.hostname
            && let Err(e) = dns_label(h)
        {
            p.add(format!("{at}.endpoints[{i}].hostname"), e);
        }
        if s.endpoints[..i].iter().any(|o| o.machine == ep.machine) {
            p.add(
                format!("{at}.endpoints[{i}].machine"),
                format!("{:?} is listed twice", ep.machine),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("Example.com", "example.COM"));
    }

    #[test]
    fn hostnames() {
        assert!(hostname("a.example.com", false).is_ok());
        assert!(hostname("*.example.com", true).is_ok());
        assert!(hostname("*.example.com", false).is_err());
        assert!(hostname("localhost", false).is_err());
        assert!(hostname("A.example.com", false).is_err());
        assert!(hostname("-a.example.com", false).is_err());
    }

    #[test]
    fn wg_keys() {
        assert!(wg_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        assert!(wg_key("AAAA").is_err());
        assert!(wg_key("not base64!").is_err());
    }
}
