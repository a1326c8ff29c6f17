//! Rendering results as text for people or as JSON for scripts. Renderers
//! return the text; `cli::emit` writes it.
//!
//! Text output cannot be made to lie by what it prints: every line goes
//! through [`single_line`] (the `say!` macro and `table` do it), so a reason,
//! id or message with a newline, a carriage return or a bidi override shows
//! as visible escapes on its own line instead of forging a row or a
//! "verified" verdict. JSON output is exact: serde escapes it.

use std::fmt::{self, Write as _};

use serde_json::{Value, json};

use super::Format;
use safemode_client::{DecisionReport, PolicySnapshot};
use safemode_policy::{ActionPolicy, Effect, EffectKind};
use safemode_wire::{self as wire, proto};

/// One line of text into a `String` (which cannot fail), with everything
/// in it that could break or reorder the line escaped (see [`single_line`]).
macro_rules! say {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        let _ = writeln!($out, "{}", single_line(&line));
    }};
}

// === one line per line ===

/// `text` for a terminal, on one line and shown as it is stored: control
/// characters (`\n`, `\r`, `\t`, and every other one as `\u{..}`), line and
/// paragraph separators, and invisible format characters (bidi embeddings,
/// overrides, isolates and marks such as U+202E, zero-width spaces and
/// joiners, tag characters) are written as visible escapes, and a backslash
/// as `\\`, so that no escape can be faked either.
pub fn single_line(text: &str) -> SingleLine<'_> {
    SingleLine(text)
}

/// A string displayed by [`single_line`]: escapes are written as it is
/// formatted, without a copy of the text.
pub struct SingleLine<'a>(&'a str);

impl fmt::Display for SingleLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(must_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char there");
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                other => write!(f, "\\u{{{:x}}}", u32::from(other))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Whether `c` must be escaped to keep a line honest: the backslash, and
/// every character of Unicode's general categories Cc (controls), Zl and Zp
/// (line and paragraph separators) and Cf (format characters: invisible, and
/// among them everything that reorders text). Written out by hand because
/// the standard library knows only `is_control` and a crate of Unicode
/// tables for one short list is not worth its weight; the list is Cf as of
/// Unicode 15.
fn must_escape(c: char) -> bool {
    matches!(
        c,
        '\\'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    ) || c.is_control()
}

fn json_line(value: &Value) -> String {
    format!("{value}\n")
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(|t| wire::timestamp_from_wire(t).ok())
        .map_or(Value::Null, |t| json!(t.to_string()))
}

/// A time for people: to the second (JSON keeps full precision).
fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| wire::timestamp_from_wire(t).ok())
        .and_then(|t| t.round(jiff::Unit::Second).ok())
        .map_or_else(|| "-".to_string(), |t| t.to_string())
}

fn channels_text(channels: &[String]) -> String {
    if channels.is_empty() {
        "all".to_string()
    } else {
        channels.join(",")
    }
}

fn activation_json(a: &proto::Activation) -> Value {
    json!({
        "id": a.id,
        "mode": a.mode,
        "title": a.title,
        "channels": if a.channels.is_empty() { json!(["*"]) } else { json!(a.channels) },
        "reason": a.reason,
        "principal": a.principal,
        "applied_at": time(&a.applied_at),
        "revision": a.revision,
    })
}

// === mode list ===

pub fn modes(format: Format, response: &proto::ListModesResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "modes": response.modes.iter().map(|m| json!({
                "name": m.name,
                "title": m.title,
                "summary": m.summary,
                "rules": m.rules.len(),
                "lift_requires_approval": m.lift_requires_approval,
            })).collect::<Vec<_>>()
        })),
        Format::Text => {
            let mut out = String::new();
            let width = response
                .modes
                .iter()
                .map(|m| m.name.len())
                .max()
                .unwrap_or(4);
            say!(out, "{:width$}  TITLE", "MODE");
            for m in &response.modes {
                say!(out, "{:width$}  {}", m.name, m.title);
            }
            out
        }
    }
}

// === mode apply / lift ===

