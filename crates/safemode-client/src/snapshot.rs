//! A snapshot as the client holds it: checked, converted into the policy core's
//! compiled rules, ready for lookups; and the owned report of a decision.

use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;

use safemode_policy::{
    Action, Channel, ChannelPolicy, Context, Decision, Namespace, Outcome, Revision,
};
use safemode_wire::{self as wire, SCHEMA_VERSION, WireError, proto};

/// An activation as a snapshot describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivationInfo {
    /// Activation id.
    pub id: String,
    /// Mode name.
    pub mode: String,
    /// Mode title.
    pub title: String,
    /// Channels covered; `["*"]` means all.
    pub channels: Vec<String>,
    /// Why it was applied.
    pub reason: String,
    /// Who applied it.
    pub principal: String,
    /// When.
    pub applied_at: Option<Timestamp>,
    /// Revision of the change that applied it.
    pub revision: Revision,
}

/// The policy of one channel at one revision.
#[derive(Clone, Debug)]
pub struct PolicySnapshot {
    /// Namespace.
    pub namespace: Namespace,
    /// Channel.
    pub channel: Channel,
    /// Namespace revision.
    pub revision: Revision,
    /// When the controller issued it.
    pub issued_at: Timestamp,
    /// Active activations covering the channel.
    pub activations: Vec<ActivationInfo>,
    /// The compiled rules.
    pub policy: ChannelPolicy,
    /// The store history the revision counts in.
    pub epoch: String,
    /// The decisions made with it since the last report, once a subscriber
    /// applied it (`None` otherwise: they count as made with none).
    pub(crate) tally: Option<Arc<crate::reporting::Tally>>,
}

impl PolicySnapshot {
    /// Checks a received snapshot for the subscription of `channel` in
    /// `namespace` and compiles it for lookups.
    pub fn from_wire(
        snapshot: proto::Snapshot,
        namespace: &Namespace,
        channel: Channel,
    ) -> Result<Self, WireError> {
        if snapshot.schema_version != SCHEMA_VERSION {
            return Err(WireError::new(
                "schema_version",
                format!(
                    "unknown snapshot schema version {} (this client reads {SCHEMA_VERSION}); upgrade the client",
                    snapshot.schema_version
                ),
            ));
        }
        if snapshot.namespace != namespace.as_str() {
            return Err(WireError::new(
                "namespace",
                format!(
                    "'{}' is not the subscribed '{namespace}'",
                    snapshot.namespace
                ),
            ));
        }
        if snapshot.channel != channel.as_str() {
            return Err(WireError::new(
                "channel",
                format!("'{}' is not the subscribed '{channel}'", snapshot.channel),
            ));
        }
        if snapshot.revision < 0 {
            return Err(WireError::new("revision", "is negative"));
        }
        let issued_at = snapshot
            .issued_at
            .as_ref()
            .ok_or_else(|| WireError::new("issued_at", "is missing"))
            .and_then(|t| {
                wire::timestamp_from_wire(t).map_err(|e| WireError::new("issued_at", e))
            })?;
        let rules = snapshot
            .rules
            .as_ref()
            .ok_or_else(|| WireError::new("rules", "is missing"))?;
        let policy = wire::channel_policy_from_wire(rules)?;
        let activations = snapshot
            .activations
            .into_iter()
            .map(|a| ActivationInfo {
                applied_at: a
                    .applied_at
                    .as_ref()
                    .and_then(|t| wire::timestamp_from_wire(t).ok()),
                id: a.id,
                mode: a.mode,
                title: a.title,
                channels: if a.channels.is_empty() {
                    vec!["*".to_string()]
                } else {
                    a.channels
                },
                reason: a.reason,
                principal: a.principal,
                revision: a.revision,
            })
            .collect();
        Ok(PolicySnapshot {
            namespace: namespace.clone(),
            channel,
            revision: snapshot.revision,
            issued_at,
            activations,
            policy,
            epoch: snapshot.epoch,
            tally: None,
        })
    }

    /// Decides `action` for `ctx`; borrows from the snapshot, allocates
    /// nothing.
    pub fn decide(&self, action: &Action, ctx: &Context) -> Decision<'_> {
        self.policy.decide_action(action, ctx)
    }
}

/// A decision with everything a caller may want to print or log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionReport {
    /// The effect and its parameters (`effect`, then e.g. `queue`).
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The action decided.
    pub action: String,
    /// The channel's namespace and channel, when there was a policy.
    pub namespace: Option<String>,
    /// The channel.
    pub channel: Option<String>,
    /// Revision of the policy used; `None` when there is no policy yet.
    pub revision: Option<Revision>,
    /// When the controller issued the policy used (`issued_at` in JSON, so
    /// that it never collides with a read-only effect's own `as_of`).
    #[serde(rename = "issued_at")]
    pub as_of: Option<Timestamp>,
    /// Whether the policy may be out of date (no contact within the limit,
    /// or no policy at all).
    pub stale: bool,
    /// Whether the decision failed closed (stale for too long).
    pub fail_closed: bool,
    /// Activations behind the decision.
    pub reasons: Vec<String>,
    /// Message for the customer.
    pub customer_message: Option<String>,
    /// Script for the agent.
    pub agent_script: Option<String>,
}
