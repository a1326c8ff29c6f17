//! A decision as a channel service gets it: made from the applied snapshot
//! without a lock or an allocation, saying how fresh the policy was, and
//! failing closed for the actions a service chose once it has been cut off
//! from the controller for too long.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::Guard;
use jiff::Timestamp;

use super::PolicySnapshot;
use super::snapshot::DecisionReport;
use safemode_policy::{
    Action, ActionSelector, ActivationId, ChannelPolicy, Deny, EffectKind, Outcome, Revision, Text,
    Verdict,
};

/// What a subscriber does for chosen actions once its policy has been stale
/// for too long: an attacker who cuts a channel off from the controller must
/// not keep the old, softer policy forever.
#[derive(Clone, Debug)]
pub struct FailClosed {
    /// Stale for longer than this (counted from the last moment the client
    /// knew its policy was current, or from its start if it never did).
    pub after: Duration,
    /// The actions that fail closed, e.g. `account.*`, `payment.payout`.
    pub actions: Vec<ActionSelector>,
    /// What they become.
    pub effect: FailClosedEffect,
    /// Message for the customer while failing closed.
    pub customer_message: String,
    /// Script for the agent while failing closed.
    pub agent_script: String,
}

/// What a fail-closed action becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailClosedEffect {
    /// Send it to this human review queue.
    Review {
        /// The queue.
        queue: String,
    },
    /// Refuse it.
    Deny,
}

impl FailClosed {
    /// `actions` fail closed with `effect` once stale for longer than
    /// `after`, with default messages.
    pub fn new(after: Duration, actions: Vec<ActionSelector>, effect: FailClosedEffect) -> Self {
        FailClosed {
            after,
            actions,
            effect,
            customer_message: "We can't do this right now. Please try again later, or we will \
                               follow up once we have checked it."
                .to_string(),
            agent_script: "This service has lost contact with safemode, so this action is held \
                           back until it reconnects. Do not complete it another way."
                .to_string(),
        }
    }
}

/// A [`FailClosed`] prepared for decisions: its outcome and texts built once,
/// so that a decision only borrows them.
#[derive(Debug)]
pub(super) struct FailClosedRule {
    after: Duration,
    actions: Vec<ActionSelector>,
    outcome: Outcome,
    customer_message: Box<str>,
    agent_script: Box<str>,
}

impl FailClosedRule {
    pub fn new(config: &FailClosed) -> Self {
        let outcome = match &config.effect {
            FailClosedEffect::Review { queue } => Outcome::Review {
                queue: Text::intern(queue),
                escalated: false,
            },
            FailClosedEffect::Deny => Outcome::Deny(Deny { alternative: None }),
        };
        FailClosedRule {
            after: config.after,
            actions: config.actions.clone(),
            outcome,
            customer_message: config.customer_message.as_str().into(),
            agent_script: config.agent_script.as_str().into(),
        }
    }

    /// The effect the rule decides with.
    pub fn effect(&self) -> EffectKind {
        self.outcome.kind()
    }

    /// Whether the rule decides with a review a step-up escalated to.
    pub fn is_escalated(&self) -> bool {
        self.outcome.is_escalated()
    }

    /// Whether the rule overrides an outcome of kind `effect` for
    /// `action`, stale for `stale_for`: the action is listed, the limit
    /// passed, and the policy's own outcome is milder.
    pub fn overrides(&self, action: &str, stale_for: Duration, effect: EffectKind) -> bool {
        stale_for > self.after
            && effect < self.outcome.kind()
            && self.actions.iter().any(|s| s.matches(action))
    }
}

/// What the channel must do for one action now, and why. It holds the
/// snapshot it was made from (without a lock: an atomically swapped pointer)
/// and borrows its texts and reasons from it; keep it only as long as the
/// request it answers.
pub struct Decision<'a> {
    pub(super) snapshot: Guard<Option<Arc<PolicySnapshot>>>,
    pub(super) action: &'a Action,
    pub(super) verdict: Verdict,
    /// The rule that overrode the policy, when the decision failed closed.
    pub(super) fail_closed: Option<&'a FailClosedRule>,
    pub(super) stale: bool,
}

