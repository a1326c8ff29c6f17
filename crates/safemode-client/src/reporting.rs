//! What a subscriber tells the controller about what its channel decided
//! and saw (issue "see the attack first"): decisions counted by action,
//! effect, revision and context class, and named signal counters, sent as
//! a `Report` on the subscription stream every [`REPORT_EVERY`]. Only
//! counts: the wire type has no field for a customer.
//!
//! A decision is counted once: one relaxed atomic addition into a 64-bit
//! cell of the tally of the snapshot it decided with (two when a step-up
//! is asked again after a failed attempt), so every count carries its revision without a lock.
//! A tally has one set of cells per core (up to [`MAX_SHARDS`]), and a
//! thread counts into the set its number picks, so that threads deciding
//! the same action at once on different cores do not pass one cache line
//! back and forth.
//! The same cells are the metrics' counts (`metrics.rs`): the [`Book`]
//! keeps what was drained out of them, and a scrape adds what is still in
//! them. The task drains the tallies when it reports. A snapshot can
//! outlive its tally's last drain (a thread still deciding with it, a
//! service holding it); what is counted in it after that is not lost: when
//! the snapshot goes, its tally leaves those counts in the book, under its
//! own revision, for the next report.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tracing::warn;

use safemode_policy::telemetry::limits::{MAX_DECISION_ROWS, MAX_SIGNALS};
use safemode_policy::{ContextClass, EffectKind, Revision, SignalName};
use safemode_wire::proto;

use super::metrics::{ACTION_SLOTS, EFFECTS, action_name, effect_slot};

pub use safemode_policy::telemetry::limits::REPORT_EVERY;

/// Fresh, stale, failed closed.
const FLAGS: usize = 3;
const CELLS: usize = ACTION_SLOTS * ContextClass::COUNT * EFFECTS.len() * FLAGS;

/// Sets of cells in a tally, at most: one per core. Each set is
/// `CELLS` 64-bit counts (about 97 KB).
pub const MAX_SHARDS: usize = 4;

/// Sets of cells in every tally of the process: one per core, up to
/// [`MAX_SHARDS`].
fn shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, MAX_SHARDS))
    })
}

/// Where the calling thread's set of cells starts in every tally: threads
/// are numbered as they first count, and take the sets in turn.
#[inline]
fn shard_start() -> usize {
    thread_local! {
        static START: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static THREADS: AtomicUsize = AtomicUsize::new(0);
    START.with(|start| {
        let mut at = start.get();
        if at == usize::MAX {
            at = THREADS.fetch_add(1, Ordering::Relaxed) % shards() * CELLS;
            start.set(at);
        }
        at
    })
}

/// Every tally of one subscriber, for its metrics and reports: the counts
/// that left them (drained for a report, or left by a tally that was
/// dropped), and the tallies still alive.
#[derive(Debug, Default)]
pub(crate) struct Book {
    inner: Mutex<BookInner>,
}

#[derive(Debug, Default)]
struct BookInner {
    /// The cells of every tally alive.
    live: Vec<Arc<[AtomicU64]>>,
    /// Metric totals of the counts that left them.
    gone: Totals,
    /// Counts a tally still held when it was dropped, after its last
    /// drain, for the next report.
    late: BTreeMap<RowKey, u64>,
}

/// A subscriber's decisions since it started, as its metrics count them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Totals {
    pub decisions: [[u64; EFFECTS.len()]; ACTION_SLOTS],
    pub stale: u64,
    pub failed_closed: u64,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            decisions: [[0; EFFECTS.len()]; ACTION_SLOTS],
            stale: 0,
            failed_closed: 0,
        }
    }
}

impl Totals {
    /// Adds `n` decisions of cell `i`.
    fn add(&mut self, i: usize, n: u64) {
        let at = At::of(i);
        let row = &mut self.decisions[at.action][effect_slot(at.effect)];
        *row = row.saturating_add(n);
        if at.flag >= 1 {
            self.stale = self.stale.saturating_add(n);
        }
        if at.flag == 2 {
            self.failed_closed = self.failed_closed.saturating_add(n);
        }
    }
}

