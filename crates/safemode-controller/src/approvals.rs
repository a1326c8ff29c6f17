//! Four-eyes: a change that removes protections and needs a second approver
//! waits as a [`ChangeRequest`]; a different principal with the approver role
//! carries it out. The requester can never approve their own request.

use std::collections::BTreeMap;

use jiff::Timestamp;
use tracing::info;

use super::change::{Act, ChangeId, Plan, Writes};
use super::incidents::{StagePlan, incident_activations};
use super::keys::NamespaceChange;
use super::modes::{describe, shared_incident};
use super::preview::{DryRun, Preview};
use super::records::{
    ChangeRequest, Incident, IncidentId, RequestId, RequestKind, RequestState, RequestStatus,
    TimelineEvent,
};
use super::{Controller, Error, NamespaceView, Result, corrupt};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::{ActivationId, Change, Namespace, Reason, Revision};

/// What an approval did.
#[derive(Clone, Debug)]
pub struct ApproveOutcome {
    /// The request, now approved.
    pub request: ChangeRequest,
    /// Revision of the change.
    pub revision: Revision,
    /// For a dry run: what approving would do. Nothing was written.
    pub preview: Option<Preview>,
}

/// What a withdrawal did.
#[derive(Clone, Debug)]
pub struct WithdrawOutcome {
    /// The request, now withdrawn.
    pub request: ChangeRequest,
    /// Revision of the change.
    pub revision: Revision,
}

/// A request with where it stands now.
#[derive(Clone, Debug)]
pub struct RequestView {
    /// The request as recorded.
    pub request: ChangeRequest,
    /// Where it stands.
    pub state: RequestState,
}

/// What overtook a pending request, if anything: for an incident's request,
/// any change to the incident after it (the request and the incident's
/// timeline entry were written together, at `request_revision`); for a
/// lift, every activation it names being gone from `view`.
fn overtaken(
    request: &ChangeRequest,
    request_revision: Revision,
    incident: Option<&(Incident, Revision)>,
    view: &NamespaceView,
) -> Option<String> {
    match &request.incident_id {
        Some(id) => {
            let Some((incident, revision)) = incident else {
                return Some(format!("incident {id} no longer exists"));
            };
            if *revision == request_revision {
                return None;
            }
            let event = incident
                .timeline
                .iter()
                .find(|e| e.revision > request_revision)
                .or(incident.timeline.last());
            // To the second: a person reads it.
            let at = |e: &TimelineEvent| e.at.round(jiff::Unit::Second).unwrap_or(e.at);
            Some(match event {
                Some(e) if e.event == "requested" => format!(
                    "incident {id} has a newer request{} by {} at {}",
                    e.request_id
                        .as_ref()
                        .map(|r| format!(" {r}"))
                        .unwrap_or_default(),
                    e.principal,
                    at(e)
                ),
                Some(e) if e.event == "lifted" => format!(
                    "incident {id} had {} by {} at {}",
                    e.detail.as_deref().unwrap_or("modes lifted"),
                    e.principal,
                    at(e)
                ),
                Some(e) => format!(
                    "incident {id} was {} (now {}) by {} at {}",
                    e.event,
                    e.severity,
                    e.principal,
                    at(e)
                ),
                None => format!("incident {id} changed"),
            })
        }
        None => {
            // Approving would do less than it showed.
            let gone: Vec<&str> = request
                .activation_ids
                .iter()
                .filter(|id| !view.activations.iter().any(|a| a.id == **id))
                .map(ActivationId::as_str)
                .collect();
            (!gone.is_empty()).then(|| format!("{} was lifted since", gone.join(", ")))
        }
    }
}

impl Controller {
    /// Change requests in `namespace`, newest first, each with where it
    /// stands; only the pending ones unless `include_decided`.
    pub async fn list_requests(
        &self,
        namespace: &Namespace,
        include_decided: bool,
    ) -> Result<Vec<RequestView>> {
        let now = Timestamp::now();
        let prefix = self.config.layout.requests_prefix();
        // In pages: the requests of every namespace, decided ones included,
        // may be more than one store message holds.
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        let view = self.view(namespace).await?;
        let incidents: BTreeMap<IncidentId, (Incident, Revision)> = self
            .incidents()
            .await?
            .into_iter()
            .filter(|(i, _)| i.namespace == *namespace)
            .map(|(i, r)| (i.id.clone(), (i, r)))
            .collect();
        let mut requests = Vec::new();
        for kv in range.kvs {
            let request: ChangeRequest =
                serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            if request.namespace != *namespace {
                continue;
            }
            let incident = request.incident_id.as_ref().and_then(|i| incidents.get(i));
            let state = request.state(now, overtaken(&request, kv.mod_revision, incident, &view));
            if include_decided || state == RequestState::Pending {
                requests.push(RequestView { request, state });
            }
        }
        requests.sort_by_key(|r| std::cmp::Reverse(r.request.requested_at));
        Ok(requests)
    }