impl Decision<'_> {
    /// What the channel must do, with the effect's parameters.
    pub fn outcome(&self) -> &Outcome {
        match self.fail_closed {
            Some(rule) => &rule.outcome,
            None => self.verdict.outcome(self.policy(), self.action),
        }
    }

    /// The effect.
    pub fn effect(&self) -> EffectKind {
        self.outcome().kind()
    }

    /// The snapshot the decision was made with; `None` before the first.
    pub fn snapshot(&self) -> Option<&PolicySnapshot> {
        self.snapshot.as_deref()
    }

    fn policy(&self) -> Option<&ChannelPolicy> {
        self.snapshot().map(|s| &s.policy)
    }

    /// The activations whose rules decided, each once, in the policy's
    /// order. Empty when the decision failed closed and no rule applied.
    pub fn reasons(&self) -> impl Iterator<Item = &ActivationId> {
        let all = self.verdict.reasons(self.policy(), self.action);
        let earlier = all.clone();
        all.enumerate()
            .filter(move |(i, id)| !earlier.clone().take(*i).any(|e| e == *id))
            .map(|(_, id)| id)
    }

    /// Message for the customer, if there is one.
    pub fn customer_message(&self) -> Option<&str> {
        match self.fail_closed {
            Some(rule) => Some(&rule.customer_message),
            None => self.verdict.customer_message(self.policy(), self.action),
        }
    }

    /// Script for the agent, if there is one.
    pub fn agent_script(&self) -> Option<&str> {
        match self.fail_closed {
            Some(rule) => Some(&rule.agent_script),
            None => self.verdict.agent_script(self.policy(), self.action),
        }
    }

    /// Revision of the policy used; `None` before the first snapshot.
    pub fn revision(&self) -> Option<Revision> {
        self.snapshot().map(|s| s.revision)
    }

    /// When the controller issued the policy used.
    pub fn as_of(&self) -> Option<Timestamp> {
        self.snapshot().map(|s| s.issued_at)
    }

    /// Whether the policy may be out of date.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether the decision failed closed: the policy was stale for too long
    /// and the action is one that then goes to review or is refused.
    pub fn is_fail_closed(&self) -> bool {
        self.fail_closed.is_some()
    }

    /// An owned copy of everything, for printing or logging (this one
    /// allocates).
    pub fn report(&self) -> DecisionReport {
        DecisionReport {
            outcome: self.outcome().clone(),
            action: self.action.to_string(),
            namespace: self.snapshot().map(|s| s.namespace.to_string()),
            channel: self.snapshot().map(|s| s.channel.to_string()),
            revision: self.revision(),
            as_of: self.as_of(),
            stale: self.stale,
            fail_closed: self.is_fail_closed(),
            reasons: self.reasons().map(ToString::to_string).collect(),
            customer_message: self.customer_message().map(str::to_string),
            agent_script: self.agent_script().map(str::to_string),
        }
    }
}

impl std::fmt::Debug for Decision<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decision")
            .field("action", &self.action)
            .field("outcome", self.outcome())
            .field("revision", &self.revision())
            .field("stale", &self.stale)
            .field("fail_closed", &self.is_fail_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_closed_never_softens_a_decision() {
        let rule = FailClosedRule::new(&FailClosed::new(
            Duration::from_secs(60),
            vec![ActionSelector::parse("account.*").unwrap()],
            FailClosedEffect::Review {
                queue: "fraud".into(),
            },
        ));
        let long = Duration::from_secs(61);
        assert!(rule.overrides("account.password_reset", long, EffectKind::Allow));
        assert!(!rule.overrides(
            "account.password_reset",
            Duration::from_secs(60),
            EffectKind::Allow
        ));
        assert!(!rule.overrides("order.view", long, EffectKind::Allow));
        assert!(!rule.overrides("account.password_reset", long, EffectKind::Deny));
    }
}