pub fn applied(format: Format, response: &proto::ApplyModesResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "namespace": response.namespace,
            "revision": response.revision,
            "applied": response.applied.iter().map(activation_json).collect::<Vec<_>>(),
            "already_active": response.already_active.iter().map(activation_json).collect::<Vec<_>>(),
        })),
        Format::Text => {
            let mut out = String::new();
            for a in &response.applied {
                say!(
                    out,
                    "applied {} as {} on {} channels",
                    a.mode,
                    a.id,
                    channels_text(&a.channels)
                );
            }
            for a in &response.already_active {
                say!(
                    out,
                    "{} was already active as {} on {} channels (applied by {} at {})",
                    a.mode,
                    a.id,
                    channels_text(&a.channels),
                    a.principal,
                    time_text(&a.applied_at)
                );
            }
            say!(
                out,
                "namespace {} at revision {}",
                response.namespace,
                response.revision
            );
            out
        }
    }
}

pub fn lifted(format: Format, response: &proto::LiftActivationsResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "namespace": response.namespace,
            "revision": response.revision,
            "lifted": response.lifted.iter().map(activation_json).collect::<Vec<_>>(),
            "pending": response.pending.as_ref().map(request_json),
        })),
        Format::Text => {
            let mut out = String::new();
            if let Some(pending) = &response.pending {
                pending_text(&mut out, pending);
                return out;
            }
            for a in &response.lifted {
                say!(
                    out,
                    "lifted {} ({}) on {} channels",
                    a.id,
                    a.mode,
                    channels_text(&a.channels)
                );
            }
            say!(
                out,
                "namespace {} at revision {}",
                response.namespace,
                response.revision
            );
            out
        }
    }
}

// === status ===

pub fn status(format: Format, s: &proto::GetStatusResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "namespace": s.namespace,
            "revision": s.revision,
            "server_time": time(&s.server_time),
            "replica": s.replica,
            "activations": s.activations.iter().map(activation_json).collect::<Vec<_>>(),
            "subscribers": s.subscribers.iter().map(|sub| json!({
                "subscriber_id": sub.subscriber_id,
                "channel": sub.channel,
                "peer": sub.peer,
                "connected_at": time(&sub.connected_at),
                "sent_revision": sub.sent_revision,
                "acked_revision": sub.acked_revision,
                "acked_at": time(&sub.acked_at),
                "rejected_revision": (sub.rejected_revision > 0 || !sub.reject_reason.is_empty()).then_some(sub.rejected_revision),
                "reject_reason": (!sub.reject_reason.is_empty()).then_some(&sub.reject_reason),
                "rejected_at": time(&sub.rejected_at),
            })).collect::<Vec<_>>(),
            "problems": s.problems,
        })),
        Format::Text => status_text(s),
    }
}