    /// How many change requests wait for an approver in each namespace this
    /// replica follows (one read of the requests and one of the incidents,
    /// for metrics).
    pub(crate) async fn pending_requests_by_namespace(
        &self,
    ) -> Result<std::collections::HashMap<Namespace, usize>> {
        let views: std::collections::HashMap<Namespace, std::sync::Arc<NamespaceView>> = self
            .all_followed()
            .into_iter()
            .map(|handle| {
                let view = handle.current();
                (view.namespace.clone(), view)
            })
            .collect();
        let mut pending = std::collections::HashMap::new();
        let range =
            safemode_store::read_all(&*self.store, &self.config.layout.requests_prefix()).await?;
        if range.kvs.is_empty() {
            return Ok(pending);
        }
        let incidents: BTreeMap<IncidentId, (Incident, Revision)> = self
            .incidents()
            .await?
            .into_iter()
            .map(|(i, r)| (i.id.clone(), (i, r)))
            .collect();
        let now = Timestamp::now();
        for kv in range.kvs {
            let Ok(request) = serde_json::from_slice::<ChangeRequest>(&kv.value) else {
                continue;
            };
            let Some(view) = views.get(&request.namespace) else {
                continue;
            };
            let incident = request.incident_id.as_ref().and_then(|i| incidents.get(i));
            let state = request.state(now, overtaken(&request, kv.mod_revision, incident, view));
            if state == RequestState::Pending {
                *pending.entry(request.namespace.clone()).or_insert(0) += 1;
            }
        }
        Ok(pending)
    }

    /// One change request, as it is recorded.
    pub async fn request(&self, id: &RequestId) -> Result<ChangeRequest> {
        Ok(self.read_request(id).await?.0)
    }

    /// Where `request`, recorded at `request_revision`, stands at `now`
    /// against `view`, its namespace's; with its incident as read, for an
    /// incident's request (while it is pending, as the request showed it).
    async fn state_of(
        &self,
        request: &ChangeRequest,
        request_revision: Revision,
        view: &NamespaceView,
        now: Timestamp,
    ) -> Result<(RequestState, Option<(Incident, Revision)>)> {
        let incident = match &request.incident_id {
            Some(id) => match self.read_incident(id).await {
                Ok(found) => Some(found),
                Err(Error::UnknownIncident(_)) => None,
                Err(other) => return Err(other),
            },
            None => None,
        };
        let state = request.state(
            now,
            overtaken(request, request_revision, incident.as_ref(), view),
        );
        Ok((state, incident))
    }

    /// A pending request that asks exactly what a new one would (the same
    /// kind, incident and activations, still current), so that asking twice
    /// returns the first rather than making a second.
    pub(crate) async fn same_request(
        &self,
        namespace: &Namespace,
        kind: &RequestKind,
        incident: Option<(&IncidentId, Revision)>,
        activation_ids: &[ActivationId],
    ) -> Result<Option<ChangeRequest>> {
        let now = Timestamp::now();
        let prefix = self.config.layout.requests_prefix();
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        let mut wanted = activation_ids.to_vec();
        wanted.sort();
        for kv in range.kvs {
            let request: ChangeRequest =
                serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            let mut ids = request.activation_ids.clone();
            ids.sort();
            let current = match incident {
                Some((id, revision)) => {
                    request.incident_id.as_ref() == Some(id) && kv.mod_revision == revision
                }
                None => request.incident_id.is_none(),
            };
            if request.namespace == *namespace
                && request.kind == *kind
                && current
                && ids == wanted
                && request.status == RequestStatus::Pending
                && now < request.expires_at
            {
                return Ok(Some(request));
            }
        }
        Ok(None)
    }

