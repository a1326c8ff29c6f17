//! Deciding: "may this channel do this action for this customer now?"
//!
//! [`ChannelPolicy::decide`] looks the action up, merges the base entry with
//! every conditional entry whose condition holds, and resolves the result
//! against the context (a satisfied step-up, an exhausted one). It takes no
//! lock and allocates nothing: the decision borrows its messages and reasons
//! from the policy. [`ChannelPolicy::verdict`] is the same decision for a
//! parsed action as a [`Verdict`]: for a known action, the index of an
//! outcome made beforehand (when a subscriber read the policy from the
//! wire), so nothing is copied.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::activation::ActivationId;
use super::compile::{ActionPolicy, ChannelPolicy, EffectivePolicy, Entry};
use super::effect::{Deny, Effect, EffectKind, ReadOnly, Route, StepUp, Throttle};
use super::names::{Action, Channel};
use super::text::Text;

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
        queue: Text,
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

    /// Whether the outcome is a review that a step-up escalated to
    /// (exhausted or unsatisfiable).
    pub fn is_escalated(&self) -> bool {
        matches!(
            self,
            Outcome::Review {
                escalated: true,
                ..
            }
        )
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

    /// Resolves a merged effect against the context, cloning only what the
    /// outcome keeps.
    #[inline(always)]
    fn resolve(effect: &Effect, throttle: Option<Throttle>, ctx: &Context) -> Outcome {
        match effect {
            Effect::Allow => Outcome::Allow,
            Effect::Throttle(t) => Outcome::Throttle(*t),
            Effect::StepUp(s) => match StepUpState::of(s, ctx) {
                StepUpState::Escalated => Outcome::Review {
                    queue: s.escalate_queue.clone(),
                    escalated: true,
                },
                StepUpState::Satisfied => throttle.map_or(Outcome::Allow, Outcome::Throttle),
                StepUpState::Pending { attempts_left } => Outcome::StepUp {
                    attempts_left,
                    required: s.clone(),
                },
            },
            Effect::Review(r) => Outcome::Review {
                queue: r.queue.clone(),
                escalated: false,
            },
            Effect::ReadOnly(r) => Outcome::ReadOnly(*r),
            Effect::Route(r) if r.to.is_empty() => Outcome::Deny(Deny { alternative: None }),
            Effect::Route(r) => Outcome::Route(*r),
            Effect::Deny(d) => Outcome::Deny(d.clone()),
        }
    }
}

/// Where a step-up stands for a context: the one place that says so, for
/// the outcomes resolved at a decision and those made beforehand alike.
#[derive(Clone, Copy, Debug, PartialEq)]
enum StepUpState {
    /// Nothing can satisfy it, or the attempts ran out: review.
    Escalated,
    /// The customer passed it.
    Satisfied,
    /// The customer must verify, with this many attempts left.
    Pending { attempts_left: u32 },
}

impl StepUpState {
    #[inline(always)]
    fn of(s: &StepUp, ctx: &Context) -> StepUpState {
        if s.methods.is_empty() || ctx.failed_attempts >= s.max_attempts {
            StepUpState::Escalated
        } else if ctx.confidence >= s.min_confidence && ctx.methods.intersects(s.methods) {
            StepUpState::Satisfied
        } else {
            StepUpState::Pending {
                attempts_left: s.max_attempts - ctx.failed_attempts,
            }
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

/// A decision that borrows nothing: where its outcome is (in the action's
/// outcomes made beforehand, or in itself when it had to be made at the
/// decision) and which entries it came from, so that the
/// outcome, reasons and texts can be read back from the channel's policy
/// without copying them. This is what lets a client hold a decision without
/// holding a lock, allocating, or moving an outcome about.
///
/// A verdict is read with the policy and action it was made for
/// ([`ChannelPolicy::verdict`]).
///
/// # Panics
///
/// Its methods panic when a verdict is read without the policy it was made
/// with (or a copy of it), or for another action: they never answer from
/// another table. ([`Verdict::allow`] is read with any policy, or none.)
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Bit `i` set: conditional entry `i` held.
    held: u64,
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    /// No rule applies.
    Allow,
    /// The action's outcome made beforehand.
    Made(Pick),
    /// Made at the decision. The outcome is dropped by [`Verdict`]'s
    /// `Drop`, off the way of the verdicts that point at a table.
    Here {
        outcome: ManuallyDrop<Outcome>,
        texts: Texts,
        origin: Origin,
    },
}

/// A verdict owns something to drop only when it was made at the decision:
/// checked here, in line, and dropped in a call of its own, so that
/// dropping a verdict (and a client's decision) that points at a table is a
/// comparison, not a call into the whole outcome's drop.
impl Drop for Verdict {
    #[inline]
    fn drop(&mut self) {
        if let Source::Here { outcome, .. } = &mut self.source {
            drop_made_here(outcome);
        }
    }
}

#[cold]
#[inline(never)]
fn drop_made_here(outcome: &mut ManuallyDrop<Outcome>) {
    // What is left in its place owns nothing.
    drop(std::mem::replace(&mut **outcome, Outcome::Allow));
}

/// Which policy and action a verdict made at the decision came from, so
/// that it too is caught when read with another.
#[derive(Clone, Copy, Debug)]
struct Origin {
    stamp: Stamp,
    /// [`Origin::key`] of the action.
    action: u32,
}

impl Origin {
    fn of(policy: &ChannelPolicy, action: &Action) -> Origin {
        Origin {
            stamp: policy.stamp,
            action: Origin::key(action),
        }
    }

    /// The action, as a number: its name hashed (32-bit FNV-1a; a check
    /// against mistakes, not against an adversary). Made and read only off
    /// the tables' way, so its cost is not a decision's.
    fn key(action: &Action) -> u32 {
        action.as_str().bytes().fold(0x811c_9dc5, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        })
    }

    /// Whether `policy` and `action` are those this came from.
    fn is(&self, policy: Option<&ChannelPolicy>, action: &Action) -> bool {
        policy.is_some_and(|policy| policy.stamp.0 == self.stamp.0)
            && Origin::key(action) == self.action
    }
}

/// The outcome of every decision no rule covers.
static ALLOW: Outcome = Outcome::Allow;

/// An outcome made beforehand: where it is, and what a decision counts of
/// it (its kind, and whether a step-up escalated to review), so that
/// counting a decision does not read the outcome itself; with the action's
/// position in [`ACTIONS`](crate::names::ACTIONS) and the tables' stamp, so
/// that a verdict read with another action or policy is caught rather than
/// answered from the wrong table.
///
/// Two whole words, aligned to their 16 bytes: a pick is copied into a
/// verdict in one store, which the copy of the whole verdict into a
/// client's decision reads back at once. Copied field by field, that read
/// waited for three stores to reach memory, a sixth of a decision's time.
#[derive(Clone, Copy)]
#[repr(align(16))]
struct Pick {
    /// Bits 0-31 where the outcome is in `made`, 32-39 its kind's position
    /// in [`EffectKind::ALL`], bit 40 whether a step-up escalated to it,
    /// 48-55 the action's position.
    word: u64,
    stamp: Stamp,
}

// A pick stores its kind as `kind as u64` and reads it back from
// `EffectKind::ALL`: the two orders must be one.
const _: () = {
    let mut i = 0;
    while i < EffectKind::ALL.len() {
        assert!(EffectKind::ALL[i] as usize == i);
        i += 1;
    }
};

impl Pick {
    #[inline(always)]
    fn new(at: u32, kind: EffectKind, escalated: bool, action: u8, stamp: Stamp) -> Pick {
        // A kind's number is its position in `ALL` (declared in that order).
        let kind = kind as u64;
        Pick {
            word: u64::from(at) | kind << 32 | u64::from(escalated) << 40 | u64::from(action) << 48,
            stamp,
        }
    }

