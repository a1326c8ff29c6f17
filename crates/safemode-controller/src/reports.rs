//! What this replica's subscribers reported, over sliding windows: their
//! decisions by channel, revision, action, context class and effect, the
//! subscribers that decided on an old revision, stale or failing closed,
//! named signal counters, and the reports refused or cut short. Kept in
//! memory only, in 10-second buckets for the last 15 minutes; the fleet's
//! view is every replica's tallies summed (asked like a fleet status).
//!
//! Everything is bounded: a report by [`limits`], the book by [`MAX_ROWS`]
//! rows in all, and no one sender can take the book from the others: one
//! token adds at most [`MAX_TOKEN_ROWS_PER_BUCKET`] new rows to each
//! bucket (so a token over it loses the excess of that bucket only, never
//! the next) and, once the book holds [`HOLDING_BOUND_FROM`], holds at
//! most [`MAX_TOKEN_ROWS`] (so it takes four flooding tokens to fill the
//! room all may share, and the [reserve](RESERVE_FLOOR) past it is for the
//! tokens that hold little); the drills together hold at most
//! [`MAX_DRILL_ROWS`], so the live namespace always has room, and one
//! token at most [`MAX_TOKEN_DRILL_ROWS`] of it, so a real drill does too.
//! Rows beyond a bound are left out: the sender is told how many, and the
//! tallies say counts are low. A report names no customer: only counts.
//!
//! [`limits`]: safemode_policy::telemetry::limits

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jiff::Timestamp;

use safemode_policy::{Channel, ContextClass, EffectKind, Namespace, Revision, SignalName};

/// The width of one bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// The longest window kept.
pub const LONGEST_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Rows the book holds in all, over every namespace and bucket (about 280
/// bytes each, measured: about 140 MB when full).
pub const MAX_ROWS: usize = 500_000;
/// Rows any sender may fill the book to; the rest, up to [`MAX_ROWS`], is
/// kept for tokens that hold fewer than [`RESERVE_FLOOR`] rows, so that
/// flooding tokens (or a few huge fleets) leave room for everyone else.
pub const MAX_SHARED_ROWS: usize = 400_000;
/// New rows one token (one principal, without tokens) adds to the book in
/// one 10-second bucket, over every namespace, at most: a busy channel's
/// fleet reports a few hundred distinct rows per bucket; a flooding or
/// looping sender fills its own part of each bucket only.
pub const MAX_TOKEN_ROWS_PER_BUCKET: usize = 2_500;
/// Rows one token holds over every bucket kept, at most, once the book
/// holds [`HOLDING_BOUND_FROM`]: a quarter of the shared room, so fewer
/// than four flooding tokens never fill it (a token adding its whole part
/// of every bucket reaches this in under 7 minutes, and adds as its oldest
/// rows age out after). A lone busy token in a book that holds little adds
/// its whole part of every bucket.
pub const MAX_TOKEN_ROWS: usize = MAX_SHARED_ROWS / 4;
/// Rows the book holds before [`MAX_TOKEN_ROWS`] applies.
pub const HOLDING_BOUND_FROM: usize = MAX_SHARED_ROWS / 2;
/// Rows a token may hold and still add past [`MAX_SHARED_ROWS`]: what a
/// token adding a quarter of its part of every bucket holds over the
/// longest window (a busy channel's fleet stays under it; a flooding one
/// does not).
pub const RESERVE_FLOOR: usize = BUCKETS * MAX_TOKEN_ROWS_PER_BUCKET / 4;
/// Rows every drill namespace together holds, at most: live reports always
/// have the rest.
pub const MAX_DRILL_ROWS: usize = MAX_ROWS / 4;
/// Rows one drill namespace holds, at most: one drill's flood cannot take
/// the room of the others.
pub const MAX_ROWS_PER_DRILL: usize = MAX_DRILL_ROWS / 4;
/// Rows one token holds in drills, over every drill namespace, at most: it
/// takes eight tokens to fill the drills' share, whichever drills they
/// report into, so a real drill has room.
pub const MAX_TOKEN_DRILL_ROWS: usize = MAX_DRILL_ROWS / 8;
/// Rows one tally answer holds, at most, of each kind.
pub const MAX_TALLY_ROWS: usize = 20_000;
/// Drill namespaces the book keeps reports of, besides live (which is
/// always kept); only a drill that changed something is kept at all.
pub const MAX_DRILL_NAMESPACES: usize = 256;
/// Subscribers of one principal whose refusals a bucket names, at most;
/// the principal's other refusals are counted together, by channel and why.
pub const MAX_REFUSED_NAMED_PER_PRINCIPAL: usize = 8;
/// Refusal rows a bucket holds, at most (beyond, refusals are only counted,
/// and the tallies say names were cut).
pub const MAX_REFUSED_ROWS: usize = 256;

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

/// Why a report was refused, or cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Sooner than its subscriber's (or its token's) pace allows.
    TooSoon,
    /// Larger than a report may be.
    TooLarge,
    /// A row that does not hold (an unknown name, a revision never sent).
    Malformed,
    /// The sender may not report in the namespace.
    NotPermitted,
    /// Taken, but rows were left out: the sender's share of the book (or
    /// the book) was full.
    LeftOut,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::TooSoon,
        Refusal::TooLarge,
        Refusal::Malformed,
        Refusal::NotPermitted,
        Refusal::LeftOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooSoon => "too_soon",
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed",
            Refusal::NotPermitted => "not_permitted",
            Refusal::LeftOut => "left_out",
        }
    }

    pub fn parse(name: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reports of one sender refused (or cut short) for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefusedRow {
    pub principal: Arc<str>,
    pub channel: Channel,
    /// Empty: several subscribers of the principal, beyond those named.
    pub subscriber: Arc<str>,
    pub why: Refusal,
}

/// Who sent a report: the token (its hash, or the principal's name
/// without tokens), its principal, and the channel and subscriber id of
/// its hello.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sender {
    pub token: Arc<str>,
    pub principal: Arc<str>,
    pub channel: Channel,
    pub subscriber: Arc<str>,
}

