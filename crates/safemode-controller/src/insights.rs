//! What the policy in force and the channels' reports show a commander:
//!
//! - the **inconsistency map**: static, each sensitive action's outcome on
//!   every channel for an unverified customer (what an attacker starts
//!   with), weakest channel first; live, the same action and context class
//!   decided differently across channels, subscribers or revisions;
//! - **soft downtime**: channels up but failing (stale or rejecting
//!   subscribers, every decision failing closed, an action nearly always
//!   refused);
//! - **dead ends**: actions no channel offers a path through.
//!
//! Pure: the edge gathers the fleet's tallies and subscriber states and
//! hands them in.

use std::collections::{BTreeMap, BTreeSet};

use safemode_policy::names::ACTIONS;
use safemode_policy::paths::{DeadEnd, dead_ends, path};
use safemode_policy::{
    Channel, Context, ContextClass, EffectKind, EffectivePolicy, Outcome, Revision,
};

use super::reports::Tallies;
use super::subscribers::SubscriberState;

/// Live differences listed, at most.
pub const MAX_LIVE: usize = 50;
/// Outcomes listed per live difference, at most.
pub const MAX_OUTCOMES: usize = 20;
/// Subscribers named per outcome, at most.
const MAX_NAMED: usize = 3;
/// An action counts as nearly always refused on a channel when at least
/// this share of at least [`REFUSED_MIN_DECISIONS`] decisions were denials.
const REFUSED_SHARE: f64 = 0.95;
const REFUSED_MIN_DECISIONS: u64 = 20;

/// One action across the channels.
#[derive(Clone, Debug)]
pub struct ActionMap {
    pub action: &'static str,
    /// Weakest first.
    pub channels: Vec<(Channel, Outcome)>,
    /// The channels do not all decide alike.
    pub differs: bool,
    /// When they differ: the weakest channel that itself offers the
    /// customer a path through the action (not one that routes elsewhere,
    /// denies, or serves a write read-only), if any does.
    pub easiest: Option<Channel>,
}

/// Who decided what, in one live difference.
#[derive(Clone, Debug, PartialEq)]
pub struct OutcomeTally {
    pub channel: Channel,
    pub revision: Revision,
    pub effect: EffectKind,
    pub stale: bool,
    pub failed_closed: bool,
    pub count: u64,
    /// The revision is older than the namespace's.
    pub old_revision: bool,
    /// Subscribers of the channel that decided on that revision stale or
    /// failing closed, or on an old revision (at most a few).
    pub subscribers: Vec<String>,
}

/// The same action and context class decided differently.
#[derive(Clone, Debug)]
pub struct LiveDifference {
    pub action: String,
    pub class: ContextClass,
    pub outcomes: Vec<OutcomeTally>,
    pub total: u64,
    pub across_channels: bool,
}

/// A channel up and still failing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoftDowntime {
    pub channel: Channel,
    /// `stale`, `rejecting`, `failing_closed` or `refused`.
    pub kind: &'static str,
    pub detail: String,
}

/// Everything insights shows.
#[derive(Clone, Debug)]
pub struct Insights {
    pub static_map: Vec<ActionMap>,
    pub live: Vec<LiveDifference>,
    pub soft_downtime: Vec<SoftDowntime>,
    pub dead_ends: Vec<DeadEnd>,
    /// Decisions reported in the window.
    pub decisions: u64,
}

/// Whether the map looks at `action`: everything but reading and intake.
pub fn is_sensitive(action: &str) -> bool {
    !action.ends_with(".view") && action != "contact.intake"
}

/// Insights from `policy` (in force at `current`), the fleet's `tallies`
/// over the window, and its subscribers' `states` by channel.
pub fn insights(
    policy: &EffectivePolicy,
    current: Revision,
    tallies: &Tallies,
    states: &[(Channel, SubscriberState, u32)],
) -> Insights {
    Insights {
        static_map: static_map(policy),
        live: live(current, tallies),
        soft_downtime: soft_downtime(tallies, states),
        dead_ends: dead_ends(policy),
        decisions: tallies
            .decisions
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n)),
    }
}

/// For an unverified customer (no verification, low confidence, no
/// amount given, no hand-off): each sensitive action on every channel.
fn static_map(policy: &EffectivePolicy) -> Vec<ActionMap> {
    let unverified = Context::default();
    ACTIONS
        .iter()
        .filter(|a| is_sensitive(a))
        .map(|action| {
            let mut channels: Vec<(Channel, Outcome)> = Channel::all()
                .map(|channel| {
                    let outcome = policy.channel(channel).decide(action, &unverified).outcome;
                    (channel, outcome)
                })
                .collect();
            channels.sort_by_key(|(channel, outcome)| (outcome.kind(), channel.index()));
            let differs = channels.windows(2).any(|w| w[0].1.kind() != w[1].1.kind());
            // A channel that routes the customer elsewhere is no path by
            // itself, nor one that offers none (the dead-end test): the
            // easiest is the weakest that is one.
            let easiest = channels
                .iter()
                .find(|(channel, outcome)| {
                    outcome.kind() < EffectKind::Route && path(policy, *channel, action).is_ok()
                })
                .map(|(channel, _)| *channel);
            ActionMap {
                action,
                differs,
                easiest: easiest.filter(|_| differs),
                channels,
            }
        })
        .collect()
}