    #[inline(always)]
    fn at(self) -> u32 {
        self.word as u32
    }

    #[inline(always)]
    fn kind(self) -> EffectKind {
        EffectKind::ALL[usize::from((self.word >> 32) as u8)]
    }

    #[inline(always)]
    fn escalated(self) -> bool {
        self.word & 1 << 40 != 0
    }

    #[inline(always)]
    fn action(self) -> u8 {
        (self.word >> 48) as u8
    }

    /// The same outcome's place, kind and escalation for `at` instead.
    #[inline(always)]
    fn moved_to(self, at: u32, kind: EffectKind, escalated: bool) -> Pick {
        Pick::new(at, kind, escalated, self.action(), self.stamp)
    }
}

impl PartialEq for Pick {
    /// As [`Stamp`]s compare: the tables' contents, not where they came
    /// from.
    fn eq(&self, other: &Pick) -> bool {
        self.word == other.word
    }
}

impl std::fmt::Debug for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pick")
            .field("at", &self.at())
            .field("kind", &self.kind())
            .field("escalated", &self.escalated())
            .field("action", &self.action())
            .field("stamp", &self.stamp)
            .finish()
    }
}

/// Which compile of a channel policy made an action's tables: a number no
/// other compile in the process has. A copy of the policy keeps it (its
/// tables are the same), and two policies compare equal whatever their
/// stamps.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stamp(u64);

impl Stamp {
    pub(crate) fn next() -> Stamp {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Stamp(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl PartialEq for Stamp {
    /// Equal always: a stamp says where tables came from, not what they
    /// hold ([`Pick`] compares the numbers).
    fn eq(&self, _: &Stamp) -> bool {
        true
    }
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

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Texts {
    #[default]
    None,
    /// The entry whose effect won.
    Entry(EntryAt),
    /// The standing throttle of an entry (a step-up was satisfied).
    Standing(EntryAt),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum EntryAt {
    Base,
    /// A conditional entry's position (32 bits keep a verdict's texts, and
    /// so a client's `Decision`, small).
    Conditional(u32),
}

impl EntryAt {
    fn of(self, policy: &ActionPolicy) -> Option<&Entry> {
        match self {
            EntryAt::Base => policy.base.as_ref(),
            EntryAt::Conditional(i) => policy.conditional.get(usize::try_from(i).ok()?),
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

    /// The decision without its borrow of the policy, as a verdict of
    /// `policy` for `action`.
    fn detach(self, policy: &ChannelPolicy, action: &Action) -> Verdict {
        Verdict {
            held: self.trail.held,
            source: Source::Here {
                outcome: ManuallyDrop::new(self.outcome),
                texts: self.trail.texts,
                origin: Origin::of(policy, action),
            },
        }
    }
}

impl Verdict {
    /// Allow, for an action no rule covers (or with no policy at all).
    pub fn allow() -> Verdict {
        Verdict {
            held: 0,
            source: Source::Allow,
        }
    }

    /// The outcome made beforehand that this verdict points at.
    #[inline]
    fn made<'p>(pick: &Pick, policy: Option<&'p ChannelPolicy>, action: &Action) -> &'p Made {
        let known = policy
            .filter(|policy| {
                policy.stamp.0 == pick.stamp.0 && action.known_index() == Some(pick.action().into())
            })
            .and_then(|policy| policy.known_action(action));
        match known.and_then(|known| known.made.get(pick.at() as usize)) {
            Some(made) => made,
            None => Verdict::read_elsewhere(action),
        }
    }

    /// A verdict made at the decision, checked to be read with the policy
    /// and action it was made for.
    #[inline]
    fn here(origin: &Origin, policy: Option<&ChannelPolicy>, action: &Action) {
        if !origin.is(policy, action) {
            Verdict::read_elsewhere(action);
        }
    }

    #[cold]
    fn read_elsewhere(action: &Action) -> ! {
        panic!(
            "a verdict was read with a policy or an action other than those it was made for \
             ({action})"
        )
    }

    /// The effect of the outcome, without reading it.
    #[inline]
    pub fn kind(&self) -> EffectKind {
        match &self.source {
            Source::Allow => EffectKind::Allow,
            Source::Made(pick) => pick.kind(),
            Source::Here { outcome, .. } => outcome.kind(),
        }
    }

    /// Whether the outcome is a review that a step-up escalated to
    /// (exhausted or unsatisfiable), without reading it.
    #[inline]
    pub fn is_escalated(&self) -> bool {
        match &self.source {
            Source::Allow => false,
            Source::Made(pick) => pick.escalated(),
            Source::Here { outcome, .. } => outcome.is_escalated(),
        }
    }

    /// What the channel must do.
    #[inline]
    pub fn outcome<'s>(
        &'s self,
        policy: Option<&'s ChannelPolicy>,
        action: &Action,
    ) -> &'s Outcome {
        match &self.source {
            Source::Allow => &ALLOW,
            Source::Made(pick) => &Verdict::made(pick, policy, action).outcome,
            Source::Here {
                outcome, origin, ..
            } => {
                Verdict::here(origin, policy, action);
                outcome
            }
        }
    }

    /// Where the verdict's texts and reasons are read from: its trail, and
    /// the action's policy in `policy`.
    fn parts<'p>(
        &self,
        policy: Option<&'p ChannelPolicy>,
        action: &Action,
    ) -> (Trail, Option<&'p ActionPolicy>) {
        let texts = match &self.source {
            Source::Allow => Texts::None,
            Source::Made(pick) => Verdict::made(pick, policy, action).texts,
            Source::Here { texts, origin, .. } => {
                Verdict::here(origin, policy, action);
                *texts
            }
        };
        let trail = Trail {
            held: self.held,
            texts,
        };
        (trail, policy.and_then(|p| p.action_policy(action)))
    }

    /// The decision again, borrowing from `policy` (this one copies the
    /// outcome). `policy` is the channel's policy the verdict was made with
    /// (`None` only for [`Verdict::allow`]), here and in every method.
    pub fn attach<'p>(&self, policy: Option<&'p ChannelPolicy>, action: &Action) -> Decision<'p> {
        let (trail, rules) = self.parts(policy, action);
        Decision {
            outcome: self.outcome(policy, action).clone(),
            policy: rules,
            trail,
        }
    }

