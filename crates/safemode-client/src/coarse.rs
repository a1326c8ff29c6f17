//! A process-wide coarse clock: milliseconds since it started, stored in an
//! atomic by a thread of its own that reads the real clock every
//! [`TICK`], and pushed forward by every real reading the decisions make.
//! A decision far from its staleness limit reads this instead of the clock
//! (`clock_gettime` was a fifth of `decide`'s own time); near the limit it
//! reads the real clock (`state::Freshness::decision_staleness`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the clock thread reads the real clock.
pub(super) const TICK: Duration = Duration::from_millis(2);

pub(super) struct CoarseClock {
    start: Instant,
    ms: AtomicU64,
}

static CLOCK: OnceLock<CoarseClock> = OnceLock::new();

/// The clock, started (with its thread) by the first caller.
pub(super) fn clock() -> &'static CoarseClock {
    CLOCK.get_or_init(|| {
        // The thread waits for the clock to be in place.
        let ticking = std::thread::Builder::new()
            .name("safemode-clock".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TICK);
                    if let Some(clock) = CLOCK.get() {
                        clock.now_ms();
                    }
                }
            })
            .is_ok();
        CoarseClock::new(ticking)
    })
}

impl CoarseClock {
    /// A clock whose thread runs, or not. Without it nothing would move
    /// the coarse time while decisions only read it, and a policy past its
    /// limit would read fresh for good: so the coarse time of a clock with
    /// no thread is as late as can be, and every decision reads the real
    /// clock (`state::Freshness::decision_staleness`).
    fn new(ticking: bool) -> CoarseClock {
        CoarseClock {
            start: Instant::now(),
            ms: AtomicU64::new(if ticking { 0 } else { u64::MAX }),
        }
    }

    /// A clock whose thread could not be started.
    #[cfg(test)]
    pub(super) fn unticked() -> &'static CoarseClock {
        Box::leak(Box::new(CoarseClock::new(false)))
    }
}

impl CoarseClock {
    /// The instant its milliseconds count from.
    #[cfg(test)]
    pub(super) fn start(&self) -> Instant {
        self.start
    }

    /// Milliseconds since the start, read from the real clock now; the
    /// coarse time moves forward to it.
    pub(super) fn now_ms(&self) -> u64 {
        let now = self.start.elapsed().as_millis() as u64;
        self.ms.fetch_max(now, Ordering::Relaxed);
        now
    }

    /// Milliseconds since the start as of the last reading: never ahead of
    /// the real time, normally behind it by less than [`TICK`]; `u64::MAX`
    /// when the clock has no thread (see [`CoarseClock::new`]).
    #[inline]
    pub(super) fn coarse_ms(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_time_follows_the_real_one_and_never_leads_it() {
        let clock = clock();
        let before = clock.coarse_ms();
        let real = clock.now_ms();
        assert!(before <= real);
        assert!(clock.coarse_ms() >= real, "a real reading moves it forward");
        // The thread moves it on its own (waited for with a deadline).
        let deadline = Instant::now() + Duration::from_secs(10);
        while clock.coarse_ms() <= real + 1 {
            assert!(Instant::now() < deadline, "the clock thread never ticked");
            std::thread::yield_now();
        }
        assert!(clock.coarse_ms() <= clock.start().elapsed().as_millis() as u64);
    }
}