/// Why rows of a report were left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The sender's token added [`MAX_TOKEN_ROWS_PER_BUCKET`] rows to this
    /// bucket.
    TokenShare,
    /// The sender's token holds [`MAX_TOKEN_ROWS`] rows.
    TokenHolding,
    /// The sender's token holds [`MAX_TOKEN_DRILL_ROWS`] rows in drills.
    TokenDrillHolding,
    /// The drills together hold [`MAX_DRILL_ROWS`] rows, or this drill
    /// [`MAX_ROWS_PER_DRILL`].
    DrillShare,
    /// The book holds [`MAX_SHARED_ROWS`] rows, and the sender's token
    /// holds `held`, at least [`RESERVE_FLOOR`].
    Reserve { held: usize },
    /// The book holds [`MAX_ROWS`] rows.
    Book,
    /// The book keeps [`MAX_DRILL_NAMESPACES`] other drills already.
    DrillNamespaces,
    /// A drill namespace that never changed anything: nothing to rehearse
    /// yet.
    DrillNotStarted,
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Full::TokenShare => write!(
                f,
                "this token added {MAX_TOKEN_ROWS_PER_BUCKET} new rows to the report book in these 10 seconds, its share; give each channel service its own token"
            ),
            Full::TokenHolding => write!(
                f,
                "this token holds {MAX_TOKEN_ROWS} rows of the report book over 15 minutes, the most one token may once the book holds {HOLDING_BOUND_FROM}; it adds again as its oldest rows age out; give each channel service its own token"
            ),
            Full::TokenDrillHolding => write!(
                f,
                "this token holds {MAX_TOKEN_DRILL_ROWS} rows of the drills' reports over 15 minutes, the most one token may in drills; live reports are not affected"
            ),
            Full::DrillShare => write!(
                f,
                "the drills' share of the report book ({MAX_DRILL_ROWS} rows, {MAX_ROWS_PER_DRILL} for one drill) is full; live reports always have room"
            ),
            Full::Reserve { held } => write!(
                f,
                "the report book's shared room ({MAX_SHARED_ROWS} rows over 15 minutes) is full; past it only tokens holding fewer than {RESERVE_FLOOR} rows may add, and this token holds {held}; it adds again as the oldest rows age out"
            ),
            Full::Book => write!(
                f,
                "the report book is full ({MAX_ROWS} rows over 15 minutes)"
            ),
            Full::DrillNamespaces => write!(
                f,
                "the report book keeps {MAX_DRILL_NAMESPACES} other drills already; their reports age out within 15 minutes"
            ),
            Full::DrillNotStarted => write!(
                f,
                "this drill namespace has changed nothing yet; reports count once the drill applies a mode"
            ),
        }
    }
}

/// What a report recorded: how many of its rows there were, how many were
/// left out, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub rows: usize,
    pub left_out: usize,
    pub full: Option<Full>,
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
    /// Senders of refused reports were left unnamed (only counted).
    pub refusals_cut: bool,
    /// Reports refused or cut short in the window, in all.
    pub refused: u64,
    /// The same by sender and why (the first [`MAX_REFUSED_ROWS`] senders
    /// of each bucket).
    pub refused_by: Vec<(RefusedRow, u64)>,
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
        let (mut decisions, mut notable, mut signals, mut refused_by) = (
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
        );
        let mut total = Tallies::default();
        for part in parts {
            add(&mut decisions, part.decisions);
            add(&mut notable, part.notable);
            add(&mut signals, part.signals);
            add(&mut refused_by, part.refused_by);
            total.truncated |= part.truncated;
            total.refusals_cut |= part.refusals_cut;
            total.refused = total.refused.saturating_add(part.refused);
        }
        total.decisions = biggest(decisions, &mut total.truncated);
        total.notable = biggest(notable, &mut total.truncated);
        total.signals = biggest(signals, &mut total.truncated);
        total.refused_by = biggest(refused_by, &mut total.refusals_cut);
        total
    }
}

