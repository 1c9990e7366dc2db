//! The guard program loaded into the kernel and attached to a real veth: a machine
//! (a network namespace) behind its host (another one) reaches its own network, and
//! its spoofed and foreign packets are dropped and counted by reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use skein_ebpf::Datapath;
use skein_sixpn::{SixPn, policy::Reason};
use skein_testkit::{Netns, require_root, veth};

/// Skips (returns None) where the programs cannot be loaded: not root, or a binary
/// built without them. `cargo xtask test` sets SKEIN_REQUIRE_EBPF so CI fails instead.
fn datapath(test: &str) -> Option<Datapath> {
    if !require_root(test) {
        return None;
    }
    match Datapath::load() {
        Ok(d) => Some(d),
        Err(skein_ebpf::Error::NotBuilt) if std::env::var_os("SKEIN_REQUIRE_EBPF").is_none() => {
            println!("skipped: needs the eBPF object (cargo xtask build-ebpf): {test}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The machine's address.
const OWN: &str = "fdaa:0:18:0:2:0:7:0";
/// An address of another network, on the host's `lo`.
const OTHER_NETWORK: &str = "fdaa:0:19:0:3:0:1:0";

/// A host and a machine behind it on veth (`vm1` on the host, `eth0` in the
/// machine): the machine at [`OWN`], routing 6PN to its gateway `fe80::1`; the
/// host routing the machine's `/112` back and holding [`OTHER_NETWORK`].
fn machine_behind_host(tag: &str) -> (Netns, Netns) {
    let host = Netns::new(&format!("{tag}h"));
    let vm = Netns::new(&format!("{tag}m"));
    veth(&host, "vm1", &vm, "eth0");
    vm.ip(&format!("addr add {OWN}/128 dev eth0 nodad"));
    vm.ip("route add fdaa::/16 via fe80::1 dev eth0");
    host.ip("addr add fe80::1/64 dev vm1 nodad");
    host.ip(&format!("route add {OWN}/112 dev vm1"));
    host.ip(&format!("addr add {OTHER_NETWORK}/128 dev lo"));
    (host, vm)
}

fn count(d: &Datapath, r: Reason) -> u64 {
    d.counters()
        .unwrap()
        .into_iter()
        .find(|(x, _)| *x == r)
        .map(|(_, n)| n)
        .unwrap()
}

#[test]
fn guard_drops_spoofed_and_foreign_packets_and_counts_them() {
    if !skein_testkit::is_root() {
        require_root("guard_drops_spoofed_and_foreign_packets_and_counts_them");
        return;
    }
    let (host, vm) = machine_behind_host("g");
    let me: SixPn = OWN.parse().unwrap();
    // a second address the machine is not allowed to use
    vm.ip("addr add fdaa:0:18:0:2:0:8:0/128 dev eth0 nodad");
    host.ip("route add fdaa:0:18:0:2:0:8:0/112 dev vm1");
    host.ip("addr add fdaa:0:18:0:3:0:1:0/128 dev lo"); // same network, other host
    host.ip("addr add fdaa::3/128 dev lo"); // the resolver

    let own = OWN;
    let spoof = "fdaa:0:18:0:2:0:8:0";
    // without the guard everything gets through
    assert!(vm.ping(own, "fdaa:0:18:0:3:0:1:0"));
    assert!(vm.ping(spoof, "fdaa:0:18:0:3:0:1:0"));
    assert!(vm.ping(own, OTHER_NETWORK));

    let test = "guard_drops_spoofed_and_foreign_packets_and_counts_them";
    let h = std::thread::scope(|s| {
        s.spawn(|| {
            host.enter();
            let mut d = datapath(test)?;
            d.attach_guard("vm1", me).unwrap();
            Some(d)
        })
        .join()
        .unwrap()
    });
    let Some(mut d) = h else { return };
    assert_eq!(d.attached(), vec![("vm1".to_owned(), "guard")]);

    assert!(vm.ping(own, "fdaa:0:18:0:3:0:1:0"), "own network must pass");
    assert!(vm.ping(own, "fdaa::3"), "the resolver must pass");
    assert!(
        !vm.ping(spoof, "fdaa:0:18:0:3:0:1:0"),
        "a spoofed source must be dropped"
    );
    assert!(
        !vm.ping(own, OTHER_NETWORK),
        "another network must be dropped"
    );
    assert!(count(&d, Reason::GuardPass) >= 2);
    assert!(count(&d, Reason::GuardSpoofedSource) >= 1);
    assert!(count(&d, Reason::GuardForeignDestination) >= 1);
    // neighbour discovery kept working (the pings above needed it)
    assert!(count(&d, Reason::GuardLinkLocal) >= 1);

    // an IPv4 packet from the machine is dropped as not_ipv6
    vm.ip("addr add 10.9.0.2/24 dev eth0");
    host.ip("addr add 10.9.0.1/24 dev vm1");
    let v4 = vm.run(&["ping", "-4", "-n", "-c", "1", "-W", "1", "10.9.0.1"]);
    assert!(!v4.status.success());
    assert!(count(&d, Reason::GuardNotIpv6) >= 1);

    // detaching takes it away again
    d.detach_guard("vm1");
    assert!(d.attached().is_empty());
    assert!(vm.ping(spoof, "fdaa:0:18:0:3:0:1:0"));
}

#[test]
fn pinned_guards_outlive_a_datapath_that_did_not_stop_and_the_next_one_takes_over() {
    let test = "pinned_guards_outlive_a_datapath_that_did_not_stop_and_the_next_one_takes_over";
    if !skein_testkit::is_root() {
        require_root(test);
        return;
    }
    let (host, vm) = machine_behind_host("p");
    let me: SixPn = OWN.parse().unwrap();
    let own = OWN;
    assert!(vm.ping(own, OTHER_NETWORK), "open before any guard");

    let fs = skein_testkit::BpfFs::mount("guard-bpf");
    let pins = fs.path().join("host");
    let in_host = |f: &(dyn Fn() -> Option<Vec<String>> + Sync)| {
        std::thread::scope(|s| {
            s.spawn(|| {
                host.enter();
                f()
            })
            .join()
            .unwrap()
        })
    };
    let programs = || {
        in_host(&|| {
            Some(
                skein_ebpf::tcx_programs("vm1")
                    .unwrap()
                    .into_iter()
                    .map(|(d, p)| format!("{d} {p}"))
                    .collect(),
            )
        })
        .unwrap()
    };

    // A datapath pins its guard, then goes without stopping (a start that
    // failed, a panic): the guard stays, pinned.
    let adopted = std::thread::scope(|s| {
        s.spawn(|| {
            host.enter();
            let mut d = datapath(test)?;
            let adopted = d.pin_links(&pins).unwrap();
            d.attach_guard("vm1", me).unwrap();
            drop(d);
            Some(adopted)
        })
        .join()
        .unwrap()
    });
    let Some(adopted) = adopted else { return };
    assert_eq!(adopted, 0);
    assert_eq!(programs(), ["ingress guard"]);
    assert!(pins.join("guard@vm1").exists());
    assert!(!vm.ping(own, OTHER_NETWORK), "the pinned guard still drops");

    // The next one adopts it, replaces it with its own (one guard, not two),
    // and an orderly stop takes everything away.
    let d = std::thread::scope(|s| {
        s.spawn(|| {
            host.enter();
            let mut d = datapath(test).unwrap();
            assert_eq!(d.pin_links(&pins).unwrap(), 1);
            assert_eq!(d.stale_links(), 1);
            d.attach_guard("vm1", me).unwrap();
            assert_eq!(d.stale_links(), 0);
            d
        })
        .join()
        .unwrap()
    });
    assert_eq!(programs(), ["ingress guard"]);
    assert!(!vm.ping(own, OTHER_NETWORK));
    let mut d = d;
    d.detach_all();
    assert!(programs().is_empty());
    assert!(!pins.exists(), "the pin directory is removed");
    assert!(vm.ping(own, OTHER_NETWORK), "open again after a stop");
}
