//! skein's WireGuard device between two network namespaces over a veth underlay:
//! configured through its UAPI socket, it carries IPv6 both ways, `wg show` reads
//! it, and it interoperates with Debian's wireguard-go.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command, time::Duration};

use skein_mesh::{
    Device, DeviceConfig, Key,
    uapi::{self, DeviceUpdate, PeerUpdate},
};
use skein_testkit::{Netns, require_root, veth};

fn underlay() -> (Netns, Netns) {
    let a = Netns::new("da");
    let b = Netns::new("db");
    veth(&a, "ul", &b, "ul");
    a.ip("addr add fd00:77::1/64 dev ul nodad");
    b.ip("addr add fd00:77::2/64 dev ul nodad");
    (a, b)
}

/// The device's data paths run on `rt`, as they do on the daemon's serving
/// threads: `queues` TUN queues and sockets.
fn device_in(
    rt: &tokio::runtime::Runtime,
    queues: usize,
    ns: &Netns,
    name: &str,
    port: u16,
) -> Device {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            Device::create(
                &DeviceConfig {
                    name: name.into(),
                    listen_port: port,
                    uapi_dir: uapi::SOCKET_DIR.into(),
                },
                &vec![rt.handle().clone(); queues],
            )
            .unwrap()
        })
        .join()
        .unwrap()
    })
}

fn configure(sock: &Path, private: Key, peer: Key, endpoint: &str, allowed: &str) {
    let mut p = PeerUpdate::new(peer);
    p.endpoint = Some(endpoint.parse().unwrap());
    p.replace_allowed_ips = true;
    p.allowed_ips = vec![allowed.parse().unwrap()];
    uapi::set(
        sock,
        &DeviceUpdate {
            private_key: Some(Some(private)),
            listen_port: None,
            fwmark: None,
            replace_peers: true,
            peers: vec![p],
        },
    )
    .unwrap();
}

fn up(ns: &Netns, iface: &str, addr: &str) {
    ns.ip(&format!("addr add {addr}/64 dev {iface} nodad"));
    ns.ip(&format!("link set {iface} mtu 1420 up"));
}

fn ping_eventually(ns: &Netns, from: &str, to: &str) -> bool {
    (0..10).any(|_| ns.ping(from, to))
}

