//! Conversions between the policy core and `safemode.v1` messages.
//!
//! Outbound conversions cannot fail. Inbound ones (a client reading a
//! snapshot) check every field and return a [`WireError`] that names it.

use std::sync::Arc;

use jiff::Timestamp;

use super::proto;
use safemode_policy::runbook::Runbook;
use safemode_policy::{
    ActionPolicy, Activation, ActivationId, ChannelPolicy, ChannelSet, Condition, Deny, Effect,
    Entry, MethodSet, Mode, ReadOnly, Review, Route, StandingThrottle, StepUp, Text, Throttle,
};

/// A message that does not hold what the format promises.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct WireError {
    /// Where in the message.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl WireError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        WireError {
            field: field.into(),
            problem: problem.to_string(),
        }
    }
}

// === Time ===

/// A timestamp as protobuf's well-known type.
pub fn timestamp_to_wire(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// A protobuf timestamp, checked to be in range.
pub fn timestamp_from_wire(t: &prost_types::Timestamp) -> Result<Timestamp, String> {
    Timestamp::new(t.seconds, t.nanos).map_err(|e| format!("bad timestamp: {e}"))
}

// === Outbound ===

/// An optional text (an `Arc<str>` message, a [`Text`] alternative) as
/// protobuf has it: empty for none.
pub fn opt_text<S: std::ops::Deref<Target = str>>(s: &Option<S>) -> String {
    s.as_deref().unwrap_or_default().to_string()
}

/// An activation, without its rules (a snapshot carries them compiled).
pub fn activation_to_wire(a: &Activation) -> proto::Activation {
    proto::Activation {
        id: a.id.to_string(),
        mode: a.mode.name.to_string(),
        title: a.mode.title.clone(),
        channels: if a.channels == ChannelSet::ALL {
            Vec::new()
        } else {
            a.channels.iter().map(|c| c.as_str().to_string()).collect()
        },
        reason: a.reason.as_str().to_string(),
        principal: a.principal.clone(),
        applied_at: Some(timestamp_to_wire(a.applied_at)),
        revision: a.revision,
        incident_id: a.incident_id.clone().unwrap_or_default(),
        customer_notice: opt_text(&a.mode.customer_notice),
        agent_script: opt_text(&a.mode.agent_script),
    }
}

fn effect_to_wire(e: &Effect) -> proto::Effect {
    use proto::effect::Kind;
    let kind = match e {
        Effect::Allow => Kind::Allow(proto::Allow {}),
        Effect::Throttle(t) => Kind::Throttle(throttle_to_wire(t)),
        Effect::StepUp(s) => Kind::StepUp(proto::StepUp {
            min_confidence: s.min_confidence,
            methods: s.methods.names().map(str::to_string).collect(),
            max_attempts: s.max_attempts,
            escalate_queue: s.escalate_queue.to_string(),
        }),
        Effect::Review(r) => Kind::Review(proto::Review {
            queue: r.queue.to_string(),
        }),
        Effect::ReadOnly(r) => Kind::ReadOnly(proto::ReadOnly {
            as_of: r.as_of.map(timestamp_to_wire),
        }),
        Effect::Route(r) => Kind::Route(proto::Route {
            to_channels: r.to.iter().map(|c| c.as_str().to_string()).collect(),
        }),
        Effect::Deny(d) => Kind::Deny(proto::Deny {
            alternative: opt_text(&d.alternative),
        }),
    };
    proto::Effect { kind: Some(kind) }
}

fn throttle_to_wire(t: &Throttle) -> proto::Throttle {
    proto::Throttle {
        max: t.max,
        window_seconds: t.window_seconds,
    }
}

fn condition_to_wire(c: &Condition) -> proto::Condition {
    proto::Condition {
        handoff_from_bot: c.handoff_from_bot,
        amount_over: c.amount_over,
        bot_flags_any: c.bot_flags_any.iter().map(|f| f.to_string()).collect(),
    }
}

fn entry_to_wire(e: &Entry) -> proto::CompiledEntry {
    proto::CompiledEntry {
        when: e.when.as_ref().map(condition_to_wire),
        effect: Some(effect_to_wire(&e.effect)),
        activation_ids: e.activation_ids.iter().map(ToString::to_string).collect(),
        customer_message: opt_text(&e.customer_message),
        agent_script: opt_text(&e.agent_script),
        throttle: e.throttle.as_ref().map(|t| proto::StandingThrottle {
            limit: Some(throttle_to_wire(&t.limit)),
            customer_message: opt_text(&t.customer_message),
            agent_script: opt_text(&t.agent_script),
        }),
    }
}

/// A channel's compiled rules.
pub fn channel_policy_to_wire(policy: &ChannelPolicy) -> proto::ChannelRules {
    proto::ChannelRules {
        actions: policy
            .entries()
            .into_iter()
            .map(|(key, p)| {
                let wire = proto::ActionPolicy {
                    base: p.base.as_ref().map(entry_to_wire),
                    conditional: p.conditional.iter().map(entry_to_wire).collect(),
                };
                (key, wire)
            })
            .collect(),
    }
}

/// A runbook, summarised.
pub fn runbook_to_wire(r: &Runbook) -> proto::Runbook {
    proto::Runbook {
        name: r.name.to_string(),
        title: r.title.clone(),
        summary: r.summary.clone(),
        owners: r.owners.clone(),
        lift_requires_approval: r.lift_requires_approval,
        review_interval_seconds: r.review_interval.as_secs(),
        exit_criteria: r.exit_criteria.clone(),
        stages: r
            .stages
            .iter()
            .map(|s| proto::RunbookStage {
                severity: s.severity.to_string(),
                modes: s
                    .modes
                    .iter()
                    .map(|m| {
                        if m.channels == ChannelSet::ALL {
                            m.mode.to_string()
                        } else {
                            format!("{} on {}", m.mode, m.channels)
                        }
                    })
                    .collect(),
                expectations: s.expectations.len() as u32,
                apply_within_ms: s.apply_within.as_millis() as u64,
                customer_message: opt_text(&s.customer_message),
                agent_script: opt_text(&s.agent_script),
            })
            .collect(),
    }
}

/// A mode of the catalogue, with its rules.
pub fn mode_to_wire(m: &Mode) -> proto::Mode {
    proto::Mode {
        name: m.name.to_string(),
        title: m.title.clone(),
        summary: m.summary.clone(),
        customer_notice: opt_text(&m.customer_notice),
        agent_script: opt_text(&m.agent_script),
        lift_requires_approval: m.lift_requires_approval,
        rules: m
            .rules
            .iter()
            .map(|r| proto::ModeRule {
                channels: r.channels.to_names(),
                actions: r.actions.iter().map(ToString::to_string).collect(),
                except_actions: r.except.iter().map(ToString::to_string).collect(),
                when: r.when.as_ref().map(condition_to_wire),
                effect: Some(effect_to_wire(&r.effect)),
                customer_message: opt_text(&r.customer_message),
                agent_script: opt_text(&r.agent_script),
            })
            .collect(),
    }
}

// === Inbound ===

fn non_empty(s: &str) -> Option<Arc<str>> {
    (!s.is_empty()).then(|| Arc::from(s))
}

fn effect_from_wire(field: &str, e: Option<&proto::Effect>) -> Result<Effect, WireError> {
    use proto::effect::Kind;
    let kind = e
        .and_then(|e| e.kind.as_ref())
        .ok_or_else(|| WireError::new(field, "effect is missing"))?;
    Ok(match kind {
        Kind::Allow(_) => Effect::Allow,
        Kind::Throttle(t) => Effect::Throttle(throttle_from_wire(field, t)?),
        Kind::StepUp(s) => {
            if !(0.0..=1.0).contains(&s.min_confidence) {
                return Err(WireError::new(
                    field,
                    format!("min_confidence {} outside 0..1", s.min_confidence),
                ));
            }
            if s.max_attempts == 0 {
                return Err(WireError::new(field, "max_attempts is 0"));
            }
            Effect::StepUp(StepUp {
                min_confidence: s.min_confidence,
                methods: MethodSet::parse(&s.methods).map_err(|e| WireError::new(field, e))?,
                max_attempts: s.max_attempts,
                escalate_queue: Text::intern(&s.escalate_queue),
            })
        }
        Kind::Review(r) => Effect::Review(Review {
            queue: Text::intern(&r.queue),
        }),
        Kind::ReadOnly(r) => Effect::ReadOnly(ReadOnly {
            as_of: r
                .as_of
                .as_ref()
                .map(timestamp_from_wire)
                .transpose()
                .map_err(|e| WireError::new(field, e))?,
        }),
        Kind::Route(r) => {
            // A merged route may have no channel left (decides as deny).
            let mut to = ChannelSet::NONE;
            for name in &r.to_channels {
                let channel =
                    safemode_policy::Channel::parse(name).map_err(|e| WireError::new(field, e))?;
                to = to.with(channel);
            }
            Effect::Route(Route { to })
        }
        Kind::Deny(d) => Effect::Deny(Deny {
            alternative: (!d.alternative.is_empty()).then(|| Text::intern(&d.alternative)),
        }),
    })
}

fn throttle_from_wire(field: &str, t: &proto::Throttle) -> Result<Throttle, WireError> {
    if t.max == 0 || t.window_seconds == 0 {
        return Err(WireError::new(
            field,
            "throttle max and window_seconds must be at least 1",
        ));
    }
    Ok(Throttle {
        max: t.max,
        window_seconds: t.window_seconds,
    })
}

fn entry_from_wire(
    field: &str,
    e: &proto::CompiledEntry,
    conditional: bool,
) -> Result<Entry, WireError> {
    let when = match (&e.when, conditional) {
        (Some(c), true) => {
            let mut flags: Vec<Arc<str>> = c
                .bot_flags_any
                .iter()
                .map(|f| Arc::from(f.as_str()))
                .collect();
            flags.sort();
            flags.dedup();
            Some(Condition {
                handoff_from_bot: c.handoff_from_bot,
                amount_over: c.amount_over,
                bot_flags_any: flags,
            })
        }
        (None, false) => None,
        (None, true) => {
            return Err(WireError::new(
                field,
                "conditional entry without a condition",
            ));
        }
        (Some(_), false) => return Err(WireError::new(field, "base entry with a condition")),
    };
    Ok(Entry {
        when,
        effect: effect_from_wire(field, e.effect.as_ref())?,
        throttle: e
            .throttle
            .as_ref()
            .map(|t| {
                let limit = t
                    .limit
                    .as_ref()
                    .ok_or_else(|| WireError::new(field, "standing throttle without a limit"))?;
                Ok::<_, WireError>(StandingThrottle {
                    limit: throttle_from_wire(field, limit)?,
                    customer_message: non_empty(&t.customer_message),
                    agent_script: non_empty(&t.agent_script),
                })
            })
            .transpose()?,
        activation_ids: e
            .activation_ids
            .iter()
            .map(|id| ActivationId::parse(id).map_err(|err| WireError::new(field, err)))
            .collect::<Result<_, _>>()?,
        customer_message: non_empty(&e.customer_message),
        agent_script: non_empty(&e.agent_script),
    })
}

/// A channel's compiled rules, checked.
pub fn channel_policy_from_wire(rules: &proto::ChannelRules) -> Result<ChannelPolicy, WireError> {
    let mut keys = Vec::with_capacity(rules.actions.len());
    for (key, action) in &rules.actions {
        let field = format!("rules[{key}]");
        let base = action
            .base
            .as_ref()
            .map(|e| entry_from_wire(&format!("{field}.base"), e, false))
            .transpose()?;
        let conditional = action
            .conditional
            .iter()
            .enumerate()
            .map(|(i, e)| entry_from_wire(&format!("{field}.conditional[{i}]"), e, true))
            .collect::<Result<Vec<_>, _>>()?;
        keys.push((key.as_str(), ActionPolicy { base, conditional }));
    }
    // The error names the key.
    ChannelPolicy::from_keys(keys).map_err(|e| WireError::new("rules", e))
}
