//! The steering program loaded into the kernel and attached to a network
//! namespace: one listening socket takes connections for every address of an
//! anycast prefix on every port, and another every flycast address; nothing is
//! bound per address, and detaching gives the kernel's lookup back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use skein_ebpf::Steer;
use skein_sixpn::policy::{Slot, Steered};
use skein_testkit::{Netns, require_root};

/// A listener on the loopback.
fn listener(at: &str) -> TcpListener {
    TcpListener::bind(at).unwrap()
}

/// Connects to `to`; the listener must accept it and see `to` as its local
/// address (the address the client asked for, not the listener's own).
fn reaches(l: &TcpListener, to: &str) -> bool {
    let to: SocketAddr = to.parse().unwrap();
    let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return false;
    };
    l.set_nonblocking(false).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let local = s.local_addr().unwrap();
    assert_eq!(
        (local.ip().to_canonical(), local.port()),
        (to.ip(), to.port())
    );
    c.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    &b == b"hi"
}

fn count(s: &Steer, what: Steered) -> u64 {
    s.counters()
        .unwrap()
        .into_iter()
        .find(|(x, _)| *x == what)
        .unwrap()
        .1
}

#[test]
fn one_socket_serves_every_anycast_address_and_port_and_one_every_flycast_address() {
    let test = "one_socket_serves_every_anycast_address_and_port_and_one_every_flycast_address";
    if !require_root(test) {
        return;
    }
    let ns = Netns::new("st");
    // The host takes the prefixes in (AnyIP): the kernel delivers them locally.
    ns.ip("route add local 198.51.100.0/24 dev lo");
    ns.ip("-6 route add local 2001:db8:5::/48 dev lo");
    ns.ip("-6 route add local fdaa:0:18:0:1::/80 dev lo");
    ns.ip("-6 route add local fdaa:0:18:0:2::/80 dev lo"); // a host's machines, not flycast
    std::thread::scope(|sc| {
        sc.spawn(|| {
            ns.enter();
            let mut steer = match Steer::load() {
                Ok(s) => s,
                Err(skein_ebpf::Error::NotBuilt)
                    if std::env::var_os("SKEIN_REQUIRE_EBPF").is_none() =>
                {
                    return println!(
                        "skipped: needs the eBPF object (cargo xtask build-ebpf): {test}"
                    );
                }
                Err(e) => panic!("{e}"),
            };
            let (v4, v6) = (listener("127.0.0.1:0"), listener("[::1]:0"));
            // Nothing listens there yet: refused.
            assert!(!reaches(&v4, "198.51.100.7:443"));
            steer.attach().unwrap();
            steer.set_socket(Slot::V4, &v4).unwrap();
            steer.set_socket(Slot::V6, &v6).unwrap();
            steer
                .add_prefix("198.51.100.0/24".parse().unwrap())
                .unwrap();
            steer
                .add_prefix("2001:db8:5::/48".parse().unwrap())
                .unwrap();
            for to in ["198.51.100.7:443", "198.51.100.200:8080"] {
                assert!(reaches(&v4, to), "{to}: {:?}", steer.counters());
            }
            for to in ["[2001:db8:5::1]:443", "[2001:db8:5:ff::9]:25"] {
                assert!(reaches(&v6, to), "{to}: {:?}", steer.counters());
            }
            for to in ["[fdaa:0:18:0:1::10]:80", "[fdaa:0:18:0:1::11]:5432"] {
                assert!(reaches(&v6, to), "{to}");
            }
            // Outside the prefixes: the kernel's own lookup (nothing there).
            assert!(!reaches(&v6, "[fdaa:0:18:0:2::10]:80"));
            assert_eq!(count(&steer, Steered::Anycast), 4);
            assert_eq!(count(&steer, Steered::Flycast), 2);
            // A prefix withdrawn: its addresses are the kernel's again.
            steer.remove_prefix("2001:db8:5::/48".parse().unwrap());
            assert!(!reaches(&v6, "[2001:db8:5::1]:443"));
            assert!(reaches(&v4, "198.51.100.7:443"));
            // An empty slot: counted, and the kernel answers.
            steer.clear_socket(Slot::V6);
            assert!(!reaches(&v6, "[fdaa:0:18:0:1::10]:80"));
            assert_eq!(count(&steer, Steered::NoSocket), 1);
            // Gone with the handle.
            drop(steer);
            assert!(!reaches(&v4, "198.51.100.7:443"));
        })
        .join()
        .unwrap()
    });
}
