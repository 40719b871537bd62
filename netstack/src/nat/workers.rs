//! Moving bulk TCP connections between threads.
//!
//! A port may serve its guest from several threads, each with a runtime of its own (a tap
//! device's queues): a connection's task runs on the thread that read the guest's SYN, and
//! every thread busy with new connections costs their latency. So connections start where
//! they start, and one that turns out to carry bulk data ([`BULK_BYTES`]) moves to the
//! thread with the fewest bulk connections when that has fewer than its own: a few streams
//! use as many cores, and short connections stay where they are.
//!
//! The move: the connection's task runs inside a [`Hop`]; the relay asks for a move
//! ([`request`]) and yields once; the hop hands the (boxed, so pinned in place) future to the
//! other thread's runtime, whose new task resumes it there. The relay then re-registers its
//! host socket and its timer with that runtime, and writes to the guest from that thread,
//! which is what steers the guest's frames of the flow to it (a tap queue's flow table).
//! Every connection task is counted on the worker it runs on ([`Workers::arrived`] and
//! [`Workers::left`]), so that a worker can tell when none runs there (a tap detaches that
//! queue).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What a connection carries (both ways together) before it counts as bulk.
pub(crate) const BULK_BYTES: u64 = 1 << 20;

/// A boxed connection task.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Threads that connection tasks can run on, given to [`crate::nat::Nat::add_workers`].
pub trait Workers: Send + Sync + 'static {
    /// How many there are (numbered from 0).
    fn count(&self) -> usize;
    /// The worker the calling thread is, if it is one.
    fn current(&self) -> Option<usize>;
    /// Run `task` on worker `to` from now on (its runtime spawns it).
    fn spawn(&self, to: usize, task: Task);
    /// A connection task runs on `worker` from now on (started there or moved there); each
    /// is matched by one [`Workers::left`] when it ends or moves away, also when it is
    /// dropped unfinished.
    fn arrived(&self, worker: usize);
    /// A connection task no longer runs on `worker`.
    fn left(&self, worker: usize);
}

/// One connection task counted on its worker ([`Workers::arrived`]) until dropped.
struct Running {
    workers: Arc<dyn Workers>,
    worker: usize,
}

impl Running {
    fn new(workers: Arc<dyn Workers>, worker: usize) -> Running {
        workers.arrived(worker);
        Running { workers, worker }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.workers.left(self.worker);
    }
}

/// The workers of the NAT and their bulk connections.
pub(crate) struct Pool {
    workers: Arc<dyn Workers>,
    bulk: Vec<usize>,
}

/// Set once workers are added; `None` inside when more than one port added some (a move
/// then could land a connection on another port's thread).
pub(crate) type Slot = Mutex<Option<Option<Pool>>>;

pub(crate) fn add(slot: &Slot, workers: Arc<dyn Workers>) {
    let mut s = slot.lock().unwrap();
    *s = match s.take() {
        None if workers.count() > 1 => Some(Some(Pool {
            bulk: vec![0; workers.count()],
            workers,
        })),
        None => None,
        Some(_) => Some(None),
    };
}

/// A bulk connection counted on its worker until dropped.
pub(crate) struct Bulk<'a> {
    slot: &'a Slot,
    worker: usize,
}

