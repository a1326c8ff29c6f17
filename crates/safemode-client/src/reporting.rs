//! What a subscriber tells the controller about what its channel decided
//! and saw (issue "see the attack first"): decisions counted by action,
//! effect, revision and context class, and named signal counters, sent as
//! a `Report` on the subscription stream every [`REPORT_EVERY`]. Only
//! counts: the wire type has no field for a customer.
//!
//! Counting costs a decision one relaxed atomic addition (two when a
//! step-up failed or ran out), into the tally of the snapshot it decided
//! with, so every count carries its revision without a lock. The task
//! drains the tallies when it reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tracing::warn;

use safemode_policy::telemetry::limits::{MAX_DECISION_ROWS, MAX_SIGNALS};
use safemode_policy::{ContextClass, EffectKind, Revision, SignalName};
use safemode_wire::proto;

use super::metrics::{ACTION_SLOTS, EFFECTS, action_name, effect_slot};

pub use safemode_policy::telemetry::limits::REPORT_EVERY;

/// Fresh, stale, failed closed.
const FLAGS: usize = 3;
const CELLS: usize = ACTION_SLOTS * ContextClass::COUNT * EFFECTS.len() * FLAGS;

/// The decisions made with one snapshot (or before the first), since the
/// last report.
pub(crate) struct Tally {
    cells: Box<[AtomicU32]>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            cells: (0..CELLS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tally")
    }
}

fn cell(action: usize, class: ContextClass, effect: EffectKind, flag: usize) -> usize {
    ((action * ContextClass::COUNT + class.index()) * EFFECTS.len() + effect_slot(effect)) * FLAGS
        + flag
}

impl Tally {
    /// One decision.
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
        self.cells[cell(action, class, effect, flag)].fetch_add(1, Ordering::Relaxed);
    }

    /// Moves every count into `rows` as made with `revision`, and zeroes
    /// them.
    pub fn drain(&self, revision: Revision, rows: &mut Rows) {
        for (i, cell) in self.cells.iter().enumerate() {
            if cell.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let n = cell.swap(0, Ordering::Relaxed);
            let flag = i % FLAGS;
            let effect = EFFECTS[(i / FLAGS) % EFFECTS.len()];
            let class = ContextClass::from_index((i / FLAGS / EFFECTS.len()) % ContextClass::COUNT)
                .expect("an index below COUNT");
            let action = i / FLAGS / EFFECTS.len() / ContextClass::COUNT;
            let key = RowKey {
                action: action_name(action),
                effect,
                revision,
                class,
                stale: flag >= 1,
                failed_closed: flag == 2,
            };
            *rows.decisions.entry(key).or_default() += u64::from(n);
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

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: Rows) {
        for (k, n) in other.decisions {
            *self.decisions.entry(k).or_default() += n;
        }
        for (k, n) in other.signals {
            *self.signals.entry(k).or_default() += n;
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
/// not on the decide path), and the client's two, in atomics.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    named: Mutex<BTreeMap<SignalName, u64>>,
    step_up_failed: AtomicU64,
    attempts_exhausted: AtomicU64,
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

    /// A step-up's attempts ran out.
    #[inline]
    pub fn attempts_exhausted(&self) {
        self.attempts_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves every count into `rows`.
    pub fn drain(&self, rows: &mut Rows) {
        let named = std::mem::take(&mut *self.named.lock().expect("poisoned"));
        self.warned.store(false, Ordering::Relaxed);
        for (name, n) in named {
            *rows.signals.entry(name).or_default() += n;
        }
        for (name, counter) in [
            (SignalName::STEP_UP_FAILED, &self.step_up_failed),
            (SignalName::ATTEMPTS_EXHAUSTED, &self.attempts_exhausted),
        ] {
            let n = counter.swap(0, Ordering::Relaxed);
            if n > 0 {
                let name = SignalName::parse(name).expect("the client's own names are valid");
                *rows.signals.entry(name).or_default() += n;
            }
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
        let tally = Tally::default();
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
        let tally = Tally::default();
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