    /// Message for the customer.
    pub fn customer_message<'p>(
        &self,
        policy: Option<&'p ChannelPolicy>,
        action: &Action,
    ) -> Option<&'p str> {
        let (trail, rules) = self.parts(policy, action);
        trail.customer_message(rules)
    }

    /// Script for the agent.
    pub fn agent_script<'p>(
        &self,
        policy: Option<&'p ChannelPolicy>,
        action: &Action,
    ) -> Option<&'p str> {
        let (trail, rules) = self.parts(policy, action);
        trail.agent_script(rules)
    }

    /// The activations behind the decision.
    pub fn reasons<'p>(
        &self,
        policy: Option<&'p ChannelPolicy>,
        action: &Action,
    ) -> impl Iterator<Item = &'p ActivationId> + Clone + use<'p> {
        let (trail, rules) = self.parts(policy, action);
        trail.reasons(rules)
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
        let held = self.held(ctx);
        self.finish(held, &self.merge_held(held, Some(ctx)), ctx)
    }

    /// Which conditional entries hold: bit `i` for entry `i`. Each
    /// condition is evaluated once; past 64 entries (no real policy has
    /// that many distinct conditions for one action) they are evaluated
    /// again where needed rather than remembered.
    #[inline(always)]
    fn held(&self, ctx: &Context) -> u64 {
        let mut held = 0u64;
        let first = &self.conditional[..self.conditional.len().min(64)];
        for (i, entry) in first.iter().enumerate() {
            if holds(entry, ctx) {
                held |= 1 << i;
            }
        }
        held
    }

    /// The merge of the entries that apply when those of `held` hold
    /// (and, past the 64th, those that hold for `ctx`).
    fn merge_held(&self, held: u64, ctx: Option<&Context>) -> Merged {
        let applied = || {
            self.conditional
                .iter()
                .enumerate()
                .filter(move |(i, e)| {
                    if *i < 64 {
                        held & (1 << i) != 0
                    } else {
                        ctx.is_some_and(|ctx| holds(e, ctx))
                    }
                })
                // A policy of 2^32 entries would take hundreds of GB (and
                // a snapshot is bounded by its message's size, 4 MB).
                .map(|(i, e)| {
                    (
                        EntryAt::Conditional(u32::try_from(i).expect("fewer than 2^32 entries")),
                        e,
                    )
                })
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
        let first_of = |kind: EffectKind| {
            applied()
                .find(|(_, e)| e.effect.kind() == kind)
                .map_or(Texts::None, |(at, _)| Texts::Entry(at))
        };
        let (of_kind, allow) = match &effect {
            Some(effect) => (first_of(effect.kind()), first_of(EffectKind::Allow)),
            None => (Texts::None, Texts::None),
        };
        Merged {
            effect,
            throttle,
            of_kind,
            allow,
        }
    }

    /// The decision for `ctx`, from the merge of the entries that apply
    /// (`held`: those that hold).
    #[inline(always)]
    fn finish(&self, held: u64, merged: &Merged, ctx: &Context) -> Decision<'_> {
        let Some(effect) = &merged.effect else {
            return Decision::allow();
        };
        let kind = effect.kind();
        let outcome = Outcome::resolve(effect, merged.throttle.map(|(limit, _)| limit), ctx);
        let texts = match merged.throttle {
            // A step-up the customer passed: its texts ("confirm your
            // identity") are not for them; an entry that allows (a notice)
            // still speaks.
            _ if kind != EffectKind::Allow && outcome.kind() == EffectKind::Allow => merged.allow,
            // A passed step-up leaves the throttle: its rule speaks.
            Some((_, leader))
                if kind != EffectKind::Throttle && outcome.kind() == EffectKind::Throttle =>
            {
                Texts::Standing(leader)
            }
            _ => merged.of_kind,
        };
        Decision {
            outcome,
            policy: Some(self),
            trail: Trail { held, texts },
        }
    }
}

