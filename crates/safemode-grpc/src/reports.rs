//! Reports on the subscription stream, at the edge: each one checked
//! (bounds, names, revisions the stream was sent) and paced before the
//! replica's report book takes it, and answered either way. A refused
//! report changes nothing else: the stream's policy goes on.
//!
//! The pace is the replica's, not the stream's: one report per subscriber
//! id per gap across all its streams (a reconnect does not reset it), and a
//! token's subscribers together at most one per stream the token holds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message as _;
use tokio::time::Instant;

use safemode_controller::reports::{DecisionRow, Recorded, Refusal, Report};
use safemode_policy::names::{ACTIONS, BOT_INTENT_FAMILY};
use safemode_policy::telemetry::limits::{
    MAX_DECISION_ROWS, MAX_REPORT_BYTES, MAX_SIGNALS, REPORT_EVERY,
};
use safemode_policy::{Channel, ContextClass, EffectKind, Namespace, Revision, SignalName};
use safemode_wire::proto;

/// The shortest gap between two reports of one stream that is taken: the
/// client's interval less some slack for timers and the network.
pub const MIN_REPORT_GAP: Duration = Duration::from_secs(REPORT_EVERY.as_secs() - 2);

/// First reports a token's new streams may make in a gap beyond one per
/// stream it holds: short-lived subscribers (a script's `safemode signal`,
/// a client that reconnected) report once and are gone before their turn
/// is.
pub const TOKEN_BURST: usize = 16;

/// Who takes a turn: a subscriber id on a channel of a namespace, under a
/// token (its hash, or the principal's name without tokens).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Turn {
    pub token: Arc<str>,
    pub namespace: Namespace,
    pub channel: Channel,
    pub subscriber: Arc<str>,
}

/// The replica's pace of reports, over every stream.
#[derive(Debug, Default)]
pub struct ReportPace {
    state: Mutex<PaceState>,
}

#[derive(Debug, Default)]
struct PaceState {
    /// When each turn was last taken, within the last gap.
    last: HashMap<Turn, Instant>,
    /// The same, oldest first, to forget them in order; `true` for a
    /// stream's first report.
    order: VecDeque<(Instant, Turn, bool)>,
    /// When each token's new streams made their first reports, within the
    /// last gap, oldest first.
    first_reports: HashMap<Arc<str>, VecDeque<Instant>>,
}

impl PaceState {
    /// Forgets the turns taken at or before `since`.
    fn forget_before(&mut self, since: Instant) {
        while self.order.front().is_some_and(|(at, _, _)| *at <= since) {
            let (at, turn, first) = self.order.pop_front().expect("a front turn");
            if self.last.get(&turn) == Some(&at) {
                self.last.remove(&turn);
            }
            if first && let Some(times) = self.first_reports.get_mut(&turn.token) {
                times.pop_front();
                if times.is_empty() {
                    self.first_reports.remove(&turn.token);
                }
            }
        }
    }
}