#[test]
fn two_devices_carry_ipv6_and_wg_show_reads_them() {
    if !require_root("two_devices_carry_ipv6_and_wg_show_reads_them") {
        return;
    }
    let (a, b) = underlay();
    let (ka, kb) = (Key::generate(), Key::generate());
    let ia = format!("skwa{}", std::process::id() % 10000);
    let ib = format!("skwb{}", std::process::id() % 10000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // a with two queues (IFF_MULTI_QUEUE, two sockets on one port), b with one
    let da = device_in(&rt, 2, &a, &ia, 51820);
    let db = device_in(&rt, 1, &b, &ib, 51820);
    configure(
        da.uapi_path(),
        ka,
        kb.public(),
        "[fd00:77::2]:51820",
        "fd10::2/128",
    );
    configure(
        db.uapi_path(),
        kb,
        ka.public(),
        "[fd00:77::1]:51820",
        "fd10::1/128",
    );
    up(&a, &ia, "fd10::1");
    up(&b, &ib, "fd10::2");
    assert!(
        ping_eventually(&a, "fd10::1", "fd10::2"),
        "a reaches b through the tunnel"
    );
    assert!(b.ping("fd10::2", "fd10::1"), "and back");
    // a's two queues: the kernel spreads flows over them, and each is
    // served (32 flows from 32 ports: every datagram arrives)
    assert_eq!(
        a.run(&["ls", &format!("/sys/class/net/{ia}/queues")])
            .stdout
            .split(|c| c.is_ascii_whitespace())
            .filter(|q| q.starts_with(b"tx-"))
            .count(),
        2,
        "a has two TUN queues"
    );
    let got = std::thread::scope(|sc| {
        let rx = sc
            .spawn(|| {
                b.enter();
                let s = std::net::UdpSocket::bind("[fd10::2]:9999").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s
            })
            .join()
            .unwrap();
        sc.spawn(|| {
            a.enter();
            for k in 0..32u8 {
                let s = std::net::UdpSocket::bind("[fd10::1]:0").unwrap();
                s.send_to(&[k], "[fd10::2]:9999").unwrap();
            }
        })
        .join()
        .unwrap();
        let mut got = std::collections::BTreeSet::new();
        let mut buf = [0u8; 16];
        while got.len() < 32 {
            match rx.recv_from(&mut buf) {
                Ok((1, _)) => {
                    got.insert(buf[0]);
                }
                _ => break,
            }
        }
        got
    });
    assert_eq!(got.len(), 32, "every flow arrived: {got:?}");

    // `wg show` (wireguard-tools) talks to our UAPI socket
    let out = Command::new("wg")
        .args(["show", &ia, "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    let mut lines = dump.lines();
    let dev: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(dev[0], ka.to_base64(), "private key");
    assert_eq!(dev[1], ka.public().to_base64(), "public key");
    assert_eq!(dev[2], "51820");
    let peer: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(peer[0], kb.public().to_base64());
    assert_eq!(peer[2], "[fd00:77::2]:51820");
    assert_eq!(peer[3], "fd10::2/128");
    let handshake: u64 = peer[4].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now - handshake < 60,
        "latest handshake is a wall-clock time: {handshake}"
    );
    assert!(peer[5].parse::<u64>().unwrap() > 0, "rx bytes");

    // a moves to another port: it sends and receives on the new socket, and b,
    // told nothing, follows it (roaming) once a's packets come from there
    uapi::set(
        da.uapi_path(),
        &DeviceUpdate {
            listen_port: Some(51830),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(da.listen_port(), 51830);
    assert!(a.ping("fd10::1", "fd10::2"), "through a's new port");
    let b_sees = uapi::get(db.uapi_path()).unwrap();
    assert_eq!(
        b_sees.peers[0].endpoint,
        Some("[fd00:77::1]:51830".parse().unwrap())
    );
    assert!(b.ping("fd10::2", "fd10::1"), "and b to a's new port");

    // the inner address must be one the peer is allowed to use: narrow b's view
    // of a, and a's packets from fd10::1 are refused
    let mut p = PeerUpdate::new(ka.public());
    p.replace_allowed_ips = true;
    p.allowed_ips = vec!["fd10::99/128".parse().unwrap()];
    let u = DeviceUpdate {
        peers: vec![p],
        ..Default::default()
    };
    uapi::set(db.uapi_path(), &u).unwrap();
    assert!(
        !a.ping("fd10::1", "fd10::2"),
        "cryptokey routing drops a source outside AllowedIPs"
    );

    // removing the peer cuts it
    let mut gone = PeerUpdate::new(kb.public());
    gone.remove = true;
    uapi::set(
        da.uapi_path(),
        &DeviceUpdate {
            peers: vec![gone],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(uapi::get(da.uapi_path()).unwrap().peers.is_empty());
    drop(da);
    drop(db);
    // the interfaces went with the devices (once the runtime has dropped
    // their stopped tasks)
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !a.run(&["ip", "link", "show", &ia]).status.success()
    });
    assert!(gone, "{ia} is removed");
    assert!(!Path::new(&format!("/var/run/wireguard/{ia}.sock")).exists());
}

#[test]
fn interoperates_with_wireguard_go() {
    if !require_root("interoperates_with_wireguard_go") {
        return;
    }
    let (a, b) = underlay();
    let (ka, kb) = (Key::generate(), Key::generate());
    let ia = format!("skia{}", std::process::id() % 10000);
    let ib = format!("skib{}", std::process::id() % 10000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let da = device_in(&rt, 1, &a, &ia, 51820);
    // wireguard-go in b, foreground, its UAPI socket in the shared /var/run/wireguard
    let mut go = b
        .command("wireguard-go")
        .args(["-f", &ib])
        .env("LOG_LEVEL", "error")
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let go_guard = Kill(std::mem::replace(
        &mut go,
        Command::new("true").spawn().unwrap(),
    ));
    let sock = uapi::socket_path(Path::new(uapi::SOCKET_DIR), &ib);
    for _ in 0..50 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    configure(
        da.uapi_path(),
        ka,
        kb.public(),
        "[fd00:77::2]:51820",
        "fd10::2/128",
    );
    let mut p = PeerUpdate::new(ka.public());
    p.endpoint = Some("[fd00:77::1]:51820".parse().unwrap());
    p.allowed_ips = vec!["fd10::1/128".parse().unwrap()];
    uapi::set(
        &sock,
        &DeviceUpdate {
            private_key: Some(Some(kb)),
            listen_port: Some(51820),
            peers: vec![p],
            ..Default::default()
        },
    )
    .unwrap();
    up(&a, &ia, "fd10::1");
    up(&b, &ib, "fd10::2");
    assert!(
        ping_eventually(&a, "fd10::1", "fd10::2"),
        "skein -> wireguard-go"
    );
    assert!(b.ping("fd10::2", "fd10::1"), "wireguard-go -> skein");
    // and wireguard-go's view, read with our client, agrees
    let info = uapi::get(&sock).unwrap();
    assert_eq!(info.public_key(), Some(kb.public()));
    assert!(info.peers[0].last_handshake.is_some());
    drop(go_guard);
    drop(da);
}
