//! What this replica's subscribers reported, over sliding windows: their
//! decisions by channel, revision, action, context class and effect, the
//! subscribers that decided on an old revision, stale or failing closed,
//! and named signal counters. Kept in memory only, in 10-second buckets for
//! the last 15 minutes; the fleet's view is every replica's tallies summed
//! (asked like a fleet status).
//!
//! Everything is bounded: a report by [`limits`], the book by
//! [`MAX_ROWS`] rows in all (rows beyond it are left out and the tallies
//! say so). A report names no customer: only counts.
//!
//! [`limits`]: safemode_policy::telemetry::limits

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

use safemode_policy::{Channel, ContextClass, EffectKind, Namespace, Revision, SignalName};

/// The width of one bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// The longest window kept.
pub const LONGEST_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Rows the book holds in all, over every namespace and bucket (about a
/// hundred bytes each); rows beyond are left out and the tallies say so.
pub const MAX_ROWS: usize = 200_000;
/// Rows one tally answer holds, at most, of each kind.
pub const MAX_TALLY_ROWS: usize = 20_000;
/// Namespaces the book keeps reports of (live and a few drills).
pub const MAX_NAMESPACES: usize = 16;

const BUCKETS: usize = (LONGEST_WINDOW.as_secs() / BUCKET.as_secs()) as usize;

/// Decisions alike, counted together.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionRow {
    pub channel: Channel,
    pub revision: Revision,
    /// A known action, or `bot.intent`.
    pub action: Arc<str>,
    pub class: ContextClass,
    pub effect: EffectKind,
    pub stale: bool,
    pub failed_closed: bool,
}

/// A subscriber that decided on a revision older than the namespace's, on
/// a stale policy, or failing closed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NotableRow {
    pub channel: Channel,
    pub subscriber: Arc<str>,
    pub revision: Revision,
    pub stale: bool,
    pub failed_closed: bool,
}

/// One report, checked and reduced to rows.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub decisions: Vec<(DecisionRow, u64)>,
    pub signals: Vec<(SignalName, u64)>,
}

/// A window's sums.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tallies {
    pub decisions: Vec<(DecisionRow, u64)>,
    pub notable: Vec<(NotableRow, u64)>,
    pub signals: Vec<((Channel, SignalName), u64)>,
    /// Rows were left out (the book was full, or the answer was cut).
    pub truncated: bool,
    /// Reports refused in the window.
    pub refused: u64,
}

impl Tallies {
    /// The sums of several replicas' tallies (each counts its own
    /// subscribers, so rows alike add up), cut like one replica's.
    pub fn sum(parts: impl IntoIterator<Item = Tallies>) -> Tallies {
        fn add<K: Eq + std::hash::Hash>(into: &mut HashMap<K, u64>, rows: Vec<(K, u64)>) {
            for (k, n) in rows {
                let count = into.entry(k).or_default();
                *count = count.saturating_add(n);
            }
        }
        let (mut decisions, mut notable, mut signals) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        let mut total = Tallies::default();
        for part in parts {
            add(&mut decisions, part.decisions);
            add(&mut notable, part.notable);
            add(&mut signals, part.signals);
            total.truncated |= part.truncated;
            total.refused = total.refused.saturating_add(part.refused);
        }
        total.decisions = biggest(decisions, &mut total.truncated);
        total.notable = biggest(notable, &mut total.truncated);
        total.signals = biggest(signals, &mut total.truncated);
        total
    }
}

#[derive(Debug, Default)]
struct Bucket {
    /// Seconds since the epoch divided by the bucket's width.
    slot: i64,
    decisions: HashMap<DecisionRow, u64>,
    notable: HashMap<NotableRow, u64>,
    signals: HashMap<(Channel, SignalName), u64>,
    truncated: bool,
    refused: u64,
}

impl Bucket {
    fn rows(&self) -> usize {
        self.decisions.len() + self.notable.len() + self.signals.len()
    }
}

#[derive(Debug, Default)]
struct Book {
    namespaces: BTreeMap<Namespace, VecDeque<Bucket>>,
    rows: usize,
}

/// This replica's reports, per namespace.
#[derive(Debug, Default)]
pub struct ReportBook {
    book: Mutex<Book>,
}

fn slot_of(at: Timestamp) -> i64 {
    at.as_second().div_euclid(BUCKET.as_secs() as i64)
}

/// Adds `n` to `key`'s count if the book has room for a new row.
fn add<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, u64>,
    key: K,
    n: u64,
    rows: &mut usize,
    truncated: &mut bool,
) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_add(n);
    } else if *rows < MAX_ROWS {
        map.insert(key, n);
        *rows += 1;
    } else {
        *truncated = true;
    }
}

