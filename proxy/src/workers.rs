//! The serving threads: one single-threaded tokio runtime per thread, as nginx
//! runs its workers. A connection and every task it spawns stay on one thread,
//! with no work stealing and no wakeups across threads.
//!
//! The proxy serves on them, and the daemon gives the first one to the mesh:
//! skein's userspace WireGuard runs its data path there, so a backhaul frame the
//! proxy writes to another host is encrypted and sent by the same awake thread
//! (the TUN's readiness is on its reactor), and a datagram decrypted for the
//! proxy is read without waking another thread. On a machine where every wake
//! of a sleeping thread costs 50-80 us (a virtual machine without halt polling)
//! that is four wakes less per proxied request on each host.

use std::{io, thread::JoinHandle};

use tokio::{runtime::Handle, sync::oneshot};

thread_local! {
    /// Which serving thread this is.
    static INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The calling thread's place among its [`Workers`] (`None` off them): what
/// per-thread state is indexed by.
pub fn index() -> Option<usize> {
    INDEX.with(std::cell::Cell::get)
}

/// Running serving threads; dropping them stops each runtime (dropping the
/// tasks still on it) and joins its thread.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish()
    }
}

impl Workers {
    /// Starts `n` threads (at least one) named `<name>-<i>`.
    pub fn start(n: usize, name: &str) -> io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            w.handles.push(rt.handle().clone());
            w.stops.push(stop);
            // On error `w` is dropped: the threads already started stop.
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        INDEX.with(|c| c.set(Some(i)));
                        // A dropped sender ends it too.
                        let _ = rt.block_on(stopped);
                    })?,
            );
        }
        Ok(w)
    }

    /// Each thread's runtime, in order: tasks spawned on one run on its thread.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_named_thread_and_stops_on_drop() {
        let w = Workers::start(2, "skein-test").unwrap();
        let mut names = Vec::new();
        for h in w.handles() {
            let (tx, rx) = std::sync::mpsc::channel();
            h.spawn(async move {
                let _ = tx.send((std::thread::current().name().map(str::to_owned), index()));
            });
            names.push(rx.recv().unwrap());
        }
        assert_eq!(
            names,
            vec![
                (Some("skein-test-0".into()), Some(0)),
                (Some("skein-test-1".into()), Some(1))
            ]
        );
        assert_eq!(index(), None, "off the serving threads");
        // a task still waiting is dropped with its runtime
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        w.handles()[0].spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(w);
        assert!(rx.recv().is_err(), "the pending task was dropped");
    }
}
