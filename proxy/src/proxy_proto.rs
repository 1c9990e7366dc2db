//! PROXY protocol headers (v1 text, v2 binary) that tell a machine who the
//! client really was. Pure encoders; the haproxy specification is the reference.

use std::net::{IpAddr, SocketAddr};

use skein_catalog::model::ProxyProtoVersion;

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The header for a connection from `client` to `server` (the proxy's own
/// address, as the client saw it).
pub fn header(version: ProxyProtoVersion, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    // Both sides of one family: an IPv4 client seen on an IPv6 socket is mapped.
    let (c, s) = match (client.ip().to_canonical(), server.ip().to_canonical()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => (IpAddr::V4(c), IpAddr::V4(s)),
        (c, s) => (IpAddr::V6(to_v6(c)), IpAddr::V6(to_v6(s))),
    };
    match version {
        ProxyProtoVersion::V1 => {
            let fam = if c.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {c} {s} {} {}\r\n",
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        ProxyProtoVersion::V2 => {
            let mut h = Vec::with_capacity(52);
            h.extend_from_slice(&V2_SIGNATURE);
            h.push(0x21); // version 2, PROXY command
            match (c, s) {
                (IpAddr::V4(c), IpAddr::V4(s)) => {
                    h.push(0x11); // AF_INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&c.octets());
                    h.extend_from_slice(&s.octets());
                }
                (c, s) => {
                    h.push(0x21); // AF_INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&to_v6(c).octets());
                    h.extend_from_slice(&to_v6(s).octets());
                }
            }
            h.extend_from_slice(&client.port().to_be_bytes());
            h.extend_from_slice(&server.port().to_be_bytes());
            h
        }
    }
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = header(
            ProxyProtoVersion::V1,
            "192.0.2.1:5000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n");
        let h = header(
            ProxyProtoVersion::V1,
            "[2001:db8::1]:5000".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n");
    }

    #[test]
    fn v2() {
        let h = header(
            ProxyProtoVersion::V2,
            "192.0.2.1:5000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(&h[24..28], &[0x13, 0x88, 0x01, 0xbb]);
        assert_eq!(h.len(), 28);
        let h = header(
            ProxyProtoVersion::V2,
            "[2001:db8::1]:1".parse().unwrap(),
            "192.0.2.9:2".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 52);
    }

    #[test]
    fn mapped_v4_is_v4() {
        let h = header(
            ProxyProtoVersion::V1,
            "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            "[::ffff:192.0.2.2]:80".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\n");
    }
}