impl ReportBook {
    /// Records `report` from a subscriber of `namespace` on `channel`, at
    /// `now`; `current` is the namespace's revision, to tell an old one.
    pub fn record(
        &self,
        namespace: &Namespace,
        channel: Channel,
        subscriber: &str,
        current: Revision,
        report: &Report,
        now: Timestamp,
    ) {
        let mut guard = self.book.lock().expect("poisoned");
        let Book { namespaces, rows } = &mut *guard;
        let Some(buckets) = buckets_for(namespaces, rows, namespace, now) else {
            return;
        };
        let bucket = buckets.back_mut().expect("a current bucket");
        let subscriber: Arc<str> = subscriber.into();
        for (row, n) in &report.decisions {
            let (row, n) = (row.clone(), *n);
            if row.stale || row.failed_closed || row.revision < current {
                let notable = NotableRow {
                    channel,
                    subscriber: subscriber.clone(),
                    revision: row.revision,
                    stale: row.stale,
                    failed_closed: row.failed_closed,
                };
                add(&mut bucket.notable, notable, n, rows, &mut bucket.truncated);
            }
            add(&mut bucket.decisions, row, n, rows, &mut bucket.truncated);
        }
        for (name, n) in &report.signals {
            let key = (channel, name.clone());
            add(&mut bucket.signals, key, *n, rows, &mut bucket.truncated);
        }
    }

    /// Counts a refused report of `namespace`.
    pub fn refused(&self, namespace: &Namespace, now: Timestamp) {
        let mut guard = self.book.lock().expect("poisoned");
        let Book { namespaces, rows } = &mut *guard;
        if let Some(buckets) = buckets_for(namespaces, rows, namespace, now) {
            buckets.back_mut().expect("a current bucket").refused += 1;
        }
    }

    /// The sums over the last `window` (rounded up to whole buckets, at
    /// most [`LONGEST_WINDOW`]) of `namespace`, as of `now`.
    pub fn tallies(&self, namespace: &Namespace, window: Duration, now: Timestamp) -> Tallies {
        let buckets = window
            .as_secs()
            .div_ceil(BUCKET.as_secs())
            .clamp(1, BUCKETS as u64) as i64;
        let from = slot_of(now) - buckets + 1;
        let guard = self.book.lock().expect("poisoned");
        let mut decisions: HashMap<&DecisionRow, u64> = HashMap::new();
        let mut notable: HashMap<&NotableRow, u64> = HashMap::new();
        let mut signals: HashMap<&(Channel, SignalName), u64> = HashMap::new();
        let mut tallies = Tallies::default();
        for bucket in guard
            .namespaces
            .get(namespace)
            .into_iter()
            .flatten()
            .filter(|b| b.slot >= from)
        {
            for (row, n) in &bucket.decisions {
                let count = decisions.entry(row).or_default();
                *count = count.saturating_add(*n);
            }
            for (row, n) in &bucket.notable {
                let count = notable.entry(row).or_default();
                *count = count.saturating_add(*n);
            }
            for (key, n) in &bucket.signals {
                let count = signals.entry(key).or_default();
                *count = count.saturating_add(*n);
            }
            tallies.truncated |= bucket.truncated;
            tallies.refused = tallies.refused.saturating_add(bucket.refused);
        }
        tallies.decisions = biggest(
            decisions.into_iter().map(|(k, n)| (k.clone(), n)),
            &mut tallies.truncated,
        );
        tallies.notable = biggest(
            notable.into_iter().map(|(k, n)| (k.clone(), n)),
            &mut tallies.truncated,
        );
        tallies.signals = biggest(
            signals.into_iter().map(|(k, n)| (k.clone(), n)),
            &mut tallies.truncated,
        );
        tallies
    }
}

/// The most counted [`MAX_TALLY_ROWS`] rows, biggest first.
fn biggest<K: Ord>(
    rows: impl IntoIterator<Item = (K, u64)>,
    truncated: &mut bool,
) -> Vec<(K, u64)> {
    let mut rows: Vec<(K, u64)> = rows.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if rows.len() > MAX_TALLY_ROWS {
        rows.truncate(MAX_TALLY_ROWS);
        *truncated = true;
    }
    rows
}

