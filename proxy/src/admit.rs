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
//! So a thread starts at most `requests_per_turn` (32) requests in one turn of
//! its loop (the tasks it runs between two polls for I/O); a request past that
//! waits in a first-come queue, from which the next turns start as many, ahead
//! of newer ones. The answers each poll for I/O brings in run in the turn they
//! arrive. Nothing is capped: a thread with slow upstreams still starts that
//! many requests every turn, however many are in flight.
//!
//! Turns are counted exactly, by a keeper task on each serving thread that
//! yields, and a tokio yield resumes only after the thread's next poll for I/O:
//! each time it resumes a turn has ended. It sleeps through a turn without
//! requests and the next request wakes it, so an idle thread runs nothing.
//! The first cut counted requests from one pump to the next, across turns
//! while nobody waited: in the keep-alive scenario (64 busy connections, the
//! thread at 97% of its core, ~30 requests a turn) it queued a request in 50,
//! 1,300-1,700 times a second, for nothing (p50 0.82-0.91 ms against 0.81-0.82
//! without the gate, and 0.3 us more CPU a request).
//!
//! A request is gated once its connection is readable and before a byte of it
//! is read, so a waiting connection holds no buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::task::{Poll, Waker};

use tokio::sync::oneshot;

#[derive(Default)]
struct Gate {
    /// Requests started in this turn.
    started: u32,
    /// The share of a turn, as the last request asked.
    per_turn: u32,
    /// Requests waiting to start, first come first.
    waiting: VecDeque<oneshot::Sender<()>>,
    keeper: Keeper,
}

/// The turn keeper of a thread.
#[derive(Default)]
enum Keeper {
    /// Not spawned yet (or its runtime is gone).
    #[default]
    None,
    /// Counting turns.
    Running,
    /// Waiting for a request, with what wakes it.
    Asleep(Waker),
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
        g.per_turn = per_turn;
        match std::mem::replace(&mut g.keeper, Keeper::Running) {
            Keeper::Running => {}
            Keeper::Asleep(w) => w.wake(),
            Keeper::None => drop(tokio::spawn(keep_turns())),
        }
        if g.waiting.is_empty() && g.started < per_turn {
            g.started += 1;
            return None;
        }
        if g.waiting.is_empty() {
            behind().increment(1);
        }
        let (tx, rx) = oneshot::channel();
        g.waiting.push_back(tx);
        Some(rx)
    });
    if let Some(rx) = wait {
        // Err: the keeper is gone (the thread is stopping); go on.
        let _ = rx.await;
    }
}

/// Backlogs begun: how often a serving thread had more new requests in a
/// turn than it starts in one, so that some began to wait for a later turn
/// (`skein_proxy_admission_backlogs_total`).
fn behind() -> &'static metrics::Counter {
    static C: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    C.get_or_init(|| metrics::counter!("skein_proxy_admission_backlogs_total"))
}

/// Counts the thread's turns, starts each turn with the requests waiting
/// (a turn's share of them), and sleeps through idle turns.
async fn keep_turns() {
    // Resets the state if the runtime drops this task (the thread stops), so
    // a later runtime on the thread (tests) spawns its own.
    struct Gone;
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = GATE.try_with(|g| {
                if let Ok(mut g) = g.try_borrow_mut() {
                    *g = Gate::default();
                }
            });
        }
    }
    let _gone = Gone;
    loop {
        // After the next poll for I/O: a turn has ended.
        tokio::task::yield_now().await;
        let idle = GATE.with(|g| {
            let mut g = g.borrow_mut();
            let idle = g.started == 0 && g.waiting.is_empty();
            g.started = 0;
            while g.started < g.per_turn {
                let Some(tx) = g.waiting.pop_front() else {
                    break;
                };
                // A connection that went away while it waited takes no place.
                if tx.send(()).is_ok() {
                    g.started += 1;
                }
            }
            idle
        });
        if idle {
            sleep().await;
        }
    }
}

/// Until a request wakes the keeper.
async fn sleep() {
    let mut slept = false;
    std::future::poll_fn(|cx| {
        GATE.with(|g| {
            let mut g = g.borrow_mut();
            if slept && matches!(g.keeper, Keeper::Running) {
                return Poll::Ready(());
            }
            slept = true;
            g.keeper = Keeper::Asleep(cx.waker().clone());
            Poll::Pending
        })
    })
    .await;
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
    fn each_turn_starts_its_share_and_an_idle_thread_wakes_for_the_next() {
        let workers = crate::workers::Workers::start(1, "admit-test").unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        workers.handles()[0].spawn(async move {
            let now = |n: u32| {
                (0..n)
                    .filter(|_| futures_util::FutureExt::now_or_never(admit(PER_TURN)).is_some())
                    .count()
            };
            // Bursts that each fit a turn, the thread idle in between (and its
            // keeper asleep): counted across turns, the second would overflow.
            let mut at_once = Vec::new();
            for _ in 0..3 {
                at_once.push(now(PER_TURN * 2 / 3));
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // A burst past the share: the rest waits for the next turn, and is
            // let in then.
            at_once.push(now(PER_TURN * 2));
            let late = tokio::spawn(admit(PER_TURN));
            let let_in = tokio::time::timeout(std::time::Duration::from_secs(5), late).await;
            done_tx.send((at_once, let_in.is_ok())).unwrap();
        });
        let (at_once, let_in) = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let share = PER_TURN as usize;
        assert_eq!(
            at_once,
            vec![share * 2 / 3, share * 2 / 3, share * 2 / 3, share]
        );
        assert!(let_in, "a request that waited was let in a later turn");
    }

    #[test]
    fn off_the_serving_threads_nothing_waits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..(PER_TURN * 3) {
                // Would wait for a later turn past PER_TURN on a serving thread.
                assert!(futures_util::FutureExt::now_or_never(admit(PER_TURN)).is_some());
            }
        });
    }
}
