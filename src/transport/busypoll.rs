//! Adaptive busy polling for a port that has a thread of its own (the tap port).
//!
//! After a frame from the guest, the port's thread keeps polling its reactor (the device and
//! the host sockets of the connections it carries) for a while instead of going to sleep: the
//! answer to what the guest just sent (a SYN-ACK after the host connect, the server's reply)
//! and the guest's next frame are picked up at once, without the wake-up of a sleeping thread,
//! which on a virtual machine means waking a halted vCPU (tens of microseconds; connection
//! setup crosses it three times).
//!
//! How long it spins adapts the way Linux's `haltpoll` cpuidle governor does: the window
//! starts at [`START`]; when the guest's next frame comes after the window but within the
//! limit (`--busy-poll`, [`DEFAULT_LIMIT`]), a longer window would have caught it and the
//! window doubles; when the guest stays quiet for longer than the limit, it halves. A chatty
//! guest (request and answer, connection after connection) keeps the thread polling; a guest
//! that sends now and then costs at most one window per frame, shrinking; an idle guest costs
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The window a port starts with, and the least it grows to.
pub const START: Duration = Duration::from_micros(50);

/// The default limit (`--busy-poll`): a little more than a round trip through the host's
/// loopback to a server on a busy two-core machine.
pub const DEFAULT_LIMIT: Duration = Duration::from_micros(200);

/// The next window after the port was quiet for `gap` (longer than `window`) with `limit`.
pub fn next_window(window: Duration, gap: Duration, limit: Duration) -> Duration {
    if gap <= limit {
        (window * 2).max(START).min(limit)
    } else {
        window / 2
    }
}