fn status_text(s: &proto::GetStatusResponse) -> String {
    let current = s
        .subscribers
        .iter()
        .filter(|x| x.acked_revision >= s.revision)
        .count();
    let mut out = String::new();
    say!(
        out,
        "namespace {} at revision {}: {} active, {} on replica {} ({} acked revision {})",
        s.namespace,
        s.revision,
        s.activations.len(),
        count(s.subscribers.len(), "subscriber"),
        s.replica,
        current,
        s.revision
    );
    for problem in &s.problems {
        say!(out, "PROBLEM: {problem}");
    }
    if !s.activations.is_empty() {
        say!(out);
        let rows: Vec<[String; 6]> = s
            .activations
            .iter()
            .map(|a| {
                [
                    a.id.clone(),
                    a.mode.clone(),
                    channels_text(&a.channels),
                    a.revision.to_string(),
                    format!("{} at {}", a.principal, time_text(&a.applied_at)),
                    a.reason.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            [
                "ACTIVATION",
                "MODE",
                "CHANNELS",
                "REVISION",
                "APPLIED",
                "REASON",
            ],
            &rows,
        );
    }
    if !s.subscribers.is_empty() {
        say!(out);
        let rows: Vec<[String; 6]> = s
            .subscribers
            .iter()
            .map(|x| {
                let rejected = if x.reject_reason.is_empty() {
                    "-".to_string()
                } else {
                    format!("{}: {}", x.rejected_revision, x.reject_reason)
                };
                [
                    x.subscriber_id.clone(),
                    x.channel.clone(),
                    x.acked_revision.to_string(),
                    time_text(&x.acked_at),
                    x.peer.clone(),
                    rejected,
                ]
            })
            .collect();
        table(
            &mut out,
            [
                "SUBSCRIBER",
                "CHANNEL",
                "ACKED",
                "ACKED AT",
                "PEER",
                "REJECTED",
            ],
            &rows,
        );
    }
    out
}

/// "1 subscriber", "2 subscribers".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Rows under a header, in columns. Cells are escaped by [`single_line`]
/// before they are measured, so the columns stay aligned and no cell can
/// start a line of its own.
fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let escape = |row: &[String; N]| row.each_ref().map(|cell| single_line(cell).to_string());
    let rows: Vec<[String; N]> = rows.iter().map(escape).collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Already escaped: written as is, not through `say!`, which would
    // escape the escapes.
    let mut line = |cells: Vec<&str>| {
        let mut row = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                row.push_str(cell);
            } else {
                let _ = write!(row, "{cell:w$}  ", w = widths[i]);
            }
        }
        out.push_str(row.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

// === watch ===

fn effect_text(effect: &Effect) -> String {
    match effect {
        Effect::Throttle(t) => format!("throttle {}/{}s", t.max, t.window_seconds),
        Effect::StepUp(s) => format!(
            "step_up >={} via {} ({} tries, then {})",
            s.min_confidence,
            s.methods.names().collect::<Vec<_>>().join("|"),
            s.max_attempts,
            s.escalate_queue
        ),
        Effect::Review(r) => format!("review {}", r.queue),
        Effect::Route(r) => format!("route to {}", r.to),
        other => other.kind().as_str().to_string(),
    }
}

fn action_text(policy: &ActionPolicy) -> String {
    let mut text = policy.base.as_ref().map_or_else(
        || EffectKind::Allow.as_str().to_string(),
        |e| effect_text(&e.effect),
    );
    for entry in &policy.conditional {
        text.push_str(&format!(
            "; if {}: {}",
            serde_json::to_string(&entry.when).unwrap_or_default(),
            effect_text(&entry.effect)
        ));
    }
    text
}

pub fn snapshot(format: Format, s: &PolicySnapshot) -> String {
    let rules = s.policy.entries();
    match format {
        Format::Json => json_line(&json!({
            "namespace": s.namespace.as_str(),
            "channel": s.channel.as_str(),
            "revision": s.revision,
            "issued_at": s.issued_at.to_string(),
            "activations": s.activations,
            "rules": rules.iter().map(|(key, p)| (key.clone(), json!({
                "base": p.base.as_ref().map(|e| json!({"effect": e.effect, "throttle": e.throttle.as_ref().map(|t| t.limit), "activation_ids": e.activation_ids})),
                "conditional": p.conditional.iter().map(|e| json!({"when": e.when, "effect": e.effect, "throttle": e.throttle.as_ref().map(|t| t.limit), "activation_ids": e.activation_ids})).collect::<Vec<_>>(),
            }))).collect::<serde_json::Map<_, _>>(),
        })),
        Format::Text => {
            let active: Vec<String> = s
                .activations
                .iter()
                .map(|a| format!("{} ({})", a.mode, a.id))
                .collect();
            let mut out = String::new();
            say!(
                out,
                "revision {} for {} in {} (issued {}): {}",
                s.revision,
                s.channel,
                s.namespace,
                s.issued_at,
                if active.is_empty() {
                    "no active modes".to_string()
                } else {
                    active.join(", ")
                }
            );
            for (key, policy) in rules {
                say!(out, "  {key}: {}", action_text(policy));
            }
            out
        }
    }
}

// === decide ===

pub fn decision(format: Format, d: &DecisionReport) -> String {
    match format {
        Format::Json => json_line(&serde_json::to_value(d).expect("decisions serialize")),
        Format::Text => {
            let params = serde_json::to_value(&d.outcome).expect("outcomes serialize");
            let detail: Vec<String> = params
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "effect")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let mut out = String::new();
            say!(
                out,
                "{}",
                [d.outcome.kind().as_str().to_string(), detail.join(" ")]
                    .join(" ")
                    .trim_end()
            );
            say!(
                out,
                "  {} {} at revision {}{}",
                d.channel.as_deref().unwrap_or("-"),
                d.action,
                d.revision.map_or("-".to_string(), |r| r.to_string()),
                match (d.stale, d.fail_closed) {
                    (_, true) => " (STALE too long: failed closed)",
                    (true, false) => " (STALE)",
                    (false, false) => "",
                }
            );
            if !d.reasons.is_empty() {
                say!(out, "  because: {}", d.reasons.join(", "));
            }
            if let Some(m) = &d.customer_message {
                say!(out, "  customer: {m}");
            }
            if let Some(s) = &d.agent_script {
                say!(out, "  agent: {s}");
            }
            out
        }
    }
}

// === sim ===

pub fn sim_started(
    format: Format,
    namespace: &safemode_policy::Namespace,
    channels: &[(safemode_policy::Channel, usize)],
    subscribers: usize,
) -> String {
    let spread: Vec<String> = channels.iter().map(|(c, n)| format!("{c}={n}")).collect();
    match format {
        Format::Json => json_line(&json!({
            "started": true,
            "namespace": namespace.as_str(),
            "subscribers": subscribers,
            "channels": channels.iter().map(|(c, n)| json!({"channel": c.as_str(), "subscribers": n})).collect::<Vec<_>>(),
        })),
        Format::Text => {
            let mut out = String::new();
            say!(
                out,
                "simulating {subscribers} subscribers ({}) in namespace {namespace}; each revision is reported once all applied it (Ctrl-C stops)",
                spread.join(", ")
            );
            out
        }
    }
}

pub fn sim_revision(
    format: Format,
    report: &crate::sim::RevisionReport,
    decisions: &[DecisionReport],
) -> String {
    match format {
        Format::Json => json_line(&json!({
            "revision": report.revision,
            "issued_at": report.issued_at.to_string(),
            "complete": report.complete,
            "channels": report.channels,
            "decisions": decisions,
        })),
        Format::Text => {
            let mut out = String::new();
            let applied: usize = report.channels.iter().map(|c| c.applied).sum();
            let total: usize = report.channels.iter().map(|c| c.subscribers).sum();
            say!(
                out,
                "revision {}: applied by {applied}/{total}{}",
                report.revision,
                if report.complete { "" } else { " (INCOMPLETE)" }
            );
            let rows: Vec<[String; 5]> = report
                .channels
                .iter()
                .map(|c| {
                    [
                        format!("  {}", c.channel),
                        format!("{}/{}", c.applied, c.subscribers),
                        format!("{:.1}ms", c.p50_ms),
                        format!("{:.1}ms", c.p99_ms),
                        format!("{:.1}ms", c.max_ms),
                    ]
                })
                .collect();
            table(
                &mut out,
                ["  CHANNEL", "APPLIED", "P50", "P99", "MAX"],
                &rows,
            );
            for d in decisions {
                say!(
                    out,
                    "  {} {}: {}",
                    d.channel.as_deref().unwrap_or("-"),
                    d.action,
                    d.outcome.kind().as_str()
                );
            }
            out
        }
    }
}

// === drills ===

pub fn drills(
    format: Format,
    reports: &[crate::drill::DrillReport],
    written: &[std::path::PathBuf],
) -> String {
    match format {
        Format::Json => json_line(&json!({
            "passed": reports.iter().all(|r| r.passed),
            "drills": reports.iter().map(|r| json!({
                "runbook": r.runbook,
                "namespace": r.namespace,
                "passed": r.passed,
                "incident_id": r.incident_id,
                "subscribers": r.subscribers,
                "stages": r.stages,
                "fault": r.fault,
                "restoration": r.restoration,
                "failures": r.failures,
            })).collect::<Vec<_>>(),
            "reports": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        })),
        Format::Text => {
            let mut out = String::new();
            for r in reports {
                let expectations: usize = r.stages.iter().map(|s| s.expectations.len()).sum();
                let subscribers: usize =
                    r.subscribers.iter().map(|s| s.simulated + s.attached).sum();
                let plural = |n: usize, one: &str, many: &str| {
                    format!("{n} {}", if n == 1 { one } else { many })
                };
                say!(
                    out,
                    "{} {} in {} ({}, {}, {})",
                    if r.passed { "PASS" } else { "FAIL" },
                    r.runbook,
                    r.namespace,
                    plural(r.stages.len(), "stage", "stages"),
                    plural(expectations, "expectation", "expectations"),
                    plural(subscribers, "subscriber", "subscribers")
                );
                for stage in &r.stages {
                    let slowest = stage
                        .channels
                        .iter()
                        .max_by(|a, b| a.max_ms.total_cmp(&b.max_ms));
                    say!(
                        out,
                        "  {} ({}) at revision {}: {}/{} expectations hold; slowest channel {} ({:.1} ms, limit {} ms){}",
                        stage.severity,
                        stage.step,
                        stage.revision,
                        stage.expectations.iter().filter(|e| e.passed).count(),
                        stage.expectations.len(),
                        slowest.map_or("-", |c| c.channel.as_str()),
                        slowest.map_or(0.0, |c| c.max_ms),
                        stage.apply_within_ms,
                        stage
                            .approval
                            .as_ref()
                            .map(|a| format!("; approved by {}", a.approved_by))
                            .unwrap_or_default()
                    );
                }
                if let Some(fault) = &r.fault {
                    say!(
                        out,
                        "  fault {} at {}: {} affected, {} in {:.1} ms",
                        fault.kind,
                        fault.severity,
                        fault.affected,
                        if fault.recovered {
                            "recovered"
                        } else {
                            "NOT recovered"
                        },
                        fault.recovery_ms
                    );
                }
                for failure in &r.failures {
                    say!(out, "  FAILED: {failure}");
                }
            }
            for path in written {
                say!(out, "wrote {}", path.display());
            }
            out
        }
    }
}

// === incidents, requests, audit, runbooks, tokens ===

fn request_json(r: &proto::ChangeRequest) -> Value {
    json!({
        "id": r.id,
        "namespace": r.namespace,
        "kind": r.kind,
        "incident_id": (!r.incident_id.is_empty()).then_some(&r.incident_id),
        "severity": (!r.severity.is_empty()).then_some(&r.severity),
        "activation_ids": r.activation_ids,
        "requested_by": r.requested_by,
        "reason": r.reason,
        "requested_at": time(&r.requested_at),
        "expires_at": time(&r.expires_at),
        "status": r.status,
        "approved_by": (!r.approved_by.is_empty()).then_some(&r.approved_by),
        "summary": r.summary,
    })
}

/// What a commander sees when a change waits for a second approver.
fn pending_text(out: &mut String, r: &proto::ChangeRequest) {
    say!(out, "needs a second approver: request {} is pending", r.id);
    say!(out, "  it will {}", r.summary);
    say!(
        out,
        "  another principal with the approver role runs: safemode approve {}",
        r.id
    );
    say!(out, "  it expires at {}", time_text(&r.expires_at));
}

fn incident_json(i: &proto::Incident) -> Value {
    json!({
        "id": i.id,
        "type": i.r#type,
        "title": i.title,
        "namespace": i.namespace,
        "severity": i.severity,
        "status": i.status,
        "channels": if i.channels.is_empty() { json!(["*"]) } else { json!(i.channels) },
        "activation_ids": i.activation_ids,
        "lift_requires_approval": i.lift_requires_approval,
        "declared_by": i.declared_by,
        "declared_at": time(&i.declared_at),
        "review_due": time(&i.review_due),
        "exit_criteria": i.exit_criteria,
        "timeline": i.timeline.iter().map(|e| json!({
            "at": time(&e.at),
            "event": e.event,
            "principal": e.principal,
            "severity": e.severity,
            "reason": e.reason,
            "request_id": (!e.request_id.is_empty()).then_some(&e.request_id),
            "revision": e.revision,
        })).collect::<Vec<_>>(),
    })
}

pub fn incident_change(format: Format, what: &str, change: &proto::IncidentChange) -> String {
    let incident = change.incident.clone().unwrap_or_default();
    match format {
        Format::Json => json_line(&json!({
            "incident": incident_json(&incident),
            "revision": change.revision,
            "pending": change.pending.as_ref().map(request_json),
        })),
        Format::Text => {
            let mut out = String::new();
            if let Some(pending) = &change.pending {
                pending_text(&mut out, pending);
                return out;
            }
            say!(
                out,
                "{what} {} {} ({}) at {} in {}",
                incident.r#type,
                incident.id,
                incident.status,
                incident.severity,
                incident.namespace
            );
            say!(
                out,
                "  activations: {}",
                if incident.activation_ids.is_empty() {
                    "none".to_string()
                } else {
                    incident.activation_ids.join(", ")
                }
            );
            say!(
                out,
                "namespace {} at revision {}",
                incident.namespace,
                change.revision
            );
            out
        }
    }
}

pub fn incidents(format: Format, response: &proto::ListIncidentsResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "incidents": response.incidents.iter().map(incident_json).collect::<Vec<_>>(),
            "total": response.total,
        })),
        Format::Text => {
            let mut out = String::new();
            if response.incidents.is_empty() {
                say!(out, "no incidents");
                return out;
            }
            let rows: Vec<[String; 6]> = response
                .incidents
                .iter()
                .map(|i| {
                    [
                        i.id.clone(),
                        i.r#type.clone(),
                        i.severity.clone(),
                        i.status.clone(),
                        format!("{} at {}", i.declared_by, time_text(&i.declared_at)),
                        time_text(&i.review_due),
                    ]
                })
                .collect();
            table(
                &mut out,
                [
                    "INCIDENT",
                    "TYPE",
                    "SEVERITY",
                    "STATUS",
                    "DECLARED",
                    "REVIEW DUE",
                ],
                &rows,
            );
            cut_note(
                &mut out,
                response.incidents.len(),
                response.total,
                "incidents",
            );
            out
        }
    }
}

