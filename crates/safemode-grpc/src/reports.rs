//! Reports on the subscription stream, at the edge: each one checked
//! (bounds, names, revisions the stream was sent) and paced before the
//! replica's report book takes it, and answered either way. A refused
//! report changes nothing else: the stream's policy goes on.

use std::time::Duration;

use prost::Message as _;
use tokio::time::Instant;

use safemode_controller::reports::{DecisionRow, Report};
use safemode_policy::names::{ACTIONS, BOT_INTENT_FAMILY};
use safemode_policy::telemetry::limits::{
    MAX_DECISION_ROWS, MAX_REPORT_BYTES, MAX_SIGNALS, REPORT_EVERY,
};
use safemode_policy::{Channel, ContextClass, EffectKind, Revision, SignalName};
use safemode_wire::proto;

/// The shortest gap between two reports of one stream that is taken: the
/// client's interval less some slack for timers and the network.
pub const MIN_REPORT_GAP: Duration = Duration::from_secs(REPORT_EVERY.as_secs() - 2);

/// One stream's reporting: when it last reported, and the newest revision
/// its reports may name.
#[derive(Debug)]
pub struct Pace {
    last: Option<Instant>,
    /// The newest revision the stream was sent, or its hello held: a
    /// decision may have been made with any revision up to it (one applied
    /// before a reconnect, too), never a later one.
    newest: Revision,
}

impl Pace {
    /// A stream whose hello said it held `held` (0: nothing).
    pub fn new(held: Revision) -> Self {
        Pace {
            last: None,
            newest: held.max(0),
        }
    }

    /// The stream was sent `revision`.
    pub fn sent(&mut self, revision: Revision) {
        self.newest = self.newest.max(revision);
    }

    /// Checks `report` of a subscriber on `channel`, received `now`: the
    /// report as rows, or the answer that refuses it.
    pub fn check(
        &mut self,
        report: &proto::Report,
        channel: Channel,
        now: Instant,
    ) -> Result<Report, proto::ReportAnswer> {
        let refuse = |reason: String, retry_after: u32| proto::ReportAnswer {
            sequence: report.sequence,
            accepted: false,
            reason,
            retry_after_seconds: retry_after,
        };
        let size = report.encoded_len();
        if size > MAX_REPORT_BYTES {
            return Err(refuse(
                format!(
                    "too large: {size} bytes, at most {MAX_REPORT_BYTES}; this report is dropped"
                ),
                0,
            ));
        }
        if report.decisions.len() > MAX_DECISION_ROWS || report.signals.len() > MAX_SIGNALS {
            return Err(refuse(
                format!(
                    "too many rows: {} decision rows and {} signals, at most {MAX_DECISION_ROWS} and {MAX_SIGNALS}; this report is dropped",
                    report.decisions.len(),
                    report.signals.len()
                ),
                0,
            ));
        }
        if let Some(last) = self.last {
            let since = now.saturating_duration_since(last);
            if since < MIN_REPORT_GAP {
                let wait = (MIN_REPORT_GAP - since).as_secs_f64().ceil() as u32;
                return Err(refuse(
                    format!(
                        "too soon: a subscriber reports at most every {}s; this report is dropped, send its counts with the next one in {wait}s",
                        REPORT_EVERY.as_secs()
                    ),
                    wait.max(1),
                ));
            }
        }
        let rows = self
            .rows(report, channel)
            .map_err(|e| refuse(format!("{e}; this report is dropped"), 0))?;
        self.last = Some(now);
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
    }
}

/// The answer to a report taken.
pub fn accepted(report: &proto::Report) -> proto::ReportAnswer {
    proto::ReportAnswer {
        sequence: report.sequence,
        accepted: true,
        reason: String::new(),
        retry_after_seconds: 0,
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
    fn a_report_is_refused_with_its_reason_and_the_pace_is_kept() {
        let web = Channel::parse("web").unwrap();
        let t0 = Instant::now();
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
        let cases: Vec<(proto::Report, &str)> = vec![
            (
                with(|r| r.decisions[0].action = "account.nope".into()),
                "unknown action",
            ),
            (
                with(|r| r.decisions[0].effect = "maybe".into()),
                "unknown effect",
            ),
            (
                with(|r| r.decisions[0].revision = 6),
                "never sent revision 6",
            ),
            (with(|r| r.decisions[0].context = None), "context: missing"),
            (
                with(|r| r.decisions[0].context.as_mut().unwrap().method = "x".into()),
                "unknown method class",
            ),
            (with(|r| r.decisions[0].count = 0), "at least 1"),
            (
                with(|r| r.decisions[0].failed_closed = true),
                "only when stale",
            ),
            (
                with(|r| r.signals[0].name = "Bad Name".into()),
                "bad signal name",
            ),
            (
                with(|r| r.signals = vec![r.signals[0].clone(); MAX_SIGNALS + 1]),
                "too many rows",
            ),
            (
                with(|r| r.signals[0].name = "a".repeat(70_000)),
                "too large",
            ),
        ];
        for (report, expected) in cases {
            let mut pace = Pace::new(0);
            pace.sent(5);
            let answer = pace.check(&report, web, t0).unwrap_err();
            assert!(!answer.accepted);
            assert!(
                answer.reason.contains(expected),
                "{expected}: {}",
                answer.reason
            );
            assert_eq!(answer.retry_after_seconds, 0);
            // A refused report does not use up the stream's turn.
            pace.check(&good, web, t0).unwrap();
        }
        let mut pace = Pace::new(0);
        pace.sent(5);
        let rows = pace.check(&good, web, t0).unwrap();
        assert_eq!(rows.decisions.len(), 1);
        let soon = pace
            .check(&good, web, t0 + Duration::from_secs(3))
            .unwrap_err();
        assert!(soon.reason.contains("too soon"), "{}", soon.reason);
        assert_eq!(soon.retry_after_seconds, 5);
        pace.check(&good, web, t0 + MIN_REPORT_GAP).unwrap();
    }
}
