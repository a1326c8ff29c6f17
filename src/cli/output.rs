//! Rendering results as text for people or as JSON for scripts. Renderers
//! return the text; `cli::emit` writes it.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::Format;
use crate::client::{DecisionReport, PolicySnapshot};
use crate::policy::{ActionPolicy, Effect, EffectKind};
use crate::wire::{self, proto};

/// `writeln!` into a `String`, which cannot fail.
macro_rules! say {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

fn json_line(value: &Value) -> String {
    format!("{value}\n")
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(|t| wire::timestamp_from_wire(t).ok())
        .map_or(Value::Null, |t| json!(t.to_string()))
}

fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    time(t).as_str().unwrap_or("-").to_string()
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
        })),
        Format::Text => {
            let mut out = String::new();
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

fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut row = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                row.push_str(cell);
            } else {
                let _ = write!(row, "{cell:w$}  ", w = widths[i]);
            }
        }
        say!(out, "{}", row.trim_end());
    };
    line(header.to_vec());
    for row in rows {
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
                if d.stale { " (STALE)" } else { "" }
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