    /// Withdraws a pending request, as `actor`: nothing it asked for is
    /// done, and nobody can approve it any more.
    pub async fn withdraw(
        &self,
        id: &RequestId,
        reason: Option<Reason>,
        actor: &Principal,
        change_id: Option<ChangeId>,
    ) -> Result<WithdrawOutcome> {
        let (found, _) = self.read_request(id).await?;
        let namespace = &found.namespace;
        let reason = &reason;
        let act = &Act {
            action: AuditAction::Withdraw,
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
                    match self
                        .state_of(&request, request_revision, &view, at)
                        .await?
                        .0
                    {
                        RequestState::Pending | RequestState::Superseded { .. } => {}
                        other => {
                            return Ok(Plan::answer(Err(Error::NotPending {
                                id: id.to_string(),
                                status: other.describe(),
                            })));
                        }
                    }
                    let why = reason
                        .as_ref()
                        .map_or_else(|| "withdrawn".to_string(), |r| r.as_str().to_string());
                    request.status = RequestStatus::Withdrawn {
                        by: actor.name.clone(),
                        at,
                    };
                    let mut writes = Writes::new(at);
                    let key = self.config.layout.request_key(&request.id);
                    writes.unchanged(key.clone(), request_revision);
                    writes.put(
                        key,
                        serde_json::to_vec(&request).expect("requests serialize"),
                    );
                    let mut audit = act.entry(
                        &why,
                        format!(
                            "withdrew {} requested by {}: {}",
                            request.id, request.requested_by, request.summary
                        ),
                    );
                    audit.request_id = Some(request.id.to_string());
                    audit.incident_id = request.incident_id.as_ref().map(ToString::to_string);
                    Ok(writes.audited(audit, Ok(request)))
                })
            })
            .await?;
        let request = outcome?;
        info!(request = %request.id, principal = %actor.name, revision, "request withdrawn");
        Ok(WithdrawOutcome { request, revision })
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

    /// Carries out another principal's pending request, as `actor`; with
    /// `dry_run`, only says what that would do (the same refusals, nothing
    /// written).
    pub async fn approve(
        &self,
        id: &RequestId,
        reason: Option<Reason>,
        actor: &Principal,
        change_id: Option<ChangeId>,
        dry_run: bool,
    ) -> Result<ApproveOutcome> {
        let (found, _) = self.read_request(id).await?;
        let namespace = &found.namespace;
        let reason = &reason;
        let dry_run = DryRun::when(dry_run);
        let act = &Act {
            action: AuditAction::Approve,
            actor,
            namespace,
            change_id: change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
                    let at = Timestamp::now();
                    let (mut request, request_revision) = self.read_request(id).await?;
                    let (state, incident) =
                        self.state_of(&request, request_revision, &view, at).await?;
                    match state {
                        RequestState::Pending => {}
                        RequestState::Superseded { by } => {
                            return Ok(Plan::answer(Err(Error::Superseded {
                                id: id.to_string(),
                                by,
                            })));
                        }
                        other => {
                            return Ok(Plan::answer(Err(Error::NotPending {
                                id: id.to_string(),
                                status: other.describe(),
                            })));
                        }
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
                            // The requester was told the lift is outside
                            // its incident; the incident's timeline says so.
                            let owners = self.owning_incidents(&lift).await?;
                            self.record_lifts(
                                &mut writes,
                                owners,
                                &lift,
                                (actor, &why, Some(&request.id)),
                            );
                            audit_incident = shared_incident(&lift);
                            writes.record_namespace(lift.iter().map(|a| a.id.clone()));
                            if lift.is_empty() {
                                "nothing was left to lift".to_string()
                            } else {
                                format!("lifted {}", describe(&lift))
                            }
                        }
                        RequestKind::Resolve | RequestKind::Move { .. } => {
                            // Pending, so `state_of` read the incident as
                            // the request showed it (active, unchanged
                            // since); the commit compares its revision.
                            let Some((mut incident, incident_revision)) = incident else {
                                return Err(corrupt(
                                    &self.config.layout.request_key(&request.id),
                                    "an incident request names no incident",
                                ));
                            };
                            audit_incident = Some(incident.id.to_string());
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
                                        retext: Vec::new(),
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
        let preview = DryRun::take(dry_run);
        if preview.is_none() {
            info!(request = %request.id, principal = %actor.name, revision, "request approved");
        }
        Ok(ApproveOutcome {
            request,
            revision,
            preview,
        })
    }
}
