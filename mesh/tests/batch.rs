//! Batched UDP on real sockets: what an outbox sends (GSO runs and single
//! datagrams, two receivers) arrives whole, in order, from the right sender.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::time::Duration;

use skein_mesh::batch::{Inbox, Outbox};
use skein_testkit::{Netns, require_root, veth};

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn receive_all(
    inbox: &mut Inbox,
    sock: &UdpSocket,
    n: usize,
    sender: std::net::SocketAddr,
) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        let k = inbox.recv(sock).unwrap();
        for i in 0..k {
            let (d, from) = inbox.get(i).unwrap();
            assert_eq!(from, sender);
            got.push(d.to_vec());
        }
    }
    got
}

#[test]
fn an_outbox_delivers_every_datagram_in_order_to_its_receiver() {
    let (tx, a, b) = (socket(), socket(), socket());
    let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let mut out = Outbox::new(2048);
    // To a: five of 1,200 bytes and a shorter last one (one GSO send); to b:
    // two of different sizes (no GSO run); then a again.
    let mut want_a = Vec::new();
    let mut want_b = Vec::new();
    let plan: Vec<(usize, bool)> = vec![
        (1200, true),
        (1200, true),
        (1200, true),
        (1200, true),
        (1200, true),
        (300, true),
        (100, false),
        (900, false),
        (64, true),
    ];
    for (i, (len, for_a)) in plan.into_iter().enumerate() {
        let buf = out.next_buf();
        // Written at an offset, as the cipher does after its header room.
        let start = 16;
        let d: Vec<u8> = (0..len).map(|k| (i * 31 + k) as u8).collect();
        buf[start..start + len].copy_from_slice(&d);
        out.commit(start, len, if for_a { to_a } else { to_b });
        if for_a {
            want_a.push(d);
        } else {
            want_b.push(d);
        }
    }
    let flushed = out.flush(&tx);
    assert_eq!(flushed.failed, 0, "nothing failed");
    assert!(!flushed.blocked);
    assert!(out.is_empty());
    let mut ia = Inbox::new(65536);
    let mut ib = Inbox::new(65536);
    assert_eq!(
        receive_all(&mut ia, &a, want_a.len(), tx.local_addr().unwrap()),
        want_a
    );
    assert_eq!(
        receive_all(&mut ib, &b, want_b.len(), tx.local_addr().unwrap()),
        want_b
    );
}

/// A non-blocking socket whose buffer is full (its datagrams wait in a slow
/// link's queue) takes part of a batch: the rest stays in the outbox, in
/// order, and goes once the socket is writable again. Nothing is lost.
#[test]
fn a_full_socket_buffer_keeps_the_rest_for_the_next_flush() {
    if !require_root("a_full_socket_buffer_keeps_the_rest_for_the_next_flush") {
        return;
    }
    let (a, b) = (Netns::new("bqa"), Netns::new("bqb"));
    veth(&a, "q", &b, "q");
    a.ip("addr add fd00:78::1/64 dev q nodad");
    b.ip("addr add fd00:78::2/64 dev q nodad");
    // 2 Mbit/s: a 1,200-byte datagram leaves every 5 ms, holding the
    // sender's buffer while it waits
    let tc = a.run(&[
        "tc", "qdisc", "add", "dev", "q", "root", "tbf", "rate", "2mbit", "burst", "1600", "limit",
        "1000000",
    ]);
    assert!(
        tc.status.success(),
        "{}",
        String::from_utf8_lossy(&tc.stderr)
    );
    let (tx, rx) = std::thread::scope(|s| {
        let tx = s
            .spawn(|| {
                a.enter();
                let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)
                    .unwrap();
                s.set_send_buffer_size(4096).unwrap();
                s.set_nonblocking(true).unwrap();
                s.bind(
                    &"[fd00:78::1]:0"
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
                UdpSocket::from(s)
            })
            .join()
            .unwrap();
        let rx = s
            .spawn(|| {
                b.enter();
                let s = UdpSocket::bind("[fd00:78::2]:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .join()
            .unwrap();
        (tx, rx)
    });
    let to = rx.local_addr().unwrap();
    let mut out = Outbox::new(2048);
    let mut want = Vec::new();
    for i in 0..32u8 {
        // sizes differ, so no GSO run: one datagram per message
        let d: Vec<u8> = vec![i; 1000 + usize::from(i)];
        out.next_buf()[..d.len()].copy_from_slice(&d);
        out.commit(0, d.len(), to);
        want.push(d);
    }
    let first = out.flush(&tx);
    assert!(first.blocked, "the buffer filled");
    assert_eq!(first.failed, 0);
    let left = out.len();
    assert!(left > 0 && left < 32, "part went, {left} wait");
    let mut flushes = 1;
    while !out.is_empty() {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&tx),
            nix::poll::PollFlags::POLLOUT,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        let f = out.flush(&tx);
        assert_eq!(f.failed, 0);
        flushes += 1;
    }
    assert!(flushes > 2, "it took several flushes: {flushes}");
    let mut ib = Inbox::new(65536);
    assert_eq!(
        receive_all(&mut ib, &rx, want.len(), tx.local_addr().unwrap()),
        want
    );
}