pub fn incident(format: Format, i: &proto::Incident) -> String {
    match format {
        Format::Json => json_line(&incident_json(i)),
        Format::Text => {
            let mut out = String::new();
            say!(out, "{} {}: {} ({})", i.id, i.title, i.severity, i.status);
            say!(
                out,
                "  type {} in {}, on {} channels; declared by {} at {}",
                i.r#type,
                i.namespace,
                channels_text(&i.channels),
                i.declared_by,
                time_text(&i.declared_at)
            );
            if i.status == "active" {
                say!(out, "  review due {}", time_text(&i.review_due));
            }
            say!(
                out,
                "  lifting needs a second approver: {}",
                if i.lift_requires_approval {
                    "yes"
                } else {
                    "no"
                }
            );
            say!(
                out,
                "  activations: {}",
                if i.activation_ids.is_empty() {
                    "none".to_string()
                } else {
                    i.activation_ids.join(", ")
                }
            );
            if !i.exit_criteria.is_empty() {
                say!(out, "  exit criteria:");
                for c in &i.exit_criteria {
                    say!(out, "    - {c}");
                }
            }
            say!(out);
            let rows: Vec<[String; 6]> = i
                .timeline
                .iter()
                .map(|e| {
                    [
                        time_text(&e.at),
                        e.event.clone(),
                        e.severity.clone(),
                        e.principal.clone(),
                        if e.revision > 0 {
                            e.revision.to_string()
                        } else {
                            "-".into()
                        },
                        [e.reason.as_str(), e.request_id.as_str()]
                            .iter()
                            .filter(|t| !t.is_empty())
                            .copied()
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]
                })
                .collect();
            table(
                &mut out,
                ["AT", "EVENT", "SEVERITY", "BY", "REVISION", "REASON"],
                &rows,
            );
            out
        }
    }
}