/// The buckets of `namespace`, with the current one last and the expired
/// ones dropped; `None` when the book already keeps as many namespaces as
/// it may.
fn buckets_for<'a>(
    namespaces: &'a mut BTreeMap<Namespace, VecDeque<Bucket>>,
    rows: &mut usize,
    namespace: &Namespace,
    now: Timestamp,
) -> Option<&'a mut VecDeque<Bucket>> {
    let slot = slot_of(now);
    // Expire every namespace's old buckets, so rows come back to the book.
    namespaces.retain(|_, buckets| {
        while buckets
            .front()
            .is_some_and(|b| b.slot <= slot - BUCKETS as i64)
        {
            let gone = buckets.pop_front().expect("a front bucket");
            *rows -= gone.rows();
        }
        !buckets.is_empty()
    });
    if !namespaces.contains_key(namespace) && namespaces.len() >= MAX_NAMESPACES {
        return None;
    }
    let buckets = namespaces.entry(namespace.clone()).or_default();
    if buckets.back().is_none_or(|b| b.slot < slot) {
        buckets.push_back(Bucket {
            slot,
            ..Bucket::default()
        });
    }
    Some(buckets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safemode_policy::{ConfidenceBand, MethodClass};

    fn row(channel: &str, revision: Revision, effect: EffectKind) -> DecisionRow {
        DecisionRow {
            channel: Channel::parse(channel).unwrap(),
            revision,
            action: "account.email_change".into(),
            class: ContextClass {
                confidence: ConfidenceBand::Low,
                method: MethodClass::None,
                handoff: false,
                attempts_exhausted: false,
            },
            effect,
            stale: false,
            failed_closed: false,
        }
    }

    #[test]
    fn windows_sum_what_fell_in_them_and_forget_the_rest() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let web = Channel::parse("web").unwrap();
        let t0 = Timestamp::from_second(1_000_000_000).unwrap();
        let at = |secs: i64| {
            t0.checked_add(jiff::SignedDuration::from_secs(secs))
                .unwrap()
        };
        let report = |n| Report {
            decisions: vec![(row("web", 5, EffectKind::StepUp), n)],
            signals: vec![(SignalName::parse("login.failed").unwrap(), n)],
        };
        book.record(&live, web, "w1", 5, &report(3), at(0));
        book.record(&live, web, "w2", 5, &report(4), at(5));
        book.record(&live, web, "w1", 5, &report(10), at(600));
        let minute = book.tallies(&live, Duration::from_secs(60), at(600));
        assert_eq!(
            minute.decisions,
            vec![(row("web", 5, EffectKind::StepUp), 10)]
        );
        let quarter = book.tallies(&live, LONGEST_WINDOW, at(600));
        assert_eq!(quarter.decisions[0].1, 17);
        assert_eq!(quarter.signals[0].1, 17);
        assert!(quarter.notable.is_empty());
        // Past 15 minutes the first two are gone, and so are their rows.
        let later = book.tallies(&live, LONGEST_WINDOW, at(1000));
        assert_eq!(later.decisions[0].1, 10);
        book.record(&live, web, "w1", 5, &report(1), at(1600));
        assert_eq!(book.book.lock().unwrap().rows, 2);
    }

    #[test]
    fn an_old_revision_stale_or_failing_closed_subscriber_is_named() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let ivr = Channel::parse("ivr").unwrap();
        let now = Timestamp::from_second(1_000_000_000).unwrap();
        let mut failing = row("ivr", 7, EffectKind::Deny);
        failing.failed_closed = true;
        let report = Report {
            decisions: vec![
                (row("ivr", 6, EffectKind::Allow), 2),
                (row("ivr", 7, EffectKind::StepUp), 5),
                (failing, 1),
            ],
            signals: vec![],
        };
        book.record(&live, ivr, "ivr-1", 7, &report, now);
        let t = book.tallies(&live, Duration::from_secs(60), now);
        let named: Vec<_> = t
            .notable
            .iter()
            .map(|(r, n)| (&*r.subscriber, r.revision, r.failed_closed, *n))
            .collect();
        assert_eq!(named, vec![("ivr-1", 6, false, 2), ("ivr-1", 7, true, 1)]);
    }

    #[test]
    fn a_full_book_leaves_rows_out_and_says_so() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let web = Channel::parse("web").unwrap();
        let now = Timestamp::from_second(1_000_000_000).unwrap();
        book.book.lock().unwrap().rows = MAX_ROWS;
        let report = Report {
            decisions: vec![(row("web", 1, EffectKind::Allow), 1)],
            signals: vec![],
        };
        book.record(&live, web, "w", 1, &report, now);
        let t = book.tallies(&live, Duration::from_secs(60), now);
        assert!(t.decisions.is_empty());
        assert!(t.truncated);
    }
}
