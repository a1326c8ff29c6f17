//! Four-eyes: a change that removes protections and needs a second approver
//! waits as a [`ChangeRequest`]; a different principal with the approver role
//! carries it out. The requester can never approve their own request.

use jiff::Timestamp;
use tracing::info;

use super::change::ChangeId;
use super::change::Plan;
use super::incidents::{StagePlan, corrupt, event, incident_activations, stage};
use super::modes::{
    change, delete_activations, describe, draft, put_activations, record, shared_incident,
};
use super::records::{
    ChangeRequest, Incident, IncidentStatus, RequestId, RequestKind, RequestStatus,
};
use super::{Controller, Error, Result};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::{ActivationId, Change, Namespace, Reason, Revision};
use safemode_store::{Compare, Op};

/// What an approval did.
#[derive(Clone, Debug)]
pub struct ApproveOutcome {
    /// The request, now approved.
    pub request: ChangeRequest,
    /// Revision of the change.
    pub revision: Revision,
}

impl Controller {
    /// Change requests in `namespace`, newest first; decided and expired ones
    /// only if asked.
    pub async fn list_requests(
        &self,
        namespace: &Namespace,
        include_decided: bool,
    ) -> Result<Vec<ChangeRequest>> {
        let now = Timestamp::now();
        let prefix = self.config.layout.requests_prefix();
        // In pages: the requests of every namespace, decided ones included,
        // may be more than one store message holds.
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        let mut requests = Vec::new();
        for kv in range.kvs {
            let request: ChangeRequest =
                serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            if request.namespace == *namespace && (include_decided || request.is_open(now)) {
                requests.push(request);
            }
        }
        requests.sort_by_key(|r| std::cmp::Reverse(r.requested_at));
        Ok(requests)
    }

    /// A request and the revision of its record.
    pub async fn read_request(&self, id: &RequestId) -> Result<(ChangeRequest, Revision)> {
        let key = self.config.layout.request_key(id);
        let range = self.store.range(&key).await?;
        let kv = range
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .ok_or_else(|| Error::UnknownRequest(id.to_string()))?;
        let request = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?;
        Ok((request, kv.mod_revision))
    }

