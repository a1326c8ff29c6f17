//! Deciding: "may this channel do this action for this customer now?"
//!
//! [`ChannelPolicy::decide`] looks the action up, merges the base entry with
//! every conditional entry whose condition holds, and resolves the result
//! against the context (a satisfied step-up, an exhausted one). It takes no
//! lock and allocates nothing: the decision borrows its messages and reasons
//! from the policy.

use std::sync::Arc;

use serde::Serialize;

use super::activation::ActivationId;
use super::compile::{ActionPolicy, ChannelPolicy, EffectivePolicy, Entry};
use super::effect::{Deny, Effect, EffectKind, ReadOnly, Route, StepUp, Throttle};
use super::names::{Action, Channel};

use super::mode::Context;

/// What the channel must do.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Outcome {
    /// Go ahead.
    Allow,
    /// Go ahead within the throttle.
    Throttle(Throttle),
    /// Verify first, as `required` says.
    StepUp {
        /// The verification required.
        #[serde(flatten)]
        required: StepUp,
        /// Failed attempts left before the action goes to review.
        attempts_left: u32,
    },
    /// Send to a human review queue.
    Review {
        /// The queue.
        queue: Arc<str>,
        /// Whether a step-up escalated here (exhausted or unsatisfiable).
        escalated: bool,
    },
    /// Serve data as of a time; refuse writes.
    ReadOnly(ReadOnly),
    /// Send the customer to a verified channel.
    Route(Route),
    /// Refuse.
    Deny(Deny),
}

impl Outcome {
    /// The effect kind of the outcome.
    pub fn kind(&self) -> EffectKind {
        match self {
            Outcome::Allow => EffectKind::Allow,
            Outcome::Throttle(_) => EffectKind::Throttle,
            Outcome::StepUp { .. } => EffectKind::StepUp,
            Outcome::Review { .. } => EffectKind::Review,
            Outcome::ReadOnly(_) => EffectKind::ReadOnly,
            Outcome::Route(_) => EffectKind::Route,
            Outcome::Deny(_) => EffectKind::Deny,
        }
    }

    /// Whether `self` restricts the customer at least as much as `other`.
    pub fn is_at_least_as_strict_as(&self, other: &Outcome) -> bool {
        use Outcome::*;
        match (self, other) {
            (Throttle(a), Throttle(b)) => a.is_at_least_as_strict_as(b),
            (
                StepUp {
                    required: a,
                    attempts_left: left_a,
                },
                StepUp {
                    required: b,
                    attempts_left: left_b,
                },
            ) => {
                Effect::StepUp(a.clone()).is_at_least_as_strict_as(&Effect::StepUp(b.clone()))
                    && left_a <= left_b
            }
            (ReadOnly(a), ReadOnly(b)) => a.is_at_least_as_strict_as(b),
            (Route(a), Route(b)) => a.to.is_subset(b.to),
            _ => self.kind() >= other.kind(),
        }
    }

    /// Resolves a merged effect against the context.
    fn resolve(effect: Effect, throttle: Option<Throttle>, ctx: &Context) -> Outcome {
        match effect {
            Effect::Allow => Outcome::Allow,
            Effect::Throttle(t) => Outcome::Throttle(t),
            Effect::StepUp(s) => {
                if s.methods.is_empty() || ctx.failed_attempts >= s.max_attempts {
                    Outcome::Review {
                        queue: s.escalate_queue,
                        escalated: true,
                    }
                } else if ctx.confidence >= s.min_confidence && ctx.methods.intersects(s.methods) {
                    throttle.map_or(Outcome::Allow, Outcome::Throttle)
                } else {
                    Outcome::StepUp {
                        attempts_left: s.max_attempts - ctx.failed_attempts,
                        required: s,
                    }
                }
            }
            Effect::Review(r) => Outcome::Review {
                queue: r.queue,
                escalated: false,
            },
            Effect::ReadOnly(r) => Outcome::ReadOnly(r),
            Effect::Route(r) if r.to.is_empty() => Outcome::Deny(Deny { alternative: None }),
            Effect::Route(r) => Outcome::Route(r),
            Effect::Deny(d) => Outcome::Deny(d),
        }
    }
}

/// A decision, borrowing its messages and reasons from the policy.
#[derive(Clone, Debug)]
pub struct Decision<'p> {
    /// What the channel must do.
    pub outcome: Outcome,
    policy: Option<&'p ActionPolicy>,
    trail: Trail,
}

