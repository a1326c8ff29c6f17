//! Properties of the merge: the effective policy of a set of activations is
//! deterministic (the order they come in does not matter), idempotent (an
//! activation given twice counts once; a copy under a new id changes no
//! limit) and never less restrictive than any one activation alone; the
//! compiled lookup tables decide as reading every rule directly would, and
//! survive their wire form; and `Effect::merge`, which the merge folds with,
//! is commutative, associative and idempotent on kinds and limits.
//!
//! Activations are random modes built directly (not through mode files):
//! random channels, selectors from the whole catalogue including prefixes and
//! `*`, except lists that overlap them, optional conditions, every effect
//! kind with random parameters. Every decision is checked on every channel
//! for every known action and a few bot intents, in random contexts.
//!
//! Text parameters (review queue, deny alternative, messages) come from the
//! rule that sorts first by (revision, activation id), so they are compared
//! only where that order is fixed.

use std::sync::Arc;

use jiff::Timestamp;
use proptest::prelude::*;
use safemode_policy::names::{ACTIONS, METHODS};
use safemode_policy::{
    ActionSelector, Activation, ActivationId, Change, Channel, ChannelPolicy, ChannelSet,
    Condition, Context, Deny, Effect, EffectKind, EffectivePolicy, MethodSet, Mode, ModeName,
    Outcome, ReadOnly, Reason, Review, Route, Rule, StepUp, Text, Throttle,
};

// === Generators ===

/// Every selector a rule may use: each known action, a few bot intents,
/// prefixes and `*`.
fn selectors() -> Vec<&'static str> {
    let mut selectors = ACTIONS.to_vec();
    selectors.extend([
        "bot.intent.faq",
        "bot.intent.order_status",
        "bot.intent.refund",
        "account.*",
        "payment.*",
        "order.*",
        "bot.intent.*",
        "bot.*",
        "*",
    ]);
    selectors
}

const BOT_INTENTS: &[&str] = &[
    "bot.intent.faq",
    "bot.intent.order_status",
    "bot.intent.refund",
    "bot.intent.unheard_of",
];

const QUEUES: &[&str] = &["account-review", "payments-review", "handoff-review"];
const FLAGS: &[&str] = &[
    "identity_mismatch",
    "suspected_takeover",
    "social_engineering",
];
const TEXTS: &[&str] = &["Use the app.", "Call us back later.", "We are on it."];
const TIMES: &[&str] = &[
    "2025-03-01T00:00:00Z",
    "2025-03-01T12:00:00Z",
    "2025-03-02T08:30:00Z",
];

/// Every action decisions are checked for.
fn actions() -> impl Iterator<Item = &'static str> {
    ACTIONS.iter().chain(BOT_INTENTS).copied()
}

fn selector() -> impl Strategy<Value = ActionSelector> {
    prop::sample::select(selectors()).prop_map(|s| ActionSelector::parse(s).unwrap())
}

fn channel_set(bits: u8) -> ChannelSet {
    Channel::all()
        .filter(|c| bits & (1 << c.index()) != 0)
        .fold(ChannelSet::NONE, ChannelSet::with)
}

/// A non-empty set of channels, `ALL` included.
fn channels() -> impl Strategy<Value = ChannelSet> {
    prop_oneof![1 => Just(ChannelSet::ALL), 3 => (1u8..64).prop_map(channel_set)]
}

fn methods(bits: u16) -> MethodSet {
    let names: Vec<&str> = METHODS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, m)| *m)
        .collect();
    MethodSet::parse(&names).unwrap()
}

fn text() -> impl Strategy<Value = Option<Arc<str>>> {
    prop::option::of(prop::sample::select(TEXTS).prop_map(Arc::from))
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop::sample::select(TIMES).prop_map(|t| t.parse().unwrap())
}