/// One 10-second bucket of a namespace. Shared (`Arc`) so that a tally
/// takes the buckets it sums under the lock and sums them after: only the
/// current bucket is ever written, and a write while a tally holds it
/// copies it first.
#[derive(Clone, Debug, Default)]
struct Bucket {
    /// Seconds since the epoch divided by the bucket's width.
    slot: i64,
    decisions: HashMap<DecisionRow, u64>,
    notable: HashMap<NotableRow, u64>,
    signals: HashMap<(Channel, SignalName), u64>,
    truncated: bool,
    refused: u64,
    refused_by: HashMap<RefusedRow, u64>,
    refusals_cut: bool,
    /// Subscribers named in `refused_by`, by principal.
    refused_named: HashMap<Arc<str>, usize>,
    /// New rows each token added to this bucket.
    by_token: HashMap<Arc<str>, usize>,
}

impl Bucket {
    fn rows(&self) -> usize {
        self.decisions.len() + self.notable.len() + self.signals.len()
    }
}

/// A namespace's buckets, oldest first, and the rows they hold.
#[derive(Debug, Default)]
struct Kept {
    buckets: VecDeque<Arc<Bucket>>,
    rows: usize,
}

#[derive(Debug, Default)]
struct Book {
    namespaces: BTreeMap<Namespace, Kept>,
    /// Rows held in all, and by the drills, over every bucket kept.
    rows: usize,
    drill_rows: usize,
    /// Rows each token holds over every bucket kept, and in drills.
    held: HashMap<Arc<str>, usize>,
    drill_held: HashMap<Arc<str>, usize>,
    /// New rows each token added in the current slot, over every namespace.
    slot: i64,
    added: HashMap<Arc<str>, usize>,
}

/// Where a new row may go: the counts it must stay within.
struct Room<'a> {
    rows: &'a mut usize,
    /// The drills' rows, and the token's in drills, for a drill.
    drill_rows: Option<(&'a mut usize, &'a mut usize)>,
    namespace_rows: &'a mut usize,
    token_added: &'a mut usize,
    token_held: &'a mut usize,
    bucket_token_rows: &'a mut usize,
    /// The first bound a row was left out for.
    full: Option<Full>,
}

impl Room<'_> {
    /// Takes room for one new row, or says why there is none.
    fn take(&mut self) -> bool {
        let held = *self.token_held;
        let full = if *self.token_added >= MAX_TOKEN_ROWS_PER_BUCKET {
            Some(Full::TokenShare)
        } else if held >= MAX_TOKEN_ROWS && *self.rows >= HOLDING_BOUND_FROM {
            Some(Full::TokenHolding)
        } else if let Some((_, token)) = &self.drill_rows
            && **token >= MAX_TOKEN_DRILL_ROWS
        {
            Some(Full::TokenDrillHolding)
        } else if let Some((all, _)) = &self.drill_rows
            && (**all >= MAX_DRILL_ROWS || *self.namespace_rows >= MAX_ROWS_PER_DRILL)
        {
            Some(Full::DrillShare)
        } else if *self.rows >= MAX_ROWS {
            Some(Full::Book)
        } else if *self.rows >= MAX_SHARED_ROWS && held >= RESERVE_FLOOR {
            Some(Full::Reserve { held })
        } else {
            None
        };
        if let Some(full) = full {
            self.full.get_or_insert(full);
            return false;
        }
        *self.rows += 1;
        *self.namespace_rows += 1;
        *self.token_added += 1;
        *self.token_held += 1;
        *self.bucket_token_rows += 1;
        if let Some((all, token)) = &mut self.drill_rows {
            **all += 1;
            **token += 1;
        }
        true
    }
}

/// This replica's reports, per namespace.
#[derive(Debug, Default)]
pub struct ReportBook {
    book: Mutex<Book>,
}

fn slot_of(at: Timestamp) -> i64 {
    at.as_second().div_euclid(BUCKET.as_secs() as i64)
}

/// Adds `n` to `key`'s count, if the row is there or there is room for
/// it; whether it was counted.
fn add<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, u64>,
    key: K,
    n: u64,
    room: &mut Room<'_>,
    truncated: &mut bool,
) -> bool {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_add(n);
    } else if room.take() {
        map.insert(key, n);
    } else {
        *truncated = true;
        return false;
    }
    true
}