fn live(current: Revision, tallies: &Tallies) -> Vec<LiveDifference> {
    type Key = (Channel, Revision, EffectKind, bool, bool);
    let mut groups: BTreeMap<(&str, ContextClass), BTreeMap<Key, u64>> = BTreeMap::new();
    for (row, n) in &tallies.decisions {
        let key = (
            row.channel,
            row.revision,
            row.effect,
            row.stale,
            row.failed_closed,
        );
        let count = groups
            .entry((&row.action, row.class))
            .or_default()
            .entry(key)
            .or_default();
        *count = count.saturating_add(*n);
    }
    let mut differences: Vec<LiveDifference> = groups
        .into_iter()
        .filter_map(|((action, class), outcomes)| {
            let effects: BTreeSet<EffectKind> = outcomes.keys().map(|k| k.2).collect();
            if effects.len() < 2 {
                return None;
            }
            let by_channel: BTreeMap<Channel, BTreeSet<EffectKind>> =
                outcomes.keys().fold(BTreeMap::new(), |mut m, k| {
                    m.entry(k.0).or_insert_with(BTreeSet::new).insert(k.2);
                    m
                });
            let across_channels = by_channel.values().collect::<BTreeSet<_>>().len() > 1;
            let total = outcomes
                .values()
                .fold(0u64, |sum, n| sum.saturating_add(*n));
            let mut outcomes: Vec<OutcomeTally> = outcomes
                .into_iter()
                .map(
                    |((channel, revision, effect, stale, failed_closed), count)| {
                        let old_revision = revision < current;
                        let subscribers = if old_revision || stale || failed_closed {
                            tallies
                                .notable
                                .iter()
                                .filter(|(n, _)| {
                                    n.channel == channel
                                        && n.revision == revision
                                        && n.stale == stale
                                        && n.failed_closed == failed_closed
                                })
                                .take(MAX_NAMED)
                                .map(|(n, _)| n.subscriber.to_string())
                                .collect()
                        } else {
                            Vec::new()
                        };
                        OutcomeTally {
                            channel,
                            revision,
                            effect,
                            stale,
                            failed_closed,
                            count,
                            old_revision,
                            subscribers,
                        }
                    },
                )
                .collect();
            // The weakest first (the easiest path), then the most decided.
            outcomes.sort_by(|a, b| a.effect.cmp(&b.effect).then(b.count.cmp(&a.count)));
            outcomes.truncate(MAX_OUTCOMES);
            Some(LiveDifference {
                action: action.to_string(),
                class,
                outcomes,
                total,
                across_channels,
            })
        })
        .collect();
    differences.sort_by(|a, b| b.total.cmp(&a.total).then(a.action.cmp(&b.action)));
    differences.truncate(MAX_LIVE);
    differences
}

