//! A patch to one source's machines gives exactly the catalog a full build of
//! the same documents gives, or says it cannot: checked on random sequences of
//! the changes workers publish (health flips, new machines, moves, explicit
//! addresses, removals, and bad records that must be refused).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use skein_catalog::error::parse_toml;
use skein_catalog::index::{build, patch_machines};
use skein_catalog::model::*;
use skein_catalog::sixpn::{HostId, MachineSlot, NetId, SixPn};
use skein_catalog::{Catalog, Document, MachinePatch, Source};

const PLATFORM: &str = r#"
regions = [{ code = "ams", rtt_ms = { iad = 80 } }, { code = "iad" }]
hosts = [
  { id = "0:2", name = "h2", region = "ams", underlay = "10.0.0.2" },
  { id = "0:3", name = "h3", region = "iad", underlay = "10.0.0.3" },
  { id = "0:4", name = "edge", region = "ams", underlay = "10.0.0.4", role = "edge" },
]
networks = [{ id = "0:18", name = "n1" }, { id = "0:19", name = "n2" }]
apps = [{ name = "a", network = "n1" }, { name = "b", network = "n2" }]

[[k8s_services]]
name = "pg"
namespace = "data"
network = "n1"
type = "headless"
endpoints = [{ machine = "k0" }]
"#;

fn machine(id: &str, app: &str, host: u32) -> Machine {
    Machine {
        id: id.into(),
        app: app.into(),
        region: if host == 3 { "iad" } else { "ams" }.into(),
        host: HostId(host),
        state: MachineState::Started,
        health: Health::Unknown,
        metadata: MachineMeta::default(),
        address: None,
        endpoint: None,
        interface: None,
    }
}

/// The change `(op, i, x)` makes to the machines of `doc`.
fn change(doc: &Document, op: u8, i: u8, x: u8) -> MachinePatch {
    let ms = &doc.machines;
    let pick = || ms.get(usize::from(i) % ms.len().max(1)).cloned();
    let mut p = MachinePatch::default();
    match op % 8 {
        0 => {
            if let Some(mut m) = pick() {
                m.health = if m.health == Health::Critical {
                    Health::Passing
                } else {
                    Health::Critical
                };
                p.puts.push(m);
            }
        }
        1 => p.puts.push(machine(
            &format!("n{i}"),
            if x.is_multiple_of(2) { "a" } else { "b" },
            2 + u32::from(x % 2),
        )),
        2 => {
            if let Some(m) = pick() {
                let host = if m.host.0 == 2 { 3 } else { 2 };
                p.puts.push(Machine {
                    address: None,
                    ..machine(&m.id, &m.app, host)
                });
            }
        }
        3 => {
            if let Some(mut m) = pick() {
                let net = if m.app == "a" { 0x18 } else { 0x19 };
                m.address = Some(SixPn::new(
                    NetId(net),
                    m.host,
                    MachineSlot(u32::from(x % 5)),
                ));
                p.puts.push(m);
            }
        }
        4 => {
            if let Some(m) = pick() {
                p.deletes.push(m.id);
            }
        }
        5 => p.puts.push(machine(&format!("u{i}"), "nobody", 2)),
        6 => p.puts.push(machine(&format!("e{i}"), "a", 4)),
        _ => {
            // Two at once, and the Kubernetes endpoint now and then.
            for m in ms.iter().take(2) {
                let mut m = m.clone();
                m.state = MachineState::Stopped;
                p.puts.push(m);
            }
            if x.is_multiple_of(3) {
                p.puts.push(machine("k0", "a", 2));
            }
        }
    }
    p
}

fn applied(doc: &Document, p: &MachinePatch) -> Document {
    let mut d = doc.clone();
    d.machines
        .retain(|m| !p.deletes.contains(&m.id) && !p.puts.iter().any(|n| n.id == m.id));
    d.machines.extend(p.puts.iter().cloned());
    d
}

fn full(platform: &Document, api: &Document, prev: &Catalog) -> Result<Catalog, String> {
    build(&[(Source::File, platform), (Source::Api, api)], prev).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn a_patch_agrees_with_a_full_build(ops in prop::collection::vec((0u8..8, 0u8..16, 0u8..16), 1..24)) {
        let platform: Document = parse_toml(PLATFORM).unwrap();
        let mut api = Document {
            machines: (0..6)
                .map(|i| machine(&format!("m{i}"), if i % 2 == 0 { "a" } else { "b" }, 2 + i % 2))
                .chain([machine("k0", "a", 2)])
                .collect(),
            ..Default::default()
        };
        let mut cat = full(&platform, &api, &Catalog::default()).unwrap();
        let mut patched = 0;
        for (op, i, x) in ops {
            let p = change(&api, op, i, x);
            if p.is_empty() {
                continue;
            }
            let next = applied(&api, &p);
            let want = full(&platform, &next, &cat);
            match patch_machines(&cat, Source::Api, &p) {
                None => {}
                Some(Err(e)) => prop_assert!(want.is_err(), "patch refused ({e}), full build took it"),
                Some(Ok(got)) => {
                    patched += 1;
                    let want = want.as_ref().map_err(|e| TestCaseError::fail(format!("patch took what a full build refuses: {e}")))?;
                    prop_assert_eq!(&got.machines, &want.machines);
                    prop_assert_eq!(&got.owners, &want.owners);
                }
            }
            if let Ok(c) = want {
                cat = c;
                api = next;
            }
        }
        // (most sequences take the patch path at least once)
        let _ = patched;
    }
}

#[test]
fn a_patch_names_the_record_it_refuses() {
    let platform: Document = parse_toml(PLATFORM).unwrap();
    let api = Document {
        machines: vec![machine("m0", "a", 2), machine("k0", "a", 2)],
        ..Default::default()
    };
    let cat = full(&platform, &api, &Catalog::default()).unwrap();
    let p = MachinePatch {
        puts: vec![machine("m1", "nobody", 4)],
        deletes: vec![],
    };
    let e = patch_machines(&cat, Source::Api, &p).unwrap().unwrap_err();
    let text: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("machines[\"m1\"].app") && t.contains("unknown app")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.starts_with("machines[\"m1\"].host") && t.contains("is an edge")),
        "{text:?}"
    );
    // A health flip is patched: same address, new health.
    let mut m0 = (*cat.machines["m0"]).clone();
    m0.health = Health::Critical;
    let flip = MachinePatch {
        puts: vec![Machine {
            address: None,
            ..m0
        }],
        deletes: vec![],
    };
    let got = patch_machines(&cat, Source::Api, &flip).unwrap().unwrap();
    assert_eq!(got.machines["m0"].health, Health::Critical);
    assert_eq!(got.machines["m0"].address, cat.machines["m0"].address);
    assert!(std::sync::Arc::ptr_eq(
        &got.machines["k0"],
        &cat.machines["k0"]
    ));
    // A Kubernetes endpoint's machine goes: only a full build checks that.
    let gone = MachinePatch {
        puts: vec![],
        deletes: vec!["k0".into()],
    };
    assert!(patch_machines(&cat, Source::Api, &gone).is_none());
    // A file's records have positions, not keys: only a full build names them.
    assert!(patch_machines(&cat, Source::File, &p).is_none());
}