/// Conditional entries up to which an action's merges are made when its
/// policy is compiled: one per set of them that may hold (2^n).
const MERGED_UP_TO: usize = 4;

/// Failed attempts of a pending step-up for which its outcome is made
/// beforehand (one each: the attempts left differ); past them, the outcome
/// is made at the decision.
const ATTEMPTS_MADE_UP_TO: u32 = 8;

/// A known action's policy, with the merge of its entries made beforehand
/// for each set of its conditions that may hold, and the outcomes those
/// merges resolve to: a decision evaluates the conditions, reads its plan
/// and picks an outcome made beforehand, copying nothing.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Known {
    pub(crate) policy: ActionPolicy,
    /// Indexed by the set of conditional entries that hold; empty past
    /// [`MERGED_UP_TO`] entries (merged at each decision).
    merged: Box<[Merged]>,
    /// How each merge resolves, indexed as `merged`.
    plans: Box<[Plan]>,
    /// The first plan (no conditional entry holds: always so for most
    /// actions, which have none) kept in line, so that a decision reads it
    /// from the action's entry rather than through one more pointer.
    /// `None` while `plans` is empty.
    first: Option<Plan>,
    /// The outcomes the plans pick from.
    made: Box<[Made]>,
    /// The action's position in [`ACTIONS`](crate::names::ACTIONS).
    action: u8,
}

/// An outcome made beforehand, and where its texts come from.
#[derive(Clone, Debug, PartialEq)]
struct Made {
    outcome: Outcome,
    texts: Texts,
}

/// How the merge of one set of held entries resolves against a context:
/// which outcome made beforehand it comes to.
#[derive(Clone, Debug, PartialEq)]
enum Plan {
    /// No entry applies: allow.
    Allow,
    /// The same outcome whatever the context.
    Fixed(Pick),
    /// A step-up: escalated, satisfied, or pending with one outcome per
    /// failed attempt up to `pending_made`, the first at `pending`.
    StepUp {
        step_up: StepUp,
        escalated: Pick,
        satisfied: Pick,
        pending: u32,
        pending_made: u32,
    },
}

impl Plan {
    /// The outcome made beforehand for `ctx`; `None` when it has to be made
    /// at the decision (a pending step-up past [`ATTEMPTS_MADE_UP_TO`]).
    #[inline(always)]
    fn pick(&self, ctx: &Context) -> Option<Source> {
        match self {
            Plan::Allow => Some(Source::Allow),
            Plan::Fixed(pick) => Some(Source::Made(*pick)),
            Plan::StepUp {
                step_up,
                escalated,
                satisfied,
                pending,
                pending_made,
            } => match StepUpState::of(step_up, ctx) {
                StepUpState::Escalated => Some(Source::Made(*escalated)),
                StepUpState::Satisfied => Some(Source::Made(*satisfied)),
                StepUpState::Pending { .. } if ctx.failed_attempts < *pending_made => {
                    Some(Source::Made(satisfied.moved_to(
                        pending + ctx.failed_attempts,
                        EffectKind::StepUp,
                        false,
                    )))
                }
                StepUpState::Pending { .. } => None,
            },
        }
    }
}

/// The entries that apply, merged.
#[derive(Clone, Debug, PartialEq)]
struct Merged {
    /// `None`: no entry applies.
    effect: Option<Effect>,
    throttle: Option<(Throttle, EntryAt)>,
    /// The texts of the first entry of the merged kind, and of the first
    /// that allows.
    of_kind: Texts,
    allow: Texts,
}

impl Known {
    /// The merges of the known action at `action` in
    /// [`ACTIONS`](crate::names::ACTIONS); the outcomes they resolve to
    /// are made apart ([`Known::make_outcomes`]).
    pub(crate) fn new(policy: ActionPolicy, action: usize) -> Known {
        let action = u8::try_from(action).expect("fewer than 256 known actions");
        let merged: Box<[Merged]> = if policy.conditional.len() <= MERGED_UP_TO {
            (0..1u64 << policy.conditional.len())
                .map(|held| policy.merge_held(held, None))
                .collect()
        } else {
            Box::default()
        };
        Known {
            policy,
            merged,
            plans: Box::default(),
            first: None,
            made: Box::default(),
            action,
        }
    }

    /// Makes the outcomes the merges resolve to, which verdicts point at
    /// (until then, a verdict resolves its merge at the decision), each
    /// pick under the channel policy's `stamp`: every copy that makes them
    /// makes the same ones, and a verdict that points at one is caught if
    /// read with a copy that has none.
    pub(crate) fn make_outcomes(&mut self, stamp: Stamp) {
        let action = self.action;
        let policy = &self.policy;
        let mut made = Vec::new();
        let plans: Box<[Plan]> = self
            .merged
            .iter()
            .enumerate()
            .map(|(held, merged)| {
                // The outcome for a context that resolves the merge one way:
                // made by the same code a decision past the tables runs.
                let mut make = |ctx: Context| {
                    let decision = policy.finish(held as u64, merged, &ctx);
                    let pick = Pick::new(
                        // At most 2^MERGED_UP_TO merges of at most
                        // 2 + ATTEMPTS_MADE_UP_TO outcomes each.
                        u32::try_from(made.len()).expect("a few hundred outcomes at most"),
                        decision.outcome.kind(),
                        decision.outcome.is_escalated(),
                        action,
                        stamp,
                    );
                    made.push(Made {
                        outcome: decision.outcome,
                        texts: decision.trail.texts,
                    });
                    pick
                };
                match &merged.effect {
                    None => Plan::Allow,
                    Some(Effect::StepUp(step_up)) if !step_up.methods.is_empty() => {
                        let escalated = make(Context {
                            failed_attempts: step_up.max_attempts,
                            ..Context::default()
                        });
                        let satisfied = make(Context {
                            confidence: step_up.min_confidence,
                            methods: step_up.methods,
                            ..Context::default()
                        });
                        let pending_made = step_up.max_attempts.min(ATTEMPTS_MADE_UP_TO);
                        // Made next, one per failed attempt.
                        let pending = satisfied.at() + 1;
                        for failed_attempts in 0..pending_made {
                            make(Context {
                                failed_attempts,
                                ..Context::default()
                            });
                        }
                        Plan::StepUp {
                            step_up: step_up.clone(),
                            escalated,
                            satisfied,
                            pending,
                            pending_made,
                        }
                    }
                    // Whatever the context, the same outcome (a step-up
                    // nothing can satisfy always escalates).
                    Some(_) => Plan::Fixed(make(Context::default())),
                }
            })
            .collect();
        self.first = plans.first().cloned();
        self.plans = plans;
        self.made = made.into();
    }

