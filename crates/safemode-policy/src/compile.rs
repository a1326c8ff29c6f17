//! The effective policy: every active activation merged, per channel, into
//! tables that a channel evaluates with a lookup.
//!
//! Keys are the action names and dotted prefixes that the rules mention
//! (`account.password_reset`, `account.*`, `*`). An action is looked up at its
//! own name, then at each of its prefixes from the longest, then at `*`; the
//! entry found already includes every rule that covers the action, because a
//! rule is compiled into every key it covers entirely. Merging puts the rules
//! of a key in one canonical order (most specific selector first, then by
//! revision, activation id and rule index), so the same activations give the
//! same tables on every replica, in any order; the first rule with the
//! winning effect is the one whose messages and queue are used.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::activation::{Activation, ActivationId};
use super::decide::{Known, Stamp};
use super::effect::{Effect, Throttle};
use super::mode::{Condition, Rule};
use super::names::{ACTIONS, ActionSelector, Channel, NameError};

/// One merged rule set for an action key: the effect of every rule that shares
/// a condition (or has none).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// When the entry applies; `None` for the base entry.
    pub when: Option<Condition>,
    /// The merged effect.
    pub effect: Effect,
    /// The merged throttle of every rule behind the entry, whatever the top
    /// effect: a satisfied step-up leaves it in force.
    pub throttle: Option<StandingThrottle>,
    /// Activations whose rules the entry merges, in canonical order.
    pub activation_ids: Vec<ActivationId>,
    /// Message for the customer, from the leading rule or its mode's notice.
    pub customer_message: Option<Arc<str>>,
    /// Script for the agent, from the leading rule or its mode's script.
    pub agent_script: Option<Arc<str>>,
}

/// A throttle that stands whatever the top effect is, with the messages of
/// the throttle rule that leads it.
#[derive(Clone, Debug, PartialEq)]
pub struct StandingThrottle {
    /// The merged limit.
    pub limit: Throttle,
    /// Message for the customer when the throttle is the outcome.
    pub customer_message: Option<Arc<str>>,
    /// Script for the agent when the throttle is the outcome.
    pub agent_script: Option<Arc<str>>,
}

/// The compiled policy for one action key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActionPolicy {
    /// Applies always; `None` means allow.
    pub base: Option<Entry>,
    /// Apply when their condition holds, in canonical condition order.
    pub conditional: Vec<Entry>,
}

/// The effective policy for one channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelPolicy {
    exact: HashMap<Box<str>, ActionPolicy>,
    /// Keyed by the prefix without `.*`; `""` is `*`.
    prefix: HashMap<Box<str>, ActionPolicy>,
    /// What [`ChannelPolicy::lookup`] finds for each of [`ACTIONS`], by its
    /// position: a decision on a known action is one indexed read, not a
    /// hash of its name and of its prefixes, with its merges made
    /// beforehand. Made whenever a key is added.
    pub(crate) known: Box<[Option<Known>]>,
    /// Which compile made `known`: what a verdict is checked against when
    /// read.
    pub(crate) stamp: Stamp,
}

/// A rule of an activation that covers the channel being compiled.
struct Contribution<'a> {
    activation: &'a Activation,
    index: usize,
    rule: &'a Rule,
}

