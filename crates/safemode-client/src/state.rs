//! What the background task and the decisions share: the applied snapshot,
//! swapped atomically, and how fresh it is, in atomics. Nothing here takes a
//! lock or allocates when read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::PolicySnapshot;
use super::coarse::{self, CoarseClock};
use super::decision::FailClosedRule;

pub(super) struct Shared {
    /// The applied snapshot (from a controller, or the last-known-good file).
    pub current: ArcSwapOption<PolicySnapshot>,
    pub freshness: Freshness,
    pub fail_closed: Option<FailClosedRule>,
    /// Applies and rejects, for metrics.
    pub counts: super::metrics::Counts,
    /// Every tally of this subscriber: the decisions, for metrics and
    /// reports.
    pub book: Arc<super::reporting::Book>,
    /// Decisions made with no snapshot applied, since the last report.
    pub unapplied: super::reporting::Tally,
    /// Named signal counters, since the last report.
    pub signals: super::reporting::Signals,
    /// The subscriber's namespace and channel, the labels of its metrics.
    pub labels: (String, String),
}

/// When the client last knew its policy was current: it heard from a
/// controller, in the same store history, at the revision it had applied.
pub(super) struct Freshness {
    /// The process's coarse clock (shared by every subscriber of the
    /// process, so started before this one, perhaps long before).
    clock: &'static CoarseClock,
    /// The clock's reading when this subscriber started: `start` below.
    start_ms: u64,
    /// The clock's reading at the last moment the client knew it was
    /// current; [`NEVER`] until it first does.
    current_ms: AtomicU64,
    /// Until then: how long before `start` the policy was last known
    /// current (a policy loaded from disk), or [`NEVER`] (no policy at all:
    /// as stale as can be).
    before_start_ms: u64,
    /// The controller holds something this client has not applied: a newer
    /// revision, or another store history.
    behind: AtomicBool,
    /// The policy is stale when the client has not known it was current for
    /// this long.
    limit: Duration,
    /// A decision whose coarse clock reads less than this is fresh without
    /// another look: the moment last known current, plus `limit`, less
    /// [`CLOCK_MARGIN_MS`]; zero (every decision looks further) while behind
    /// or never current. Written by the one task that writes `current_ms`
    /// and `behind`: zeroed before either changes and set anew after both
    /// have, so that a reader who sees the client behind never finds a
    /// deadline still in force.
    fresh_until_ms: AtomicU64,
}

const NEVER: u64 = u64::MAX;

/// A decision reads the real clock only when its policy is within this of
/// its staleness limit by the coarse clock (or past it, or behind, or never
/// current). The coarse clock is behind the real one by less than
/// [`TICK`](super::coarse::TICK) while its thread runs; this covers a thread
/// kept from running for almost 100 ms.
const CLOCK_MARGIN_MS: u64 = 100;

impl std::fmt::Debug for Freshness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freshness")
            .field("current_ms", &self.current_ms)
            .field("before_start_ms", &self.before_start_ms)
            .field("behind", &self.behind)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// How stale the policy is at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Staleness {
    /// Decisions must say stale.
    pub stale: bool,
    /// How long since the policy was last known current: since this process
    /// confirmed it, or since it was saved if never confirmed since start;
    /// the longest duration with no policy at all. Zero when
    /// [`Freshness::decision_staleness`] found the policy fresh.
    pub for_: Duration,
}

impl Freshness {
    /// Freshness at start, stale after `limit`: with no policy, or with one
    /// loaded from disk that was last known current `confirmed_ago` ago
    /// (`None`: unknown).
    pub fn new(loaded: bool, confirmed_ago: Option<Duration>, limit: Duration) -> Self {
        Freshness::on(coarse::clock(), loaded, confirmed_ago, limit)
    }