    /// Whether the outcomes are made ([`Known::make_outcomes`]): there are
    /// as many plans as merges.
    pub(crate) fn has_outcomes(&self) -> bool {
        self.plans.len() == self.merged.len()
    }

    #[inline(always)]
    fn decide(&self, ctx: &Context) -> Decision<'_> {
        let held = self.policy.held(ctx);
        match usize::try_from(held).ok().and_then(|i| self.merged.get(i)) {
            Some(merged) => self.policy.finish(held, merged, ctx),
            None => self.policy.decide(ctx),
        }
    }

    /// [`Known::decide`] as a verdict that points at an outcome made
    /// beforehand where there is one.
    #[inline(always)]
    fn verdict(&self, channel: &ChannelPolicy, action: &Action, ctx: &Context) -> Verdict {
        let held = self.policy.held(ctx);
        let plan = match held {
            0 => self.first.as_ref(),
            _ => usize::try_from(held).ok().and_then(|i| self.plans.get(i)),
        };
        match plan.and_then(|plan| plan.pick(ctx)) {
            Some(source) => Verdict { held, source },
            None => self.verdict_here(channel, action, ctx, held),
        }
    }

    /// [`Known::verdict`] past the outcomes made beforehand (a pending
    /// step-up past [`ATTEMPTS_MADE_UP_TO`] failed attempts, or a policy
    /// whose outcomes are not made): resolved at the decision. Out of the
    /// way of the decisions that read a table.
    #[cold]
    #[inline(never)]
    fn verdict_here(
        &self,
        channel: &ChannelPolicy,
        action: &Action,
        ctx: &Context,
        held: u64,
    ) -> Verdict {
        match usize::try_from(held).ok().and_then(|i| self.merged.get(i)) {
            // From the merge made beforehand.
            Some(merged) => self
                .policy
                .finish(held, merged, ctx)
                .detach(channel, action),
            // Past the merges made beforehand: merged here, with the
            // conditions already evaluated.
            None => {
                let merged = self.policy.merge_held(held, Some(ctx));
                self.policy
                    .finish(held, &merged, ctx)
                    .detach(channel, action)
            }
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
    #[inline(always)]
    pub fn decide_action(&self, action: &Action, ctx: &Context) -> Decision<'_> {
        match action.known_index().and_then(|i| self.known.get(i)) {
            Some(Some(known)) => known.decide(ctx),
            Some(None) => Decision::allow(),
            None => self.decide(action.as_str(), ctx),
        }
    }

    /// [`ChannelPolicy::decide_action`] as a verdict: for a known action, it
    /// points at an outcome made beforehand, so no outcome is copied (past
    /// those tables, or in a policy that has not made them, the verdict
    /// holds one made at the decision); read it back with this policy and
    /// `action`.
    #[inline(always)]
    pub fn verdict(&self, action: &Action, ctx: &Context) -> Verdict {
        match action.known_index().and_then(|i| self.known.get(i)) {
            Some(Some(known)) => known.verdict(self, action, ctx),
            Some(None) => Verdict::allow(),
            None => match self.lookup(action.as_str()) {
                Some(rules) => rules.decide(ctx).detach(self, action),
                // No rule covers it: the verdict every policy reads alike.
                None => Verdict::allow(),
            },
        }
    }

    /// The tables of a known action that has rules.
    #[inline]
    fn known_action(&self, action: &Action) -> Option<&Known> {
        self.known.get(action.known_index()?)?.as_ref()
    }

    /// The policy of `action` ([`ChannelPolicy::lookup`], by the position of
    /// a known action rather than by its name).
    pub fn action_policy(&self, action: &Action) -> Option<&ActionPolicy> {
        match action.known_index().and_then(|i| self.known.get(i)) {
            Some(known) => known.as_ref().map(|k| &k.policy),
            None => self.lookup(action.as_str()),
        }
    }
}