/// Says so when a list answer was cut to its bound.
fn cut_note(out: &mut String, shown: usize, total: u32, what: &str) {
    if (total as usize) > shown {
        say!(out, "(the newest {shown} of {total} {what})");
    }
}

pub fn requests(format: Format, response: &proto::ListRequestsResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "requests": response.requests.iter().map(request_json).collect::<Vec<_>>(),
            "total": response.total,
        })),
        Format::Text => {
            let mut out = String::new();
            if response.requests.is_empty() {
                say!(out, "no requests waiting for an approver");
                return out;
            }
            let rows: Vec<[String; 5]> = response
                .requests
                .iter()
                .map(|r| {
                    [
                        r.id.clone(),
                        r.status.clone(),
                        r.requested_by.clone(),
                        time_text(&r.expires_at),
                        r.summary.clone(),
                    ]
                })
                .collect();
            table(
                &mut out,
                ["REQUEST", "STATUS", "REQUESTED BY", "EXPIRES", "WILL"],
                &rows,
            );
            cut_note(
                &mut out,
                response.requests.len(),
                response.total,
                "requests",
            );
            out
        }
    }
}

pub fn approved(format: Format, response: &proto::ApproveResponse) -> String {
    let request = response.request.clone().unwrap_or_default();
    match format {
        Format::Json => json_line(&json!({
            "request": request_json(&request),
            "revision": response.revision,
        })),
        Format::Text => {
            let mut out = String::new();
            say!(
                out,
                "approved {} (requested by {}): {}",
                request.id,
                request.requested_by,
                request.summary
            );
            say!(
                out,
                "namespace {} at revision {}",
                request.namespace,
                response.revision
            );
            out
        }
    }
}