    /// [`Freshness::new`] on `clock`.
    fn on(
        clock: &'static CoarseClock,
        loaded: bool,
        confirmed_ago: Option<Duration>,
        limit: Duration,
    ) -> Self {
        let before_start_ms = match (loaded, confirmed_ago) {
            // Rounded up: in doubt, the policy is older (a limit it has
            // just passed counts as passed, as it does for a running
            // client, whose whole milliseconds can only overstate).
            (true, Some(ago)) => {
                u64::try_from(ago.as_nanos().div_ceil(1_000_000)).unwrap_or(NEVER - 1)
            }
            _ => NEVER,
        };
        Freshness {
            clock,
            start_ms: clock.now_ms(),
            current_ms: AtomicU64::new(NEVER),
            before_start_ms,
            behind: AtomicBool::new(true),
            limit,
            fresh_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A controller confirmed (with a signed, newer heartbeat) what it
    /// holds: is the client behind it? If not, it is current now.
    pub fn observe(&self, behind: bool) {
        self.change(behind, !behind);
    }

    /// A controller's signed snapshot said what it holds: is the client
    /// behind it? A snapshot can be replayed, so it never makes the client
    /// current; only a heartbeat does ([`Freshness::observe`]).
    pub fn note_behind(&self, behind: bool) {
        self.change(behind, false);
    }

    /// Every change of the state goes through here, in this order: the
    /// deadline zeroed first, so that a reader who sees the new state (or
    /// a state between two changes) never finds it fresh by an old
    /// deadline; then the state; then the deadline anew.
    fn change(&self, behind: bool, current_now: bool) {
        self.fresh_until_ms.store(0, Ordering::Release);
        self.behind.store(behind, Ordering::Release);
        if current_now {
            self.current_ms.store(self.now_ms(), Ordering::Release);
        }
        self.set_fresh_until();
    }

    /// `fresh_until_ms` for what `current_ms` and `behind` now say.
    fn set_fresh_until(&self) {
        let current = self.current_ms.load(Ordering::Acquire);
        let until = if current == NEVER || self.behind.load(Ordering::Acquire) {
            0
        } else {
            let limit_ms = u64::try_from(self.limit.as_millis()).unwrap_or(u64::MAX);
            current
                .saturating_add(limit_ms)
                .saturating_sub(CLOCK_MARGIN_MS)
        };
        self.fresh_until_ms.store(until, Ordering::Release);
    }

    /// [`Freshness::staleness`] for a decision: the same `stale`, without
    /// reading the clock while the policy is current and, by the coarse
    /// clock, more than [`CLOCK_MARGIN_MS`] from the limit (one comparison
    /// with `fresh_until_ms`). The coarse time is never ahead of the real
    /// one, so a policy it calls fresh is fresh. A fresh answer's `for_` is
    /// zero: it is used by nothing (only a stale policy fails closed), and
    /// is not worth its arithmetic on every decision; a stale answer's is
    /// exact.
    #[inline]
    pub fn decision_staleness(&self) -> Staleness {
        if self.clock.coarse_ms() < self.fresh_until_ms.load(Ordering::Acquire) {
            return Staleness {
                stale: false,
                for_: Duration::ZERO,
            };
        }
        self.staleness()
    }

    /// Stale: the client has not known it was current for longer than its
    /// limit, never has since it started, or is behind the controller.
    pub fn staleness(&self) -> Staleness {
        let limit = self.limit;
        let now = self.now_ms();
        let current = self.current_ms.load(Ordering::Acquire);
        let behind = self.behind.load(Ordering::Acquire);
        let (never, for_) = match current {
            NEVER if self.before_start_ms == NEVER => (true, Duration::MAX),
            NEVER => (
                true,
                Duration::from_millis(
                    self.before_start_ms
                        .saturating_add(now.saturating_sub(self.start_ms)),
                ),
            ),
            current => (false, Duration::from_millis(now.saturating_sub(current))),
        };
        Staleness {
            stale: never || behind || for_ > limit,
            for_,
        }
    }
}

impl Shared {
    pub fn new(
        loaded: Option<(Arc<PolicySnapshot>, Option<Duration>)>,
        stale_after: Duration,
        fail_closed: Option<FailClosedRule>,
        labels: (String, String),
        book: Arc<super::reporting::Book>,
    ) -> Self {
        let freshness = Freshness::new(
            loaded.is_some(),
            loaded.as_ref().and_then(|(_, ago)| *ago),
            stale_after,
        );
        Shared {
            freshness,
            current: ArcSwapOption::new(loaded.map(|(snapshot, _)| snapshot)),
            fail_closed,
            counts: super::metrics::Counts::default(),
            unapplied: super::reporting::Tally::new(&book, 0),
            book,
            signals: super::reporting::Signals::default(),
            labels,
        }
    }
}

impl Shared {
    /// The tally of a snapshot about to be applied.
    pub fn new_tally(&self, revision: safemode_policy::Revision) -> Arc<super::reporting::Tally> {
        Arc::new(super::reporting::Tally::new(&self.book, revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_loaded_policy_just_past_a_limit_counts_as_past_it() {
        let limit = Duration::from_secs(3);
        let loaded = Freshness::new(true, Some(limit + Duration::from_micros(100)), HOUR);
        let staleness = loaded.staleness();
        assert!(staleness.for_ > limit, "{:?}", staleness.for_);
    }

    #[test]
    fn stale_until_current_and_again_once_behind() {
        let freshness = Freshness::new(false, None, HOUR);
        let at_start = freshness.staleness();
        assert!(at_start.stale, "no policy yet");
        assert_eq!(
            at_start.for_,
            Duration::MAX,
            "no policy is as stale as can be"
        );
        freshness.observe(true);
        assert!(freshness.staleness().stale, "heard, but behind");
        freshness.observe(false);
        assert!(!freshness.staleness().stale);
        // A newer revision or another history was announced (and, say,
        // rejected): stale at once, whatever the limit.
        freshness.observe(true);
        assert!(freshness.staleness().stale);
        freshness.observe(false);
        assert!(!freshness.staleness().stale);
    }

    #[test]
    fn a_decision_sees_what_staleness_sees() {
        let freshness = Freshness::new(false, None, HOUR);
        assert!(freshness.decision_staleness().stale, "no policy yet");
        freshness.observe(false);
        assert!(!freshness.decision_staleness().stale);
        freshness.observe(true);
        assert!(freshness.decision_staleness().stale, "behind");
        freshness.observe(false);
        freshness.note_behind(true);
        assert!(
            freshness.decision_staleness().stale,
            "a snapshot said the controller holds more"
        );
        freshness.note_behind(false);
        assert!(!freshness.decision_staleness().stale);

        // Past the limit (a millisecond, waited for with a deadline) the
        // clock is read.
        let short = Freshness::new(false, None, Duration::from_millis(1));
        short.observe(false);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !short.staleness().stale {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        assert!(short.decision_staleness().stale);
    }

    #[test]
    fn a_decision_far_from_the_limit_is_fresh_and_one_near_it_reads_the_clock() {
        let freshness = Freshness::new(false, None, HOUR);
        freshness.observe(false);
        let until = freshness.fresh_until_ms.load(Ordering::Acquire);
        let current = freshness.current_ms.load(Ordering::Acquire);
        assert_eq!(until, current + 3_600_000 - CLOCK_MARGIN_MS);
        assert!(!freshness.decision_staleness().stale);

        // A limit within the margin: no decision is fresh by the coarse
        // clock alone, each asks the real one (and it is still fresh).
        let near = Freshness::new(false, None, Duration::from_millis(CLOCK_MARGIN_MS));
        near.observe(false);
        assert!(
            near.fresh_until_ms.load(Ordering::Acquire) <= near.current_ms.load(Ordering::Acquire)
        );

        // Behind, or never current: every decision looks further.
        freshness.observe(true);
        assert_eq!(freshness.fresh_until_ms.load(Ordering::Acquire), 0);
        let never = Freshness::new(true, Some(Duration::ZERO), HOUR);
        never.note_behind(false);
        assert_eq!(never.fresh_until_ms.load(Ordering::Acquire), 0);
        assert!(never.decision_staleness().stale, "loaded, never confirmed");
    }

    #[test]
    fn a_reader_who_sees_the_client_behind_never_finds_it_fresh() {
        use std::sync::atomic::{AtomicU64, AtomicUsize};
        // What proves the order is a read that lands after the writer set
        // `behind` and before it moved on: the writer goes on until the
        // reader has made such reads in this many distinct phases. (Reads
        // counted by number prove nothing: one preemption of the writer
        // at the wrong moment gives tens of thousands in one phase, and a
        // fixed count of toggles proves nothing about overlap, as the
        // reader may run only once the writer is done.)
        const STRADDLED: u64 = 200;
        let freshness = Arc::new(Freshness::new(false, None, HOUR));
        freshness.observe(false);
        // The phase counts the writer's changes: even while it goes from
        // fresh to behind, odd while it goes back. A reader who read within
        // one even phase and saw the client behind must not then decide
        // fresh.
        let phase = Arc::new(AtomicUsize::new(0));
        let straddled = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (freshness, phase, straddled, done) = (
                freshness.clone(),
                phase.clone(),
                straddled.clone(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let (mut wrong, mut last) = (0u64, usize::MAX);
                while !done.load(Ordering::SeqCst) {
                    let before = phase.load(Ordering::SeqCst);
                    let full = freshness.staleness();
                    let fast = freshness.decision_staleness();
                    if before.is_multiple_of(2)
                        && phase.load(Ordering::SeqCst) == before
                        && full.stale
                    {
                        if before != last {
                            last = before;
                            straddled.fetch_add(1, Ordering::Relaxed);
                        }
                        wrong += u64::from(!fast.stale);
                    }
                }
                wrong
            })
        };
        // Both ways of changing the state, in turn: a heartbeat's
        // (`observe`) and a snapshot's (`note_behind`).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut rounds = 0u64;
        while straddled.load(Ordering::Relaxed) < STRADDLED && std::time::Instant::now() < deadline
        {
            for _ in 0..1_000 {
                let set = |behind| match rounds.is_multiple_of(2) {
                    true => freshness.observe(behind),
                    false => freshness.note_behind(behind),
                };
                set(true);
                phase.fetch_add(1, Ordering::SeqCst);
                set(false);
                phase.fetch_add(1, Ordering::SeqCst);
                rounds += 1;
            }
        }
        // The reader stops before anything is asserted, so that a failure
        // leaves no thread spinning on a core the other tests need.
        done.store(true, Ordering::SeqCst);
        let wrong = reader.join().unwrap();
        // A wrong read is a failure even when the deadline came first.
        assert_eq!(wrong, 0, "stale by its state, fresh by its deadline");
        let straddled = straddled.load(Ordering::Relaxed);
        assert!(
            straddled >= STRADDLED,
            "in two minutes the reader caught the writer between its stores in {straddled} phases, wanted {STRADDLED}"
        );
    }

    #[test]
    fn without_the_clock_thread_every_decision_reads_the_real_clock() {
        let clock = CoarseClock::unticked();
        assert_eq!(clock.coarse_ms(), u64::MAX);
        let limit = Duration::from_secs(1);
        let freshness = Freshness::on(clock, false, None, limit);
        let confirmed = std::time::Instant::now();
        freshness.observe(false);
        let first = freshness.decision_staleness();
        // A machine that stalled this thread for most of the limit between
        // the two lines above may already be past it.
        if confirmed.elapsed() < limit / 2 {
            assert!(!first.stale, "confirmed just now");
        }
        // Nothing reads the real clock meanwhile (it would move a coarse
        // time that is moved only by readings): once the limit is past by
        // the real clock, a decision says stale, and not before.
        let deadline = confirmed + Duration::from_secs(30);
        loop {
            let stale = freshness.decision_staleness().stale;
            let checked = std::time::Instant::now();
            if stale {
                // The clock counts whole milliseconds: a millisecond's slack.
                let age = checked.duration_since(confirmed) + Duration::from_millis(1);
                assert!(age >= limit, "stale after {age:?} of a {limit:?} limit");
                break;
            }
            assert!(checked < deadline, "fresh 30 s after a 1 s limit");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_policy_from_disk_is_as_stale_as_when_it_was_saved() {
        let freshness = Freshness::new(true, Some(Duration::from_secs(600)), HOUR);
        let loaded = freshness.staleness();
        assert!(loaded.stale, "nobody confirmed it since the start");
        assert!(loaded.for_ >= Duration::from_secs(600), "{loaded:?}");
        freshness.observe(false);
        assert!(!freshness.staleness().stale);
        assert!(freshness.staleness().for_ < Duration::from_secs(600));

        // The process's clock may have started long before this
        // subscriber (another one started it): the age counts from this
        // one's start.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while coarse::clock().now_ms() < 50 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        let made = std::time::Instant::now();
        let late = Freshness::new(true, Some(Duration::from_secs(600)), HOUR);
        let age = late.staleness().for_;
        assert!(
            age <= Duration::from_secs(600) + made.elapsed() + Duration::from_millis(2),
            "{age:?}"
        );

        let unknown = Freshness::new(true, None, HOUR);
        assert_eq!(unknown.staleness().for_, Duration::MAX);
    }
}
