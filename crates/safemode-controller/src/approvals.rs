//! Four-eyes: a change that removes protections and needs a second approver
//! waits as a [`ChangeRequest`]; a different principal with the approver role
//! carries it out. The requester can never approve their own request.

use jiff::Timestamp;
use tracing::info;

use super::change::{Act, ChangeId, Plan, Writes};
use super::incidents::{StagePlan, incident_activations};
use super::keys::NamespaceChange;
use super::modes::{describe, shared_incident};
use super::records::{
    ChangeRequest, IncidentStatus, RequestId, RequestKind, RequestStatus, TimelineEvent,
};
use super::{Controller, Error, Result, corrupt};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::{Change, Namespace, Reason, Revision};

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

    /// One change request, as it is recorded.
    pub async fn request(&self, id: &RequestId) -> Result<ChangeRequest> {
        Ok(self.read_request(id).await?.0)
    }

    /// A request and the revision of its record.
    pub(crate) async fn read_request(&self, id: &RequestId) -> Result<(ChangeRequest, Revision)> {
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
        let act = &Act {
            action: AuditAction::Approve,
            actor,
            namespace,
            change_id: change_id.as_ref(),
            dry_run: None,
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
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
                    let mut writes = Writes::new(at);
                    let audit_incident;
                    let done = match request.kind {
                        RequestKind::Lift => {
                            let lift: Vec<_> = view
                                .activations
                                .iter()
                                .filter(|a| request.activation_ids.contains(&a.id))
                                .cloned()
                                .collect();
                            self.delete_activations(&mut writes, namespace, &lift);
                            audit_incident = shared_incident(&lift);
                            writes.record_namespace(lift.iter().map(|a| a.id.clone()));
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
                            incident.timeline.push(TimelineEvent::new(
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
                                        &mut writes,
                                        &mut incident,
                                        incident_revision,
                                        &staged,
                                        &requester,
                                        &request.reason,
                                    );
                                    // The namespace records the resolution
                                    // as requested; the log, the approval.
                                    writes.record_namespace_as(NamespaceChange {
                                        action: AuditAction::Resolve,
                                        principal: requester.name.clone(),
                                        reason: request.reason.clone(),
                                        at,
                                        activation_ids: staged
                                            .lift
                                            .iter()
                                            .map(|a| a.id.clone())
                                            .collect(),
                                        state: None,
                                    });
                                    format!("resolved {}: {}", incident.id, staged.describe())
                                }
                                RequestKind::Move { severity } => {
                                    // Staged as escalating stages it, for
                                    // the requester's change.
                                    let change = || {
                                        let reason =
                                            Reason::parse(&request.reason).map_err(|e| {
                                                corrupt(
                                                    &self.config.layout.request_key(&request.id),
                                                    e,
                                                )
                                            })?;
                                        Ok(Change {
                                            principal: request.requested_by.clone(),
                                            reason,
                                            at,
                                            incident_id: Some(incident.id.to_string()),
                                        })
                                    };
                                    let staged = match self
                                        .stage_move(&view, &incident, severity, change)?
                                    {
                                        Ok(staged) => staged,
                                        Err(refusal) => return Ok(Plan::answer(Err(refusal))),
                                    };
                                    let moved = self.move_incident(
                                        &mut writes,
                                        &mut incident,
                                        incident_revision,
                                        &staged,
                                        severity,
                                        (actor, &why, Some(&request.id)),
                                    );
                                    writes
                                        .record_namespace(incident.activation_ids.iter().cloned());
                                    format!(
                                        "moved {} from {} to {severity}: {}",
                                        incident.id,
                                        moved.from,
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
                    writes.unchanged(key.clone(), request_revision);
                    writes.put(
                        key,
                        serde_json::to_vec(&request).expect("requests serialize"),
                    );
                    let mut audit = act.entry(
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
                    Ok(writes.audited(audit, Ok(request)))
                })
            })
            .await?;
        let request = outcome?;
        info!(request = %request.id, principal = %actor.name, revision, "request approved");
        Ok(ApproveOutcome { request, revision })
    }
}
