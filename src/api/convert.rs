//! Converting the controller's state into `safemode.v1` messages: the
//! snapshot a subscriber receives and a subscriber's status line. (The
//! policy core's own conversions are in `wire`, which the client shares.)

use crate::controller::{ChannelSnapshot, NamespaceView, SubscriberRecord};
use crate::wire::{
    SCHEMA_VERSION, activation_to_wire, channel_policy_to_wire, proto, timestamp_to_wire,
};

/// The snapshot a subscriber of `snapshot.channel` receives for `view`, in
/// the store history `epoch`.
pub fn snapshot_to_wire(
    view: &NamespaceView,
    snapshot: &ChannelSnapshot,
    epoch: &str,
) -> proto::Snapshot {
    proto::Snapshot {
        schema_version: SCHEMA_VERSION,
        namespace: view.namespace.to_string(),
        channel: snapshot.channel.as_str().to_string(),
        revision: view.revision,
        issued_at: Some(timestamp_to_wire(view.issued_at)),
        activations: snapshot
            .activations
            .iter()
            .map(|a| activation_to_wire(a))
            .collect(),
        rules: Some(channel_policy_to_wire(&snapshot.policy)),
        epoch: epoch.to_string(),
    }
}

/// A connected subscriber.
pub fn subscriber_to_wire(s: &SubscriberRecord) -> proto::SubscriberStatus {
    let rejected = s.rejected.as_ref();
    proto::SubscriberStatus {
        subscriber_id: s.subscriber_id.clone(),
        channel: s.channel.as_str().to_string(),
        peer: s.peer.clone(),
        connected_at: Some(timestamp_to_wire(s.connected_at)),
        sent_revision: s.sent_revision,
        acked_revision: s.acked_revision,
        acked_at: s.acked_at.map(timestamp_to_wire),
        rejected_revision: rejected.map_or(0, |r| r.revision),
        reject_reason: rejected.map(|r| r.reason.clone()).unwrap_or_default(),
        rejected_at: rejected.map(|r| timestamp_to_wire(r.at)),
    }
}
