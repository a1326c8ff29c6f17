//! What a channel service can export about its subscriber, through the
//! OpenTelemetry metrics API (the `opentelemetry` crate alone: the service
//! picks its SDK, exporter and meter provider, and hands a [`Meter`] to
//! [`Subscriber::register_metrics`](crate::Subscriber::register_metrics)).
//!
//! Decisions are counted once, in the tally the report also reads
//! (`reporting.rs`: one relaxed atomic addition on the decide path, the
//! action's row found when the `Action` was parsed), and reported by
//! observable instruments when the service's SDK collects: the counts that
//! left the tallies plus those still in them, summed under the book's lock
//! (never on the decide path), so a counter never goes backwards. `decide`
//! stays lock-free and allocation-free. No metric
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

/// The subscriber's applies and rejects since it started (its decisions
/// are in its tallies: [`Totals`](crate::reporting::Totals)).
#[derive(Debug, Default)]
pub(crate) struct Counts {
    applies: AtomicU64,
    rejects: AtomicU64,
}

impl Counts {
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
    let observe = |name: &'static str, description: &'static str, read: fn(&Shared) -> u64| {
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let base = base.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observer| {
                if let Some(shared) = weak.upgrade() {
                    observer.observe(read(&shared), &base);
                }
            })
            .build();
    };
    observe(
        "safemode.client.decisions.stale",
        "Decisions made while the policy may be out of date",
        |s| s.book.totals().stale,
    );
    observe(
        "safemode.client.decisions.failed_closed",
        "Decisions a fail-closed rule turned into review or deny",
        |s| s.book.totals().failed_closed,
    );
    observe("safemode.client.applies", "Snapshots applied", |s| {
        s.counts.applies.load(Ordering::Relaxed)
    });
    observe(
        "safemode.client.rejects",
        "Snapshots rejected (unusable, unsigned, or older than the one applied)",
        |s| s.counts.rejects.load(Ordering::Relaxed),
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
            let totals = shared.book.totals();
            for (slot, effects) in totals.decisions.iter().enumerate() {
                for (effect, &n) in EFFECTS.iter().zip(effects) {
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
    use crate::reporting::{Book, Rows, Tally, Totals};
    use safemode_policy::ContextClass;

    #[test]
    fn every_action_and_effect_has_its_own_counter() {
        let book = Arc::new(Book::default());
        let tally = Tally::new(&book, 3);
        let action = |name: &str| Action::parse(name).unwrap();
        let class = ContextClass::from_index(0).unwrap();
        let decided = |tally: &Tally, name: &str, effect, stale, failed_closed| {
            tally.count(
                action_slot(&action(name)),
                class,
                effect,
                stale,
                failed_closed,
            );
        };
        decided(
            &tally,
            "account.password_reset",
            EffectKind::Deny,
            false,
            false,
        );
        decided(&tally, "bot.intent.refund", EffectKind::Allow, true, false);
        let at = |totals: &Totals, name: &str, effect| {
            totals.decisions[action_slot(&action(name))][effect_slot(effect)]
        };
        let totals = book.totals();
        assert_eq!(at(&totals, "account.password_reset", EffectKind::Deny), 1);
        assert_eq!(at(&totals, "account.password_reset", EffectKind::Allow), 0);
        assert_eq!(at(&totals, "bot.intent.x", EffectKind::Allow), 1);
        // Drained for a report, the counts stay in the metrics; a dropped
        // tally's too.
        tally.drain(3, &mut Rows::default());
        let other = Tally::new(&book, 4);
        decided(&other, "bot.intent.other", EffectKind::Allow, true, true);
        assert_eq!(book.totals().stale, 2);
        drop(other);
        let totals = book.totals();
        assert_eq!(at(&totals, "bot.intent.x", EffectKind::Allow), 2);
        assert_eq!(totals.stale, 2);
        assert_eq!(totals.failed_closed, 1);
        assert_eq!(
            action_name(action_slot(&action("bot.intent.x"))),
            "bot.intent"
        );
        // Each known action has its own row, named as it was parsed.
        for name in ACTIONS {
            assert_eq!(action_name(action_slot(&action(name))), name);
        }
        for (i, effect) in EFFECTS.iter().enumerate() {
            assert_eq!(effect_slot(*effect), i);
        }
    }
}
