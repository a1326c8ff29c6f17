//! Paths through a policy: whether a genuine customer can still get an
//! action done somewhere, and where the channels disagree.
//!
//! Controlled degradation must not trap genuine customers in dead ends. A
//! customer has a path through an action on a channel when the channel's
//! policy lets the action go ahead there, even with friction (`allow`,
//! `throttle`, `step_up`, `review`), serves it read-only when the action
//! only reads (`*.view`), or routes it to a channel through which the
//! customer has a path. An action with no path on any channel is a dead end:
//! account recovery denied everywhere, or a route to a channel that itself
//! refuses. Conditions are left aside: a condition only tightens the base
//! effect for some customers, and a genuine customer can meet the base.

use super::compile::EffectivePolicy;
use super::effect::Effect;
use super::names::{ACTIONS, Channel, ChannelSet};

/// An action no customer can get done on any channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadEnd {
    /// The action.
    pub action: &'static str,
    /// Why each channel offers no path, by channel.
    pub channels: Vec<(Channel, Blocked)>,
}

impl DeadEnd {
    /// `account.recovery (deny on every channel)`, or per channel:
    /// `account.recovery (chatbot route to mobile, which offers no path, …,
    /// mobile deny)`, in one line.
    pub fn describe(&self) -> String {
        match self.channels.split_first() {
            Some(((_, first), rest)) if rest.iter().all(|(_, b)| b == first) => {
                format!("{} ({first} on every channel)", self.action)
            }
            _ => {
                let why: Vec<String> = self
                    .channels
                    .iter()
                    .map(|(channel, blocked)| format!("{channel} {blocked}"))
                    .collect();
                format!("{} ({})", self.action, why.join(", "))
            }
        }
    }
}

/// Why a channel offers no path through an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The action is denied there.
    Denied,
    /// The channel is read-only and the action writes.
    ReadOnly,
    /// The channel routes the action to channels that offer no path either
    /// (or to none).
    RoutedNowhere(ChannelSet),
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocked::Denied => f.write_str("deny"),
            Blocked::ReadOnly => f.write_str("read_only"),
            Blocked::RoutedNowhere(to) if to.is_empty() => f.write_str("route to no channel"),
            Blocked::RoutedNowhere(to) => write!(f, "route to {to}, which offers no path"),
        }
    }
}

/// Whether `action` only reads (read-only service still serves it).
fn only_reads(action: &str) -> bool {
    action.ends_with(".view")
}

/// Whether a customer has a path through `action` on `channel`, following
/// routes (a route back to a channel already on the way is no path).
pub fn path(policy: &EffectivePolicy, channel: Channel, action: &str) -> Result<(), Blocked> {
    path_avoiding(policy, channel, action, ChannelSet::NONE)
}

fn path_avoiding(
    policy: &EffectivePolicy,
    channel: Channel,
    action: &str,
    visited: ChannelSet,
) -> Result<(), Blocked> {
    let base = policy
        .channel(channel)
        .lookup(action)
        .and_then(|p| p.base.as_ref());
    match base.map(|entry| &entry.effect) {
        None
        | Some(Effect::Allow)
        | Some(Effect::Throttle(_))
        | Some(Effect::StepUp(_))
        | Some(Effect::Review(_)) => Ok(()),
        Some(Effect::ReadOnly(_)) if only_reads(action) => Ok(()),
        Some(Effect::ReadOnly(_)) => Err(Blocked::ReadOnly),
        Some(Effect::Deny(_)) => Err(Blocked::Denied),
        Some(Effect::Route(route)) => {
            let visited = visited.with(channel);
            let open = route.to.iter().any(|to| {
                !visited.contains(to) && path_avoiding(policy, to, action, visited).is_ok()
            });
            if open {
                Ok(())
            } else {
                Err(Blocked::RoutedNowhere(route.to))
            }
        }
    }
}