impl Drop for Bulk<'_> {
    fn drop(&mut self) {
        if let Some(Some(pool)) = self.slot.lock().unwrap().as_mut() {
            if let Some(n) = pool.bulk.get_mut(self.worker) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// A connection on this thread has just become bulk: where it should run (`Some(to)`, the
/// worker it is counted on from now) and its count. `None`: no workers or not on one.
pub(crate) fn bulk(slot: &Slot) -> Option<(Option<usize>, Bulk<'_>)> {
    let mut s = slot.lock().unwrap();
    let pool = s.as_mut()?.as_mut()?;
    let here = pool.workers.current()?;
    let (least, &fewest) = pool.bulk.iter().enumerate().min_by_key(|(_, n)| **n)?;
    let to = if fewest < pool.bulk[here] {
        least
    } else {
        here
    };
    pool.bulk[to] += 1;
    let moved = (to != here).then_some(to);
    Some((moved, Bulk { slot, worker: to }))
}

/// Hand the running connection to worker `to`: the task's [`Hop`] moves it once the relay
/// yields ([`yield_once`]).
pub(crate) fn request(slot: &Slot, to: usize) -> bool {
    let workers = match slot.lock().unwrap().as_ref() {
        Some(Some(pool)) => Arc::clone(&pool.workers),
        _ => return false,
    };
    MOVE.with(|m| m.set(Some((to, workers))));
    true
}

/// A move asked for: the worker and the workers.
type Move = (usize, Arc<dyn Workers>);

thread_local! {
    /// A move asked for by the future a [`Hop`] is polling on this thread.
    static MOVE: Cell<Option<Move>> = const { Cell::new(None) };
}

/// Return `Pending` once (having woken the task, so that it is polled again if nothing moves
/// it), then `Ready`.
pub(crate) async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// A connection task that can move to another worker between two polls, counted on the
/// worker it runs on (when it runs on one).
pub(crate) struct Hop {
    task: Option<Task>,
    running: Option<Running>,
}

impl Hop {
    /// A task about to be spawned on this thread.
    pub(crate) fn new(slot: &Slot, task: impl Future<Output = ()> + Send + 'static) -> Hop {
        let running = match slot.lock().unwrap().as_ref() {
            Some(Some(pool)) => pool
                .workers
                .current()
                .map(|w| Running::new(Arc::clone(&pool.workers), w)),
            _ => None,
        };
        Hop {
            task: Some(Box::pin(task)),
            running,
        }
    }
}

impl Future for Hop {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(());
        };
        MOVE.with(|m| m.set(None));
        if task.as_mut().poll(cx).is_ready() {
            self.task = None;
            self.running = None;
            return Poll::Ready(());
        }
        if let Some((to, workers)) = MOVE.with(|m| m.take()) {
            // Counted on the new worker before it leaves this one.
            let moved = Hop {
                task: self.task.take(),
                running: Some(Running::new(Arc::clone(&workers), to)),
            };
            self.running = None;
            workers.spawn(to, Box::pin(moved));
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Two workers: 0 is the test's thread (current), 1 records what it is handed.
    struct Two {
        spawned: Mutex<Vec<Task>>,
        current: AtomicUsize,
        running: [AtomicUsize; 2],
    }

    impl Workers for Two {
        fn count(&self) -> usize {
            2
        }
        fn current(&self) -> Option<usize> {
            Some(self.current.load(Ordering::Relaxed))
        }
        fn spawn(&self, to: usize, task: Task) {
            assert_eq!(to, 1);
            self.spawned.lock().unwrap().push(task);
        }
        fn arrived(&self, worker: usize) {
            self.running[worker].fetch_add(1, Ordering::SeqCst);
        }
        fn left(&self, worker: usize) {
            self.running[worker].fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Two {
        fn running(&self) -> [usize; 2] {
            [0, 1].map(|w| self.running[w].load(Ordering::SeqCst))
        }
    }

    fn two() -> (Arc<Two>, Slot) {
        let w = Arc::new(Two {
            spawned: Mutex::new(Vec::new()),
            current: AtomicUsize::new(0),
            running: Default::default(),
        });
        let slot = Slot::default();
        add(&slot, Arc::clone(&w) as Arc<dyn Workers>);
        (w, slot)
    }

    #[test]
    fn bulk_connections_spread_over_workers() {
        let (_w, slot) = two();
        let (a, ga) = bulk(&slot).unwrap();
        assert_eq!(a, None, "the first stays where it is");
        let (b, gb) = bulk(&slot).unwrap();
        assert_eq!(b, Some(1), "the second moves to the idle worker");
        let (c, _gc) = bulk(&slot).unwrap();
        assert_eq!(c, None, "1 and 1: the third stays");
        drop(ga);
        drop(gb);
        // Left: one on worker 0 (c).
        let (d, _gd) = bulk(&slot).unwrap();
        assert_eq!(d, Some(1));
    }

    #[test]
    fn a_second_port_turns_moving_off() {
        let (w, slot) = two();
        add(&slot, w as Arc<dyn Workers>);
        assert!(bulk(&slot).is_none());
        assert!(!request(&slot, 1));
    }

    #[test]
    fn hop_hands_the_task_over_and_it_resumes_there() {
        let (w, slot) = two();
        let slot = Arc::new(slot);
        let steps = Arc::new(AtomicUsize::new(0));
        let (s2, st) = (Arc::clone(&slot), Arc::clone(&steps));
        let mut hop = Box::pin(Hop::new(&slot, async move {
            st.fetch_add(1, Ordering::SeqCst);
            assert!(request(&s2, 1));
            yield_once().await;
            st.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(w.running(), [1, 0], "counted where it starts");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(hop.as_mut().poll(&mut cx).is_ready(), "the old task ends");
        assert_eq!(steps.load(Ordering::SeqCst), 1);
        assert_eq!(w.running(), [0, 1], "counted where it went");
        let mut moved = w.spawned.lock().unwrap().pop().expect("handed to worker 1");
        assert!(moved.as_mut().poll(&mut cx).is_ready(), "resumed and done");
        assert_eq!(steps.load(Ordering::SeqCst), 2);
        assert_eq!(w.running(), [0, 0], "and no longer when done");
        drop(moved);
        assert_eq!(w.running(), [0, 0]);
    }

    #[test]
    fn a_task_dropped_unfinished_is_no_longer_counted() {
        let (w, slot) = two();
        let hop = Hop::new(&slot, std::future::pending::<()>());
        assert_eq!(w.running(), [1, 0]);
        drop(hop);
        assert_eq!(w.running(), [0, 0]);
    }

    #[test]
    fn yield_without_a_move_is_polled_again() {
        let slot = Slot::default();
        let mut hop = Box::pin(Hop::new(&slot, async {
            yield_once().await;
        }));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(hop.as_mut().poll(&mut cx).is_pending());
        assert!(hop.as_mut().poll(&mut cx).is_ready());
    }
}