    /// Carries out another principal's pending request, as `actor`.
    pub async fn approve(
        &self,
        id: &RequestId,
        reason: Option<Reason>,
        actor: &Principal,
        change_id: Option<ChangeId>,
    ) -> Result<ApproveOutcome> {
        let (found, _) = self.read_request(id).await?;
        let namespace = &found.namespace;
        let reason = &reason;
        let (outcome, revision) = self
            .commit_change(change("approve", &change_id), Some(namespace), |view| {
                Box::pin(async move {
                    let view = view.expect("a namespace change has a view");
                    let at = Timestamp::now();
                    let (mut request, request_revision) = self.read_request(id).await?;
                    if !request.is_open(at) {
                        return Ok(Plan::answer(Err(Error::NotPending {
                            id: id.to_string(),
                            status: request.status_name(at).to_string(),
                        })));
                    }
                    // Records from before names were lower-cased may differ in case.
                    if request.requested_by.eq_ignore_ascii_case(&actor.name) {
                        return Ok(Plan::answer(Err(Error::OwnRequest {
                            id: id.to_string(),
                            principal: actor.name.clone(),
                        })));
                    }
                    let why = reason
                        .as_ref()
                        .map_or_else(|| request.reason.clone(), |r| r.as_str().to_string());
                    let mut plan = Plan::answer(Ok(request.clone()));
                    plan.at = at;
                    let audit_incident;
                    let done = match request.kind {
                        RequestKind::Lift => {
                            let lift: Vec<_> = view
                                .activations
                                .iter()
                                .filter(|a| request.activation_ids.contains(&a.id))
                                .cloned()
                                .collect();
                            delete_activations(&mut plan, self, namespace, &lift);
                            audit_incident = shared_incident(&lift);
                            plan.record = Some(record(
                                AuditAction::Approve,
                                actor,
                                &why,
                                at,
                                lift.iter().map(|a| a.id.clone()),
                            ));
                            if lift.is_empty() {
                                "nothing was left to lift".to_string()
                            } else {
                                format!("lifted {}", describe(&lift))
                            }
                        }
                        RequestKind::Resolve | RequestKind::Move { .. } => {
                            let Some(incident_id) = request.incident_id.clone() else {
                                return Err(corrupt(
                                    &self.config.layout.request_key(&request.id),
                                    "an incident request names no incident",
                                ));
                            };
                            let (mut incident, incident_revision) =
                                self.read_incident(&incident_id).await?;
                            audit_incident = Some(incident_id.to_string());
                            if incident.status != IncidentStatus::Active {
                                return Ok(Plan::answer(Err(Error::Resolved(
                                    incident_id.to_string(),
                                ))));
                            }
                            // The request was written with the incident's
                            // timeline entry in one change: if the incident
                            // moved since, approving would carry out a change
                            // nobody was shown.
                            if incident_revision != request_revision {
                                return Ok(Plan::answer(Err(Error::OutdatedRequest {
                                    id: id.to_string(),
                                    incident: incident_id.to_string(),
                                })));
                            }
                            incident.timeline.push(event(
                                at,
                                "approved",
                                actor,
                                incident.severity,
                                Some(&why),
                                Some(&request.id),
                            ));
                            match request.kind {
                                RequestKind::Resolve => {
                                    let staged = StagePlan {
                                        keep: Vec::new(),
                                        lift: incident_activations(&view, &incident),
                                        apply: Vec::new(),
                                    };
                                    let requester = Principal {
                                        name: request.requested_by.clone(),
                                        roles: Vec::new(),
                                    };
                                    self.close(
                                        &mut plan,
                                        &mut incident,
                                        incident_revision,
                                        &staged,
                                        &requester,
                                        &request.reason,
                                        at,
                                    );
                                    format!("resolved {}: {}", incident.id, staged.describe())
                                }
                                RequestKind::Move { severity } => {
                                    let from = incident.severity;
                                    let Some(runbook) =
                                        self.runbooks().get(incident.runbook.as_str()).cloned()
                                    else {
                                        return Ok(Plan::answer(Err(Error::UnknownRunbook(
                                            incident.runbook.to_string(),
                                        ))));
                                    };
                                    let stage = match stage(&runbook, severity) {
                                        Ok(stage) => stage,
                                        Err(e) => return Ok(Plan::answer(Err(e))),
                                    };
                                    let reason = Reason::parse(&request.reason).map_err(|e| {
                                        corrupt(&self.config.layout.request_key(&request.id), e)
                                    })?;
                                    let change = Change {
                                        principal: request.requested_by.clone(),
                                        reason,
                                        at,
                                        incident_id: Some(incident.id.to_string()),
                                    };
                                    let existing = incident_activations(&view, &incident);
                                    let staged = self.stage_plan(
                                        &runbook,
                                        stage,
                                        incident.channels,
                                        existing,
                                        &change,
                                    );
                                    put_activations(&mut plan, self, namespace, &staged.apply);
                                    delete_activations(&mut plan, self, namespace, &staged.lift);
                                    incident.severity = severity;
                                    incident.activation_ids = staged.activation_ids();
                                    let moved = if severity < from {
                                        "deescalated"
                                    } else {
                                        "escalated"
                                    };
                                    incident.timeline.push(event(
                                        at,
                                        moved,
                                        actor,
                                        severity,
                                        Some(&why),
                                        Some(&request.id),
                                    ));
                                    self.put_incident(&mut plan, &incident, incident_revision);
                                    plan.uses_catalog = true;
                                    plan.record = Some(record(
                                        AuditAction::Approve,
                                        actor,
                                        &why,
                                        at,
                                        incident.activation_ids.iter().cloned(),
                                    ));
                                    format!(
                                        "moved {} from {from} to {severity}: {}",
                                        incident.id,
                                        staged.describe()
                                    )
                                }
                                RequestKind::Lift => unreachable!("handled above"),
                            }
                        }
                    };
                    request.status = RequestStatus::Approved {
                        by: actor.name.clone(),
                        at,
                    };
                    let key = self.config.layout.request_key(&request.id);
                    plan.compares.push(Compare::ModRevision {
                        key: key.clone(),
                        revision: request_revision,
                    });
                    plan.ops.push(Op::Put {
                        key,
                        value: serde_json::to_vec(&request).expect("requests serialize"),
                    });
                    let mut audit = draft(
                        AuditAction::Approve,
                        actor,
                        namespace,
                        &why,
                        format!(
                            "approved {} requested by {}: {done}",
                            request.id, request.requested_by
                        ),
                    );
                    audit.request_id = Some(request.id.to_string());
                    audit.incident_id = audit_incident;
                    audit.activation_ids = request
                        .activation_ids
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    plan.audit = Some(audit);
                    plan.outcome = Ok(request);
                    Ok(plan)
                })
            })
            .await?;
        let request = outcome?;
        info!(request = %request.id, principal = %actor.name, revision, "request approved");
        Ok(ApproveOutcome { request, revision })
    }
}