/// Every effect kind with random parameters. Step-ups always name a method
/// (as mode files must) unless `empty_methods`.
fn effect(empty_methods: bool) -> impl Strategy<Value = Effect> {
    let low_method = if empty_methods { 0u16 } else { 1 };
    prop_oneof![
        Just(Effect::Allow),
        (1u32..=10, prop::sample::select(&[60u32, 3600, 86_400][..])).prop_map(
            |(max, window_seconds)| Effect::Throttle(Throttle {
                max,
                window_seconds
            })
        ),
        (
            prop::sample::select(&[0.0, 0.5, 0.8, 0.85, 0.9, 1.0][..]),
            low_method..(1 << METHODS.len()),
            1u32..=4,
            prop::sample::select(QUEUES),
        )
            .prop_map(|(min_confidence, bits, max_attempts, queue)| {
                Effect::StepUp(StepUp {
                    min_confidence,
                    methods: methods(bits),
                    max_attempts,
                    escalate_queue: Text::intern(queue),
                })
            }),
        prop::sample::select(QUEUES).prop_map(|q| Effect::Review(Review {
            queue: Text::intern(q)
        })),
        prop::option::of(timestamp()).prop_map(|as_of| Effect::ReadOnly(ReadOnly { as_of })),
        // Never every channel: a route must leave somewhere to go.
        (1u8..63).prop_map(|bits| Effect::Route(Route {
            to: channel_set(bits)
        })),
        text().prop_map(|alternative| Effect::Deny(Deny {
            alternative: alternative.as_deref().map(Text::intern)
        })),
    ]
}

/// A condition with at least one part set, like a mode file's `when`.
fn condition() -> impl Strategy<Value = Option<Condition>> {
    (
        prop::option::of(any::<bool>()),
        prop::option::of(prop::sample::select(&[0.0, 100.0, 500.0][..])),
        prop::sample::subsequence(FLAGS, 0..=2),
    )
        .prop_map(|(handoff_from_bot, amount_over, flags)| {
            let mut bot_flags_any: Vec<Arc<str>> = flags.into_iter().map(Arc::from).collect();
            bot_flags_any.sort();
            let c = Condition {
                handoff_from_bot,
                amount_over,
                bot_flags_any,
            };
            (!c.is_empty()).then_some(c)
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        channels(),
        prop::collection::vec(selector(), 1..=3),
        prop::collection::vec(selector(), 0..=2),
        prop_oneof![2 => Just(None), 1 => condition()],
        effect(false),
        text(),
        text(),
    )
        .prop_map(
            |(channels, actions, except, when, effect, customer_message, agent_script)| {
                // As the mode file parser demands, every exception must
                // exclude something the rule's actions cover.
                let except = except
                    .into_iter()
                    .filter(|e| actions.iter().any(|a| a.overlaps(e)))
                    .collect();
                Rule {
                    channels,
                    actions,
                    except,
                    when,
                    effect,
                    customer_message,
                    agent_script,
                }
            },
        )
}

fn mode() -> impl Strategy<Value = Mode> {
    (
        prop::sample::select(&["mode-a", "mode-b", "mode-c"][..]),
        text(),
        text(),
        prop::collection::vec(rule(), 1..=3),
    )
        .prop_map(|(name, customer_notice, agent_script, rules)| Mode {
            name: ModeName::parse(name).unwrap(),
            title: "Random".into(),
            summary: "A random mode.".into(),
            customer_notice,
            agent_script,
            rules,
            lift_requires_approval: false,
        })
}

fn change() -> Change {
    Change {
        principal: "prop@example.com".into(),
        reason: Reason::parse("property test").unwrap(),
        at: "2025-03-01T12:30:00Z".parse().unwrap(),
        incident_id: None,
    }
}

/// Distinct ids for distinct indexes (below 16), in a random order. The
/// activations under test use indexes 0 to 7, their copies 8 and up.
fn original_id(seed: u64, index: usize) -> ActivationId {
    ActivationId::from_random(seed << 4 | index as u64)
}

/// One to five activations with distinct ids and a few revisions.
fn activations() -> impl Strategy<Value = Vec<Activation>> {
    prop::collection::vec(
        (any::<u64>(), mode(), channels(), timestamp(), 0i64..3),
        1..=5,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (seed, mode, channels, as_of, revision))| {
                let mut a =
                    Activation::new(original_id(seed, i), &mode, channels, as_of, &change());
                a.revision = revision;
                a
            })
            .collect()
    })
}