impl ReportPace {
    /// Takes `turn` at `now`, if it has one: its subscriber (on its channel)
    /// reported no sooner than [`MIN_REPORT_GAP`] ago on any stream, and
    /// its stream first `asked` for a turn no sooner than that either (a
    /// stream refused once waits its own gap, and may not retry at once);
    /// and a stream's first report (`asked` is `None`) only while its
    /// token's new streams made fewer first reports in that time than the
    /// `streams` it holds plus [`TOKEN_BURST`] (a stream that asked before
    /// has its own turn: a client reconnecting in a loop cannot take the
    /// turns of the steady ones). Otherwise why not, and in how many
    /// seconds to come back. Remembers at most one turn per stream the
    /// replica holds, and the bursts.
    pub fn take(
        &self,
        turn: &Turn,
        asked: Option<Instant>,
        streams: usize,
        now: Instant,
    ) -> Result<(), (String, u32)> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = now.checked_sub(MIN_REPORT_GAP) {
            state.forget_before(since);
        }
        let every = REPORT_EVERY.as_secs();
        let seconds = |wait: Duration| (wait.as_secs_f64().ceil() as u32).max(1);
        let last = state.last.get(turn).copied().into_iter().chain(asked).max();
        if let Some(last) =
            last.filter(|last| now.saturating_duration_since(*last) < MIN_REPORT_GAP)
        {
            // A stream asking for the first time asks now: its own next
            // turn is a gap away, whenever its subscriber's is.
            let since = last.max(asked.unwrap_or(now));
            let wait = seconds(MIN_REPORT_GAP.saturating_sub(now.saturating_duration_since(since)));
            return Err((
                format!(
                    "too soon: a subscriber reports at most every {every}s on a channel, over all its streams; this report is dropped, send its counts with the next one in {wait}s"
                ),
                wait,
            ));
        }
        let first = asked.is_none();
        if first {
            let times = state.first_reports.get(&turn.token);
            let taken = times.map_or(0, VecDeque::len);
            if taken >= streams + TOKEN_BURST {
                // The stream's next report is its own turn, a gap from now
                // (its `asked`), whatever the token's new streams do.
                let wait = seconds(MIN_REPORT_GAP);
                return Err((
                    format!(
                        "too soon: this token's new streams made {taken} first reports in the last {}s, and it holds {streams} {}: one first report per stream, and {TOKEN_BURST} more; this report is dropped, send its counts with the next one in {wait}s",
                        MIN_REPORT_GAP.as_secs(),
                        if streams == 1 { "stream" } else { "streams" }
                    ),
                    wait,
                ));
            }
            state
                .first_reports
                .entry(turn.token.clone())
                .or_default()
                .push_back(now);
        }
        state.last.insert(turn.clone(), now);
        state.order.push_back((now, turn.clone(), first));
        Ok(())
    }
}

/// One stream's reports: the newest revision they may name.
#[derive(Debug)]
pub struct Pace {
    /// The newest revision the stream was sent, or its hello held: a
    /// decision may have been made with any revision up to it (one applied
    /// before a reconnect, too), never a later one.
    newest: Revision,
}

impl Pace {
    /// A stream whose hello said it held `held` (0: nothing).
    pub fn new(held: Revision) -> Self {
        Pace {
            newest: held.max(0),
        }
    }

    /// The stream was sent `revision`.
    pub fn sent(&mut self, revision: Revision) {
        self.newest = self.newest.max(revision);
    }

    /// Checks `report` of a subscriber on `channel`, then takes its turn
    /// with `take_turn`: the report as rows, or the answer that refuses it
    /// and why. A report refused for what it holds does not use up a turn.
    pub fn check(
        &self,
        report: &proto::Report,
        channel: Channel,
        take_turn: impl FnOnce() -> Result<(), (String, u32)>,
    ) -> Result<Report, (proto::ReportAnswer, Refusal)> {
        let refuse = |reason: String, retry_after: u32| proto::ReportAnswer {
            sequence: report.sequence,
            accepted: false,
            reason,
            retry_after_seconds: retry_after,
            left_out: 0,
        };
        let size = report.encoded_len();
        if size > MAX_REPORT_BYTES {
            return Err((
                refuse(
                    format!(
                        "too large: {size} bytes, at most {MAX_REPORT_BYTES}; this report is dropped"
                    ),
                    0,
                ),
                Refusal::TooLarge,
            ));
        }
        if report.decisions.len() > MAX_DECISION_ROWS || report.signals.len() > MAX_SIGNALS {
            return Err((
                refuse(
                    format!(
                        "too many rows: {} decision rows and {} signals, at most {MAX_DECISION_ROWS} and {MAX_SIGNALS}; this report is dropped",
                        report.decisions.len(),
                        report.signals.len()
                    ),
                    0,
                ),
                Refusal::TooLarge,
            ));
        }
        let rows = self.rows(report, channel).map_err(|e| {
            (
                refuse(format!("{e}; this report is dropped"), 0),
                Refusal::Malformed,
            )
        })?;
        take_turn().map_err(|(reason, wait)| (refuse(reason, wait), Refusal::TooSoon))?;
        Ok(rows)
    }

