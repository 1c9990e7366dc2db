//! Answers before new requests when a serving thread falls behind.
//!
//! A serving thread's event loop runs its ready tasks first come, first
//! served, and an upstream answer that arrives while a burst of new requests
//! is being read joins the back of the queue, behind every request of the
//! burst. Clients that keep connections open and send on timers (a fleet of
//! agents polling once a second) make such bursts: in the proxy bench's idle
//! scenario, 5,000 connections at one request a second each, answers sat in
//! skein's sockets for tens of milliseconds while the thread read and
//! forwarded the rest of the burst, every request of which then held an
//! upstream connection of its own (9,000-10,000 new backend connections in 10
//! seconds, against nginx's 2,700-5,000), and the machine paid for those too.
//!
//! So a thread starts at most `requests_per_turn` (32) requests on its own
//! turn; a request past that waits in a first-come queue that a pump task
//! empties as many at a time, yielding in between, and a yield resumes only after
//! the thread's next poll for I/O, behind the answers that poll brought in.
//! Nothing is capped: a thread with slow upstreams still starts that many
//! requests every turn of its loop, however many are in flight.
//! A request is gated once its connection is readable and before a byte of it
//! is read, so a waiting connection holds no buffer.

use std::cell::RefCell;
use std::collections::VecDeque;

use tokio::sync::oneshot;

#[derive(Default)]
struct Gate {
    /// Requests started since the pump last began a turn.
    started: u32,
    /// Requests waiting to start, first come first.
    waiting: VecDeque<oneshot::Sender<()>>,
    /// The pump is running on this thread.
    pumping: bool,
}

thread_local! {
    static GATE: RefCell<Gate> = RefCell::default();
}

/// Returns when the calling connection may start its next request: at once
/// unless this serving thread has started `per_turn` requests in this turn
/// or others are waiting. Off the serving threads (tests' runtimes, a
/// multi-threaded runtime) there is no gate.
pub(crate) async fn admit(per_turn: u32) {
    if crate::workers::index().is_none() {
        return;
    }
    let wait = GATE.with(|g| {
        let mut g = g.borrow_mut();
        if g.waiting.is_empty() && g.started < per_turn {
            g.started += 1;
            return None;
        }
        let (tx, rx) = oneshot::channel();
        g.waiting.push_back(tx);
        if !g.pumping {
            g.pumping = true;
            turns().increment(1);
            tokio::spawn(pump(per_turn));
        }
        Some(rx)
    });
    if let Some(rx) = wait {
        // Err: the pump is gone (the thread is stopping); go on.
        let _ = rx.await;
    }
}

/// Pumps started: how often a serving thread had more new requests at once
/// than it starts in one (`skein_proxy_admission_pumps_total`).
fn turns() -> &'static metrics::Counter {
    static C: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    C.get_or_init(|| metrics::counter!("skein_proxy_admission_pumps_total"))
}

/// Lets the waiting requests in, `per_turn` a turn, until none wait.
async fn pump(per_turn: u32) {
    loop {
        // After the next poll for I/O: the answers it brings go first.
        tokio::task::yield_now().await;
        let more = GATE.with(|g| {
            let mut g = g.borrow_mut();
            g.started = 0;
            while g.started < per_turn {
                let Some(tx) = g.waiting.pop_front() else {
                    break;
                };
                // A connection that went away while it waited takes no place.
                if tx.send(()).is_ok() {
                    g.started += 1;
                }
            }
            g.pumping = !g.waiting.is_empty();
            g.pumping
        });
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    const PER_TURN: u32 = 32;

    #[test]
    fn an_answer_that_arrives_during_a_burst_goes_before_the_rest_of_the_burst() {
        let workers = crate::workers::Workers::start(1, "admit-test").unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let l = log.clone();
        workers.handles()[0].spawn(async move {
            // The answer: a socket with bytes waiting, whose readiness only a
            // poll for I/O can tell the thread.
            let (mut up, down) = tokio::net::UnixStream::pair().unwrap();
            up.write_all(b"answer").await.unwrap();
            let a = l.clone();
            let answer = tokio::spawn(async move {
                down.readable().await.unwrap();
                a.lock().unwrap().push("answer".to_string());
            });
            // A burst of 100 new requests, all ready at once.
            let mut burst = Vec::new();
            for i in 0..100 {
                let r = l.clone();
                burst.push(tokio::spawn(async move {
                    admit(PER_TURN).await;
                    r.lock().unwrap().push(i.to_string());
                }));
            }
            answer.await.unwrap();
            for b in burst {
                b.await.unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let log = log.lock().unwrap();
        let at = log.iter().position(|e| e == "answer").unwrap();
        // One turn of the burst went first, then the answer, then the rest.
        assert_eq!(at, PER_TURN as usize, "{log:?}");
        let requests: Vec<usize> = log.iter().filter_map(|e| e.parse().ok()).collect();
        assert_eq!(
            requests,
            (0..100).collect::<Vec<_>>(),
            "first come, first started"
        );
    }

    #[test]
    fn off_the_serving_threads_nothing_waits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..(PER_TURN * 3) {
                // Would wait for a pump past PER_TURN on a serving thread.
                assert!(futures_util::FutureExt::now_or_never(admit(PER_TURN)).is_some());
            }
        });
    }
}
