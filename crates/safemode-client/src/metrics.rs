//! What a channel service can export about its subscriber, through the
//! OpenTelemetry metrics API (the `opentelemetry` crate alone: the service
//! picks its SDK, exporter and meter provider, and hands a [`Meter`] to
//! [`Subscriber::register_metrics`](crate::Subscriber::register_metrics)).
//!
//! Decisions are counted in plain atomics on the decide path and reported
//! by observable instruments when the service's SDK collects, so that
//! `decide` stays lock-free and allocation-free: a decision costs one to
//! three relaxed atomic additions (the action's row was found when the
//! `Action` was parsed) (a few nanoseconds; under many threads deciding
//! at once, the counters' cache lines are shared between cores). No metric
//! is labelled with more than a fixed set: actions are the known ones, with
//! every `bot.intent.<name>` counted as `bot.intent`.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `safemode.client.decisions` | counter | `action`, `effect` |
//! | `safemode.client.decisions.stale` | counter | |
//! | `safemode.client.decisions.failed_closed` | counter | |
//! | `safemode.client.applied_revision` | gauge | |
//! | `safemode.client.applies` | counter | |
//! | `safemode.client.rejects` | counter | |
//!
//! Each also carries `namespace` and `channel`, the subscriber's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

use safemode_policy::names::{ACTIONS, BOT_INTENT_FAMILY};
use safemode_policy::{Action, EffectKind};

use super::state::Shared;

/// Every effect, in the order the counters keep them.
pub(crate) const EFFECTS: [EffectKind; 7] = [
    EffectKind::Allow,
    EffectKind::Throttle,
    EffectKind::StepUp,
    EffectKind::Review,
    EffectKind::ReadOnly,
    EffectKind::Route,
    EffectKind::Deny,
];

/// The known actions, then every bot intent together.
pub(crate) const ACTION_SLOTS: usize = ACTIONS.len() + 1;

/// The action's counter row: its place in [`ACTIONS`] (found when it was
/// parsed), or the last row for every `bot.intent.*`.
pub(crate) fn action_slot(action: &Action) -> usize {
    action.known_index().unwrap_or(ACTIONS.len())
}

pub(crate) fn action_name(slot: usize) -> &'static str {
    ACTIONS.get(slot).copied().unwrap_or(BOT_INTENT_FAMILY)
}

pub(crate) fn effect_slot(effect: EffectKind) -> usize {
    match effect {
        EffectKind::Allow => 0,
        EffectKind::Throttle => 1,
        EffectKind::StepUp => 2,
        EffectKind::Review => 3,
        EffectKind::ReadOnly => 4,
        EffectKind::Route => 5,
        EffectKind::Deny => 6,
    }
}

/// The subscriber's counts since it started.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    decisions: [[AtomicU64; EFFECTS.len()]; ACTION_SLOTS],
    stale: AtomicU64,
    failed_closed: AtomicU64,
    applies: AtomicU64,
    rejects: AtomicU64,
}

impl Counts {
    /// A decision of `action` with `effect`.
    #[inline]
    pub(crate) fn decided(
        &self,
        action: &Action,
        effect: EffectKind,
        stale: bool,
        failed_closed: bool,
    ) {
        self.decisions[action_slot(action)][effect_slot(effect)].fetch_add(1, Ordering::Relaxed);
        if stale {
            self.stale.fetch_add(1, Ordering::Relaxed);
        }
        if failed_closed {
            self.failed_closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot was applied.
    pub(crate) fn applied(&self) {
        self.applies.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot was rejected.
    pub(crate) fn rejected(&self) {
        self.rejects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Registers the observable instruments of `shared` on `meter`; they
/// report nothing once the subscriber is dropped.
pub(crate) fn register(meter: &Meter, shared: &Arc<Shared>, namespace: &str, channel: &str) {
    let base = [
        KeyValue::new("namespace", namespace.to_string()),
        KeyValue::new("channel", channel.to_string()),
    ];
    let observe = |name: &'static str, description: &'static str, read: fn(&Counts) -> u64| {
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let base = base.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(shared) = weak.upgrade() {
                    observer.observe(read(&shared.counts), &base);
                }
            })
            .build();
    };
    observe(
        "safemode.client.decisions.stale",
        "Decisions made while the policy may be out of date",
        |c| c.stale.load(Ordering::Relaxed),
    );
    observe(
        "safemode.client.decisions.failed_closed",
        "Decisions a fail-closed rule turned into review or deny",
        |c| c.failed_closed.load(Ordering::Relaxed),
    );
    observe("safemode.client.applies", "Snapshots applied", |c| {
        c.applies.load(Ordering::Relaxed)
    });
    observe(
        "safemode.client.rejects",
        "Snapshots rejected (unusable, unsigned, or older than the one applied)",
        |c| c.rejects.load(Ordering::Relaxed),
    );
    let weak = Arc::downgrade(shared);
    let labels = base.clone();
    meter
        .u64_observable_counter("safemode.client.decisions")
        .with_description("Decisions, by action and effect")
        .with_callback(move |observer| {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            for (slot, effects) in shared.counts.decisions.iter().enumerate() {
                for (effect, n) in EFFECTS.iter().zip(effects) {
                    let n = n.load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let mut attributes = labels.to_vec();
                    attributes.push(KeyValue::new("action", action_name(slot)));
                    attributes.push(KeyValue::new("effect", effect.as_str()));
                    observer.observe(n, &attributes);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    meter
        .i64_observable_gauge("safemode.client.applied_revision")
        .with_description(
            "The revision of the applied policy (like Unleash Edge's edge_last_applied_revision_id); absent before the first",
        )
        .with_callback(move |observer| {
            if let Some(shared) = weak.upgrade()
                && let Some(snapshot) = shared.current.load().as_deref()
            {
                observer.observe(snapshot.revision, &base);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_and_effect_has_its_own_counter() {
        let counts = Counts::default();
        let action = |name: &str| Action::parse(name).unwrap();
        counts.decided(
            &action("account.password_reset"),
            EffectKind::Deny,
            false,
            false,
        );
        counts.decided(&action("bot.intent.refund"), EffectKind::Allow, true, false);
        counts.decided(&action("bot.intent.other"), EffectKind::Allow, true, true);
        let at = |name: &str, effect| {
            counts.decisions[action_slot(&action(name))][effect_slot(effect)]
                .load(Ordering::Relaxed)
        };
        assert_eq!(at("account.password_reset", EffectKind::Deny), 1);
        assert_eq!(at("account.password_reset", EffectKind::Allow), 0);
        assert_eq!(at("bot.intent.x", EffectKind::Allow), 2);
        assert_eq!(
            action_name(action_slot(&action("bot.intent.x"))),
            "bot.intent"
        );
        // Each known action has its own row, named as it was parsed.
        for name in ACTIONS {
            assert_eq!(action_name(action_slot(&action(name))), name);
        }
        assert_eq!(counts.stale.load(Ordering::Relaxed), 2);
        assert_eq!(counts.failed_closed.load(Ordering::Relaxed), 1);
        for (i, effect) in EFFECTS.iter().enumerate() {
            assert_eq!(effect_slot(*effect), i);
        }
    }
}