/// The whole audit report as one document (JSON), or as one table with the
/// verification's summary (text). `safemode audit` prints text page by page
/// with [`audit_rows`] and [`audit_summary`] instead.
pub fn audit(format: Format, response: &proto::GetAuditResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "entries": response.entries.iter().map(|e| json!({
                "seq": e.seq,
                "at": time(&e.at),
                "action": e.action,
                "principal": e.principal,
                "roles": e.roles,
                "namespace": (!e.namespace.is_empty()).then_some(&e.namespace),
                "reason": (!e.reason.is_empty()).then_some(&e.reason),
                "incident_id": (!e.incident_id.is_empty()).then_some(&e.incident_id),
                "request_id": (!e.request_id.is_empty()).then_some(&e.request_id),
                "activation_ids": e.activation_ids,
                "detail": e.detail,
                "revision": e.revision,
                "state_digest": (!e.state_digest.is_empty()).then_some(&e.state_digest),
                "prev_hash": e.prev_hash,
                "hash": e.hash,
                "key_id": (!e.key_id.is_empty()).then_some(&e.key_id),
                "signature": (!e.signature.is_empty()).then_some(&e.signature),
            })).collect::<Vec<_>>(),
            "verified": response.verified,
            "problems": response.problems,
            "problems_total": response.problems_total,
            "head": (response.head_seq > 0).then(|| json!({
                "seq": response.head_seq,
                "hash": response.head_hash,
            })),
        })),
        Format::Text => {
            let mut out = audit_rows(response, true);
            out.push_str(&audit_summary(response));
            out
        }
    }
}

