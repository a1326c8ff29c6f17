//! Effects: what a channel must do for an action, their restrictiveness order,
//! and the merge that combines two effects toward safety.
//!
//! The order, least to most restrictive:
//! `allow < throttle < step_up < review < read_only < route < deny`.
//! `read_only` refuses writes outright, so it sits above every effect that may
//! still let a write through; `route` refuses to act on this channel at all and
//! sends the customer to a verified one; `deny` refuses everywhere.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::names::{ChannelSet, MethodSet};
use super::text::Text;

/// The kind of an effect, ordered from least to most restrictive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectKind {
    /// Go ahead.
    Allow,
    /// Go ahead at most N times per account per window.
    Throttle,
    /// Go ahead only after fresh verification.
    StepUp,
    /// Send to a human review queue.
    Review,
    /// Serve last-known-good data; refuse writes.
    ReadOnly,
    /// Not on this channel: send the customer to a verified channel.
    Route,
    /// Refuse, with a safe alternative.
    Deny,
}

impl EffectKind {
    /// Every kind, least restrictive first.
    pub const ALL: [EffectKind; 7] = [
        EffectKind::Allow,
        EffectKind::Throttle,
        EffectKind::StepUp,
        EffectKind::Review,
        EffectKind::ReadOnly,
        EffectKind::Route,
        EffectKind::Deny,
    ];

    /// The kind named `name` (as [`EffectKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The effect's name as written in mode files and decisions.
    pub fn as_str(self) -> &'static str {
        match self {
            EffectKind::Allow => "allow",
            EffectKind::Throttle => "throttle",
            EffectKind::StepUp => "step_up",
            EffectKind::Review => "review",
            EffectKind::ReadOnly => "read_only",
            EffectKind::Route => "route",
            EffectKind::Deny => "deny",
        }
    }
}

/// At most `max` of the action per account per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// Actions allowed per window, at least 1.
    pub max: u32,
    /// Window length in seconds, at least 1.
    pub window_seconds: u32,
}

impl Throttle {
    /// The tighter of two throttles: the lower count over the longer window.
    #[must_use]
    pub fn merge(self, other: Throttle) -> Throttle {
        Throttle {
            max: self.max.min(other.max),
            window_seconds: self.window_seconds.max(other.window_seconds),
        }
    }

    /// Whether `self` allows no more than `other`.
    pub fn is_at_least_as_strict_as(&self, other: &Throttle) -> bool {
        self.max <= other.max && self.window_seconds >= other.window_seconds
    }
}

/// Fresh verification before the action: an explicit path, not an open-ended
/// fallback. The customer must reach `min_confidence` with one of `methods`;
/// after `max_attempts` failed attempts the action goes to `escalate_queue`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepUp {
    /// Identity confidence (0..=1) the customer must reach.
    pub min_confidence: f64,
    /// Verification methods that count. Empty: nothing can satisfy the
    /// step-up, so the action goes to review.
    pub methods: MethodSet,
    /// Failed attempts allowed, at least 1.
    pub max_attempts: u32,
    /// Review queue the action escalates to.
    pub escalate_queue: Text,
}

/// Send the action to a named human review queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The queue.
    pub queue: Text,
}

/// Serve data as of a time; refuse writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOnly {
    /// Data is served as it was at this time. A mode file leaves it unset; an
    /// activation fills it in when it is applied.
    pub as_of: Option<Timestamp>,
}

impl ReadOnly {
    /// Whether `self` serves data at least as old as `other` does (an unset
    /// time is the newest).
    pub fn is_at_least_as_strict_as(&self, other: &ReadOnly) -> bool {
        match (self.as_of, other.as_of) {
            (Some(x), Some(y)) => x <= y,
            (_, None) => true,
            (None, Some(_)) => false,
        }
    }
}

/// Do not act on this channel; send the customer to one of `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Verified channels to send the customer to. Empty (after a merge): no
    /// channel is acceptable, which decides as deny.
    pub to: ChannelSet,
}

/// Refuse, offering a safe alternative.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deny {
    /// What the customer can do instead.
    pub alternative: Option<Text>,
}

/// What a channel must do for an action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// See [`EffectKind::Allow`].
    Allow,
    /// See [`Throttle`].
    Throttle(Throttle),
    /// See [`StepUp`].
    StepUp(StepUp),
    /// See [`Review`].
    Review(Review),
    /// See [`ReadOnly`].
    ReadOnly(ReadOnly),
    /// See [`Route`].
    Route(Route),
    /// See [`Deny`].
    Deny(Deny),
}

impl Effect {
    /// The effect's kind.
    pub fn kind(&self) -> EffectKind {
        match self {
            Effect::Allow => EffectKind::Allow,
            Effect::Throttle(_) => EffectKind::Throttle,
            Effect::StepUp(_) => EffectKind::StepUp,
            Effect::Review(_) => EffectKind::Review,
            Effect::ReadOnly(_) => EffectKind::ReadOnly,
            Effect::Route(_) => EffectKind::Route,
            Effect::Deny(_) => EffectKind::Deny,
        }
    }

    /// Combines two effects toward safety. The more restrictive kind wins;
    /// the same kind merges its limits (highest confidence, fewest methods and
    /// attempts, lowest throttle, longest window, earliest as-of, fewest
    /// route targets). Text parameters (queues, the deny alternative) come
    /// from `self`, the leader: callers merge in a canonical order so that the
    /// result does not depend on the order activations were given in.
    #[must_use]
    pub fn merge(&self, other: &Effect) -> Effect {
        use Effect::*;
        match (self, other) {
            (Throttle(a), Throttle(b)) => Throttle(a.merge(*b)),
            (StepUp(a), StepUp(b)) => StepUp(self::StepUp {
                min_confidence: a.min_confidence.max(b.min_confidence),
                methods: a.methods.intersection(b.methods),
                max_attempts: a.max_attempts.min(b.max_attempts),
                escalate_queue: a.escalate_queue.clone(),
            }),
            (ReadOnly(a), ReadOnly(b)) => ReadOnly(self::ReadOnly {
                as_of: match (a.as_of, b.as_of) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                },
            }),
            (Route(a), Route(b)) => Route(self::Route {
                to: a.to.intersection(b.to),
            }),
            _ if other.kind() > self.kind() => other.clone(),
            _ => self.clone(),
        }
    }

    /// Whether `self` restricts at least as much as `other`: a higher kind,
    /// or the same kind with limits at least as tight.
    pub fn is_at_least_as_strict_as(&self, other: &Effect) -> bool {
        use Effect::*;
        match (self, other) {
            (Throttle(a), Throttle(b)) => a.is_at_least_as_strict_as(b),
            (StepUp(a), StepUp(b)) => {
                a.min_confidence >= b.min_confidence
                    && a.methods.is_subset(b.methods)
                    && a.max_attempts <= b.max_attempts
            }
            (ReadOnly(a), ReadOnly(b)) => a.is_at_least_as_strict_as(b),
            (Route(a), Route(b)) => a.to.is_subset(b.to),
            _ => self.kind() >= other.kind(),
        }
    }
}
