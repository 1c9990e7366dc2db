//! Choosing a machine: only routable machines are in the table; of those, the
//! closest (by round-trip time) that is under its soft limit, the least loaded
//! first among equally close ones; else the least loaded under its hard limit;
//! else none (the caller queues). Pure apart from the atomic counters, so it is
//! tested without sockets.

use std::sync::atomic::Ordering;

use crate::load::Slot;
use crate::table::{Backend, RouteTable, ServiceRoute};

/// What the client asked for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prefs<'a> {
    /// Only this machine (a forced-instance header).
    pub machine: Option<&'a str>,
    /// Measure closeness from this region instead of the edge's.
    pub region: Option<&'a str>,
    /// Only machines in this region (a replay to a region).
    pub only_region: Option<&'a str>,
}

/// The outcome of a choice.
#[derive(Debug)]
pub enum Pick<'a> {
    /// This machine, with a slot held.
    Chosen(&'a Backend, Slot),
    /// Every candidate is at its hard limit.
    Full,
    /// No machine can take it (none running, or the forced one is unknown).
    Unavailable,
}

/// Chooses a machine of `svc`, skipping those in `exclude` (already tried).
pub fn pick<'a>(
    svc: &'a ServiceRoute,
    table: &RouteTable,
    prefs: Prefs<'_>,
    exclude: &[&str],
) -> Pick<'a> {
    // A machine failing its active checks is out until it passes again.
    let usable = |b: &&Backend| {
        !exclude.contains(&&*b.machine)
            && !b.load.is_failing_checks()
            && prefs.only_region.is_none_or(|r| r == &*b.region)
    };
    if let Some(id) = prefs.machine {
        return match svc
            .backends
            .iter()
            .filter(usable)
            .find(|b| &*b.machine == id)
        {
            Some(b) => match b.load.try_acquire(svc.hard) {
                Some(slot) => Pick::Chosen(b, slot),
                None => Pick::Full,
            },
            None => Pick::Unavailable,
        };
    }
    // Ejected machines are skipped while others remain.
    let any_healthy = svc
        .backends
        .iter()
        .filter(usable)
        .any(|b| !b.load.is_ejected());
    let candidate = |b: &&Backend| usable(b) && (!any_healthy || !b.load.is_ejected());
    let rtt = |b: &Backend| match prefs.region {
        Some(r) => table.rtt(r, &b.region),
        None => b.rtt_ms,
    };
    let start = svc.rr.fetch_add(1, Ordering::Relaxed);
    let n = svc.backends.len();
    // Closest under the soft limit; least loaded among equals, rotating ties.
    let mut best: Option<(&Backend, u32, u32)> = None;
    for i in 0..n {
        let b = &svc.backends[(start + i) % n];
        if !candidate(&b) {
            continue;
        }
        let load = b.load.inflight();
        if load >= svc.soft {
            continue;
        }
        let key = (rtt(b), load);
        if best.is_none_or(|(_, r, l)| key < (r, l)) {
            best = Some((b, key.0, key.1));
        }
    }
    if let Some((b, _, _)) = best
        && let Some(slot) = b.load.try_acquire(svc.hard)
    {
        return Pick::Chosen(b, slot);
    }
    // Least loaded under the hard limit, closest among equals.
    let mut best: Option<(&Backend, u32, u32)> = None;
    let mut seen = false;
    for i in 0..n {
        let b = &svc.backends[(start + i) % n];
        if !candidate(&b) {
            continue;
        }
        seen = true;
        let key = (b.load.inflight(), rtt(b));
        if key.0 < svc.hard && best.is_none_or(|(_, l, r)| key < (l, r)) {
            best = Some((b, key.0, key.1));
        }
    }
    match best {
        Some((b, _, _)) => match b.load.try_acquire(svc.hard) {
            Some(slot) => Pick::Chosen(b, slot),
            None => Pick::Full,
        },
        None if seen => Pick::Full,
        None => Pick::Unavailable,
    }
}