    fn rows(&self, report: &proto::Report, channel: Channel) -> Result<Report, String> {
        let mut rows = Report::default();
        for (i, d) in report.decisions.iter().enumerate() {
            let at = |what: &str| format!("decisions[{i}].{what}");
            let action = match ACTIONS.iter().find(|a| **a == d.action) {
                Some(known) => *known,
                None if d.action == BOT_INTENT_FAMILY => BOT_INTENT_FAMILY,
                None => {
                    return Err(format!(
                        "{}: unknown action {:?}; report a known action, or bot.intent for every bot intent",
                        at("action"),
                        cut(&d.action)
                    ));
                }
            };
            let effect = EffectKind::parse(&d.effect)
                .ok_or_else(|| format!("{}: unknown effect {:?}", at("effect"), cut(&d.effect)))?;
            if d.revision < 0 || d.revision > self.newest {
                return Err(format!(
                    "{}: this stream was never sent revision {} (the newest it was sent is {})",
                    at("revision"),
                    d.revision,
                    self.newest
                ));
            }
            let context = d
                .context
                .as_ref()
                .ok_or_else(|| format!("{}: missing", at("context")))?;
            let class = ContextClass::parse(
                &context.confidence,
                &context.method,
                context.handoff,
                context.attempts_exhausted,
            )
            .map_err(|e| format!("{}: {e}", at("context")))?;
            if d.count == 0 {
                return Err(format!("{}: must be at least 1", at("count")));
            }
            if d.failed_closed && !d.stale {
                return Err(format!(
                    "{}: a decision fails closed only when stale",
                    at("failed_closed")
                ));
            }
            rows.decisions.push((
                DecisionRow {
                    channel,
                    revision: d.revision,
                    action: action.into(),
                    class,
                    effect,
                    stale: d.stale,
                    failed_closed: d.failed_closed,
                },
                d.count,
            ));
        }
        for (i, s) in report.signals.iter().enumerate() {
            let name = SignalName::parse(&s.name).map_err(|e| format!("signals[{i}].name: {e}"))?;
            if s.count == 0 {
                return Err(format!("signals[{i}].count: must be at least 1"));
            }
            rows.signals.push((name, s.count));
        }
        Ok(rows)
    }
}

/// At most 64 characters of a caller's string, for a message.
fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The answer that refuses `report` for `reason`.
pub fn refused(report: &proto::Report, reason: String) -> proto::ReportAnswer {
    proto::ReportAnswer {
        sequence: report.sequence,
        accepted: false,
        reason,
        retry_after_seconds: 0,
        left_out: 0,
    }
}