fn context() -> impl Strategy<Value = Context> {
    (
        prop_oneof![
            prop::sample::select(&[0.0, 0.5, 0.8, 0.85, 0.9, 1.0][..]),
            0.0..=1.0f64
        ],
        0u16..(1 << METHODS.len()),
        0u32..=5,
        prop::option::of(prop::sample::select(
            &[0.0, 100.0, 500.0, 500.01, 5000.0][..],
        )),
        any::<bool>(),
        prop::sample::subsequence(
            &["suspected_takeover", "identity_mismatch", "chatty"][..],
            0..=2,
        ),
    )
        .prop_map(
            |(confidence, bits, failed_attempts, amount, handoff_from_bot, flags)| Context {
                confidence,
                methods: methods(bits),
                failed_attempts,
                amount,
                handoff_from_bot,
                bot_flags: flags.into_iter().map(String::from).collect(),
            },
        )
}

fn contexts() -> impl Strategy<Value = Vec<Context>> {
    prop::collection::vec(context(), 1..=4)
}

// === Helpers ===

/// Everything a decision says.
#[derive(Debug, PartialEq)]
struct Said {
    outcome: Outcome,
    reasons: Vec<ActivationId>,
    customer_message: Option<String>,
    agent_script: Option<String>,
}

fn said(policy: &EffectivePolicy, channel: Channel, action: &str, ctx: &Context) -> Said {
    let d = policy.decide(channel, action, ctx);
    Said {
        reasons: d.reasons().cloned().collect(),
        customer_message: d.customer_message().map(str::to_string),
        agent_script: d.agent_script().map(str::to_string),
        outcome: d.outcome,
    }
}

/// Calls `f` for every channel, action and context.
fn every_decision(
    ctxs: &[Context],
    mut f: impl FnMut(Channel, &str, &Context) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    for channel in Channel::all() {
        for action in actions() {
            for ctx in ctxs {
                f(channel, action, ctx)?;
            }
        }
    }
    Ok(())
}

/// The effect (before it is resolved against the context) that `policy`
/// applies to `action` in `ctx`: the base entry merged with every
/// conditional entry that holds.
fn merged_effect(
    policy: &EffectivePolicy,
    channel: Channel,
    action: &str,
    ctx: &Context,
) -> Effect {
    let Some(p) = policy.channel(channel).lookup(action) else {
        return Effect::Allow;
    };
    p.base
        .iter()
        .chain(
            p.conditional
                .iter()
                .filter(|e| e.when.as_ref().is_none_or(|w| w.holds(ctx))),
        )
        .fold(Effect::Allow, |acc, e| acc.merge(&e.effect))
}

/// The effect without its text parameters (queues, the deny alternative),
/// which come from the leading rule rather than from a merge.
fn numeric(effect: &Effect) -> Effect {
    match effect {
        Effect::StepUp(s) => Effect::StepUp(StepUp {
            escalate_queue: Text::intern(""),
            ..s.clone()
        }),
        Effect::Review(_) => Effect::Review(Review {
            queue: Text::intern(""),
        }),
        Effect::Deny(_) => Effect::Deny(Deny { alternative: None }),
        other => other.clone(),
    }
}

/// The outcome without its text parameters.
fn numeric_outcome(outcome: &Outcome) -> Outcome {
    match outcome {
        Outcome::StepUp {
            required,
            attempts_left,
        } => Outcome::StepUp {
            required: StepUp {
                escalate_queue: Text::intern(""),
                ..required.clone()
            },
            attempts_left: *attempts_left,
        },
        Outcome::Review { escalated, .. } => Outcome::Review {
            queue: Text::intern(""),
            escalated: *escalated,
        },
        Outcome::Deny(_) => Outcome::Deny(Deny { alternative: None }),
        other => other.clone(),
    }
}