impl Book {
    fn lock(&self) -> MutexGuard<'_, BookInner> {
        // A panic elsewhere while it was held leaves whole counts behind:
        // every change under the lock is one addition or one move.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The decisions counted so far: those that left the tallies and those
    /// still in them. Never less than an earlier answer (a count moves out
    /// of a tally and into the book under the one lock).
    pub fn totals(&self) -> Totals {
        let book = self.lock();
        let mut totals = book.gone.clone();
        for cells in &book.live {
            for (i, cell) in cells.iter().enumerate() {
                let n = cell.load(Ordering::Relaxed);
                if n != 0 {
                    totals.add(i % CELLS, n);
                }
            }
        }
        totals
    }
}

/// The decisions made with one snapshot (or before the first), since the
/// last report.
pub(crate) struct Tally {
    cells: Arc<[AtomicU64]>,
    revision: Revision,
    book: Arc<Book>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

fn cell(action: usize, class: ContextClass, effect: EffectKind, flag: usize) -> usize {
    ((action * ContextClass::COUNT + class.index()) * EFFECTS.len() + effect_slot(effect)) * FLAGS
        + flag
}

/// What cell `i` counts.
struct At {
    action: usize,
    class: ContextClass,
    effect: EffectKind,
    flag: usize,
}

impl At {
    fn of(i: usize) -> At {
        At {
            flag: i % FLAGS,
            effect: EFFECTS[(i / FLAGS) % EFFECTS.len()],
            class: ContextClass::from_index((i / FLAGS / EFFECTS.len()) % ContextClass::COUNT)
                .expect("an index below COUNT"),
            action: i / FLAGS / EFFECTS.len() / ContextClass::COUNT,
        }
    }

    fn key(&self, revision: Revision) -> RowKey {
        RowKey {
            action: action_name(self.action),
            effect: self.effect,
            revision,
            class: self.class,
            stale: self.flag >= 1,
            failed_closed: self.flag == 2,
        }
    }
}

impl Tally {
    /// A tally for the decisions made with `revision` (0: with none),
    /// kept in `book`.
    pub fn new(book: &Arc<Book>, revision: Revision) -> Tally {
        let cells: Arc<[AtomicU64]> = (0..CELLS * shards()).map(|_| AtomicU64::new(0)).collect();
        book.lock().live.push(cells.clone());
        Tally {
            cells,
            revision,
            book: book.clone(),
        }
    }