/// The book, even after a panic elsewhere while it was held: every change
/// to it is a whole row, so what a panic left is still consistent, and a
/// report must never end a policy stream.
fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReportBook {
    /// Records `report` from `sender` in `namespace`, at `now`; `current`
    /// is the namespace's revision, to tell an old one. Rows beyond the
    /// sender's share of the bucket, the drills' share or the book are left
    /// out, and [`Recorded`] says how many and why (the refusals count them
    /// too).
    pub fn record(
        &self,
        namespace: &Namespace,
        sender: &Sender,
        current: Revision,
        report: &Report,
        now: Timestamp,
    ) -> Recorded {
        let all = report.decisions.len() + report.signals.len();
        let none = |full| Recorded {
            rows: all,
            left_out: all,
            full: Some(full),
        };
        // A drill that changed nothing has nothing to rehearse: it takes no
        // room (a drill token could otherwise make up namespaces).
        if namespace.is_drill() && current == 0 {
            return none(Full::DrillNotStarted);
        }
        let mut guard = lock(&self.book);
        let book = &mut *guard;
        book.expire(now);
        let Book {
            namespaces,
            rows,
            drill_rows,
            held,
            drill_held,
            added,
            ..
        } = book;
        let Some(Kept {
            buckets,
            rows: namespace_rows,
        }) = kept(namespaces, namespace, now, true)
        else {
            return none(Full::DrillNamespaces);
        };
        let bucket = Arc::make_mut(buckets.back_mut().expect("a current bucket"));
        let Bucket {
            decisions,
            notable,
            signals,
            truncated,
            by_token,
            ..
        } = bucket;
        let mut room = Room {
            rows,
            drill_rows: namespace.is_drill().then(|| {
                let token = drill_held.entry(sender.token.clone()).or_default();
                (drill_rows, token)
            }),
            namespace_rows,
            token_added: added.entry(sender.token.clone()).or_default(),
            token_held: held.entry(sender.token.clone()).or_default(),
            bucket_token_rows: by_token.entry(sender.token.clone()).or_default(),
            full: None,
        };
        // A report row is left out when any of its book rows is.
        let mut left_out = 0;
        let channel = sender.channel;
        for (row, n) in &report.decisions {
            let (row, n) = (row.clone(), *n);
            let mut counted = true;
            if row.stale || row.failed_closed || row.revision < current {
                let key = NotableRow {
                    channel,
                    subscriber: sender.subscriber.clone(),
                    revision: row.revision,
                    stale: row.stale,
                    failed_closed: row.failed_closed,
                };
                counted &= add(notable, key, n, &mut room, truncated);
            }
            counted &= add(decisions, row, n, &mut room, truncated);
            left_out += usize::from(!counted);
        }
        for (name, n) in &report.signals {
            let key = (channel, name.clone());
            left_out += usize::from(!add(signals, key, *n, &mut room, truncated));
        }
        let recorded = Recorded {
            rows: all,
            left_out,
            full: room.full,
        };
        if recorded.left_out > 0 {
            refuse_in(bucket, sender, Refusal::LeftOut, 1);
        }
        recorded
    }

    /// Counts `n` reports of `sender` in `namespace` refused for `why`: in
    /// live, or a drill the book already keeps (a refusal makes no room).
    pub fn refused(
        &self,
        namespace: &Namespace,
        sender: &Sender,
        why: Refusal,
        n: u64,
        now: Timestamp,
    ) {
        let mut guard = lock(&self.book);
        guard.expire(now);
        let live = namespace == &Namespace::live();
        if let Some(kept) = kept(&mut guard.namespaces, namespace, now, live) {
            refuse_in(
                Arc::make_mut(kept.buckets.back_mut().expect("a current bucket")),
                sender,
                why,
                n,
            );
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
        // The buckets are taken under the lock and summed after it: a
        // report waits for a few pointer copies, not for the sum.
        let taken: Vec<Arc<Bucket>> = lock(&self.book)
            .namespaces
            .get(namespace)
            .into_iter()
            .flat_map(|kept| &kept.buckets)
            .filter(|b| b.slot >= from)
            .cloned()
            .collect();
        let mut decisions: HashMap<&DecisionRow, u64> = HashMap::new();
        let mut refused_by: HashMap<&RefusedRow, u64> = HashMap::new();
        let mut notable: HashMap<&NotableRow, u64> = HashMap::new();
        let mut signals: HashMap<&(Channel, SignalName), u64> = HashMap::new();
        let mut tallies = Tallies::default();
        for bucket in &taken {
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
            for (key, n) in &bucket.refused_by {
                let count = refused_by.entry(key).or_default();
                *count = count.saturating_add(*n);
            }
            tallies.truncated |= bucket.truncated;
            tallies.refusals_cut |= bucket.refusals_cut;
            tallies.refused = tallies.refused.saturating_add(bucket.refused);
        }
        tallies.refused_by = biggest(
            refused_by.into_iter().map(|(k, n)| (k.clone(), n)),
            &mut tallies.refusals_cut,
        );
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

/// Counts `n` refusals of `sender` for `why` in `bucket`: named by
/// subscriber for the first few subscribers of its principal, together
/// after them, and only counted once the bucket names as many as it may.
fn refuse_in(bucket: &mut Bucket, sender: &Sender, why: Refusal, n: u64) {
    bucket.refused = bucket.refused.saturating_add(n);
    let mut key = RefusedRow {
        principal: sender.principal.clone(),
        channel: sender.channel,
        subscriber: sender.subscriber.clone(),
        why,
    };
    if !bucket.refused_by.contains_key(&key) {
        let named = bucket
            .refused_named
            .entry(sender.principal.clone())
            .or_default();
        if *named < MAX_REFUSED_NAMED_PER_PRINCIPAL {
            *named += 1;
        } else {
            key.subscriber = "".into();
        }
    }
    let rows = bucket.refused_by.len();
    match bucket.refused_by.get_mut(&key) {
        Some(count) => *count = count.saturating_add(n),
        None if rows < MAX_REFUSED_ROWS => {
            bucket.refused_by.insert(key, n);
        }
        None => bucket.refusals_cut = true,
    }
}

impl Book {
    /// Drops the buckets older than the longest window as of `now`, and
    /// gives their rows back to the book, the drills and the tokens that
    /// added them; starts the count of the tokens' new rows of a new slot.
    fn expire(&mut self, now: Timestamp) {
        let slot = slot_of(now);
        // Later only: two reports that straddle a bucket's end may take the
        // lock out of order, and must not start the slot's count twice (a
        // clock stepped back more than that starts it too).
        if slot > self.slot || slot + 1 < self.slot {
            self.slot = slot;
            self.added.clear();
        }
        let Book {
            namespaces,
            rows,
            drill_rows,
            held,
            drill_held,
            ..
        } = self;
        namespaces.retain(|name, kept| {
            while kept
                .buckets
                .front()
                .is_some_and(|b| b.slot <= slot - BUCKETS as i64)
            {
                let gone = kept.buckets.pop_front().expect("a front bucket");
                *rows -= gone.rows();
                kept.rows -= gone.rows();
                if name.is_drill() {
                    *drill_rows -= gone.rows();
                    give_back(drill_held, &gone.by_token);
                }
                give_back(held, &gone.by_token);
            }
            !kept.buckets.is_empty()
        });
    }
}

/// Gives the rows an expired bucket's tokens added back to what they hold.
fn give_back(held: &mut HashMap<Arc<str>, usize>, added: &HashMap<Arc<str>, usize>) {
    for (token, n) in added {
        if let Some(h) = held.get_mut(token) {
            *h -= n;
            if *h == 0 {
                held.remove(token);
            }
        }
    }
}

/// The buckets of `namespace`, with the current one last (made if `make`);
/// `None` for a drill when the book already keeps as many drills as it
/// may. Live is always kept.
fn kept<'a>(
    namespaces: &'a mut BTreeMap<Namespace, Kept>,
    namespace: &Namespace,
    now: Timestamp,
    make: bool,
) -> Option<&'a mut Kept> {
    let slot = slot_of(now);
    if !make && !namespaces.contains_key(namespace) {
        return None;
    }
    let drills = namespaces.keys().filter(|n| n.is_drill()).count();
    if namespace.is_drill() && !namespaces.contains_key(namespace) && drills >= MAX_DRILL_NAMESPACES
    {
        return None;
    }
    let kept = namespaces.entry(namespace.clone()).or_default();
    if kept.buckets.back().is_none_or(|b| b.slot < slot) {
        kept.buckets.push_back(Arc::new(Bucket {
            slot,
            ..Bucket::default()
        }));
    }
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safemode_policy::{ConfidenceBand, MethodClass};

    fn sender(token: &str, channel: &str, subscriber: &str) -> Sender {
        Sender {
            token: token.into(),
            principal: format!("p-{token}").into(),
            channel: Channel::parse(channel).unwrap(),
            subscriber: subscriber.into(),
        }
    }

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
        let t0 = Timestamp::from_second(1_000_000_000).unwrap();
        let at = |secs: i64| {
            t0.checked_add(jiff::SignedDuration::from_secs(secs))
                .unwrap()
        };
        let report = |n| Report {
            decisions: vec![(row("web", 5, EffectKind::StepUp), n)],
            signals: vec![(SignalName::parse("login.failed").unwrap(), n)],
        };
        book.record(&live, &sender("tok", "web", "w1"), 5, &report(3), at(0));
        book.record(&live, &sender("tok", "web", "w2"), 5, &report(4), at(5));
        book.record(&live, &sender("tok", "web", "w1"), 5, &report(10), at(600));
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
        book.record(&live, &sender("tok", "web", "w1"), 5, &report(1), at(1600));
        assert_eq!(book.book.lock().unwrap().rows, 2);
    }

    #[test]
    fn an_old_revision_stale_or_failing_closed_subscriber_is_named() {
        let book = ReportBook::default();
        let live = Namespace::live();
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
        book.record(&live, &sender("tok", "ivr", "ivr-1"), 7, &report, now);
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
        let now = Timestamp::from_second(1_000_000_000).unwrap();
        book.book.lock().unwrap().rows = MAX_ROWS;
        let report = Report {
            decisions: vec![(row("web", 1, EffectKind::Allow), 1)],
            signals: vec![],
        };
        let recorded = book.record(&live, &sender("tok", "web", "w"), 1, &report, now);
        assert_eq!((recorded.left_out, recorded.full), (1, Some(Full::Book)));
        let t = book.tallies(&live, Duration::from_secs(60), now);
        assert!(t.decisions.is_empty());
        assert!(t.truncated);
        assert_eq!(t.refused, 1);
        assert_eq!(t.refused_by[0].0.why, Refusal::LeftOut);
    }

    /// A report of `n` distinct signal rows, named from `from` on.
    fn distinct(from: usize, n: usize) -> Report {
        Report {
            decisions: vec![],
            signals: (from..from + n)
                .map(|i| (SignalName::parse(&format!("flood.s{i}")).unwrap(), 1))
                .collect(),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_000_000_000 + secs).unwrap()
    }

    #[test]
    fn one_token_fills_only_its_part_of_each_bucket() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let flooder = sender("flood", "ivr", "looping");
        let recorded = book.record(
            &live,
            &flooder,
            1,
            &distinct(0, MAX_TOKEN_ROWS_PER_BUCKET),
            at(0),
        );
        assert_eq!(recorded.left_out, 0);
        // Its part of this bucket is full: the next new rows are left out,
        // and it is told why; rows it already has still count.
        let recorded = book.record(
            &live,
            &flooder,
            1,
            &distinct(MAX_TOKEN_ROWS_PER_BUCKET - 5, 10),
            at(1),
        );
        assert_eq!(
            (recorded.left_out, recorded.full),
            (5, Some(Full::TokenShare))
        );
        // Another subscriber of the same token shares the part...
        let same_token = sender("flood", "web", "other");
        let recorded = book.record(&live, &same_token, 1, &distinct(0, 1), at(2));
        assert_eq!(recorded.left_out, 1);
        // ... another token's report is taken whole...
        let honest = sender("ivr-token", "ivr", "ivr-1");
        let login = Report {
            decisions: vec![],
            signals: vec![(SignalName::parse("login.failed").unwrap(), 500)],
        };
        assert_eq!(book.record(&live, &honest, 1, &login, at(3)).left_out, 0);
        let t = book.tallies(&live, Duration::from_secs(60), at(3));
        assert!(t.signals.iter().any(|((c, n), count)| {
            c.as_str() == "ivr" && n.as_str() == "login.failed" && *count == 500
        }));
        let limited: Vec<_> = t
            .refused_by
            .iter()
            .map(|(r, n)| (&*r.subscriber, r.why, *n))
            .collect();
        assert_eq!(
            limited,
            vec![
                ("looping", Refusal::LeftOut, 1),
                ("other", Refusal::LeftOut, 1)
            ]
        );
        // ... and in the next bucket the flooder has its part again.
        let recorded = book.record(&live, &flooder, 1, &distinct(10_000, 10), at(10));
        assert_eq!(recorded.left_out, 0);
    }

    #[test]
    fn a_busy_fleet_on_one_token_keeps_reporting_for_half_an_hour() {
        // Two channels of 288 distinct rows each, every 10 s, from twenty
        // subscribers of one token: nothing is ever left out, and the book
        // holds 15 minutes of it.
        let book = ReportBook::default();
        let live = Namespace::live();
        for bucket in 0..180 {
            for pod in 0..20 {
                let channel = if pod % 2 == 0 { "web" } else { "chatbot" };
                let s = sender("fleet", channel, &format!("pod-{pod}"));
                let recorded = book.record(&live, &s, 1, &distinct(0, 288), at(bucket * 10));
                assert_eq!(recorded.left_out, 0, "bucket {bucket}, pod {pod}");
            }
        }
        assert_eq!(book.book.lock().unwrap().rows, BUCKETS * 576);
        let t = book.tallies(&live, LONGEST_WINDOW, at(1790));
        assert!(!t.truncated && t.refused == 0);
    }

    #[test]
    fn drills_never_take_the_room_of_live() {
        let book = ReportBook::default();
        let now = at(0);
        let s = sender("d", "web", "w");
        // A drill that changed nothing takes no room at all.
        let idle = Namespace::parse("drill-idle").unwrap();
        let recorded = book.record(&idle, &s, 0, &distinct(0, 3), now);
        assert_eq!(
            (recorded.left_out, recorded.full),
            (3, Some(Full::DrillNotStarted))
        );
        book.refused(&idle, &s, Refusal::TooSoon, 1, now);
        assert!(book.book.lock().unwrap().namespaces.is_empty());
        // One drill's own part filled by many tokens: another drill still
        // has room...
        let drill = Namespace::parse("drill-a").unwrap();
        let fill = |drill: &Namespace, rows: usize, tag: &str| {
            let mut from = 0;
            let mut token = 0;
            while from < rows {
                let s = sender(&format!("{tag}{token}"), "web", "w");
                let n = (rows - from).min(MAX_TOKEN_ROWS_PER_BUCKET);
                assert_eq!(
                    book.record(drill, &s, 1, &distinct(from, n), now).left_out,
                    0
                );
                from += n;
                token += 1;
            }
        };
        fill(&drill, MAX_ROWS_PER_DRILL, "a");
        let late = sender("late-drill", "web", "w");
        let recorded = book.record(&drill, &late, 1, &distinct(1_000_000, 1), now);
        assert_eq!(
            (recorded.left_out, recorded.full),
            (1, Some(Full::DrillShare))
        );
        let drill_b = Namespace::parse("drill-b").unwrap();
        assert_eq!(
            book.record(&drill_b, &late, 1, &distinct(0, 1), now)
                .left_out,
            0
        );
        // ... until the drills together hold their share.
        for (i, tag) in ["c", "d", "e"].iter().enumerate() {
            let other = Namespace::parse(&format!("drill-{tag}")).unwrap();
            let rows = if i == 0 {
                MAX_ROWS_PER_DRILL - 1
            } else {
                MAX_ROWS_PER_DRILL
            };
            fill(&other, rows, tag);
        }
        let recorded = book.record(&drill_b, &late, 1, &distinct(7, 1), now);
        assert_eq!(
            (recorded.left_out, recorded.full),
            (1, Some(Full::DrillShare))
        );
        // ... and every other drill namespace taken: live is still kept.
        for i in 1..MAX_DRILL_NAMESPACES {
            let other = Namespace::parse(&format!("drill-n{i}")).unwrap();
            book.record(&other, &late, 1, &Report::default(), now);
        }
        let one_more = Namespace::parse("drill-one-more").unwrap();
        let recorded = book.record(&one_more, &late, 1, &distinct(0, 1), now);
        assert_eq!(recorded.full, Some(Full::DrillNamespaces));
        let live = Namespace::live();
        let recorded = book.record(&live, &sender("ivr", "ivr", "i"), 1, &distinct(0, 5), now);
        assert_eq!(recorded.left_out, 0);
        assert_eq!(book.tallies(&live, BUCKET, now).signals.len(), 5);
    }

    #[test]
    fn one_token_holds_an_eighth_of_the_drills_share_at_most() {
        // A subscriber token spreads its part of every bucket over junk
        // drills: it stops at its holding in drills, and a real drill, and
        // the token's own live reports, still have room.
        let book = ReportBook::default();
        let junk = sender("junk", "web", "j");
        let part = distinct(0, 500);
        let drills: Vec<Namespace> = (0..5)
            .map(|i| Namespace::parse(&format!("drill-junk{i}")).unwrap())
            .collect();
        let mut held_at = None;
        for bucket in 0..20 {
            for drill in &drills {
                let recorded = book.record(drill, &junk, 1, &part, at(bucket * 10));
                if recorded.full == Some(Full::TokenDrillHolding) {
                    held_at.get_or_insert(bucket);
                }
            }
        }
        assert_eq!(held_at, Some(6));
        assert_eq!(
            book.book.lock().unwrap().drill_held["junk"],
            MAX_TOKEN_DRILL_ROWS
        );
        let now = at(200);
        let real = Namespace::parse("drill-real").unwrap();
        let drill_fleet = sender("drill-fleet", "ivr", "i");
        assert_eq!(
            book.record(&real, &drill_fleet, 1, &distinct(0, 100), now)
                .left_out,
            0
        );
        let live = Namespace::live();
        assert_eq!(
            book.record(&live, &junk, 1, &distinct(0, 100), now)
                .left_out,
            0
        );
        // What it held in drills goes back with their buckets.
        book.record(&live, &junk, 1, &Report::default(), at(200 + 900));
        let guard = book.book.lock().unwrap();
        assert_eq!(guard.drill_rows, 0);
        assert!(guard.drill_held.values().all(|h| *h == 0));
    }

    #[test]
    fn a_token_share_counts_every_namespace() {
        let book = ReportBook::default();
        let now = at(0);
        // One token reporting in several drills has one share in all.
        let flooder = sender("flood", "web", "w");
        for tag in ["x", "y", "z"] {
            let drill = Namespace::parse(&format!("drill-{tag}")).unwrap();
            book.record(&drill, &flooder, 1, &distinct(0, 1000), now);
        }
        let guard = book.book.lock().unwrap();
        assert_eq!(guard.rows, MAX_TOKEN_ROWS_PER_BUCKET);
        assert_eq!(guard.added["flood"], MAX_TOKEN_ROWS_PER_BUCKET);
        // A report that took the lock late, with a time of the bucket
        // before, does not start the token's count again.
        drop(guard);
        book.record(&Namespace::live(), &flooder, 1, &distinct(0, 1), at(10));
        book.record(&Namespace::live(), &flooder, 1, &distinct(5, 1), at(9));
        assert_eq!(book.book.lock().unwrap().added["flood"], 2);
        // A clock stepped back further starts the slot's count again.
        book.record(&Namespace::live(), &flooder, 1, &distinct(9, 1), at(-120));
        assert_eq!(book.book.lock().unwrap().added["flood"], 1);
    }

    #[test]
    fn one_token_holds_a_quarter_of_the_shared_room_at_most() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let flooder = sender("flood", "web", "w");
        let part = distinct(0, MAX_TOKEN_ROWS_PER_BUCKET);
        // Alone, it adds its whole part of every bucket until the book
        // holds enough for a holding to matter.
        let buckets = (HOLDING_BOUND_FROM / MAX_TOKEN_ROWS_PER_BUCKET) as i64;
        for bucket in 0..buckets {
            let recorded = book.record(&live, &flooder, 1, &part, at(bucket * 10));
            assert_eq!(recorded.left_out, 0, "bucket {bucket}");
        }
        let recorded = book.record(&live, &flooder, 1, &part, at(buckets * 10));
        assert_eq!(
            (recorded.left_out, recorded.full),
            (MAX_TOKEN_ROWS_PER_BUCKET, Some(Full::TokenHolding))
        );
        let reason = Full::TokenHolding.to_string();
        assert!(
            reason.contains("holds 100000 rows") && reason.contains("once the book holds 200000"),
            "{reason}"
        );
        // Once its oldest rows age out, it adds as many again.
        let first_gone = BUCKETS as i64 * 10;
        let recorded = book.record(&live, &flooder, 1, &part, at(first_gone));
        assert_eq!(recorded.left_out, 0);
    }

    #[test]
    fn flooding_tokens_never_blind_a_busy_fleet() {
        // Five tokens add their whole part of every bucket for 20 minutes,
        // and the last of each bucket is a busy channel's fleet (576
        // distinct rows every 10 s): four flooders fill the shared room,
        // the fifth stops at the reserve's floor, and the fleet, holding
        // less, never loses a row.
        let book = ReportBook::default();
        let live = Namespace::live();
        let flooders: Vec<(Sender, Report)> = (0..5)
            .map(|i| {
                let name = format!("flood-{i}");
                let part = distinct(i * 10_000, MAX_TOKEN_ROWS_PER_BUCKET);
                (sender(&name, "web", &name), part)
            })
            .collect();
        let fleet = sender("fleet", "ivr", "ivr-1");
        let busy = distinct(100_000, 576);
        let mut reserve = None;
        for bucket in 0..120 {
            let now = at(bucket * 10);
            for (flooder, part) in &flooders {
                let recorded = book.record(&live, flooder, 1, part, now);
                if let Some(Full::Reserve { held }) = recorded.full {
                    reserve.get_or_insert(held);
                }
            }
            let recorded = book.record(&live, &fleet, 1, &busy, now);
            assert_eq!(recorded.left_out, 0, "bucket {bucket}: {recorded:?}");
        }
        let held = reserve.expect("a flooder was held to the reserve's floor");
        assert!(held >= RESERVE_FLOOR, "{held}");
        let reason = Full::Reserve { held }.to_string();
        assert!(
            reason.contains("(400000 rows over 15 minutes) is full")
                && reason.contains("fewer than 56250 rows may add")
                && reason.contains(&format!("this token holds {held}")),
            "{reason}"
        );
        let guard = book.book.lock().unwrap();
        assert!(guard.rows <= MAX_ROWS, "{}", guard.rows);
        assert!(guard.held.values().all(|h| *h <= MAX_TOKEN_ROWS));
        assert_eq!(guard.held["fleet"], BUCKETS * 576);
        drop(guard);
        // Rows go back with their buckets, for every token.
        let gone = at(120 * 10 + LONGEST_WINDOW.as_secs() as i64);
        book.record(&live, &fleet, 1, &Report::default(), gone);
        let guard = book.book.lock().unwrap();
        assert_eq!((guard.rows, guard.drill_rows), (0, 0));
        assert!(guard.held.values().all(|h| *h == 0), "{:?}", guard.held);
    }

    #[test]
    fn a_tally_sums_what_it_took_while_reports_go_on() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let s = sender("t", "web", "w");
        book.record(&live, &s, 1, &distinct(0, 3), at(0));
        let taken: Vec<Arc<Bucket>> = book.book.lock().unwrap().namespaces[&live]
            .buckets
            .iter()
            .cloned()
            .collect();
        // A report into the bucket a tally holds copies it: the tally's
        // bucket is unchanged, the book's has the new rows.
        book.record(&live, &s, 1, &distinct(3, 2), at(1));
        assert_eq!(taken[0].signals.len(), 3);
        assert_eq!(book.tallies(&live, BUCKET, at(1)).signals.len(), 5);
    }

    #[test]
    fn refusals_are_named_a_few_per_principal_and_never_make_counts_low() {
        let book = ReportBook::default();
        let live = Namespace::live();
        let now = at(0);
        // A flooding principal: its first subscribers named, the rest
        // counted together.
        for i in 0..100 {
            let s = sender("flood", "ivr", &format!("ivr-{i}"));
            book.refused(&live, &s, Refusal::Malformed, 2, now);
        }
        // An honest one refused later is still named.
        book.refused(
            &live,
            &sender("view", "web", "web-1"),
            Refusal::NotPermitted,
            1,
            now,
        );
        let t = book.tallies(&live, BUCKET, now);
        assert_eq!(t.refused, 201);
        let named: Vec<_> = t
            .refused_by
            .iter()
            .map(|(r, n)| (&*r.principal, &*r.subscriber, *n))
            .collect();
        assert_eq!(named[0], ("p-flood", "", 184));
        assert_eq!(named.len(), 1 + MAX_REFUSED_NAMED_PER_PRINCIPAL + 1);
        assert!(named.contains(&("p-view", "web-1", 1)));
        assert!(!t.truncated && !t.refusals_cut);
        // Past the bucket's bound, refusals are only counted, and the
        // tallies say names were cut, not that counts are low.
        for p in 0..MAX_REFUSED_ROWS {
            book.refused(
                &live,
                &sender(&format!("t{p}"), "web", "w"),
                Refusal::TooSoon,
                1,
                now,
            );
        }
        let t = book.tallies(&live, BUCKET, now);
        assert!(t.refusals_cut && !t.truncated);
    }
}