/// The decision read straight off the rules, without compiled tables: every
/// rule of every activation that covers the channel and the action and whose
/// condition holds, merged; then resolved as the design says. Returns the
/// outcome and the ids of the activations behind it.
fn read_every_rule(
    activations: &[Activation],
    channel: Channel,
    action: &str,
    ctx: &Context,
) -> (Outcome, Vec<ActivationId>) {
    let mut effect: Option<Effect> = None;
    let mut throttle: Option<Throttle> = None;
    let mut ids = Vec::new();
    for a in activations.iter().filter(|a| a.covers(channel)) {
        for rule in &a.mode.rules {
            let applies = rule.channels.contains(channel)
                && rule.covers_action(action)
                && rule.when.as_ref().is_none_or(|w| w.holds(ctx));
            if !applies {
                continue;
            }
            effect = Some(match effect {
                Some(e) => e.merge(&rule.effect),
                None => rule.effect.clone(),
            });
            if let Effect::Throttle(t) = rule.effect {
                throttle = Some(throttle.map_or(t, |m| m.merge(t)));
            }
            ids.push(a.id.clone());
        }
    }
    ids.sort();
    ids.dedup();
    let outcome = match effect {
        None | Some(Effect::Allow) => Outcome::Allow,
        Some(Effect::Throttle(t)) => Outcome::Throttle(t),
        Some(Effect::StepUp(s)) => {
            if s.methods.is_empty() || ctx.failed_attempts >= s.max_attempts {
                Outcome::Review {
                    queue: s.escalate_queue,
                    escalated: true,
                }
            } else if ctx.confidence >= s.min_confidence && ctx.methods.intersects(s.methods) {
                // A passed step-up does not lift a throttle.
                throttle.map_or(Outcome::Allow, Outcome::Throttle)
            } else {
                Outcome::StepUp {
                    attempts_left: s.max_attempts - ctx.failed_attempts,
                    required: s,
                }
            }
        }
        Some(Effect::Review(r)) => Outcome::Review {
            queue: r.queue,
            escalated: false,
        },
        Some(Effect::ReadOnly(r)) => Outcome::ReadOnly(r),
        // Routed nowhere: refuse.
        Some(Effect::Route(r)) if r.to.is_empty() => Outcome::Deny(Deny { alternative: None }),
        Some(Effect::Route(r)) => Outcome::Route(r),
        Some(Effect::Deny(d)) => Outcome::Deny(d),
    };
    (outcome, ids)
}

/// Copies of `activations` under the fresh ids `id(i)`, at `revision` if
/// given (else at the original's).
fn copies_under_new_ids(
    activations: &[Activation],
    id: impl Fn(usize) -> ActivationId,
    revision: Option<i64>,
) -> Vec<Activation> {
    activations
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut copy = a.clone();
            copy.id = id(i);
            copy.revision = revision.unwrap_or(a.revision);
            copy
        })
        .collect()
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// === Properties ===