/// A change that waits for a second approver instead of being carried out.
pub(crate) struct ApprovalNeeded<'a> {
    /// What approving it will do.
    pub kind: RequestKind,
    /// Where.
    pub namespace: &'a Namespace,
    /// Who asked.
    pub actor: &'a Principal,
    /// Why.
    pub reason: &'a str,
    /// The activations it will lift.
    pub activation_ids: Vec<ActivationId>,
    /// The incident it belongs to, and the revision its record was read at;
    /// its timeline records the request.
    pub incident: Option<(&'a mut Incident, Revision)>,
    /// What it will do, for people ("lift freeze-... on all channels").
    pub summary: String,
}

impl Controller {
    /// Adds to `plan` a pending request for `needed` (and its audit entry,
    /// and the incident's timeline event) in place of the change itself.
    pub(crate) fn request_approval<T>(
        &self,
        plan: &mut Plan<T>,
        needed: ApprovalNeeded<'_>,
    ) -> ChangeRequest {
        let at = plan.at;
        let pending = ChangeRequest {
            id: RequestId::random(),
            namespace: needed.namespace.clone(),
            kind: needed.kind,
            incident_id: needed.incident.as_ref().map(|(i, _)| i.id.clone()),
            activation_ids: needed.activation_ids,
            requested_by: needed.actor.name.clone(),
            reason: needed.reason.to_string(),
            requested_at: at,
            expires_at: expiry(at, self.config.request_ttl),
            status: RequestStatus::Pending,
            summary: needed.summary,
        };
        let key = self.config.layout.request_key(&pending.id);
        plan.compares.push(Compare::ModRevision {
            key: key.clone(),
            revision: 0,
        });
        plan.ops.push(Op::Put {
            key,
            value: serde_json::to_vec(&pending).expect("requests serialize"),
        });
        let mut audit = draft(
            AuditAction::Request,
            needed.actor,
            needed.namespace,
            needed.reason,
            format!("requested approval to {}", pending.summary),
        );
        audit.request_id = Some(pending.id.to_string());
        audit.activation_ids = pending
            .activation_ids
            .iter()
            .map(ToString::to_string)
            .collect();
        if let Some((incident, revision)) = needed.incident {
            incident.timeline.push(event(
                at,
                "requested",
                needed.actor,
                incident.severity,
                Some(needed.reason),
                Some(&pending.id),
            ));
            self.put_incident(plan, incident, revision);
            audit.incident_id = Some(incident.id.to_string());
        }
        plan.audit = Some(audit);
        pending
    }
}

/// When a request made at `at` expires.
fn expiry(at: Timestamp, ttl: std::time::Duration) -> Timestamp {
    at.saturating_add(jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}