/// One port's busy polling. [`BusyPoll::run`] runs on the port's thread; [`BusyPoll::frame`]
/// is called for every frame to or from the guest, from any thread.
pub struct BusyPoll {
    limit: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch`.
    window: AtomicU64,
    /// The last frame either way, in nanoseconds since `epoch`.
    last: AtomicU64,
    /// Whether the poller is asleep (waiting for [`BusyPoll::frame`]).
    asleep: AtomicBool,
    kick: Notify,
    /// Shared by the pollers of one device's queues: the one whose queue had the last frame
    /// (only it spins: two spinning threads would hold both cores of a small machine against
    /// the guest's and the host's own processes).
    turn: Arc<AtomicUsize>,
    id: usize,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().try_into().unwrap_or(u64::MAX)
}

impl BusyPoll {
    /// Busy polling up to `limit` (zero: none).
    pub fn new(limit: Duration) -> BusyPoll {
        BusyPoll::shared(limit, Arc::new(AtomicUsize::new(0)), 0)
    }

    /// One of several pollers of which only the last one with a frame spins: `turn` is
    /// shared by them, `id` tells them apart.
    pub fn shared(limit: Duration, turn: Arc<AtomicUsize>, id: usize) -> BusyPoll {
        BusyPoll {
            turn,
            id,
            limit,
            epoch: Instant::now(),
            window: AtomicU64::new(nanos(START.min(limit))),
            last: AtomicU64::new(0),
            asleep: AtomicBool::new(true),
            kick: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    /// A frame went to or came from the guest.
    pub fn frame(&self) {
        if self.limit.is_zero() {
            return;
        }
        let now = self.now();
        if self.turn.load(Relaxed) != self.id {
            self.turn.store(self.id, Relaxed);
        }
        let before = self.last.swap(now, Relaxed);
        // Only the caller that finds the poller asleep wakes it and moves the window.
        if self.asleep.load(Relaxed) && self.asleep.swap(false, Relaxed) {
            let gap = Duration::from_nanos(now.saturating_sub(before));
            let window = next_window(self.window(), gap, self.limit);
            self.window.store(nanos(window), Relaxed);
            self.kick.notify_one();
        }
    }

    /// The poller: runs beside the port's reader on its thread, never returns. While the last
    /// frame is less than the window old it yields to the runtime, which then polls its
    /// reactor without blocking and runs whatever became ready, and it lets any other thread
    /// waiting for this core run first (`sched_yield`).
    pub async fn run(&self) {
        if self.limit.is_zero() {
            return std::future::pending().await;
        }
        loop {
            if !self.asleep.load(Relaxed) {
                let window = self.window.load(Relaxed);
                while self.should_spin(window) {
                    // SAFETY: no arguments, no memory.
                    unsafe { libc::sched_yield() };
                    tokio::task::yield_now().await;
                }
                self.asleep.store(true, Relaxed);
                // A frame between the check and the store found the poller awake and did
                // not kick it: look again.
                if self.should_spin(window) && self.asleep.swap(false, Relaxed) {
                    continue;
                }
            }
            self.kick.notified().await;
        }
    }

    /// The last frame came within `window` (nanoseconds) and the turn is ours.
    fn should_spin(&self, window: u64) -> bool {
        self.now().saturating_sub(self.last.load(Relaxed)) < window
            && self.turn.load(Relaxed) == self.id
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window.load(Relaxed))
    }

    #[cfg(test)]
    fn asleep(&self) -> bool {
        self.asleep.load(Relaxed)
    }

    #[cfg(test)]
    fn since_last(&self) -> Duration {
        Duration::from_nanos(self.now().saturating_sub(self.last.load(Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_window_grows_to_the_limit_for_gaps_within_it_and_halves_beyond() {
        let limit = 200 * US;
        let mut w = START;
        for want in [100, 200, 200] {
            w = next_window(w, 150 * US, limit);
            assert_eq!(w, want * US);
        }
        for want in [100, 50, 25] {
            w = next_window(w, 5000 * US, limit);
            assert_eq!(w, want * US);
        }
        // From a shrunk window a near gap brings it back to at least START at once.
        assert_eq!(next_window(3 * US, 100 * US, limit), START);
        // A limit below START caps the window.
        assert_eq!(next_window(START, 10 * US, 20 * US), 20 * US);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_poller_spins_after_a_frame_and_sleeps_once_the_guest_is_quiet() {
        let bp = BusyPoll::new(200 * US);
        let check = async {
            for round in 0..2 {
                bp.frame();
                assert!(!bp.asleep(), "a frame wakes the poller");
                let deadline = Instant::now() + Duration::from_secs(5);
                while !bp.asleep() {
                    assert!(Instant::now() < deadline, "the poller never went to sleep");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert!(bp.since_last() >= bp.window(), "round {round}");
            }
            // The first frame doubled the window (a gap within the limit since the start,
            // unless the test was preempted for longer), the second came after a millisecond
            // or more, beyond the limit: halved, back to the start or below.
            assert!(bp.window() <= START, "{:?}", bp.window());
        };
        tokio::select! {
            () = bp.run() => unreachable!(),
            () = check => {}
        }
        assert_eq!(BusyPoll::new(Duration::ZERO).window(), Duration::ZERO);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn of_pollers_sharing_a_turn_only_the_last_one_with_a_frame_spins() {
        let turn = Arc::new(AtomicUsize::new(0));
        let a = BusyPoll::shared(Duration::from_secs(10), Arc::clone(&turn), 0);
        let b = BusyPoll::shared(Duration::from_secs(10), Arc::clone(&turn), 1);
        let check = async {
            a.frame();
            // Windows far longer than the test: only the turn can stop a poller.
            for p in [&a, &b] {
                p.window.store(nanos(Duration::from_secs(10)), Relaxed);
            }
            tokio::task::yield_now().await;
            assert!(!a.asleep(), "a spins after its frame");
            b.frame();
            b.window.store(nanos(Duration::from_secs(10)), Relaxed);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !a.asleep() {
                assert!(Instant::now() < deadline, "a kept spinning after b's frame");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(!b.asleep(), "b spins: its turn, its window far from over");
        };
        tokio::select! {
            () = a.run() => unreachable!(),
            () = b.run() => unreachable!(),
            () = check => {}
        }
    }
}