proptest! {
    #![proptest_config(config())]

    /// Compiling the same activations in any order gives the same tables and
    /// the same decisions, reasons and texts included.
    #[test]
    fn order_does_not_matter(
        (activations, shuffled) in activations().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        ctxs in contexts(),
    ) {
        let a = EffectivePolicy::compile(&activations);
        let b = EffectivePolicy::compile(&shuffled);
        for channel in Channel::all() {
            prop_assert_eq!(a.channel(channel), b.channel(channel), "channel {}", channel);
        }
        prop_assert_eq!(&a, &b);
        every_decision(&ctxs, |channel, action, ctx| {
            prop_assert_eq!(
                said(&a, channel, action, ctx),
                said(&b, channel, action, ctx),
                "{} {} {:?}", channel, action, ctx
            );
            Ok(())
        })?;
    }

    /// An activation given twice (same id) counts once.
    #[test]
    fn same_activation_twice_counts_once(
        (activations, extra) in activations().prop_flat_map(|v| {
            let n = v.len();
            (Just(v.clone()), prop::sample::subsequence(v, 0..=n).prop_shuffle())
        }),
        ctxs in contexts(),
    ) {
        let once = EffectivePolicy::compile(&activations);
        let twice: Vec<Activation> = activations.iter().chain(&extra).cloned().collect();
        let twice = EffectivePolicy::compile(&twice);
        prop_assert_eq!(&once, &twice);
        every_decision(&ctxs, |channel, action, ctx| {
            prop_assert_eq!(said(&once, channel, action, ctx), said(&twice, channel, action, ctx));
            Ok(())
        })?;
    }

    /// The same modes applied again later under new ids change no outcome
    /// and no text; only the reasons name the new activations too.
    #[test]
    fn copies_applied_later_change_no_outcome(activations in activations(), ctxs in contexts()) {
        let once = EffectivePolicy::compile(&activations);
        // Applied later: a higher revision, so the copies sort after every
        // original whatever their ids.
        let copies = copies_under_new_ids(&activations, |i| original_id(i as u64 + 7, i + 8), Some(100));
        let both: Vec<Activation> = activations.iter().chain(&copies).cloned().collect();
        let both = EffectivePolicy::compile(&both);
        every_decision(&ctxs, |channel, action, ctx| {
            let a = said(&once, channel, action, ctx);
            let b = said(&both, channel, action, ctx);
            prop_assert_eq!(&a.outcome, &b.outcome, "{} {} {:?}", channel, action, ctx);
            prop_assert_eq!(&a.customer_message, &b.customer_message);
            prop_assert_eq!(&a.agent_script, &b.agent_script);
            for id in &a.reasons {
                prop_assert!(b.reasons.contains(id), "{} lost from reasons {:?}", id, b.reasons);
            }
            Ok(())
        })?;
    }

    /// Copies under new ids in the same revision may sort before the
    /// originals and so lead with another rule's texts (queue, alternative),
    /// but the kind and every limit of every outcome stay the same.
    #[test]
    fn copies_in_the_same_revision_change_no_limit(
        (activations, copies) in activations().prop_flat_map(|v| {
            // Random ids in the same revisions: a copy may sort before or
            // after any original.
            let n = v.len();
            (Just(v), prop::collection::vec(any::<u64>(), n))
                .prop_map(|(v, seeds)| {
                    let copies = copies_under_new_ids(&v, |i| original_id(seeds[i], i + 8), None);
                    (v, copies)
                })
        }),
        ctxs in contexts(),
    ) {
        let once = EffectivePolicy::compile(&activations);
        let both: Vec<Activation> = copies.iter().chain(&activations).cloned().collect();
        let both = EffectivePolicy::compile(&both);
        every_decision(&ctxs, |channel, action, ctx| {
            let a = once.decide(channel, action, ctx).outcome;
            let b = both.decide(channel, action, ctx).outcome;
            prop_assert_eq!(numeric_outcome(&a), numeric_outcome(&b), "{} {} {:?}", channel, action, ctx);
            Ok(())
        })?;
    }

    /// The compiled tables (exact keys, then prefixes, then `*`, with except
    /// lists and conditions) decide as reading every rule would: the same
    /// kind and limits, behind the same activations.
    #[test]
    fn tables_agree_with_reading_every_rule(activations in activations(), ctxs in contexts()) {
        let policy = EffectivePolicy::compile(&activations);
        every_decision(&ctxs, |channel, action, ctx| {
            let d = policy.decide(channel, action, ctx);
            let (want, want_ids) = read_every_rule(&activations, channel, action, ctx);
            prop_assert_eq!(
                numeric_outcome(&d.outcome), numeric_outcome(&want),
                "{} {} {:?}", channel, action, ctx
            );
            let mut ids: Vec<ActivationId> = d.reasons().cloned().collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids, want_ids, "{} {} {:?}", channel, action, ctx);
            Ok(())
        })?;
    }

    /// A channel's tables rebuilt from their wire form (`entries`, then
    /// `insert` key by key, or `from_keys`, as a client does with a
    /// snapshot) are the same tables, with the outcomes that a compiled
    /// policy makes only when asked.
    #[test]
    fn tables_survive_their_wire_form(activations in activations()) {
        let policy = EffectivePolicy::compile(&activations);
        for channel in Channel::all() {
            let compiled = policy.channel(channel);
            let mut rebuilt = ChannelPolicy::default();
            for (key, action_policy) in compiled.entries() {
                rebuilt.insert(&key, action_policy.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            let entries = compiled.entries();
            let together = ChannelPolicy::from_keys(
                entries.iter().map(|(key, action_policy)| (key.as_str(), (*action_policy).clone())),
            ).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(rebuilt.has_outcomes() && together.has_outcomes());
            let mut made = compiled.clone();
            made.make_outcomes();
            prop_assert_eq!(&rebuilt, &made);
            prop_assert_eq!(&together, &made);
        }
    }

    /// Adding activations never makes a decision less restrictive: the
    /// merged outcome is at least as strict as each activation's alone, and
    /// so is the merged effect before the context resolves it.
    #[test]
    fn merge_is_never_less_restrictive(activations in activations(), ctxs in contexts()) {
        let merged = EffectivePolicy::compile(&activations);
        for single in &activations {
            let alone = EffectivePolicy::compile(std::slice::from_ref(single));
            every_decision(&ctxs, |channel, action, ctx| {
                let m = merged.decide(channel, action, ctx).outcome;
                let s = alone.decide(channel, action, ctx).outcome;
                prop_assert!(
                    m.is_at_least_as_strict_as(&s),
                    "{} {} {:?}: merged {:?} is less strict than {} alone: {:?}",
                    channel, action, ctx, m, single.id, s
                );
                prop_assert!(m.kind() >= s.kind(), "{} {}: {:?} < {:?}", channel, action, m, s);
                let me = merged_effect(&merged, channel, action, ctx);
                let se = merged_effect(&alone, channel, action, ctx);
                prop_assert!(me.kind() >= se.kind(), "{} {}: effect {:?} < {:?}", channel, action, me, se);
                prop_assert!(me.is_at_least_as_strict_as(&se), "{} {}: effect {:?} vs {:?}", channel, action, me, se);
                Ok(())
            })?;
        }
    }

    /// The merge is commutative on kind and limits, associative, idempotent,
    /// and its result is at least as strict as both inputs.
    #[test]
    fn effect_merge_laws(a in effect(true), b in effect(true), c in effect(true)) {
        let ab = a.merge(&b);
        prop_assert_eq!(ab.kind(), b.merge(&a).kind());
        prop_assert_eq!(ab.kind(), a.kind().max(b.kind()));
        prop_assert_eq!(numeric(&ab), numeric(&b.merge(&a)));
        prop_assert_eq!(numeric(&ab.merge(&c)), numeric(&a.merge(&b.merge(&c))));
        prop_assert_eq!(a.merge(&a), a.clone());
        prop_assert!(ab.is_at_least_as_strict_as(&a), "{:?} vs {:?}", ab, a);
        prop_assert!(ab.is_at_least_as_strict_as(&b), "{:?} vs {:?}", ab, b);
        prop_assert_eq!(
            EffectKind::Allow.max(a.kind()),
            a.merge(&Effect::Allow).kind()
        );
    }
}

// === The client decides as the core does ===

/// What the client's lock-free decision says, reasons once each.
fn client_said(subscriber: &safemode_client::Subscriber, action: &str, ctx: &Context) -> Said {
    let action = safemode_policy::Action::parse(action).unwrap();
    let d = subscriber.decide(&action, ctx);
    assert!(!d.is_stale() && !d.is_fail_closed());
    Said {
        outcome: d.outcome().clone(),
        reasons: d.reasons().cloned().collect(),
        customer_message: d.customer_message().map(str::to_string),
        agent_script: d.agent_script().map(str::to_string),
    }
}

/// A channel's snapshot as the controller sends it, received by a client.
fn received(
    policy: &EffectivePolicy,
    activations: &[Activation],
    channel: Channel,
) -> safemode_client::PolicySnapshot {
    use safemode_wire::{self as wire, proto};
    let namespace = safemode_policy::Namespace::live();
    let wire = proto::Snapshot {
        schema_version: wire::SCHEMA_VERSION,
        namespace: namespace.to_string(),
        channel: channel.as_str().to_string(),
        revision: 42,
        issued_at: Some(wire::timestamp_to_wire(Timestamp::UNIX_EPOCH)),
        activations: activations
            .iter()
            .filter(|a| a.channels.contains(channel))
            .map(wire::activation_to_wire)
            .collect(),
        rules: Some(wire::channel_policy_to_wire(policy.channel(channel))),
        epoch: "e".into(),
        ..Default::default()
    };
    safemode_client::PolicySnapshot::from_wire(wire, &namespace, channel).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// For any policy and context, the client's decision (from the snapshot
    /// as sent over the wire, without a lock) is the core evaluator's:
    /// outcome, texts, and reasons (each once).
    #[test]
    fn the_client_decides_as_the_core_does(activations in activations(), ctxs in contexts()) {
        let policy = EffectivePolicy::compile(&activations);
        for channel in Channel::all() {
            let snapshot = received(&policy, &activations, channel);
            // A policy read from the wire has the outcomes verdicts point at:
            // the client decides through them, not by merging each time.
            prop_assert!(snapshot.policy.has_outcomes());
            let subscriber = safemode_client::Subscriber::fixed(snapshot);
            for action in actions() {
                for ctx in &ctxs {
                    let mut core = said(&policy, channel, action, ctx);
                    let mut seen = Vec::new();
                    core.reasons.retain(|id| {
                        let first = !seen.contains(id);
                        seen.push(id.clone());
                        first
                    });
                    let client = client_said(&subscriber, action, ctx);
                    prop_assert_eq!(client, core, "{} {} {:?}", channel, action, ctx);
                }
            }
        }
    }
}
