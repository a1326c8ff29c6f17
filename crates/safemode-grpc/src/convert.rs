//! Converting the controller's state into `safemode.v1` messages: snapshots,
//! subscribers, incidents, requests, runbooks and audit entries. (The policy
//! core's own conversions are in `wire`, which the client shares.)

use safemode_controller::audit::AuditEntry;
use safemode_controller::{
    ChangeRequest, ChannelSnapshot, Incident, IncidentStatus, NamespaceView, Preview, RequestKind,
    RequestState, StoreHealth, SubscriberRecord, SubscriberState,
};
use std::sync::Arc;

use safemode_policy::{Activation, ChannelSet};
use safemode_wire::{
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
        // Set by the stream that sends it (a start-over), and when signed.
        start_over_from: 0,
        key_id: String::new(),
        signature: Vec::new(),
    }
}

/// A connected subscriber.
pub fn subscriber_to_wire(
    s: &SubscriberRecord,
    replica: &str,
    state: SubscriberState,
) -> proto::SubscriberStatus {
    let rejected = s.rejected.as_ref();
    proto::SubscriberStatus {
        replica: replica.to_string(),
        state: state.as_str().to_string(),
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

/// The store's health and the replica's lag behind it.
pub fn store_health_to_wire(h: &StoreHealth) -> proto::StoreHealth {
    let (follower_error, failing_for) = h.follower.clone().unwrap_or_default();
    proto::StoreHealth {
        kind: h.place.kind().to_string(),
        endpoints: h.place.endpoints(),
        reachable: h.reachable(),
        error: h.error.clone().unwrap_or_default(),
        store_revision: h.store_revision,
        namespace_revision: h.namespace_revision.unwrap_or_default(),
        applied_revision: h.applied_revision,
        lag_revisions: h.lag_revisions,
        follower_failing_ms: u64::try_from(failing_for.as_millis()).unwrap_or(u64::MAX),
        follower_error,
    }
}

/// An incident with its timeline and the activations of it `in_force`.
pub fn incident_to_wire(i: &Incident, in_force: &[Arc<Activation>]) -> proto::Incident {
    proto::Incident {
        id: i.id.to_string(),
        r#type: i.runbook.to_string(),
        title: i.title.clone(),
        namespace: i.namespace.to_string(),
        severity: i.severity.to_string(),
        status: match i.status {
            IncidentStatus::Active => "active",
            IncidentStatus::Resolved => "resolved",
        }
        .to_string(),
        channels: if i.channels == ChannelSet::ALL {
            Vec::new()
        } else {
            i.channels.iter().map(|c| c.as_str().to_string()).collect()
        },
        activation_ids: in_force.iter().map(|a| a.id.to_string()).collect(),
        activations: in_force.iter().map(|a| activation_to_wire(a)).collect(),
        // Whether resolving (or lifting what is in force) needs a second
        // approver: the runbook's word, or a mode in force that says so,
        // as `resolve` decides it.
        lift_requires_approval: i.lift_requires_approval
            || in_force.iter().any(|a| a.mode.lift_requires_approval),
        declared_by: i.declared_by.clone(),
        declared_at: Some(timestamp_to_wire(i.declared_at)),
        review_due: (i.status == IncidentStatus::Active).then(|| timestamp_to_wire(i.review_due())),
        exit_criteria: i.exit_criteria.clone(),
        timeline: i
            .timeline
            .iter()
            .map(|e| proto::TimelineEvent {
                at: Some(timestamp_to_wire(e.at)),
                event: e.event.clone(),
                principal: e.principal.clone(),
                severity: e.severity.to_string(),
                reason: e.reason.clone().unwrap_or_default(),
                request_id: e
                    .request_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                detail: e.detail.clone().unwrap_or_default(),
                revision: e.revision,
            })
            .collect(),
    }
}

/// What a dry run found a change would do.
pub fn preview_to_wire(p: &Preview) -> proto::ChangePreview {
    let approval = p.approval.as_ref();
    proto::ChangePreview {
        revision: p.revision,
        summary: p.summary.clone(),
        needs_approval: approval.is_some(),
        approver_roles: approval.map(|a| a.roles.clone()).unwrap_or_default(),
        not_approver: approval.map(|a| a.not_by.clone()).unwrap_or_default(),
        approval_summary: approval.map(|a| a.summary.clone()).unwrap_or_default(),
        channels: p
            .channels
            .iter()
            .map(|c| proto::ChannelPreview {
                channel: c.channel.to_string(),
                effects: c
                    .effects
                    .iter()
                    .map(|e| proto::EffectChange {
                        action: e.action.clone(),
                        before: e.before.clone(),
                        after: e.after.clone(),
                        customer_message_before: e.customer_message_before.clone(),
                        customer_message_after: e.customer_message_after.clone(),
                        agent_script_before: e.agent_script_before.clone(),
                        agent_script_after: e.agent_script_after.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A change request whose state its record tells (a new, approved or
/// withdrawn one, as a change answers it).
pub fn recorded_request_to_wire(r: &ChangeRequest) -> proto::ChangeRequest {
    request_to_wire(r, &r.state(jiff::Timestamp::now(), None))
}

/// A change request, with where it stands.
pub fn request_to_wire(r: &ChangeRequest, state: &RequestState) -> proto::ChangeRequest {
    proto::ChangeRequest {
        id: r.id.to_string(),
        namespace: r.namespace.to_string(),
        kind: r.kind.as_str().to_string(),
        incident_id: r
            .incident_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        severity: match &r.kind {
            RequestKind::Move { severity } => severity.to_string(),
            _ => String::new(),
        },
        activation_ids: r.activation_ids.iter().map(ToString::to_string).collect(),
        requested_by: r.requested_by.clone(),
        reason: r.reason.clone(),
        requested_at: Some(timestamp_to_wire(r.requested_at)),
        expires_at: Some(timestamp_to_wire(r.expires_at)),
        status: state.as_str().to_string(),
        approved_by: match state {
            RequestState::Approved { by, .. } => by.clone(),
            _ => String::new(),
        },
        summary: r.summary.clone(),
        superseded_by: match state {
            RequestState::Superseded { by } => by.clone(),
            _ => String::new(),
        },
        withdrawn_by: match state {
            RequestState::Withdrawn { by, .. } => by.clone(),
            _ => String::new(),
        },
    }
}

/// An audit entry.
pub fn audit_entry_to_wire(e: &AuditEntry) -> proto::AuditEntry {
    proto::AuditEntry {
        seq: e.seq,
        at: Some(timestamp_to_wire(e.at)),
        action: e.action.as_str().to_string(),
        principal: e.principal.clone(),
        roles: e.roles.clone(),
        namespace: e.namespace.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
        incident_id: e.incident_id.clone().unwrap_or_default(),
        request_id: e.request_id.clone().unwrap_or_default(),
        activation_ids: e.activation_ids.clone(),
        detail: e.detail.clone(),
        revision: e.revision,
        prev_hash: e.prev_hash.clone(),
        hash: e.hash.clone(),
        state_digest: e.state_digest.clone().unwrap_or_default(),
        key_id: e.key_id.clone(),
        signature: e.signature.clone(),
        change_id: e.change_id.clone().unwrap_or_default(),
    }
}

/// A proposal as `ListProposals`, `DismissProposal` and `RaiseProposal`
/// answer it.
pub fn proposal_to_wire(p: &safemode_controller::Proposal) -> proto::Proposal {
    use safemode_controller::{Evidence, ProposalState};
    let mut wire = proto::Proposal {
        id: p.id.to_string(),
        namespace: p.namespace.to_string(),
        r#type: p.runbook.to_string(),
        severity: p.severity.to_string(),
        question: p.question(),
        evidence: p.evidence.describe(),
        raised_by: p.raised_by.clone(),
        raised_at: Some(timestamp_to_wire(p.raised_at)),
        state: p.state.as_str().to_string(),
        ..proto::Proposal::default()
    };
    match &p.evidence {
        Evidence::Trigger {
            signal,
            count,
            above,
            within_seconds,
            channels,
            partial,
        } => {
            wire.source = "trigger".into();
            wire.signal = signal.clone();
            wire.count = *count;
            wire.above = *above;
            wire.within_seconds = u32::try_from(*within_seconds).unwrap_or(u32::MAX);
            wire.channels = channels
                .iter()
                .map(|c| proto::ProposalChannelCount {
                    channel: c.channel.clone(),
                    count: c.count,
                })
                .collect();
            wire.partial = *partial;
        }
        Evidence::External { summary } => {
            wire.source = "external".into();
            wire.summary = summary.clone();
        }
    }
    match &p.state {
        ProposalState::Open => {}
        ProposalState::Accepted {
            by,
            at,
            reason,
            incident_id,
        } => {
            wire.closed_by = by.clone();
            wire.closed_at = Some(timestamp_to_wire(*at));
            wire.closed_reason = reason.clone();
            wire.incident_id = incident_id.to_string();
        }
        ProposalState::Dismissed { by, at, reason } => {
            wire.closed_by = by.clone();
            wire.closed_at = Some(timestamp_to_wire(*at));
            wire.closed_reason = reason.clone();
        }
    }
    wire
}