/// A decision that borrows nothing: what the channel must do, and which
/// entries of the action's policy it came from, so that its reasons and
/// texts can be read back from that policy ([`Verdict::attach`]) without
/// copying them. This is what lets a client hold a decision without holding
/// a lock or allocating.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// What the channel must do.
    pub outcome: Outcome,
    trail: Trail,
}

/// Which entries a decision came from.
#[derive(Clone, Copy, Debug, Default)]
struct Trail {
    /// Bit `i` set: conditional entry `i` held. Entries past the 64th still
    /// count in the outcome and messages; only `reasons` does not list them.
    held: u64,
    /// Where the customer message and agent script come from.
    texts: Texts,
}

#[derive(Clone, Copy, Debug, Default)]
enum Texts {
    #[default]
    None,
    /// The entry whose effect won.
    Entry(EntryAt),
    /// The standing throttle of an entry (a step-up was satisfied).
    Standing(EntryAt),
}

#[derive(Clone, Copy, Debug)]
enum EntryAt {
    Base,
    Conditional(usize),
}

impl EntryAt {
    fn of(self, policy: &ActionPolicy) -> Option<&Entry> {
        match self {
            EntryAt::Base => policy.base.as_ref(),
            EntryAt::Conditional(i) => policy.conditional.get(i),
        }
    }
}

impl Trail {
    fn customer_message(self, policy: Option<&ActionPolicy>) -> Option<&str> {
        match self.texts {
            Texts::None => None,
            Texts::Entry(at) => at.of(policy?)?.customer_message.as_deref(),
            Texts::Standing(at) => at
                .of(policy?)?
                .throttle
                .as_ref()?
                .customer_message
                .as_deref(),
        }
    }

    fn agent_script(self, policy: Option<&ActionPolicy>) -> Option<&str> {
        match self.texts {
            Texts::None => None,
            Texts::Entry(at) => at.of(policy?)?.agent_script.as_deref(),
            Texts::Standing(at) => at.of(policy?)?.throttle.as_ref()?.agent_script.as_deref(),
        }
    }

    fn reasons(self, policy: Option<&ActionPolicy>) -> impl Iterator<Item = &ActivationId> + Clone {
        let held = self.held;
        policy
            .into_iter()
            .flat_map(move |p| {
                p.conditional
                    .iter()
                    .enumerate()
                    .filter(move |(i, _)| *i < 64 && held & (1 << i) != 0)
                    .map(|(_, e)| e)
                    .chain(p.base.iter())
            })
            .flat_map(|e| e.activation_ids.iter())
    }
}

impl<'p> Decision<'p> {
    /// Message for the customer, if the policy has one.
    pub fn customer_message(&self) -> Option<&'p str> {
        self.trail.customer_message(self.policy)
    }

    /// Script for the agent, if the policy has one.
    pub fn agent_script(&self) -> Option<&'p str> {
        self.trail.agent_script(self.policy)
    }

    /// The activations whose rules applied to this decision, entry by entry
    /// (an activation behind two entries appears twice).
    pub fn reasons(&self) -> impl Iterator<Item = &'p ActivationId> + Clone + use<'p> {
        self.trail.reasons(self.policy)
    }

    /// The decision without its borrow of the policy.
    pub fn detach(self) -> Verdict {
        Verdict {
            outcome: self.outcome,
            trail: self.trail,
        }
    }
}

impl Verdict {
    /// The decision again, reading its reasons and texts from `policy`,
    /// which must be the action policy it was made from (the one
    /// [`ChannelPolicy::lookup`] gives for the action; `None` if none).
    pub fn attach(self, policy: Option<&ActionPolicy>) -> Decision<'_> {
        Decision {
            outcome: self.outcome,
            policy,
            trail: self.trail,
        }
    }

    /// Message for the customer; `policy` as for [`Verdict::attach`].
    pub fn customer_message<'p>(&self, policy: Option<&'p ActionPolicy>) -> Option<&'p str> {
        self.trail.customer_message(policy)
    }

    /// Script for the agent; `policy` as for [`Verdict::attach`].
    pub fn agent_script<'p>(&self, policy: Option<&'p ActionPolicy>) -> Option<&'p str> {
        self.trail.agent_script(policy)
    }

    /// The activations behind the decision; `policy` as for
    /// [`Verdict::attach`].
    pub fn reasons<'p>(
        &self,
        policy: Option<&'p ActionPolicy>,
    ) -> impl Iterator<Item = &'p ActivationId> + Clone + use<'p> {
        self.trail.reasons(policy)
    }
}

