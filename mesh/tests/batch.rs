//! Batched UDP on real sockets: what an outbox sends (GSO runs and single
//! datagrams, two receivers) arrives whole, in order, from the right sender.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::time::Duration;

use skein_mesh::batch::{Inbox, Outbox};

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn receive_all(inbox: &mut Inbox, sock: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        let k = inbox.recv(sock).unwrap();
        for i in 0..k {
            let (d, from) = inbox.get(i).unwrap();
            assert!(from.ip().is_loopback());
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
    assert_eq!(out.flush(&tx), 0, "nothing failed");
    assert!(out.is_empty());
    let mut ia = Inbox::new(65536);
    let mut ib = Inbox::new(65536);
    assert_eq!(receive_all(&mut ia, &a, want_a.len()), want_a);
    assert_eq!(receive_all(&mut ib, &b, want_b.len()), want_b);
}