impl EffectivePolicy {
    /// Decides `action` on `channel` for `ctx`.
    pub fn decide(&self, channel: Channel, action: &str, ctx: &Context) -> Decision<'_> {
        self.channel(channel).decide(action, ctx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::compile::StandingThrottle;
    use crate::effect::Review;
    use crate::mode::Condition;
    use crate::{ChannelSet, MethodSet};

    fn entry(when: Option<Condition>, effect: Effect, text: &str, throttle: bool) -> Entry {
        Entry {
            when,
            effect,
            throttle: throttle.then(|| StandingThrottle {
                limit: Throttle {
                    max: 3,
                    window_seconds: 60,
                },
                customer_message: Some(Arc::from(format!("{text} (throttle)"))),
                agent_script: None,
            }),
            activation_ids: vec![ActivationId::from_random(text.len() as u64)],
            customer_message: Some(Arc::from(text)),
            agent_script: Some(Arc::from(format!("{text} (script)"))),
        }
    }

    fn over(amount: f64) -> Option<Condition> {
        Some(Condition {
            amount_over: Some(amount),
            ..Condition::default()
        })
    }

    /// A policy of `n` conditional entries (amounts over 100, 200, ...) of
    /// every kind of effect, over a throttled step-up.
    fn policy(n: usize) -> ActionPolicy {
        let step_up = StepUp {
            min_confidence: 0.8,
            methods: MethodSet::parse(&["totp", "webauthn"]).unwrap(),
            max_attempts: 2,
            escalate_queue: Text::intern("account-review"),
        };
        let effects = [
            Effect::Throttle(Throttle {
                max: 1,
                window_seconds: 10,
            }),
            Effect::Review(Review {
                queue: Text::intern("payments"),
            }),
            Effect::StepUp(StepUp {
                min_confidence: 0.9,
                ..step_up.clone()
            }),
            Effect::Allow,
            Effect::Route(Route {
                to: ChannelSet::parse_selector(&["web"]).unwrap(),
            }),
            Effect::Deny(Deny {
                alternative: Some(Text::intern("use the app")),
            }),
        ];
        ActionPolicy {
            base: Some(entry(None, Effect::StepUp(step_up), "base", true)),
            conditional: (0..n)
                .map(|i| {
                    entry(
                        over(100.0 * (i + 1) as f64),
                        effects[i % effects.len()].clone(),
                        &format!("entry {i}"),
                        i % 2 == 0,
                    )
                })
                .collect(),
        }
    }

    fn contexts() -> Vec<Context> {
        let mut contexts = Vec::new();
        for amount in [
            None,
            Some(50.0),
            Some(150.0),
            Some(250.0),
            Some(450.0),
            Some(9e9),
        ] {
            for (confidence, methods) in [
                (0.5, &[][..]),
                (0.85, &["totp"][..]),
                (0.95, &["webauthn"][..]),
            ] {
                for failed_attempts in [0, 1, 2] {
                    contexts.push(Context {
                        confidence,
                        methods: MethodSet::parse(methods).unwrap(),
                        failed_attempts,
                        amount,
                        ..Context::default()
                    });
                }
            }
        }
        contexts
    }

    #[test]
    fn merges_made_beforehand_decide_as_merging_at_each_decision() {
        // Below, at and past the bound of merges made beforehand.
        for n in [0, 1, 3, MERGED_UP_TO, MERGED_UP_TO + 1, 6] {
            let policy = policy(n);
            let mut known = Known::new(policy.clone(), 0);
            known.make_outcomes(Stamp::next());
            assert_eq!(known.merged.is_empty(), n > MERGED_UP_TO, "{n} entries");
            for ctx in contexts() {
                let fast = known.decide(&ctx);
                let slow = policy.decide(&ctx);
                let why = format!("{n} entries, {ctx:?}");
                assert_eq!(fast.outcome, slow.outcome, "{why}");
                assert_eq!(fast.customer_message(), slow.customer_message(), "{why}");
                assert_eq!(fast.agent_script(), slow.agent_script(), "{why}");
                assert!(fast.reasons().eq(slow.reasons()), "{why}");
            }
        }
    }

    /// A channel policy whose `account.password_reset` is `policy`.
    fn channel_policy(policy: &ActionPolicy) -> (ChannelPolicy, Action) {
        let mut channel = ChannelPolicy::default();
        channel
            .insert("account.password_reset", policy.clone())
            .unwrap();
        (channel, Action::parse("account.password_reset").unwrap())
    }

    /// What a verdict says, read back from the policy it was made with,
    /// against a decision made by merging at the decision.
    fn assert_verdict_says(
        verdict: &Verdict,
        slow: &Decision<'_>,
        channel: &ChannelPolicy,
        action: &Action,
        why: &str,
    ) {
        let policy = Some(channel);
        assert_eq!(verdict.outcome(policy, action), &slow.outcome, "{why}");
        // What a client counts, read without the outcome.
        assert_eq!(verdict.kind(), slow.outcome.kind(), "{why}");
        assert_eq!(verdict.is_escalated(), slow.outcome.is_escalated(), "{why}");
        assert_eq!(
            verdict.customer_message(policy, action),
            slow.customer_message(),
            "{why}"
        );
        assert_eq!(
            verdict.agent_script(policy, action),
            slow.agent_script(),
            "{why}"
        );
        assert!(verdict.reasons(policy, action).eq(slow.reasons()), "{why}");
        let attached = verdict.attach(policy, action);
        assert_eq!(attached.outcome, slow.outcome, "{why}");
        assert!(attached.reasons().eq(slow.reasons()), "{why}");
    }

    #[test]
    fn verdicts_read_from_outcomes_made_beforehand_say_what_merging_says() {
        for n in [0, 1, 3, MERGED_UP_TO, MERGED_UP_TO + 1, 6] {
            let policy = policy(n);
            let (channel, action) = channel_policy(&policy);
            for ctx in contexts() {
                let verdict = channel.verdict(&action, &ctx);
                let slow = policy.decide(&ctx);
                assert_verdict_says(
                    &verdict,
                    &slow,
                    &channel,
                    &action,
                    &format!("{n} entries, {ctx:?}"),
                );
            }
        }
    }

    #[test]
    fn a_policy_whose_outcomes_are_not_made_says_the_same_and_makes_them_when_asked() {
        for n in [0, 1, 3, MERGED_UP_TO, MERGED_UP_TO + 1, 6] {
            let policy = policy(n);
            let (with, action) = channel_policy(&policy);
            // As the controller compiles it: merges only.
            let mut without = with.clone();
            without.index_known();
            assert_eq!(without.has_outcomes(), n > MERGED_UP_TO, "{n} entries");
            let known = without.known_action(&action).unwrap();
            assert!(
                known.plans.is_empty() && known.first.is_none() && known.made.is_empty(),
                "{n} entries"
            );
            assert_eq!(known.merged.is_empty(), n > MERGED_UP_TO, "{n} entries");
            assert!(with.has_outcomes(), "{n} entries");
            for ctx in contexts() {
                let verdict = without.verdict(&action, &ctx);
                let why = format!("{n} entries, {ctx:?}");
                assert!(
                    matches!(verdict.source, Source::Here { .. } | Source::Allow),
                    "{why}"
                );
                assert_verdict_says(&verdict, &policy.decide(&ctx), &without, &action, &why);
            }
            // Made when asked: the same tables as a policy read from the
            // wire, pointed at by the verdicts.
            let mut made = without.clone();
            made.make_outcomes();
            assert!(made.has_outcomes(), "{n} entries");
            assert_eq!(made, with, "{n} entries");
            for ctx in contexts() {
                let verdict = made.verdict(&action, &ctx);
                let why = format!("{n} entries, {ctx:?}");
                if n <= MERGED_UP_TO && ctx.failed_attempts < ATTEMPTS_MADE_UP_TO {
                    assert!(
                        matches!(verdict.source, Source::Made(_) | Source::Allow),
                        "{why}"
                    );
                }
                assert_verdict_says(&verdict, &policy.decide(&ctx), &made, &action, &why);
            }
        }
    }

    #[test]
    fn compiling_makes_the_merges_and_not_the_outcomes() {
        let catalog = crate::catalog::Catalog::standard();
        let change = crate::activation::Change {
            principal: "test".into(),
            reason: crate::Reason::parse("test").unwrap(),
            at: jiff::Timestamp::UNIX_EPOCH,
            incident_id: None,
        };
        let activations: Vec<crate::Activation> = catalog
            .modes
            .iter()
            .enumerate()
            .map(|(i, mode)| {
                let id = ActivationId::from_random(i as u64);
                crate::Activation::new(id, mode, crate::ChannelSet::ALL, change.at, &change)
            })
            .collect();
        let compiled = EffectivePolicy::compile(&activations);
        for channel in Channel::all() {
            let mut policy = compiled.channel(channel).clone();
            let knowns = || policy.known.iter().flatten();
            assert!(knowns().any(|k| !k.merged.is_empty()), "{channel}");
            assert!(
                knowns().all(|k| k.plans.is_empty() && k.first.is_none() && k.made.is_empty()),
                "{channel}"
            );
            assert!(!policy.has_outcomes(), "{channel}");
            policy.make_outcomes();
            let knowns = || policy.known.iter().flatten();
            assert!(
                knowns().all(|k| k.plans.len() == k.merged.len()
                    && k.first.as_ref() == k.plans.first()),
                "{channel}"
            );
            assert!(policy.has_outcomes(), "{channel}");
        }
    }

    #[test]
    fn a_step_up_with_more_attempts_than_are_made_beforehand_still_counts_them_down() {
        // The base step-up, with a throttle whose condition holds (so that
        // the entries behind the decision are more than the base).
        let mut policy = policy(1);
        let Some(Entry {
            effect: Effect::StepUp(step_up),
            ..
        }) = &mut policy.base
        else {
            panic!("the base is a step-up");
        };
        step_up.max_attempts = ATTEMPTS_MADE_UP_TO + 5;
        let (channel, action) = channel_policy(&policy);
        let mut seen = Vec::new();
        for failed_attempts in 0..ATTEMPTS_MADE_UP_TO + 7 {
            let ctx = Context {
                failed_attempts,
                ..Context::default()
            };
            let verdict = channel.verdict(&action, &ctx);
            let slow = policy.decide(&ctx);
            assert_verdict_says(
                &verdict,
                &slow,
                &channel,
                &action,
                &format!("{failed_attempts} failed"),
            );
            seen.push(verdict.outcome(Some(&channel), &action).clone());
        }
        // Counted down past the outcomes made beforehand, then escalated.
        let last_pending = &seen[(ATTEMPTS_MADE_UP_TO + 4) as usize];
        assert!(
            matches!(
                last_pending,
                Outcome::StepUp {
                    attempts_left: 1,
                    ..
                }
            ),
            "{last_pending:?}"
        );
        let past = &seen[(ATTEMPTS_MADE_UP_TO + 5) as usize];
        assert!(
            matches!(
                past,
                Outcome::Review {
                    escalated: true,
                    ..
                }
            ),
            "{past:?}"
        );
    }

    #[test]
    fn a_verdict_reads_the_same_from_a_copy_of_its_policy() {
        let policy = policy(2);
        let (channel, action) = channel_policy(&policy);
        let copy = channel.clone();
        for ctx in contexts() {
            let verdict = channel.verdict(&action, &ctx);
            let slow = policy.decide(&ctx);
            assert_verdict_says(&verdict, &slow, &copy, &action, &format!("{ctx:?}"));
        }
    }

    #[test]
    #[should_panic(expected = "other than those it was made for")]
    fn a_verdict_read_with_another_policy_is_caught() {
        let (channel, action) = channel_policy(&policy(1));
        // The same rules compiled again: equal, but other tables.
        let (other, _) = channel_policy(&policy(1));
        assert_eq!(channel, other);
        let verdict = channel.verdict(&action, &Context::default());
        verdict.outcome(Some(&other), &action);
    }

    #[test]
    #[should_panic(expected = "other than those it was made for")]
    fn a_verdict_read_for_another_action_is_caught() {
        let mut channel = ChannelPolicy::default();
        channel.insert("*", policy(1)).unwrap();
        let action = Action::parse("account.password_reset").unwrap();
        let other = Action::parse("payment.refund").unwrap();
        let verdict = channel.verdict(&action, &Context::default());
        verdict.outcome(Some(&channel), &other);
    }

    /// Verdicts made at the decision: a compiled policy's (no outcomes
    /// made), one past the merges made beforehand, and an action not in
    /// the known list's.
    fn verdicts_made_here() -> Vec<(ChannelPolicy, Action, Verdict)> {
        let mut made = Vec::new();
        let (mut compiled, action) = channel_policy(&policy(1));
        compiled.index_known();
        made.push((compiled, action));
        made.push(channel_policy(&policy(MERGED_UP_TO + 1)));
        let mut unknown = ChannelPolicy::default();
        unknown.insert("*", policy(1)).unwrap();
        made.push((unknown, Action::parse("bot.intent.cancel_order").unwrap()));
        made.into_iter()
            .map(|(channel, action)| {
                let verdict = channel.verdict(&action, &Context::default());
                assert!(matches!(verdict.source, Source::Here { .. }), "{action}");
                (channel, action, verdict)
            })
            .collect()
    }

    #[test]
    fn a_verdict_made_at_the_decision_reads_the_same_from_a_copy_of_its_policy() {
        for (channel, action, verdict) in verdicts_made_here() {
            let copy = channel.clone();
            assert_eq!(
                verdict.outcome(Some(&copy), &action),
                verdict.outcome(Some(&channel), &action),
                "{action}"
            );
            assert_eq!(
                verdict.customer_message(Some(&copy), &action),
                verdict.customer_message(Some(&channel), &action),
                "{action}"
            );
        }
    }

    #[test]
    fn a_verdict_made_at_the_decision_read_with_another_policy_or_action_is_caught() {
        let elsewhere = |read: &dyn Fn()| {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
                .expect_err("read elsewhere, it must panic");
            let message = caught.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(
                message.contains("other than those it was made for"),
                "{message}"
            );
        };
        let other_action = Action::parse("payment.refund").unwrap();
        for (channel, action, verdict) in verdicts_made_here() {
            // The same tables again: equal, but another compile.
            let mut other = channel.clone();
            other.index_known();
            if channel.has_outcomes() {
                other.make_outcomes();
            }
            assert_eq!(channel, other, "{action}");
            elsewhere(&|| {
                verdict.outcome(Some(&other), &action);
            });
            elsewhere(&|| {
                verdict.customer_message(Some(&other), &action);
            });
            elsewhere(&|| {
                verdict.outcome(None, &action);
            });
            elsewhere(&|| {
                verdict.reasons(Some(&channel), &other_action).count();
            });
        }
    }

    #[test]
    fn keys_added_together_make_the_tables_that_keys_added_one_by_one_make() {
        let (one_by_one, action) = channel_policy(&policy(3));
        let mut more = one_by_one.clone();
        more.insert("payment.*", policy(1)).unwrap();
        let together = ChannelPolicy::from_keys([
            ("account.password_reset", policy(3)),
            ("payment.*", policy(1)),
        ])
        .unwrap();
        assert_eq!(together, more);
        let rules = policy(3);
        for ctx in contexts() {
            let verdict = together.verdict(&action, &ctx);
            let slow = rules.decide(&ctx);
            assert_verdict_says(&verdict, &slow, &together, &action, &format!("{ctx:?}"));
        }
        let refused = ChannelPolicy::from_keys([("payment.*", policy(1)), ("Bad Key", policy(1))])
            .unwrap_err();
        assert!(refused.0.contains("'Bad Key'"), "{refused}");
    }

    #[test]
    fn a_key_given_twice_is_refused_and_changes_nothing() {
        let (mut channel, action) = channel_policy(&policy(1));
        let before = channel.decide_action(&action, &Context::default()).outcome;
        let error = channel
            .insert("account.password_reset", ActionPolicy::default())
            .unwrap_err();
        assert!(error.0.contains("appears twice"), "{error}");
        let ctx = Context::default();
        assert_eq!(channel.decide_action(&action, &ctx).outcome, before);
        assert_eq!(channel.decide(action.as_str(), &ctx).outcome, before);
    }

    #[test]
    fn a_verdict_with_no_rule_allows_without_a_policy() {
        let action = Action::parse("account.password_reset").unwrap();
        let verdict = Verdict::allow();
        assert_eq!(verdict.outcome(None, &action), &Outcome::Allow);
        assert_eq!(verdict.customer_message(None, &action), None);
        assert_eq!(verdict.reasons(None, &action).count(), 0);
        // An action the policy has no rule for.
        let (channel, _) = channel_policy(&policy(1));
        let other = Action::parse("payment.refund").unwrap();
        let verdict = channel.verdict(&other, &Context::default());
        assert_eq!(verdict.outcome(Some(&channel), &other), &Outcome::Allow);
        // With no rule at all, known or not, and read with no policy: an
        // allow every policy reads alike.
        let intent = Action::parse("bot.intent.cancel_order").unwrap();
        for (policy, action) in [
            (ChannelPolicy::default(), &action),
            (ChannelPolicy::default(), &intent),
            (channel, &intent),
        ] {
            let verdict = policy.verdict(action, &Context::default());
            assert!(matches!(verdict.source, Source::Allow), "{action}");
            assert_eq!(verdict.outcome(None, action), &Outcome::Allow, "{action}");
        }
    }

    #[test]
    fn a_verdict_made_at_the_decision_drops_its_outcome_and_its_copies_theirs() {
        let (queue, holders) = Text::shared("fraud-review");
        let verdict = Verdict {
            held: 0,
            source: Source::Here {
                outcome: ManuallyDrop::new(Outcome::Review {
                    queue,
                    escalated: false,
                }),
                texts: Texts::None,
                origin: Origin {
                    stamp: Stamp(0),
                    action: 0,
                },
            },
        };
        assert_eq!(holders(), 1);
        let copy = verdict.clone();
        assert_eq!(holders(), 2, "a copy holds its own outcome");
        drop(verdict);
        assert_eq!(holders(), 1, "dropping a verdict drops its outcome");
        drop(copy);
        assert_eq!(holders(), 0, "and its copy's");
    }

    #[test]
    fn a_pick_reads_back_what_it_was_made_with() {
        for kind in EffectKind::ALL {
            for escalated in [false, true] {
                for (at, action) in [(0, 0), (7, 3), (u32::MAX, u8::MAX)] {
                    let pick = Pick::new(at, kind, escalated, action, Stamp(9));
                    assert_eq!(
                        (pick.at(), pick.kind(), pick.escalated(), pick.action()),
                        (at, kind, escalated, action)
                    );
                    assert_eq!(pick.stamp.0, 9);
                    let moved = pick.moved_to(at / 2, EffectKind::StepUp, !escalated);
                    assert_eq!(
                        (moved.at(), moved.kind(), moved.escalated(), moved.action()),
                        (at / 2, EffectKind::StepUp, !escalated, action)
                    );
                    assert_eq!(moved.stamp.0, 9, "a moved pick keeps its tables' stamp");
                    assert_eq!(
                        pick,
                        Pick::new(at, kind, escalated, action, Stamp(10)),
                        "picks compare what they point at, not where the tables came from"
                    );
                }
            }
        }
    }
}