    /// One decision. A 64-bit count cannot wrap: a billion decisions a
    /// second would take five centuries.
    #[inline]
    pub fn count(
        &self,
        action: usize,
        class: ContextClass,
        effect: EffectKind,
        stale: bool,
        failed_closed: bool,
    ) {
        let flag = if failed_closed { 2 } else { usize::from(stale) };
        self.cells[shard_start() + cell(action, class, effect, flag)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Moves every count into `rows` as made with `revision`, and zeroes
    /// them; with them, the counts that tallies dropped since the last
    /// drain left behind.
    pub fn drain(&self, revision: Revision, rows: &mut Rows) {
        let mut book = self.book.lock();
        for (key, n) in std::mem::take(&mut book.late) {
            rows.add_drained(key, n);
        }
        for (i, cell) in self.cells.iter().enumerate() {
            if cell.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let n = cell.swap(0, Ordering::Relaxed);
            book.gone.add(i % CELLS, n);
            rows.add_drained(At::of(i % CELLS).key(revision), n);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let mut book = self.book.lock();
        let book = &mut *book;
        book.live.retain(|cells| !Arc::ptr_eq(cells, &self.cells));
        for (i, cell) in self.cells.iter().enumerate() {
            let n = cell.swap(0, Ordering::Relaxed);
            if n != 0 {
                book.gone.add(i % CELLS, n);
                let late = book
                    .late
                    .entry(At::of(i % CELLS).key(self.revision))
                    .or_default();
                *late = late.saturating_add(n);
            }
        }
    }
}

/// What a decision row is counted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RowKey {
    action: &'static str,
    effect: EffectKind,
    revision: Revision,
    class: ContextClass,
    stale: bool,
    failed_closed: bool,
}

/// A report being put together (and what a refused one carries over).
#[derive(Debug, Default)]
pub(crate) struct Rows {
    decisions: BTreeMap<RowKey, u64>,
    signals: BTreeMap<SignalName, u64>,
}

impl Rows {
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty() && self.signals.is_empty()
    }

    fn add(&mut self, key: RowKey, n: u64) {
        let count = self.decisions.entry(key).or_default();
        *count = count.saturating_add(n);
    }

    /// Decisions drained from a tally: those whose step-up attempts ran
    /// out are also the signal `safemode.attempts_exhausted` (counted
    /// once, in the tally, not again at the decision).
    fn add_drained(&mut self, key: RowKey, n: u64) {
        if key.class.attempts_exhausted {
            self.add_signal(SignalName::ATTEMPTS_EXHAUSTED, n);
        }
        self.add(key, n);
    }

    /// One of the client's own signals.
    fn add_signal(&mut self, name: &str, n: u64) {
        let name = SignalName::parse(name).expect("the client's own names are valid");
        let count = self.signals.entry(name).or_default();
        *count = count.saturating_add(n);
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: Rows) {
        for (k, n) in other.decisions {
            self.add(k, n);
        }
        for (k, n) in other.signals {
            let count = self.signals.entry(k).or_default();
            *count = count.saturating_add(n);
        }
    }

    /// The report to send, within the bounds of one; what does not fit
    /// stays in `self` for the next.
    pub fn take_report(&mut self, sequence: u64) -> (proto::Report, Rows) {
        let mut sent = Rows::default();
        let mut biggest: Vec<(RowKey, u64)> =
            std::mem::take(&mut self.decisions).into_iter().collect();
        biggest.sort_by_key(|row| std::cmp::Reverse(row.1));
        for (i, (k, n)) in biggest.into_iter().enumerate() {
            if i < MAX_DECISION_ROWS {
                sent.decisions.insert(k, n);
            } else {
                self.decisions.insert(k, n);
            }
        }
        let mut signals: Vec<(SignalName, u64)> =
            std::mem::take(&mut self.signals).into_iter().collect();
        signals.sort_by_key(|row| std::cmp::Reverse(row.1));
        for (i, (k, n)) in signals.into_iter().enumerate() {
            if i < MAX_SIGNALS {
                sent.signals.insert(k, n);
            } else {
                self.signals.insert(k, n);
            }
        }
        let report = proto::Report {
            sequence,
            decisions: sent
                .decisions
                .iter()
                .map(|(k, n)| proto::DecisionCount {
                    action: k.action.to_string(),
                    effect: k.effect.as_str().to_string(),
                    revision: k.revision,
                    context: Some(proto::ReportedClass {
                        confidence: k.class.confidence.as_str().to_string(),
                        method: k.class.method.as_str().to_string(),
                        handoff: k.class.handoff,
                        attempts_exhausted: k.class.attempts_exhausted,
                    }),
                    stale: k.stale,
                    failed_closed: k.failed_closed,
                    count: *n,
                })
                .collect(),
            signals: sent
                .signals
                .iter()
                .map(|(name, n)| proto::SignalCount {
                    name: name.to_string(),
                    count: *n,
                })
                .collect(),
        };
        (report, sent)
    }
}

/// The signal names one subscriber counts at once, besides the client's
/// own two; counts for more names are dropped (and logged once).
pub const MAX_SIGNAL_NAMES: usize = MAX_SIGNALS - 2;

/// Named signal counters: the service's own, under a lock (a signal is
/// not on the decide path), and the client's `safemode.step_up_failed`, in
/// an atomic (`safemode.attempts_exhausted` is the tallies' decisions of
/// that context class).
#[derive(Debug, Default)]
pub(crate) struct Signals {
    named: Mutex<BTreeMap<SignalName, u64>>,
    step_up_failed: AtomicU64,
    warned: std::sync::atomic::AtomicBool,
}

impl Signals {
    /// Counts `n` of `name`; a name under `safemode.` is the client's own
    /// and is not counted from outside.
    pub fn add(&self, name: &SignalName, n: u64) {
        if name.is_reserved() {
            warn!(signal = %name, "signal names under safemode. are counted by the client itself; this count is dropped");
            return;
        }
        let mut named = self.named.lock().expect("poisoned");
        if let Some(count) = named.get_mut(name) {
            *count = count.saturating_add(n);
        } else if named.len() < MAX_SIGNAL_NAMES {
            named.insert(name.clone(), n);
        } else if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                signal = %name,
                "more than {MAX_SIGNAL_NAMES} signal names in one report interval; counts of new names are dropped until the next report"
            );
        }
    }