/// The answer to a report taken, saying which rows were left out.
pub fn accepted(report: &proto::Report, recorded: Recorded) -> proto::ReportAnswer {
    let reason = match recorded.full {
        Some(full) if recorded.left_out > 0 => format!(
            "{} of its {} rows were left out and their counts are lost: {full}",
            recorded.left_out, recorded.rows
        ),
        _ => String::new(),
    };
    proto::ReportAnswer {
        sequence: report.sequence,
        accepted: true,
        reason,
        retry_after_seconds: 0,
        left_out: recorded.left_out.try_into().unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(revision: Revision) -> proto::DecisionCount {
        proto::DecisionCount {
            action: "account.email_change".into(),
            effect: "allow".into(),
            revision,
            context: Some(proto::ReportedClass {
                confidence: "low".into(),
                method: "none".into(),
                handoff: false,
                attempts_exhausted: false,
            }),
            stale: false,
            failed_closed: false,
            count: 3,
        }
    }

    #[test]
    fn a_report_is_refused_with_its_reason_and_keeps_its_turn() {
        let web = Channel::parse("web").unwrap();
        let good = proto::Report {
            decisions: vec![decision(5)],
            signals: vec![proto::SignalCount {
                name: "login.failed".into(),
                count: 2,
            }],
            sequence: 1,
        };
        let with = |edit: fn(&mut proto::Report)| {
            let mut r = good.clone();
            edit(&mut r);
            r
        };
        let cases: Vec<(proto::Report, &str, Refusal)> = vec![
            (
                with(|r| r.decisions[0].action = "account.nope".into()),
                "unknown action",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].effect = "maybe".into()),
                "unknown effect",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].revision = 6),
                "never sent revision 6",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].context = None),
                "context: missing",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].context.as_mut().unwrap().method = "x".into()),
                "unknown method class",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].count = 0),
                "at least 1",
                Refusal::Malformed,
            ),
            (
                with(|r| r.decisions[0].failed_closed = true),
                "only when stale",
                Refusal::Malformed,
            ),
            (
                with(|r| r.signals[0].name = "Bad Name".into()),
                "bad signal name",
                Refusal::Malformed,
            ),
            (
                with(|r| r.signals = vec![r.signals[0].clone(); MAX_SIGNALS + 1]),
                "too many rows",
                Refusal::TooLarge,
            ),
            (
                with(|r| r.signals[0].name = "a".repeat(70_000)),
                "too large",
                Refusal::TooLarge,
            ),
        ];
        for (report, expected, kind) in cases {
            let mut pace = Pace::new(0);
            pace.sent(5);
            let (answer, why) = pace
                .check(&report, web, || panic!("a bad report takes no turn"))
                .unwrap_err();
            assert!(!answer.accepted);
            assert!(
                answer.reason.contains(expected),
                "{expected}: {}",
                answer.reason
            );
            assert_eq!((answer.retry_after_seconds, why), (0, kind));
        }
        let mut pace = Pace::new(0);
        pace.sent(5);
        let rows = pace.check(&good, web, || Ok(())).unwrap();
        assert_eq!(rows.decisions.len(), 1);
        let (soon, why) = pace
            .check(&good, web, || Err(("too soon: wait".into(), 4)))
            .unwrap_err();
        assert_eq!((soon.retry_after_seconds, why), (4, Refusal::TooSoon));
    }

    fn turn(token: &str, subscriber: &str) -> Turn {
        Turn {
            token: token.into(),
            namespace: Namespace::live(),
            channel: Channel::parse("web").unwrap(),
            subscriber: subscriber.into(),
        }
    }

    #[test]
    fn the_pace_holds_across_streams_and_first_reports_per_token() {
        let pace = ReportPace::default();
        let t0 = Instant::now() + Duration::from_secs(60);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // A subscriber's turn is its own, whichever stream it comes on.
        pace.take(&turn("a", "ivr-1"), None, 10, at(0)).unwrap();
        let (reason, wait) = pace.take(&turn("a", "ivr-1"), None, 10, at(3)).unwrap_err();
        assert!(reason.contains("over all its streams"), "{reason}");
        assert_eq!(wait, 8, "a new stream's own turn is a gap after it asked");
        let (_, wait) = pace
            .take(&turn("a", "ivr-1"), Some(at(3)), 10, at(5))
            .unwrap_err();
        assert_eq!(wait, 6);
        // A token's new streams make at most one first report per stream it
        // holds and a few more: a new id on every reconnect does not make a
        // new turn every time...
        for i in 0..=TOKEN_BURST {
            pace.take(&turn("b", &format!("x{i}")), None, 1, at(0))
                .unwrap();
        }
        let (reason, wait) = pace.take(&turn("b", "again"), None, 1, at(1)).unwrap_err();
        assert!(reason.contains("made 17 first reports"), "{reason}");
        assert!(reason.contains("holds 1 stream:"), "{reason}");
        assert_eq!(wait, 8, "the stream's own turn, a gap after it asked");
        // ... a stream refused once waits its own gap, and retrying at once
        // is too soon, however often it asks...
        for now in [1, 1, 4] {
            let (reason, wait) = pace
                .take(&turn("b", "again"), Some(at(1)), 1, at(now))
                .unwrap_err();
            assert!(reason.contains("over all its streams"), "{reason}");
            assert_eq!(wait, 9 - now as u32);
        }
        // ... while a stream that asked a gap ago has its own turn, though
        // the token's new streams hold every first report.
        pace.take(&turn("b", "steady"), Some(t0 - MIN_REPORT_GAP), 1, at(1))
            .unwrap();
        // Another token is not held back by them.
        pace.take(&turn("c", "x1"), None, 1, at(1)).unwrap();
        // A subscriber's turn is on its channel: the same id on another
        // channel has its own.
        let mut mobile = turn("a", "ivr-1");
        mobile.channel = Channel::parse("mobile").unwrap();
        pace.take(&mobile, None, 10, at(3)).unwrap();
        // A gap later every turn is back, and what was remembered is gone.
        pace.take(&turn("a", "ivr-1"), Some(at(0)), 1, at(0) + MIN_REPORT_GAP)
            .unwrap();
        pace.take(&turn("b", "x3"), None, 1, at(1) + MIN_REPORT_GAP)
            .unwrap();
        let state = pace.state.lock().unwrap();
        assert_eq!(state.last.len(), 3, "{state:?}");
        assert_eq!(state.order.len(), 3);
        assert_eq!(state.first_reports["a"].len(), 1);
        assert_eq!(state.first_reports["b"].len(), 1);
        assert_eq!(state.first_reports.len(), 2);
    }
}
