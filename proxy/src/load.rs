//! Live load counters: in-flight work per machine and service, passive ejection,
//! and the wait queue of each service. They live outside the routing tables so
//! that a table swap never resets them: a new table looks them up by key when it
//! is built, and the hot path then holds the `Arc` directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::http::ByStatus;

/// Where the process's clock starts, for ejection deadlines in an atomic.
fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The wait queue of one service of one app: requests wait here when every
/// machine is at its hard limit.
#[derive(Debug)]
pub struct ServiceQueue {
    /// Woken when a slot frees.
    pub freed: Notify,
    /// Requests waiting now.
    pub waiting: AtomicU32,
    /// The same, exported: `skein_proxy_queue_depth{app,port}`.
    pub depth: metrics::Gauge,
    /// Answers to the service's requests, the machines' and the proxy's own
    /// (capacity, timeouts): `skein_proxy_service_requests_total{app,port,status}`.
    pub answered: ByStatus,
}

/// Why a machine gave no answer, for `skein_proxy_machine_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineError {
    /// The connection was refused, reset or timed out.
    Connect,
    /// The request or the answer broke off (or the answer was malformed).
    Upstream,
    /// No answer within the response timeout.
    Timeout,
}

impl MachineError {
    const ALL: [MachineError; 3] = [
        MachineError::Connect,
        MachineError::Upstream,
        MachineError::Timeout,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineError::Connect => "connect",
            MachineError::Upstream => "upstream",
            MachineError::Timeout => "timeout",
        }
    }
}

/// Load of one machine for one service.
#[derive(Debug)]
pub struct MachineLoad {
    inflight: AtomicU32,
    /// `skein_proxy_machine_inflight{app,machine}`.
    gauge: metrics::Gauge,
    /// `skein_proxy_machine_requests_total{app,machine,status}`: its answers.
    answered: ByStatus,
    /// `skein_proxy_machine_errors_total{app,machine,reason}`, by
    /// [`MachineError`].
    errors: [metrics::Counter; 3],
    check_failing: std::sync::atomic::AtomicBool,
    ejected_until_ms: AtomicU64,
    epoch: Instant,
    queue: Arc<ServiceQueue>,
}

impl MachineLoad {
    /// In-flight connections or requests now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes a slot if fewer than `hard` are in use.
    pub fn try_acquire(self: &Arc<Self>, hard: u32) -> Option<Slot> {
        let mut cur = self.inflight.load(Ordering::Relaxed);
        loop {
            if cur >= hard {
                return None;
            }
            match self.inflight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.gauge.increment(1.0);
                    return Some(Slot(self.clone()));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Counts one of its answers (as it gave it, before the proxy's changes).
    pub fn answered(&self, status: http::StatusCode) {
        self.answered.record(status);
    }

    /// Counts a request it did not answer.
    pub fn failed(&self, why: MachineError) {
        self.errors[why as usize].increment(1);
    }

    /// True while an active health check fails: out of routing until it passes.
    pub fn is_failing_checks(&self) -> bool {
        self.check_failing.load(Ordering::Relaxed)
    }

    /// Records the outcome of an active check; returns whether it changed.
    pub fn set_check_result(&self, passing: bool) -> bool {
        self.check_failing.swap(!passing, Ordering::Relaxed) == passing
    }

    /// True while a recent failure keeps it out of rotation.
    pub fn is_ejected(&self) -> bool {
        // Never ejected (the usual case): no clock read.
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms(self.epoch)
    }

    /// Keeps it out of rotation for `d` (after a connect failure).
    pub fn eject(&self, d: Duration) {
        let until =
            now_ms(self.epoch).saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
    }
}

/// A held slot; frees itself (and wakes one waiter) when dropped.
#[derive(Debug)]
pub struct Slot(Arc<MachineLoad>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.decrement(1.0);
        self.0.queue.freed.notify_one();
    }
}

/// Registry of counters by (app, internal port, machine). Only table builds
/// touch its lock; entries whose tables are all gone are dropped.
#[derive(Debug)]
pub struct Loads {
    epoch: Instant,
    machines: Mutex<HashMap<(String, u16, String), Weak<MachineLoad>>>,
    queues: Mutex<HashMap<(String, u16), Weak<ServiceQueue>>>,
}

impl Default for Loads {
    fn default() -> Self {
        Loads {
            epoch: Instant::now(),
            machines: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl Loads {
    /// The queue of a service (created on first use).
    pub fn queue(&self, app: &str, port: u16) -> Arc<ServiceQueue> {
        let mut m = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let key = (app.to_string(), port);
        if let Some(q) = m.get(&key).and_then(Weak::upgrade) {
            return q;
        }
        let q = Arc::new(ServiceQueue {
            freed: Notify::new(),
            waiting: AtomicU32::new(0),
            depth: metrics::gauge!("skein_proxy_queue_depth", "app" => app.to_string(), "port" => port.to_string()),
            answered: ByStatus::new(
                |class| metrics::counter!("skein_proxy_service_requests_total", "app" => app.to_string(), "port" => port.to_string(), "status" => class),
            ),
        });
        m.insert(key, Arc::downgrade(&q));
        q
    }

    /// The counter of a machine for a service (created on first use).
    pub fn machine(
        &self,
        app: &str,
        port: u16,
        machine: &str,
        queue: &Arc<ServiceQueue>,
    ) -> Arc<MachineLoad> {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let key = (app.to_string(), port, machine.to_string());
        if let Some(l) = m.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(MachineLoad {
            inflight: AtomicU32::new(0),
            gauge: metrics::gauge!(
                "skein_proxy_machine_inflight",
                "app" => app.to_string(),
                "machine" => machine.to_string()
            ),
            answered: ByStatus::new(|class| metrics::counter!("skein_proxy_machine_requests_total", "app" => app.to_string(), "machine" => machine.to_string(), "status" => class)),
            errors: MachineError::ALL.map(|why| metrics::counter!("skein_proxy_machine_errors_total", "app" => app.to_string(), "machine" => machine.to_string(), "reason" => why.as_str())),
            check_failing: std::sync::atomic::AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            epoch: self.epoch,
            queue: queue.clone(),
        });
        m.insert(key, Arc::downgrade(&l));
        l
    }

    /// Drops entries no table refers to any more.
    pub fn prune(&self) {
        self.machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| w.strong_count() > 0);
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| w.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_respect_the_hard_limit_and_free_on_drop() {
        let loads = Loads::default();
        let q = loads.queue("a", 80);
        let m = loads.machine("a", 80, "m1", &q);
        let s1 = m.try_acquire(2).unwrap();
        let _s2 = m.try_acquire(2).unwrap();
        assert!(m.try_acquire(2).is_none());
        drop(s1);
        assert_eq!(m.inflight(), 1);
        assert!(m.try_acquire(2).is_some());
    }

    #[test]
    fn counters_survive_while_referenced() {
        let loads = Loads::default();
        let q = loads.queue("a", 80);
        let m = loads.machine("a", 80, "m1", &q);
        let _slot = m.try_acquire(5).unwrap();
        // A new table asks again: same counter, same in-flight count.
        let again = loads.machine("a", 80, "m1", &q);
        assert!(Arc::ptr_eq(&m, &again));
        assert_eq!(again.inflight(), 1);
    }

    #[test]
    fn ejection_expires() {
        let loads = Loads::default();
        let q = loads.queue("a", 80);
        let m = loads.machine("a", 80, "m1", &q);
        m.eject(Duration::from_millis(30));
        assert!(m.is_ejected());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!m.is_ejected());
    }
}