    /// A step-up asked again after a failed attempt.
    #[inline]
    pub fn step_up_failed(&self) {
        self.step_up_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves every count into `rows`.
    pub fn drain(&self, rows: &mut Rows) {
        let named = std::mem::take(&mut *self.named.lock().expect("poisoned"));
        self.warned.store(false, Ordering::Relaxed);
        for (name, n) in named {
            *rows.signals.entry(name).or_default() += n;
        }
        let n = self.step_up_failed.swap(0, Ordering::Relaxed);
        if n > 0 {
            rows.add_signal(SignalName::STEP_UP_FAILED, n);
        }
    }
}

/// What the controller said of a report sent with
/// [`Subscriber::report_now`](crate::Subscriber::report_now).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReportReceipt {
    /// Taken.
    Accepted,
    /// Taken, but `left_out` of its rows were left out (their counts are
    /// lost), and why: a bound of the controller's report book was full.
    Partial {
        /// Rows left out.
        left_out: u32,
        /// Which bound was full, and what to do.
        reason: String,
    },
    /// Refused for coming too soon: the counts go with the next report,
    /// which the controller takes after `retry_after`.
    TooSoon {
        /// When to report again.
        retry_after: std::time::Duration,
        /// The controller's words.
        reason: String,
    },
    /// Refused, and why (the counts are kept for the next report when the
    /// controller takes no reports).
    Refused(String),
    /// The stream ended before the controller answered; the counts go with
    /// the next report (the controller may have counted them already).
    Lost(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use safemode_policy::{ConfidenceBand, MethodClass};

    #[test]
    fn a_tally_drains_every_count_once_under_its_own_key() {
        let tally = Tally::new(&Arc::default(), 42);
        let class = ContextClass {
            confidence: ConfidenceBand::High,
            method: MethodClass::Strong,
            handoff: true,
            attempts_exhausted: false,
        };
        tally.count(0, class, EffectKind::StepUp, false, false);
        tally.count(0, class, EffectKind::StepUp, false, false);
        tally.count(ACTION_SLOTS - 1, class, EffectKind::Deny, true, true);
        tally.count(3, class, EffectKind::Allow, true, false);
        let mut rows = Rows::default();
        tally.drain(42, &mut rows);
        let (report, _) = rows.take_report(7);
        let mut got: Vec<_> = report
            .decisions
            .iter()
            .map(|d| {
                (
                    d.action.as_str(),
                    d.effect.as_str(),
                    d.revision,
                    d.stale,
                    d.failed_closed,
                    d.count,
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("account.mfa_reset", "allow", 42, true, false, 1),
                ("account.password_reset", "step_up", 42, false, false, 2),
                ("bot.intent", "deny", 42, true, true, 1),
            ]
        );
        assert!(report.decisions.iter().all(|d| d.context
            == Some(proto::ReportedClass {
                confidence: "high".into(),
                method: "strong".into(),
                handoff: true,
                attempts_exhausted: false,
            })));
        let mut again = Rows::default();
        tally.drain(42, &mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn a_report_holds_at_most_its_bound_and_keeps_the_rest() {
        let tally = Tally::new(&Arc::default(), 1);
        for index in 0..ContextClass::COUNT {
            let class = ContextClass::from_index(index).unwrap();
            for action in 0..ACTION_SLOTS {
                for effect in EFFECTS {
                    tally.count(action, class, effect, false, false);
                }
            }
        }
        let mut rows = Rows::default();
        tally.drain(1, &mut rows);
        let total = ContextClass::COUNT * ACTION_SLOTS * EFFECTS.len();
        let (report, _) = rows.take_report(1);
        assert_eq!(report.decisions.len(), MAX_DECISION_ROWS);
        assert_eq!(rows.decisions.len(), total - MAX_DECISION_ROWS);
    }

    #[test]
    fn decisions_after_a_tally_was_drained_for_the_last_time_reach_the_next_report() {
        let book = Arc::new(Book::default());
        let unapplied = Tally::new(&book, 0);
        let retired = Arc::new(Tally::new(&book, 7));
        let class = ContextClass::from_index(5).unwrap();
        retired.count(1, class, EffectKind::Deny, false, false);
        // The task drains it and lets it go, while a thread still decides
        // with its snapshot.
        let held = retired.clone();
        let mut first = Rows::default();
        retired.drain(7, &mut first);
        drop(retired);
        held.count(1, class, EffectKind::Deny, false, false);
        held.count(1, class, EffectKind::Deny, false, false);
        drop(held);
        let mut next = Rows::default();
        unapplied.drain(0, &mut next);
        let key = At::of(cell(1, class, EffectKind::Deny, 0)).key(7);
        assert_eq!(first.decisions[&key], 1);
        assert_eq!(next.decisions[&key], 2);
        assert_eq!(next.decisions.len(), 1);
        // Each counted once in the metrics too.
        assert_eq!(book.totals().decisions[1][effect_slot(EffectKind::Deny)], 3);
    }

    #[test]
    fn threads_counting_at_once_are_summed_exactly() {
        let book = Arc::new(Book::default());
        let tally = Tally::new(&book, 9);
        let class = ContextClass::from_index(3).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..MAX_SHARDS + 1 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        tally.count(2, class, EffectKind::StepUp, true, false);
                    }
                });
            }
        });
        let want = 1000 * (MAX_SHARDS as u64 + 1);
        assert_eq!(
            book.totals().decisions[2][effect_slot(EffectKind::StepUp)],
            want
        );
        assert_eq!(book.totals().stale, want);
        let mut rows = Rows::default();
        tally.drain(9, &mut rows);
        let key = At::of(cell(2, class, EffectKind::StepUp, 1)).key(9);
        assert_eq!(rows.decisions[&key], want);
        assert_eq!(rows.decisions.len(), 1);
        assert_eq!(book.totals().stale, want);
    }

    #[test]
    fn decisions_whose_attempts_ran_out_are_the_signal_too() {
        let book = Arc::new(Book::default());
        let tally = Tally::new(&book, 2);
        let exhausted = ContextClass {
            confidence: ConfidenceBand::Low,
            method: MethodClass::None,
            handoff: false,
            attempts_exhausted: true,
        };
        tally.count(0, exhausted, EffectKind::Review, false, false);
        tally.count(0, exhausted, EffectKind::Review, false, false);
        tally.count(
            0,
            ContextClass::from_index(0).unwrap(),
            EffectKind::Allow,
            false,
            false,
        );
        let mut rows = Rows::default();
        tally.drain(2, &mut rows);
        let signal = SignalName::parse(SignalName::ATTEMPTS_EXHAUSTED).unwrap();
        assert_eq!(rows.signals[&signal], 2);
        assert_eq!(rows.signals.len(), 1);
    }

    #[test]
    fn a_count_goes_past_what_32_bits_hold() {
        let tally = Tally::new(&Arc::default(), 1);
        let class = ContextClass::from_index(0).unwrap();
        let i = cell(0, class, EffectKind::Allow, 0);
        tally.cells[i].store(u64::from(u32::MAX), Ordering::Relaxed);
        tally.count(0, class, EffectKind::Allow, false, false);
        let mut rows = Rows::default();
        tally.drain(1, &mut rows);
        assert_eq!(rows.decisions[&At::of(i).key(1)], u64::from(u32::MAX) + 1);
    }

    #[test]
    fn signals_beyond_the_bound_of_names_are_dropped() {
        let signals = Signals::default();
        for i in 0..MAX_SIGNAL_NAMES + 5 {
            signals.add(&SignalName::parse(&format!("s.n{i}")).unwrap(), 2);
        }
        signals.step_up_failed();
        let mut rows = Rows::default();
        signals.drain(&mut rows);
        assert_eq!(rows.signals.len(), MAX_SIGNAL_NAMES + 1);
        assert_eq!(
            rows.signals[&SignalName::parse(SignalName::STEP_UP_FAILED).unwrap()],
            1
        );
    }
}