impl ActionPolicy {
    /// Merges the entries that apply to `ctx` and resolves the result.
    ///
    /// Entries are taken in precedence order: the conditional entries that
    /// hold (their condition is the more specific circumstance), then the
    /// base. Effects and limits merge the same whatever the order; texts
    /// (queues, the deny alternative, messages) come from the first entry
    /// with the winning kind.
    pub fn decide(&self, ctx: &Context) -> Decision<'_> {
        // Each condition is evaluated once; past 64 entries (no real policy
        // has that many distinct conditions for one action) they are
        // evaluated again where needed rather than remembered.
        let mut held = 0u64;
        for (i, entry) in self.conditional.iter().enumerate().take(64) {
            if holds(entry, ctx) {
                held |= 1 << i;
            }
        }
        let applied = || {
            self.conditional
                .iter()
                .enumerate()
                .filter(move |(i, e)| {
                    if *i < 64 {
                        held & (1 << i) != 0
                    } else {
                        holds(e, ctx)
                    }
                })
                .map(|(i, e)| (EntryAt::Conditional(i), e))
                .chain(self.base.iter().map(|e| (EntryAt::Base, e)))
        };
        let mut effect: Option<Effect> = None;
        // The merged standing throttle, and the entry whose throttle leads.
        let mut throttle: Option<(Throttle, EntryAt)> = None;
        for (at, entry) in applied() {
            effect = Some(match effect {
                Some(acc) => acc.merge(&entry.effect),
                None => entry.effect.clone(),
            });
            if let Some(standing) = &entry.throttle {
                throttle = Some(match throttle {
                    Some((limit, leader)) => (limit.merge(standing.limit), leader),
                    None => (standing.limit, at),
                });
            }
        }
        let Some(effect) = effect else {
            return Decision::allow();
        };
        let kind = effect.kind();
        let outcome = Outcome::resolve(effect, throttle.map(|(limit, _)| limit), ctx);
        let texts = match throttle {
            // A step-up the customer passed: its texts ("confirm your
            // identity") are not for them; an entry that allows (a notice)
            // still speaks.
            _ if kind != EffectKind::Allow && outcome.kind() == EffectKind::Allow => applied()
                .find(|(_, e)| e.effect.kind() == EffectKind::Allow)
                .map_or(Texts::None, |(at, _)| Texts::Entry(at)),
            // A passed step-up leaves the throttle: its rule speaks.
            Some((_, leader))
                if kind != EffectKind::Throttle && outcome.kind() == EffectKind::Throttle =>
            {
                Texts::Standing(leader)
            }
            _ => applied()
                .find(|(_, e)| e.effect.kind() == kind)
                .map_or(Texts::None, |(at, _)| Texts::Entry(at)),
        };
        Decision {
            outcome,
            policy: Some(self),
            trail: Trail { held, texts },
        }
    }
}

fn holds(entry: &Entry, ctx: &Context) -> bool {
    entry.when.as_ref().is_none_or(|w| w.holds(ctx))
}

impl Decision<'static> {
    /// Allow, for an action no rule covers.
    pub fn allow() -> Self {
        Decision {
            outcome: Outcome::Allow,
            policy: None,
            trail: Trail::default(),
        }
    }
}

impl ChannelPolicy {
    /// Decides `action` on this channel for `ctx`.
    pub fn decide(&self, action: &str, ctx: &Context) -> Decision<'_> {
        match self.lookup(action) {
            Some(policy) => policy.decide(ctx),
            None => Decision::allow(),
        }
    }

    /// [`ChannelPolicy::decide`] for a parsed action: a known one's policy
    /// is read from the table made when the policy was compiled, by the
    /// position found when the action was parsed.
    pub fn decide_action(&self, action: &Action, ctx: &Context) -> Decision<'_> {
        let policy = match action.known_index().and_then(|i| self.known.get(i)) {
            Some(found) => found.as_ref(),
            None => self.lookup(action.as_str()),
        };
        match policy {
            Some(policy) => policy.decide(ctx),
            None => Decision::allow(),
        }
    }
}

impl EffectivePolicy {
    /// Decides `action` on `channel` for `ctx`.
    pub fn decide(&self, channel: Channel, action: &str, ctx: &Context) -> Decision<'_> {
        self.channel(channel).decide(action, ctx)
    }
}