/// One page of the log as table rows (text), with the header on the first.
pub fn audit_rows(response: &proto::GetAuditResponse, header: bool) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 6]> = response
        .entries
        .iter()
        .map(|e| {
            [
                e.seq.to_string(),
                time_text(&e.at),
                e.action.clone(),
                if e.roles.is_empty() {
                    e.principal.clone()
                } else {
                    format!("{} ({})", e.principal, e.roles.join(","))
                },
                e.revision.to_string(),
                [e.detail.as_str(), e.reason.as_str()]
                    .iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" / reason: "),
            ]
        })
        .collect();
    let titles = ["SEQ", "AT", "ACTION", "BY", "REVISION", "DETAIL"];
    if header {
        table(&mut out, titles, &rows);
    } else {
        // Later pages: the rows only, so the listing reads as one table.
        let mut page = String::new();
        table(&mut page, titles, &rows);
        out.extend(page.lines().skip(1).map(|l| format!("{l}\n")));
    }
    out
}

/// What verification found (text): the head to keep, and each problem.
pub fn audit_summary(response: &proto::GetAuditResponse) -> String {
    let mut out = String::new();
    if response.verified {
        say!(out);
        if response.head_seq > 0 {
            // Kept somewhere else, it shows later whether the whole
            // store was rewritten.
            say!(
                out,
                "head: entry {} with hash {}",
                response.head_seq,
                response.head_hash
            );
        }
        if response.problems.is_empty() {
            say!(
                out,
                "verified: the hash chain is intact, every entry is signed by a trusted key, and the activations are those the log committed to"
            );
        } else {
            for problem in &response.problems {
                say!(out, "TAMPERED: {problem}");
            }
            let listed = response.problems.len() as u64;
            if response.problems_total > listed {
                say!(
                    out,
                    "TAMPERED: and {} more problem(s) not listed",
                    response.problems_total - listed
                );
            }
        }
    }
    out
}