impl ChannelPolicy {
    /// Merges the activations that cover `channel`.
    pub fn compile<'a>(
        channel: Channel,
        activations: impl IntoIterator<Item = &'a Activation>,
    ) -> Self {
        let mut contributions: Vec<Contribution<'a>> = activations
            .into_iter()
            .filter(|a| a.covers(channel))
            .flat_map(|activation| {
                activation
                    .mode
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, rule)| rule.channels.contains(channel))
                    .map(move |(index, rule)| Contribution {
                        activation,
                        index,
                        rule,
                    })
            })
            .collect();
        contributions.sort_by(|a, b| {
            (a.activation.revision, &a.activation.id, a.index).cmp(&(
                b.activation.revision,
                &b.activation.id,
                b.index,
            ))
        });
        // The same activation given twice is one activation.
        contributions.dedup_by(|a, b| a.activation.id == b.activation.id && a.index == b.index);

        let mut exact_keys = BTreeSet::new();
        let mut prefix_keys = BTreeSet::from([""]);
        for c in &contributions {
            for selector in c.rule.actions.iter().chain(&c.rule.except) {
                match selector {
                    ActionSelector::Exact(a) => exact_keys.insert(a.as_str()),
                    ActionSelector::Prefix(p) => prefix_keys.insert(p.as_str()),
                };
            }
        }
        // `contributions` is in (revision, id, index) order; a stable sort by
        // specificity keeps that order among equally specific rules.
        let exact = exact_keys
            .into_iter()
            .map(|a| {
                let mut covering: Vec<&Contribution> = contributions
                    .iter()
                    .filter(|c| c.rule.covers_action(a))
                    .collect();
                covering.sort_by_key(|c| Reverse(c.rule.specificity_for_action(a)));
                (Box::from(a), ActionPolicy::merge(&covering))
            })
            .collect();
        let prefix = prefix_keys
            .into_iter()
            .map(|p| {
                let mut covering: Vec<&Contribution> = contributions
                    .iter()
                    .filter(|c| c.rule.covers_all_under(p))
                    .collect();
                covering.sort_by_key(|c| Reverse(c.rule.specificity_under(p)));
                (Box::from(p), ActionPolicy::merge(&covering))
            })
            .collect();
        let mut policy = ChannelPolicy {
            exact,
            prefix,
            known: Box::default(),
            stamp: Stamp::default(),
        };
        // The controller compiles a policy for every channel of every
        // namespace and decides with few of them: the outcomes that
        // verdicts point at are made where verdicts are read
        // ([`ChannelPolicy::make_outcomes`]; a subscriber's policy, read from
        // the wire, has them).
        policy.index_known();
        policy
    }

    /// The policy for `action`: its own key, else its longest prefix key,
    /// else `*`. `None` means no rule covers it (allow).
    pub fn lookup(&self, action: &str) -> Option<&ActionPolicy> {
        if let Some(policy) = self.exact.get(action) {
            return Some(policy);
        }
        let mut end = action.len();
        while let Some(dot) = action[..end].rfind('.') {
            if let Some(policy) = self.prefix.get(&action[..dot]) {
                return Some(policy);
            }
            end = dot;
        }
        self.prefix.get("")
    }

    /// Adds a compiled key as written on the wire: `account.password_reset`,
    /// `account.*` or `*`. Only the key's shape is checked: a client must be
    /// able to use rules for actions newer than itself.
    pub fn insert(&mut self, key: &str, policy: ActionPolicy) -> Result<(), NameError> {
        self.insert_key(key, policy)?;
        self.index_known();
        self.make_outcomes();
        Ok(())
    }

    /// A channel policy of the compiled keys as written on the wire, each
    /// added as [`ChannelPolicy::insert`] does, with the known actions'
    /// tables made once, after the last key (their outcomes included: this
    /// is how a subscriber reads its policy).
    pub fn from_keys<'k>(
        keys: impl IntoIterator<Item = (&'k str, ActionPolicy)>,
    ) -> Result<ChannelPolicy, NameError> {
        let mut policy = ChannelPolicy::default();
        for (key, action) in keys {
            policy.insert_key(key, action)?;
        }
        policy.index_known();
        policy.make_outcomes();
        Ok(policy)
    }

    /// [`ChannelPolicy::insert`] without making the tables again.
    fn insert_key(&mut self, key: &str, policy: ActionPolicy) -> Result<(), NameError> {
        let bad = || NameError(format!("bad rule key '{key}'"));
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let (map, name) = if key == "*" {
            (&mut self.prefix, "")
        } else if let Some(p) = key.strip_suffix(".*") {
            (&mut self.prefix, p)
        } else {
            (&mut self.exact, key)
        };
        if !name.is_empty() && !name.split('.').all(segment_ok) {
            return Err(bad());
        }
        // Refused before anything changes: the tables stay those of the keys.
        if map.contains_key(name) {
            return Err(NameError(format!("rule key '{key}' appears twice")));
        }
        map.insert(Box::from(name), policy);
        Ok(())
    }

    /// Looks up every known action once, for [`ChannelPolicy::known`], and
    /// makes its merges (not their outcomes: [`ChannelPolicy::make_outcomes`]),
    /// under a new stamp.
    pub(crate) fn index_known(&mut self) {
        self.stamp = Stamp::next();
        self.known = ACTIONS
            .iter()
            .enumerate()
            .map(|(index, a)| {
                self.lookup(a)
                    .cloned()
                    .map(|policy| Known::new(policy, index))
            })
            .collect();
    }

    /// Makes, for every known action, the outcomes its merges resolve to,
    /// which [`ChannelPolicy::verdict`] points at rather than resolving the
    /// merge at each decision. A policy read from the wire
    /// ([`ChannelPolicy::from_keys`], [`ChannelPolicy::insert`]) has them; a
    /// compiled one ([`EffectivePolicy::compile`]) has them only once asked,
    /// as they are larger than the merges. A verdict made before this call
    /// reads the same; one made after it is caught if read with a copy of
    /// the policy from before it. Does nothing a second time.
    pub fn make_outcomes(&mut self) {
        for known in self.known.iter_mut().flatten() {
            if !known.has_outcomes() {
                known.make_outcomes(self.stamp);
            }
        }
    }

    /// Whether every known action's outcomes are made
    /// ([`ChannelPolicy::make_outcomes`]).
    pub fn has_outcomes(&self) -> bool {
        self.known.iter().flatten().all(Known::has_outcomes)
    }

    /// Every key as written on the wire, with its policy, in key order.
    pub fn entries(&self) -> Vec<(String, &ActionPolicy)> {
        let mut entries: Vec<(String, &ActionPolicy)> = self
            .exact
            .iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(self.prefix.iter().map(|(k, v)| {
                let key = if k.is_empty() {
                    "*".to_string()
                } else {
                    format!("{k}.*")
                };
                (key, v)
            }))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }
}