/// Why no machine could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No machine runs (or the forced one is unknown); with exclusions: every
    /// machine left was tried.
    Unavailable,
    /// All were full until the queue deadline.
    Capacity,
    /// Too many were already waiting.
    QueueFull,
}

/// How long a request may wait in a service's queue, counted from the first
/// time it has to: a request that never waits never reads the clock for it.
#[derive(Debug, Clone, Copy)]
pub struct QueueDeadline {
    wait: std::time::Duration,
    at: Option<std::time::Instant>,
}

impl QueueDeadline {
    /// At most `wait` in the queue, across every machine the request tries.
    pub fn new(wait: std::time::Duration) -> Self {
        QueueDeadline { wait, at: None }
    }

    fn at(&mut self) -> std::time::Instant {
        *self
            .at
            .get_or_insert_with(|| std::time::Instant::now() + self.wait)
    }
}

/// Chooses a machine, waiting in the service's bounded queue while all are at
/// their hard limit, until `deadline`.
pub async fn acquire<'a>(
    svc: &'a ServiceRoute,
    table: &RouteTable,
    prefs: Prefs<'_>,
    exclude: &[&str],
    deadline: &mut QueueDeadline,
    queue_depth: usize,
) -> Result<(&'a Backend, Slot), Refusal> {
    loop {
        match pick(svc, table, prefs, exclude) {
            Pick::Chosen(b, s) => return Ok((b, s)),
            Pick::Unavailable => return Err(Refusal::Unavailable),
            Pick::Full => {
                let q = &svc.queue;
                if q.waiting.load(Ordering::Relaxed) as usize >= queue_depth {
                    return Err(Refusal::QueueFull);
                }
                q.waiting.fetch_add(1, Ordering::Relaxed);
                q.depth.increment(1.0);
                let until = deadline.at();
                let waited = tokio::time::timeout_at(until.into(), q.freed.notified()).await;
                q.waiting.fetch_sub(1, Ordering::Relaxed);
                q.depth.decrement(1.0);
                if waited.is_err() {
                    return Err(Refusal::Capacity);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use skein_catalog::error::parse_toml;
    use skein_catalog::{Source, Store};

    use super::*;
    use crate::load::Loads;

    /// Two machines in ams, one in iad, one in syd; soft 2, hard 3.
    fn table(loads: &Loads) -> RouteTable {
        let doc = parse_toml(
            r#"
            regions = [{ code = "ams", rtt_ms = { iad = 80, syd = 250 } }, { code = "iad", rtt_ms = { syd = 200 } }, { code = "syd" }]
            hosts = [
              { id = "0:2", name = "h-ams", region = "ams", underlay = "10.0.0.2" },
              { id = "0:3", name = "h-iad", region = "iad", underlay = "10.0.0.3" },
              { id = "0:4", name = "h-syd", region = "syd", underlay = "10.0.0.4" },
            ]
            networks = [{ id = "18", name = "n" }]
            [[apps]]
            name = "a"
            network = "n"
            hostnames = ["a.example.com", "*.a.example.com"]
            services = [{ internal_port = 80, concurrency = { soft_limit = 2, hard_limit = 3 }, ports = [{ port = 443, handlers = ["tls", "http"] }] }]
            [[machines]]
            id = "ams1"
            app = "a"
            region = "ams"
            host = "0:2"
            state = "started"
            [[machines]]
            id = "ams2"
            app = "a"
            region = "ams"
            host = "0:2"
            state = "started"
            [[machines]]
            id = "iad1"
            app = "a"
            region = "iad"
            host = "0:3"
            state = "started"
            [[machines]]
            id = "syd1"
            app = "a"
            region = "syd"
            host = "0:4"
            state = "started"
            [[machines]]
            id = "down"
            app = "a"
            region = "ams"
            host = "0:2"
            state = "started"
            health = "critical"
        "#,
        )
        .unwrap();
        let store = Store::new();
        store.replace(Source::File, doc).unwrap();
        RouteTable::build(
            &store.snapshot(),
            &crate::table::Locality::region("ams"),
            loads,
        )
    }

    fn chosen(p: Pick<'_>) -> (String, Slot) {
        match p {
            Pick::Chosen(b, s) => (b.machine.to_string(), s),
            other => panic!("expected a machine, got {other:?}"),
        }
    }

    #[test]
    fn fills_the_closest_region_to_its_soft_limit_then_spills() {
        let loads = Loads::default();
        let t = table(&loads);
        let svc = &t.app("a.example.com").unwrap().services[0];
        assert_eq!(
            svc.backends.len(),
            4,
            "the critical machine is not routable"
        );
        let mut held = Vec::new();
        // 2 machines x soft 2 in ams first, spread evenly.
        for _ in 0..4 {
            let (m, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
            assert!(m.starts_with("ams"), "{m}");
            held.push(s);
        }
        assert_eq!(
            svc.backends
                .iter()
                .filter(|b| b.load.inflight() == 2)
                .count(),
            2
        );
        // ams is at soft: the next region by RTT.
        let (m, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
        assert_eq!(m, "iad1");
        held.push(s);
        let (m, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
        assert_eq!(m, "iad1");
        held.push(s);
        let (m, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
        assert_eq!(m, "syd1");
        held.push(s);
        let (_, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
        held.push(s);
        // Everyone at soft: least loaded under hard, the closest first.
        let (m, s) = chosen(pick(svc, &t, Prefs::default(), &[]));
        assert!(m.starts_with("ams"), "{m}");
        held.push(s);
        while let Pick::Chosen(_, s) = pick(svc, &t, Prefs::default(), &[]) {
            held.push(s);
        }
        assert_eq!(held.len(), 12, "4 machines x hard 3");
        assert!(matches!(pick(svc, &t, Prefs::default(), &[]), Pick::Full));
        held.pop();
        assert!(matches!(
            pick(svc, &t, Prefs::default(), &[]),
            Pick::Chosen(..)
        ));
    }

    #[test]
    fn client_hints_and_exclusions() {
        let loads = Loads::default();
        let t = table(&loads);
        let svc = &t.app("x.a.example.com").expect("wildcard").services[0];
        let prefs = Prefs {
            region: Some("syd"),
            ..Default::default()
        };
        assert_eq!(chosen(pick(svc, &t, prefs, &[])).0, "syd1");
        let prefs = Prefs {
            machine: Some("iad1"),
            ..Default::default()
        };
        assert_eq!(chosen(pick(svc, &t, prefs, &[])).0, "iad1");
        let prefs = Prefs {
            machine: Some("nope"),
            ..Default::default()
        };
        assert!(matches!(pick(svc, &t, prefs, &[]), Pick::Unavailable));
        assert_eq!(
            chosen(pick(svc, &t, Prefs::default(), &["ams1", "ams2"])).0,
            "iad1"
        );
    }

    #[test]
    fn ejected_machines_are_skipped_while_others_remain() {
        let loads = Loads::default();
        let t = table(&loads);
        let svc = &t.app("a.example.com").unwrap().services[0];
        for b in &svc.backends {
            if b.region.as_ref() == "ams" {
                b.load.eject(std::time::Duration::from_secs(60));
            }
        }
        assert_eq!(chosen(pick(svc, &t, Prefs::default(), &[])).0, "iad1");
    }

    #[test]
    fn counters_survive_a_table_swap() {
        let loads = Loads::default();
        let t1 = table(&loads);
        let svc1 = &t1.app("a.example.com").unwrap().services[0];
        let (m, _slot) = chosen(pick(svc1, &t1, Prefs::default(), &[]));
        let t2 = table(&loads);
        let svc2 = &t2.app("a.example.com").unwrap().services[0];
        let b = svc2.backends.iter().find(|b| *b.machine == *m).unwrap();
        assert_eq!(b.load.inflight(), 1);
        assert!(Arc::ptr_eq(&svc1.queue, &svc2.queue));
    }
}