pub fn runbooks(format: Format, response: &proto::ListRunbooksResponse) -> String {
    match format {
        Format::Json => json_line(&json!({
            "runbooks": response.runbooks.iter().map(|r| json!({
                "name": r.name,
                "title": r.title,
                "summary": r.summary,
                "owners": r.owners,
                "lift_requires_approval": r.lift_requires_approval,
                "review_interval_seconds": r.review_interval_seconds,
                "exit_criteria": r.exit_criteria,
                "stages": r.stages.iter().map(|s| json!({
                    "severity": s.severity,
                    "modes": s.modes,
                    "expectations": s.expectations,
                    "apply_within_ms": s.apply_within_ms,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })),
        Format::Text => {
            let mut out = String::new();
            for r in &response.runbooks {
                say!(out, "{}: {}", r.name, r.title);
                for s in &r.stages {
                    say!(out, "  {}: {}", s.severity, s.modes.join(", "));
                }
            }
            out
        }
    }
}

pub fn lint(format: Format, result: &Result<usize, Vec<String>>) -> String {
    match (format, result) {
        (Format::Json, Ok(files)) => json_line(&json!({"files": files, "errors": []})),
        (Format::Json, Err(errors)) => json_line(&json!({"errors": errors})),
        (Format::Text, Ok(files)) => format!("{} ok\n", count(*files, "file")),
        (Format::Text, Err(errors)) => errors
            .iter()
            .map(|e| format!("{}\n", single_line(e)))
            .collect(),
    }
}

pub fn token(
    format: Format,
    principal: &str,
    roles: &[safemode_controller::auth::Role],
    new: &safemode_controller::auth::NewToken,
) -> String {
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    match format {
        Format::Json => json_line(&json!({
            "principal": principal,
            "roles": roles,
            "token": new.token,
            "line": new.line,
        })),
        Format::Text => {
            let mut out = String::new();
            say!(
                out,
                "token for {principal} ({}), shown only now:",
                roles.join(", ")
            );
            say!(out, "  {}", new.token);
            say!(
                out,
                "add this line to the server's tokens file (it holds only the hash):"
            );
            say!(out, "{}", new.line);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let shown = single_line(input).to_string();
        assert_eq!(shown, expected, "single_line({input:?})");
        // Nothing that breaks, reorders or hides text is left.
        assert!(!shown.chars().any(must_escape_but_backslash), "{shown:?}");
    }

    fn must_escape_but_backslash(c: char) -> bool {
        c != '\\' && must_escape(c)
    }

    #[test]
    fn text_is_shown_on_one_line_with_hidden_characters_visible() {
        let cases = [
            ("", ""),
            ("plain reason, INC-4211", "plain reason, INC-4211"),
            ("ünïcödé stays: 日本語 ✓", "ünïcödé stays: 日本語 ✓"),
            ("two\nlines", "two\\nlines"),
            (
                "x\nverified: the hash chain is intact",
                "x\\nverified: the hash chain is intact",
            ),
            ("cr\roverwrite", "cr\\roverwrite"),
            ("crlf\r\n", "crlf\\r\\n"),
            ("tab\there", "tab\\there"),
            ("nul\0", "nul\\u{0}"),
            ("escape \u{1b}[2J clears", "escape \\u{1b}[2J clears"),
            ("del\u{7f}", "del\\u{7f}"),
            ("c1 \u{85} next line", "c1 \\u{85} next line"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("rtl \u{202e}txt.exe", "rtl \\u{202e}txt.exe"),
            (
                "\u{202a}\u{202b}\u{202c}\u{202d}",
                "\\u{202a}\\u{202b}\\u{202c}\\u{202d}",
            ),
            (
                "\u{2066}\u{2067}\u{2068}\u{2069}",
                "\\u{2066}\\u{2067}\\u{2068}\\u{2069}",
            ),
            ("\u{200e}\u{200f}\u{61c}", "\\u{200e}\\u{200f}\\u{61c}"),
            ("line\u{2028}para\u{2029}", "line\\u{2028}para\\u{2029}"),
            (
                "zero\u{200b}width\u{200c}\u{200d}\u{2060}\u{feff}",
                "zero\\u{200b}width\\u{200c}\\u{200d}\\u{2060}\\u{feff}",
            ),
            ("soft\u{ad}hyphen", "soft\\u{ad}hyphen"),
            ("tag\u{e0041}\u{e007f}", "tag\\u{e0041}\\u{e007f}"),
            // A backslash is escaped too, so text cannot pretend to be an
            // escape: "\n" typed as two characters is not a newline shown.
            ("a\\nb", "a\\\\nb"),
            ("\\u{202e}", "\\\\u{202e}"),
            ("\\", "\\\\"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn a_table_keeps_one_row_per_line_and_its_columns_aligned() {
        let mut out = String::new();
        table(
            &mut out,
            ["ID", "REASON"],
            &[
                ["a\u{202e}b".to_string(), "x\nverified: forged".to_string()],
                ["c".to_string(), "fine".to_string()],
            ],
        );
        assert_eq!(
            out,
            "ID          REASON\n\
             a\\u{202e}b  x\\nverified: forged\n\
             c           fine\n"
        );
    }

    #[test]
    fn say_writes_one_line_whatever_it_is_given() {
        let mut out = String::new();
        let reason = "ok\nTAMPERED: nothing\u{2028}";
        say!(out, "reason: {reason}");
        assert_eq!(out, "reason: ok\\nTAMPERED: nothing\\u{2028}\n");
    }
}