/// Every known action (not the open `bot.intent.*` family: a bot's intents
/// are its own) that `policy` leaves with no path on any channel.
pub fn dead_ends(policy: &EffectivePolicy) -> Vec<DeadEnd> {
    ACTIONS
        .iter()
        .filter_map(|action| {
            let mut channels = Vec::new();
            for channel in Channel::all() {
                match path(policy, channel, action) {
                    Ok(()) => return None,
                    Err(blocked) => channels.push((channel, blocked)),
                }
            }
            Some(DeadEnd { action, channels })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::{Activation, ActivationId, Change, Reason};
    use crate::mode_file::parse_mode;

    fn policy(modes: &[&str]) -> EffectivePolicy {
        let change = Change {
            principal: "test".into(),
            reason: Reason::parse("test").unwrap(),
            at: jiff::Timestamp::UNIX_EPOCH,
            incident_id: None,
        };
        let activations: Vec<Activation> = modes
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let mode = parse_mode("m.yaml", &format!("m{i}"), text).unwrap();
                Activation::new(
                    ActivationId::from_random(i as u64),
                    &mode,
                    ChannelSet::ALL,
                    jiff::Timestamp::UNIX_EPOCH,
                    &change,
                )
            })
            .collect();
        EffectivePolicy::compile(activations.iter())
    }

    fn mode(rules: &str) -> String {
        format!("title: t\nsummary: s\nrules:\n{rules}")
    }

    #[test]
    fn an_action_is_a_dead_end_only_when_no_channel_offers_a_path() {
        let deny_recovery_everywhere = mode(
            "  - channels: [\"*\"]\n    actions: [account.recovery]\n    effect: {deny: {}}\n",
        );
        let deny_recovery_but_web = mode(
            "  - channels: [chatbot, ivr, agent-desk, mobile, email]\n    actions: [account.recovery]\n    effect: {deny: {}}\n",
        );
        let route_to_a_denying_channel = mode(concat!(
            "  - channels: [chatbot, ivr, agent-desk, web, email]\n    actions: [account.recovery]\n    effect: {route: {to: [mobile]}}\n",
            "  - channels: [mobile]\n    actions: [account.recovery]\n    effect: {deny: {}}\n",
        ));
        let route_to_an_open_channel = mode(
            "  - channels: [chatbot, ivr, agent-desk, web, email]\n    actions: [account.recovery]\n    effect: {route: {to: [mobile]}}\n",
        );
        let read_only_everywhere =
            mode("  - channels: [\"*\"]\n    actions: [\"*\"]\n    effect: {read_only: {}}\n");
        let review_everywhere = mode(
            "  - channels: [\"*\"]\n    actions: [account.recovery]\n    effect: {review: {queue: q}}\n",
        );
        let cases: [(&str, &str, Vec<&str>); 6] = [
            (
                "deny everywhere",
                &deny_recovery_everywhere,
                vec!["account.recovery"],
            ),
            ("deny but on web", &deny_recovery_but_web, vec![]),
            (
                "route to a denying channel",
                &route_to_a_denying_channel,
                vec!["account.recovery"],
            ),
            (
                "route to an open channel",
                &route_to_an_open_channel,
                vec![],
            ),
            (
                "read-only everywhere: every write, not the views",
                &read_only_everywhere,
                ACTIONS
                    .iter()
                    .copied()
                    .filter(|a| !a.ends_with(".view"))
                    .collect(),
            ),
            ("review is a path", &review_everywhere, vec![]),
        ];
        for (case, text, want) in cases {
            let found: Vec<&str> = dead_ends(&policy(&[text]))
                .iter()
                .map(|d| d.action)
                .collect();
            assert_eq!(found, want, "{case}");
        }
    }

    #[test]
    fn a_dead_end_says_why_on_each_channel() {
        let text = mode(concat!(
            "  - channels: [chatbot, ivr, agent-desk, web, email]\n    actions: [account.recovery]\n    effect: {route: {to: [mobile]}}\n",
            "  - channels: [mobile]\n    actions: [account.recovery]\n    effect: {deny: {}}\n",
        ));
        let dead = dead_ends(&policy(&[&text]));
        assert_eq!(
            dead[0].describe(),
            "account.recovery (chatbot route to mobile, which offers no path, ivr route to mobile, which offers no path, agent-desk route to mobile, which offers no path, web route to mobile, which offers no path, mobile deny, email route to mobile, which offers no path)"
        );
    }
}