impl ActionPolicy {
    /// Groups the covering rules (in canonical order) by condition and merges
    /// each group.
    fn merge(covering: &[&Contribution]) -> Self {
        let mut base: Vec<&Contribution> = Vec::new();
        let mut groups: Vec<(&Condition, Vec<&Contribution>)> = Vec::new();
        for &c in covering {
            match &c.rule.when {
                None => base.push(c),
                Some(when) => match groups
                    .iter_mut()
                    .find(|(w, _)| w.canonical_cmp(when).is_eq())
                {
                    Some((_, group)) => group.push(c),
                    None => groups.push((when, vec![c])),
                },
            }
        }
        groups.sort_by(|a, b| a.0.canonical_cmp(b.0));
        ActionPolicy {
            base: Entry::merge(None, &base),
            conditional: groups
                .into_iter()
                .filter_map(|(when, group)| Entry::merge(Some(when.clone()), &group))
                .collect(),
        }
    }
}

impl Entry {
    /// Merges rules given in canonical order; `None` when there are none.
    fn merge(when: Option<Condition>, rules: &[&Contribution]) -> Option<Entry> {
        let (first, rest) = rules.split_first()?;
        let effect = rest.iter().fold(first.rule.effect.clone(), |acc, c| {
            acc.merge(&c.rule.effect)
        });
        let mut throttles = rules.iter().filter_map(|c| match c.rule.effect {
            Effect::Throttle(t) => Some((t, c)),
            _ => None,
        });
        let throttle = throttles
            .next()
            .map(|(first_limit, leader)| StandingThrottle {
                limit: throttles.fold(first_limit, |acc, (t, _)| acc.merge(t)),
                customer_message: leader.customer_message(),
                agent_script: leader.agent_script(),
            });
        // Messages come from the first rule with the winning kind, the same
        // rule whose text parameters the fold kept.
        let leader = rules
            .iter()
            .find(|c| c.rule.effect.kind() == effect.kind())
            .unwrap_or(first);
        let mut activation_ids: Vec<ActivationId> = Vec::new();
        for c in rules {
            if !activation_ids.contains(&c.activation.id) {
                activation_ids.push(c.activation.id.clone());
            }
        }
        Some(Entry {
            when,
            effect,
            throttle,
            activation_ids,
            customer_message: leader.customer_message(),
            agent_script: leader.agent_script(),
        })
    }
}

impl Contribution<'_> {
    /// The rule's message, else its mode's notice.
    fn customer_message(&self) -> Option<Arc<str>> {
        self.rule
            .customer_message
            .clone()
            .or_else(|| self.activation.mode.customer_notice.clone())
    }

    /// The rule's script, else its mode's script.
    fn agent_script(&self) -> Option<Arc<str>> {
        self.rule
            .agent_script
            .clone()
            .or_else(|| self.activation.mode.agent_script.clone())
    }
}

/// The effective policy of a namespace: one [`ChannelPolicy`] per channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EffectivePolicy {
    channels: Vec<ChannelPolicy>,
}

impl EffectivePolicy {
    /// Merges `activations` for every channel.
    pub fn compile<'a>(activations: impl IntoIterator<Item = &'a Activation> + Clone) -> Self {
        EffectivePolicy {
            channels: Channel::all()
                .map(|channel| ChannelPolicy::compile(channel, activations.clone()))
                .collect(),
        }
    }

    /// The policy of one channel.
    pub fn channel(&self, channel: Channel) -> &ChannelPolicy {
        &self.channels[channel.index()]
    }
}