fn soft_downtime(
    tallies: &Tallies,
    states: &[(Channel, SubscriberState, u32)],
) -> Vec<SoftDowntime> {
    let mut found = Vec::new();
    let mut totals: BTreeMap<Channel, u32> = BTreeMap::new();
    for (channel, _, n) in states {
        let total = totals.entry(*channel).or_default();
        *total = total.saturating_add(*n);
    }
    for (channel, state, n) in states {
        if *n == 0 {
            continue;
        }
        let of = totals[channel];
        let kind = match state {
            SubscriberState::Stale => "stale",
            SubscriberState::Rejected => "rejecting",
            SubscriberState::Synced | SubscriberState::NotAcked => continue,
        };
        let what = match state {
            SubscriberState::Stale => "enforce an older revision than the one in force",
            _ => "rejected the policy in force and enforce an older one",
        };
        found.push(SoftDowntime {
            channel: *channel,
            kind,
            detail: format!("{n} of {of} subscribers {what}"),
        });
    }
    // Per channel: every decision failing closed; per action: nearly all
    // refused.
    let mut decided: BTreeMap<Channel, (u64, u64)> = BTreeMap::new();
    let mut by_action: BTreeMap<(Channel, &str), (u64, u64)> = BTreeMap::new();
    for (row, n) in &tallies.decisions {
        let d = decided.entry(row.channel).or_default();
        d.0 = d.0.saturating_add(*n);
        if row.failed_closed {
            d.1 = d.1.saturating_add(*n);
        }
        let a = by_action.entry((row.channel, &row.action)).or_default();
        a.0 = a.0.saturating_add(*n);
        if row.effect == EffectKind::Deny {
            a.1 = a.1.saturating_add(*n);
        }
    }
    for (channel, (all, failed)) in decided {
        if all > 0 && failed == all {
            found.push(SoftDowntime {
                channel,
                kind: "failing_closed",
                detail: format!(
                    "all {all} decisions in the window failed closed: its subscribers have lost the controller"
                ),
            });
        }
    }
    for ((channel, action), (all, denied)) in by_action {
        if all >= REFUSED_MIN_DECISIONS && denied as f64 >= REFUSED_SHARE * all as f64 {
            found.push(SoftDowntime {
                channel,
                kind: "refused",
                detail: format!("{action}: {denied} of {all} decisions in the window were denials"),
            });
        }
    }
    found.sort_by(|a, b| (a.channel.index(), a.kind).cmp(&(b.channel.index(), b.kind)));
    found
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::reports::{DecisionRow, NotableRow};
    use safemode_policy::{ConfidenceBand, MethodClass};

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    const UNVERIFIED: ContextClass = ContextClass {
        confidence: ConfidenceBand::Low,
        method: MethodClass::None,
        handoff: false,
        attempts_exhausted: false,
    };

    fn row(channel: &str, revision: Revision, effect: EffectKind) -> DecisionRow {
        DecisionRow {
            channel: ch(channel),
            revision,
            action: "account.email_change".into(),
            class: UNVERIFIED,
            effect,
            stale: false,
            failed_closed: false,
        }
    }

    #[test]
    fn the_live_map_ranks_differences_and_names_old_revisions() {
        let mut stale = row("ivr", 6, EffectKind::Allow);
        stale.stale = true;
        let tallies = Tallies {
            decisions: vec![
                (row("web", 7, EffectKind::StepUp), 40),
                (row("agent-desk", 7, EffectKind::Allow), 25),
                (stale.clone(), 5),
            ],
            notable: vec![(
                NotableRow {
                    channel: ch("ivr"),
                    subscriber: Arc::from("ivr-2"),
                    revision: 6,
                    stale: true,
                    failed_closed: false,
                },
                5,
            )],
            ..Tallies::default()
        };
        let live = live(7, &tallies);
        assert_eq!(live.len(), 1);
        let d = &live[0];
        assert_eq!((d.total, d.across_channels), (70, true));
        let shown: Vec<_> = d
            .outcomes
            .iter()
            .map(|o| {
                (
                    o.channel.as_str(),
                    o.effect,
                    o.old_revision,
                    o.subscribers.clone(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("agent-desk", EffectKind::Allow, false, vec![]),
                ("ivr", EffectKind::Allow, true, vec!["ivr-2".to_string()]),
                ("web", EffectKind::StepUp, false, vec![]),
            ]
        );
        // Alike everywhere: no difference.
        let alike = Tallies {
            decisions: vec![
                (row("web", 7, EffectKind::StepUp), 4),
                (row("ivr", 7, EffectKind::StepUp), 4),
            ],
            ..Tallies::default()
        };
        assert!(super::live(7, &alike).is_empty());
    }

    #[test]
    fn soft_downtime_names_each_way_a_channel_fails() {
        let mut failing = row("chatbot", 7, EffectKind::Deny);
        failing.stale = true;
        failing.failed_closed = true;
        let mut recovery = row("web", 7, EffectKind::Deny);
        recovery.action = "account.recovery".into();
        let tallies = Tallies {
            decisions: vec![
                (failing, 12),
                (recovery.clone(), 30),
                (row("web", 7, EffectKind::StepUp), 3),
                (row("ivr", 7, EffectKind::Deny), 5),
            ],
            ..Tallies::default()
        };
        let states = [
            (ch("ivr"), SubscriberState::Synced, 3),
            (ch("ivr"), SubscriberState::Stale, 1),
            (ch("mobile"), SubscriberState::Rejected, 2),
        ];
        let found: Vec<_> = soft_downtime(&tallies, &states)
            .into_iter()
            .map(|s| (s.channel.as_str(), s.kind, s.detail))
            .collect();
        assert_eq!(
            found,
            vec![
                ("chatbot", "failing_closed", "all 12 decisions in the window failed closed: its subscribers have lost the controller".to_string()),
                ("ivr", "stale", "1 of 4 subscribers enforce an older revision than the one in force".to_string()),
                ("web", "refused", "account.recovery: 30 of 30 decisions in the window were denials".to_string()),
                ("mobile", "rejecting", "2 of 2 subscribers rejected the policy in force and enforce an older one".to_string()),
            ]
        );
    }

    #[test]
    fn the_static_map_names_the_weakest_channel_first() {
        let policy = EffectivePolicy::compile(std::iter::empty());
        let map = static_map(&policy);
        // Nothing active: every channel allows alike, nobody is easiest.
        assert!(map.iter().all(|m| m.easiest.is_none()));
        assert!(map.iter().all(|m| is_sensitive(m.action)));
        assert!(!map.iter().any(|m| m.action == "order.view"));
    }
}
