//! `safemode.v1.ControlService`: modes, incidents, approvals, status and the
//! audit log. Every handler validates its request, checks the caller's role
//! (refusals are audited), and converts the result.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{
    audit_entry_to_wire, incident_to_wire, preview_to_wire, proposal_to_wire,
    recorded_request_to_wire, request_to_wire,
};
use super::{
    authorize, authorize_anywhere, authorize_change, authorize_change_anywhere, invalid,
    invalid_name, limits, principal, status,
};
use crate::fleet::{self, Fleet, FleetCursor, FleetQuery};
use safemode_controller::auth::{Operation, Principal};
use safemode_controller::{
    ApplyRequest, AuditFilter, AuditPage, ChangeId, ChangeRequest, Controller, DeclareRequest,
    EscalateRequest, IncidentId, IncidentOutcome, LiftRequest, LiftTarget, MAX_SUMMARY_CHARS,
    ProposalId, RequestId, ResolveRequest, StoreOutcome, in_force_in,
};
use safemode_policy::runbook::{RunbookName, Severity};
use safemode_policy::{
    Action, Channel, ChannelSet, Context, Effect, MethodSet, ModeName, Namespace, Outcome, Reason,
};
use safemode_wire::proto::control_service_server::ControlService;
use safemode_wire::runbook_to_wire;
use safemode_wire::{self as wire, proto};

/// The control service.
pub struct ControlApi {
    controller: Arc<Controller>,
    replica: String,
    fleet: Arc<Fleet>,
}

impl ControlApi {
    /// The service over `controller`, on the replica called `replica`.
    pub(crate) fn new(controller: Arc<Controller>, replica: String, fleet: Arc<Fleet>) -> Self {
        ControlApi {
            controller,
            replica,
            fleet,
        }
    }

    /// The request an approve or withdraw call names (`verb`), with the
    /// call's reason if it gave one, once `actor` may do `operation` in the
    /// request's namespace; and the words its refusal is audited with.
    async fn named_request(
        &self,
        actor: &Principal,
        request_id: &str,
        given_reason: &str,
        operation: Operation,
        verb: &str,
        dry_run: bool,
    ) -> Result<(RequestId, Option<Reason>, ChangeRequest, String), Status> {
        let id = RequestId::parse(request_id).map_err(invalid_name("request_id"))?;
        let reason = if given_reason.trim().is_empty() {
            None
        } else {
            Some(reason(given_reason)?)
        };
        let what = format!("{verb} {id}");
        authorize_change_anywhere(&self.controller, actor, operation, &what, dry_run).await?;
        let found = self
            .controller
            .request(&id)
            .await
            .map_err(|e| self.write_failed(e))?;
        authorize_change(
            &self.controller,
            actor,
            operation,
            Some(&found.namespace),
            &what,
            dry_run,
        )
        .await?;
        Ok((id, reason, found, what))
    }

    /// Whether the catalogue's `mode` has a read-only rule (so an as-of time
    /// means something for it). Unknown modes are the controller's to refuse.
    fn serves_read_only(&self, mode: &ModeName) -> bool {
        self.controller
            .catalog()
            .get(mode.as_str())
            .is_none_or(|m| {
                m.rules
                    .iter()
                    .any(|r| matches!(r.effect, Effect::ReadOnly(_)))
            })
    }

    /// A change's failure as a status: when the store was unreachable,
    /// which store, why, and that nothing changed (or, when its
    /// transaction's answer was lost, that it may have been applied).
    fn write_failed(&self, error: safemode_controller::Error) -> Status {
        status(self.controller.in_words(error, StoreOutcome::Unchanged))
    }

    /// A read's failure as a status: when the store was unreachable, which
    /// store and why.
    fn read_failed(&self, error: safemode_controller::Error) -> Status {
        status(self.controller.in_words(error, StoreOutcome::Read))
    }

    fn incident_change(
        &self,
        outcome: IncidentOutcome,
        change_id: &ChangeId,
    ) -> proto::IncidentChange {
        proto::IncidentChange {
            incident: Some(incident_to_wire(&outcome.incident, &outcome.in_force)),
            revision: outcome.revision,
            pending: outcome.pending.as_ref().map(recorded_request_to_wire),
            change_id: change_id.to_string(),
            // Of what is (or, in a dry run, would be) in force; a request
            // changed nothing yet.
            dead_ends: match outcome.pending {
                Some(_) => Vec::new(),
                None => self
                    .controller
                    .dead_end_warnings(&outcome.incident, &outcome.in_force),
            },
            preview: outcome.preview.as_ref().map(preview_to_wire),
        }
    }
}

/// The caller's change id, or a new one when it gave none, bound to who
/// asked for exactly what: a retry sends the same bytes, anything else under
/// the same id is refused.
fn change_id(
    text: &str,
    actor: &safemode_controller::auth::Principal,
    request: &impl prost::Message,
) -> Result<ChangeId, Status> {
    use sha2::{Digest as _, Sha256};
    let id = ChangeId::parse_or_random(text).map_err(|e| invalid("change_id", e))?;
    let mut digest = Sha256::new();
    digest.update(actor.name.as_bytes());
    digest.update([0]);
    digest.update(request.encode_to_vec());
    Ok(id.for_request(format!("{:x}", digest.finalize())))
}

fn namespace(text: &str) -> Result<Namespace, Status> {
    Namespace::parse(text).map_err(invalid_name("namespace"))
}

fn reason(text: &str) -> Result<Reason, Status> {
    Reason::parse(text).map_err(invalid_name("reason"))
}

fn channels(names: &[String]) -> Result<ChannelSet, Status> {
    if names.len() > limits::MAX_CHANNELS_PER_REQUEST {
        return Err(invalid(
            "channels",
            format!(
                "{} channels named; there are only {} (leave the list empty for all)",
                names.len(),
                safemode_policy::names::CHANNELS.len()
            ),
        ));
    }
    if names.is_empty() {
        Ok(ChannelSet::ALL)
    } else {
        ChannelSet::parse_selector(names).map_err(invalid_name("channels"))
    }
}

fn severity(text: &str) -> Result<Severity, Status> {
    Severity::parse(text).map_err(invalid_name("severity"))
}

fn proposal_id(text: &str) -> Result<ProposalId, Status> {
    ProposalId::parse(text).map_err(invalid_name("proposal_id"))
}

/// An external detector's summary: one line of 1 to
/// [`MAX_SUMMARY_CHARS`] characters, with no control characters.
fn proposal_summary(text: &str) -> Result<String, Status> {
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(
            "summary",
            "say what the detector saw, e.g. \"login.failed 5x baseline for 10m\"",
        ));
    }
    let chars = text.chars().count();
    if chars > MAX_SUMMARY_CHARS {
        return Err(invalid(
            "summary",
            format!("{chars} characters; keep it to one line of at most {MAX_SUMMARY_CHARS}"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(
            "summary",
            "has control characters or line breaks; send one line of text",
        ));
    }
    Ok(text.to_string())
}

fn incident_id(text: &str) -> Result<IncidentId, Status> {
    IncidentId::parse(text).map_err(invalid_name("incident_id"))
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn apply_modes(
        &self,
        request: Request<proto::ApplyModesRequest>,
    ) -> Result<Response<proto::ApplyModesResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        // Authorised before anything that grows with the request; a refusal
        // records a bounded summary, never the caller's list.
        authorize_change(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&namespace),
            &format!("apply {}", limits::summary(&r.modes)),
            r.dry_run,
        )
        .await?;
        if r.modes.is_empty() {
            return Err(invalid(
                "modes",
                "name at least one mode (`safemode mode list` shows them)",
            ));
        }
        if r.modes.len() > limits::MAX_MODES_PER_REQUEST {
            return Err(invalid(
                "modes",
                format!(
                    "{} modes named; one request applies at most {} (declare an incident to apply a runbook's stage)",
                    r.modes.len(),
                    limits::MAX_MODES_PER_REQUEST
                ),
            ));
        }
        let mut modes = Vec::with_capacity(r.modes.len());
        let mut seen = HashSet::with_capacity(r.modes.len());
        for name in &r.modes {
            let name = ModeName::parse(name).map_err(invalid_name("modes"))?;
            if seen.insert(name.clone()) {
                modes.push(name);
            }
        }
        let channels = channels(&r.channels)?;
        let reason = reason(&r.reason)?;
        let as_of = match &r.as_of {
            None => None,
            Some(t) => {
                let t = wire::timestamp_from_wire(t).map_err(|e| invalid("as_of", e))?;
                if t > jiff::Timestamp::now() {
                    return Err(invalid(
                        "as_of",
                        "is in the future; last-known-good data is from the past",
                    ));
                }
                Some(t)
            }
        };
        if as_of.is_some() && !modes.iter().any(|m| self.serves_read_only(m)) {
            return Err(invalid(
                "as_of",
                "none of these modes serves read-only data, so an as-of time would do nothing; leave it out",
            ));
        }
        let outcome = self
            .controller
            .apply(ApplyRequest {
                namespace: namespace.clone(),
                modes,
                channels,
                as_of,
                actor: (*actor).clone(),
                reason,
                change_id: Some(change.clone()),
                dry_run: r.dry_run,
            })
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(proto::ApplyModesResponse {
            change_id: change.to_string(),
            namespace: namespace.to_string(),
            revision: outcome.revision,
            applied: outcome
                .applied
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            already_active: outcome
                .already_active
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            preview: outcome.preview.as_ref().map(preview_to_wire),
        }))
    }

    async fn lift_activations(
        &self,
        request: Request<proto::LiftActivationsRequest>,
    ) -> Result<Response<proto::LiftActivationsResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        authorize_change(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&namespace),
            &format!("lift {}", limits::summary(&r.targets)),
            r.dry_run,
        )
        .await?;
        if r.targets.is_empty() {
            return Err(invalid(
                "targets",
                "name at least one activation id or mode (`safemode status` lists them)",
            ));
        }
        if r.targets.len() > limits::MAX_TARGETS_PER_REQUEST {
            return Err(invalid(
                "targets",
                format!(
                    "{} targets named; one request lifts at most {}: name modes instead of activation ids (with --all, a name lifts every activation of its mode), or lift them in several commands",
                    r.targets.len(),
                    limits::MAX_TARGETS_PER_REQUEST
                ),
            ));
        }
        let targets = r
            .targets
            .iter()
            .map(|t| LiftTarget::parse(t).map_err(invalid_name("targets")))
            .collect::<Result<Vec<_>, _>>()?;
        let reason = reason(&r.reason)?;
        let outcome = self
            .controller
            .lift(LiftRequest {
                namespace: namespace.clone(),
                targets,
                actor: (*actor).clone(),
                reason,
                all: r.all,
                incident_ok: r.incident_ok,
                change_id: Some(change.clone()),
                dry_run: r.dry_run,
            })
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(proto::LiftActivationsResponse {
            change_id: change.to_string(),
            namespace: namespace.to_string(),
            revision: outcome.revision,
            lifted: outcome
                .lifted
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            pending: outcome.pending.as_ref().map(recorded_request_to_wire),
            preview: outcome.preview.as_ref().map(preview_to_wire),
        }))
    }

    async fn list_modes(
        &self,
        request: Request<proto::ListModesRequest>,
    ) -> Result<Response<proto::ListModesResponse>, Status> {
        let actor = principal(&request)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            None,
            "list modes",
        )
        .await?;
        Ok(Response::new(proto::ListModesResponse {
            modes: self
                .controller
                .catalog()
                .iter()
                .map(|m| wire::mode_to_wire(m))
                .collect(),
        }))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        let actor = principal(&request)?;
        let namespace = namespace(&request.get_ref().namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "read status",
        )
        .await?;
        let r = request.get_ref();
        let limit = match r.page_size as usize {
            0 => limits::STATUS_PAGE_DEFAULT,
            n if n > limits::STATUS_PAGE_MAX => {
                return Err(invalid(
                    "page_size",
                    format!(
                        "{n} is more than {}; ask for fewer",
                        limits::STATUS_PAGE_MAX
                    ),
                ));
            }
            n => n,
        };
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(FleetCursor::parse(token).ok_or_else(|| {
                invalid(
                    "page_token",
                    "is not a token this server gave; pass the previous page's next_page_token, or none for the first page",
                )
            })?),
        };
        let filter = fleet::filter(&r.channel, &r.state)?;
        let status = self
            .controller
            .status(&namespace)
            .await
            .map_err(|e| self.read_failed(e))?;
        // The namespace's current revision: the store's when it answered
        // (a change no replica applied yet leaves every subscriber behind).
        let current = status
            .view
            .revision
            .max(status.store.namespace_revision.unwrap_or_default());
        let query = FleetQuery {
            namespace: namespace.clone(),
            current,
            filter,
            limit,
            after,
        };
        let gathered = if r.this_replica_only {
            self.fleet.gather_here(&query)
        } else {
            let _turn = self.fleet.admit().await?;
            self.fleet.gather(&query).await
        };
        let mut problems = status.problems();
        problems.extend(
            gathered
                .problems
                .into_iter()
                .filter(|p| !status.replica.contains(p)),
        );
        Ok(Response::new(proto::GetStatusResponse {
            namespace: namespace.to_string(),
            revision: current,
            activations: status
                .view
                .activations
                .iter()
                .map(|a| wire::activation_to_wire(a))
                .collect(),
            subscribers: gathered.subscribers,
            server_time: Some(wire::timestamp_to_wire(jiff::Timestamp::now())),
            problems,
            replica: self.replica.clone(),
            next_page_token: gathered
                .next
                .as_ref()
                .map(FleetCursor::token)
                .unwrap_or_default(),
            subscriber_count: u32::try_from(gathered.total).unwrap_or(u32::MAX),
            store: Some(super::convert::store_health_to_wire(&status.store)),
            channels: gathered.channels,
            replicas: gathered.replicas,
            partial: gathered.partial,
        }))
    }

    async fn list_runbooks(
        &self,
        request: Request<proto::ListRunbooksRequest>,
    ) -> Result<Response<proto::ListRunbooksResponse>, Status> {
        let actor = principal(&request)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            None,
            "list runbooks",
        )
        .await?;
        Ok(Response::new(proto::ListRunbooksResponse {
            runbooks: self
                .controller
                .runbooks()
                .iter()
                .map(|r| runbook_to_wire(r))
                .collect(),
        }))
    }

    async fn declare_incident(
        &self,
        request: Request<proto::DeclareIncidentRequest>,
    ) -> Result<Response<proto::IncidentChange>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        let runbook = RunbookName::parse(&r.r#type).map_err(invalid_name("type"))?;
        let severity = severity(&r.severity)?;
        let what = format!("declare {runbook} at {severity}");
        authorize_change(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&namespace),
            &what,
            r.dry_run,
        )
        .await?;
        let reason = reason(&r.reason)?;
        let channels = channels(&r.channels)?;
        let outcome = self
            .controller
            .declare(DeclareRequest {
                namespace,
                runbook,
                severity,
                reason,
                channels,
                actor: (*actor).clone(),
                change_id: Some(change.clone()),
                dry_run: r.dry_run,
            })
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(self.incident_change(outcome, &change)))
    }

    async fn escalate_incident(
        &self,
        request: Request<proto::EscalateIncidentRequest>,
    ) -> Result<Response<proto::IncidentChange>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let id = incident_id(&r.incident_id)?;
        let severity = severity(&r.severity)?;
        let reason = if r.reason.trim().is_empty() {
            Reason::parse(&format!("moved to {severity}")).expect("a valid reason")
        } else {
            reason(&r.reason)?
        };
        let what = format!("move incident {id} to {severity}");
        authorize_change_anywhere(
            &self.controller,
            &actor,
            Operation::Change,
            &what,
            r.dry_run,
        )
        .await?;
        let incident = self
            .controller
            .incident(&id)
            .await
            .map_err(|e| self.write_failed(e))?;
        authorize_change(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&incident.namespace),
            &what,
            r.dry_run,
        )
        .await?;
        let outcome = self
            .controller
            .escalate(EscalateRequest {
                incident: id,
                severity,
                reason,
                actor: (*actor).clone(),
                change_id: Some(change.clone()),
                dry_run: r.dry_run,
            })
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(self.incident_change(outcome, &change)))
    }

    async fn resolve_incident(
        &self,
        request: Request<proto::ResolveIncidentRequest>,
    ) -> Result<Response<proto::IncidentChange>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let id = incident_id(&r.incident_id)?;
        let reason = reason(&r.reason)?;
        let what = format!("resolve incident {id}");
        authorize_change_anywhere(
            &self.controller,
            &actor,
            Operation::Change,
            &what,
            r.dry_run,
        )
        .await?;
        let incident = self
            .controller
            .incident(&id)
            .await
            .map_err(|e| self.write_failed(e))?;
        authorize_change(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&incident.namespace),
            &what,
            r.dry_run,
        )
        .await?;
        let outcome = self
            .controller
            .resolve(ResolveRequest {
                incident: id,
                reason,
                actor: (*actor).clone(),
                change_id: Some(change.clone()),
                dry_run: r.dry_run,
            })
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(self.incident_change(outcome, &change)))
    }

    async fn list_incidents(
        &self,
        request: Request<proto::ListIncidentsRequest>,
    ) -> Result<Response<proto::ListIncidentsResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "list incidents",
        )
        .await?;
        let incidents = self
            .controller
            .list_incidents(&namespace, r.include_resolved)
            .await
            .map_err(|e| self.read_failed(e))?;
        let view = self
            .controller
            .view(&namespace)
            .await
            .map_err(|e| self.read_failed(e))?;
        Ok(Response::new(proto::ListIncidentsResponse {
            total: u32::try_from(incidents.len()).unwrap_or(u32::MAX),
            incidents: incidents
                .iter()
                .take(limits::MAX_LISTED)
                .map(|i| incident_to_wire(i, &in_force_in(&view, i)))
                .collect(),
        }))
    }

    async fn get_incident(
        &self,
        request: Request<proto::GetIncidentRequest>,
    ) -> Result<Response<proto::Incident>, Status> {
        let actor = principal(&request)?;
        let id = incident_id(&request.get_ref().incident_id)?;
        let what = format!("read incident {id}");
        authorize_anywhere(&self.controller, &actor, Operation::Read, &what).await?;
        let incident = self
            .controller
            .incident(&id)
            .await
            .map_err(|e| self.read_failed(e))?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&incident.namespace),
            &what,
        )
        .await?;
        let in_force = self
            .controller
            .in_force(&incident)
            .await
            .map_err(|e| self.read_failed(e))?;
        Ok(Response::new(incident_to_wire(&incident, &in_force)))
    }

    async fn list_requests(
        &self,
        request: Request<proto::ListRequestsRequest>,
    ) -> Result<Response<proto::ListRequestsResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "list requests",
        )
        .await?;
        let requests = self
            .controller
            .list_requests(&namespace, r.include_decided)
            .await
            .map_err(|e| self.read_failed(e))?;
        Ok(Response::new(proto::ListRequestsResponse {
            total: u32::try_from(requests.len()).unwrap_or(u32::MAX),
            requests: requests
                .iter()
                .take(limits::MAX_LISTED)
                .map(|r| request_to_wire(&r.request, &r.state))
                .collect(),
        }))
    }

    async fn approve(
        &self,
        request: Request<proto::ApproveRequest>,
    ) -> Result<Response<proto::ApproveResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let (id, reason, pending, what) = self
            .named_request(
                &actor,
                &r.request_id,
                &r.reason,
                Operation::Approve,
                "approve",
                r.dry_run,
            )
            .await?;
        let outcome = match self
            .controller
            .approve(&id, reason, &actor, Some(change.clone()), r.dry_run)
            .await
        {
            // A dry run audits nothing, its refusals neither.
            Err(own @ safemode_controller::Error::OwnRequest { .. }) if !r.dry_run => {
                // Four-eyes: refused like a missing role, and audited.
                self.controller
                    .record_refusal(
                        &actor,
                        Some(&pending.namespace),
                        format!("refused {what}: {own}"),
                    )
                    .await
                    .map_err(|e| self.write_failed(e))?;
                return Err(status(own));
            }
            other => other.map_err(|e| self.write_failed(e))?,
        };
        Ok(Response::new(proto::ApproveResponse {
            request: Some(recorded_request_to_wire(&outcome.request)),
            revision: outcome.revision,
            change_id: change.to_string(),
            preview: outcome.preview.as_ref().map(preview_to_wire),
        }))
    }

    async fn withdraw(
        &self,
        request: Request<proto::WithdrawRequest>,
    ) -> Result<Response<proto::WithdrawResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let (id, reason, _, _) = self
            .named_request(
                &actor,
                &r.request_id,
                &r.reason,
                Operation::Change,
                "withdraw",
                false,
            )
            .await?;
        let outcome = self
            .controller
            .withdraw(&id, reason, &actor, Some(change.clone()))
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(proto::WithdrawResponse {
            request: Some(recorded_request_to_wire(&outcome.request)),
            revision: outcome.revision,
            change_id: change.to_string(),
        }))
    }

    async fn get_audit(
        &self,
        request: Request<proto::GetAuditRequest>,
    ) -> Result<Response<proto::GetAuditResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let filter = AuditFilter {
            incident: if r.incident_id.is_empty() {
                None
            } else {
                Some(incident_id(&r.incident_id)?)
            },
            namespace: if r.namespace.is_empty() {
                None
            } else {
                Some(Namespace::parse(&r.namespace).map_err(invalid_name("namespace"))?)
            },
        };
        authorize(
            &self.controller,
            &actor,
            Operation::ReadAudit,
            None,
            "read the audit log",
        )
        .await?;
        let limit = match r.limit as usize {
            0 => AuditPage::DEFAULT_LIMIT,
            n if n > AuditPage::MAX_LIMIT => {
                return Err(invalid(
                    "limit",
                    format!("{n} is more than {}; ask for fewer", AuditPage::MAX_LIMIT),
                ));
            }
            n => n,
        };
        let page = AuditPage {
            after: r.after_seq,
            limit,
        };
        let report = self
            .controller
            .audit(&filter, r.verify, page)
            .await
            .map_err(|e| self.read_failed(e))?;
        let head = report.head.unwrap_or_default();
        Ok(Response::new(proto::GetAuditResponse {
            entries: report.entries.iter().map(audit_entry_to_wire).collect(),
            next_after_seq: report.next_after.unwrap_or(0),
            head_seq: head.seq,
            head_hash: if head.seq == 0 {
                String::new()
            } else {
                head.hash
            },
            verified: report.findings.is_some(),
            problems_total: report.findings.as_ref().map_or(0, |f| f.total),
            problems: report
                .findings
                .unwrap_or_default()
                .problems
                .iter()
                .map(ToString::to_string)
                .collect(),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let actor = principal(&request)?;
        // Only a server with a tokens file attaches a credential.
        let tokens = request.extensions().get::<crate::Credential>().is_some();
        let r = request.into_inner();
        if r.namespaces.len() > MAX_WHOAMI_NAMESPACES {
            return Err(invalid(
                "namespaces",
                format!(
                    "{} named; ask about at most {MAX_WHOAMI_NAMESPACES}",
                    r.namespaces.len()
                ),
            ));
        }
        let mut asked = r
            .namespaces
            .iter()
            .map(|n| namespace(n))
            .collect::<Result<Vec<_>, _>>()?;
        if asked.is_empty() {
            asked.push(Namespace::live());
        }
        // No role is needed: the answer is the caller's own, from the same
        // table every handler checks.
        let may = |operation, namespace| actor.may(operation, Some(namespace)).is_ok();
        Ok(Response::new(proto::WhoAmIResponse {
            principal: actor.name.clone(),
            roles: actor.role_names(),
            tokens,
            permissions: asked
                .iter()
                .map(|n| proto::NamespacePermissions {
                    namespace: n.to_string(),
                    read: may(Operation::Read, n),
                    read_audit: may(Operation::ReadAudit, n),
                    change: may(Operation::Change, n),
                    approve: may(Operation::Approve, n),
                })
                .collect(),
            replica: self.replica.clone(),
        }))
    }

    async fn list_proposals(
        &self,
        request: Request<proto::ListProposalsRequest>,
    ) -> Result<Response<proto::ListProposalsResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "list proposals",
        )
        .await?;
        let proposals = self
            .controller
            .list_proposals(&namespace, r.include_closed)
            .await
            .map_err(|e| self.read_failed(e))?;
        Ok(Response::new(proto::ListProposalsResponse {
            proposals: proposals.iter().map(proposal_to_wire).collect(),
        }))
    }

    async fn accept_proposal(
        &self,
        request: Request<proto::AcceptProposalRequest>,
    ) -> Result<Response<proto::IncidentChange>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        let id = proposal_id(&r.proposal_id)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&namespace),
            &format!("accept proposal {id}"),
        )
        .await?;
        let reason = reason(&r.reason)?;
        let outcome = self
            .controller
            .accept_proposal(&namespace, &id, reason, &actor, Some(change.clone()))
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(
            self.incident_change(outcome.declared, &change),
        ))
    }

    async fn dismiss_proposal(
        &self,
        request: Request<proto::DismissProposalRequest>,
    ) -> Result<Response<proto::DismissProposalResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        let id = proposal_id(&r.proposal_id)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Change,
            Some(&namespace),
            &format!("dismiss proposal {id}"),
        )
        .await?;
        if r.reason.trim().is_empty() {
            return Err(invalid(
                "reason",
                "say why the proposal is dismissed: nothing is declared, and the audit log keeps the reason",
            ));
        }
        let reason = reason(&r.reason)?;
        let outcome = self
            .controller
            .dismiss_proposal(&namespace, &id, reason, &actor, Some(change.clone()))
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(proto::DismissProposalResponse {
            proposal: Some(proposal_to_wire(&outcome.proposal)),
            revision: outcome.revision,
            change_id: change.to_string(),
        }))
    }

    async fn raise_proposal(
        &self,
        request: Request<proto::RaiseProposalRequest>,
    ) -> Result<Response<proto::RaiseProposalResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let change = change_id(&r.change_id, &actor, &r)?;
        let namespace = namespace(&r.namespace)?;
        let runbook = RunbookName::parse(&r.r#type).map_err(invalid_name("type"))?;
        let severity = severity(&r.severity)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Propose,
            Some(&namespace),
            &format!("raise a proposal to declare {runbook} at {severity}"),
        )
        .await?;
        let summary = proposal_summary(&r.summary)?;
        let reason = reason(&r.reason)?;
        let outcome = self
            .controller
            .raise_external(
                &namespace,
                &runbook,
                severity,
                &summary,
                &reason,
                &actor,
                Some(change),
            )
            .await
            .map_err(|e| self.write_failed(e))?;
        Ok(Response::new(proto::RaiseProposalResponse {
            proposal: Some(proposal_to_wire(&outcome.proposal)),
            created: outcome.created,
        }))
    }

    async fn get_insights(
        &self,
        request: Request<proto::GetInsightsRequest>,
    ) -> Result<Response<proto::GetInsightsResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "read insights",
        )
        .await?;
        let window = match r.window_seconds {
            0 => safemode_controller::reports::LONGEST_WINDOW,
            60 | 900 => std::time::Duration::from_secs(u64::from(r.window_seconds)),
            n => {
                return Err(invalid(
                    "window_seconds",
                    format!("{n} is not a window insights keeps: give 60 (1m) or 900 (15m)"),
                ));
            }
        };
        let _turn = self.fleet.admit().await?;
        let answer = crate::insights::gather(&self.controller, &self.fleet, &namespace, window)
            .await
            .map_err(|e| self.read_failed(e))?;
        Ok(Response::new(answer))
    }

    async fn decide(
        &self,
        request: Request<proto::DecideRequest>,
    ) -> Result<Response<proto::DecideResponse>, Status> {
        let actor = principal(&request)?;
        let r = request.into_inner();
        let namespace = namespace(&r.namespace)?;
        authorize(
            &self.controller,
            &actor,
            Operation::Read,
            Some(&namespace),
            "preview a decision",
        )
        .await?;
        let channel = Channel::parse(&r.channel).map_err(invalid_name("channel"))?;
        let action = Action::parse(&r.action).map_err(invalid_name("action"))?;
        let ctx = decide_context(&r)?;
        let view = self
            .controller
            .view(&namespace)
            .await
            .map_err(|e| self.read_failed(e))?;
        let snapshot = view.channel(channel);
        let decision = snapshot.policy.decide(action.as_str(), &ctx);
        Ok(Response::new(proto::DecideResponse {
            namespace: namespace.to_string(),
            channel: channel.to_string(),
            action: action.to_string(),
            revision: view.revision,
            effect: decision.outcome.kind().as_str().to_string(),
            detail: outcome_in_words(&decision.outcome),
            reasons: decision.reasons().map(ToString::to_string).collect(),
            customer_message: decision.customer_message().unwrap_or_default().to_string(),
            agent_script: decision.agent_script().unwrap_or_default().to_string(),
        }))
    }
}

/// The most namespaces one WhoAmI asks about.
const MAX_WHOAMI_NAMESPACES: usize = 16;

/// The most bot flags one Decide names.
const MAX_BOT_FLAGS: usize = 16;

/// A Decide request's context, checked as `safemode decide` checks its flags.
fn decide_context(r: &proto::DecideRequest) -> Result<Context, Status> {
    if !(0.0..=1.0).contains(&r.confidence) {
        return Err(invalid(
            "confidence",
            format!("{} is outside 0 to 1", r.confidence),
        ));
    }
    if let Some(amount) = r.amount
        && (!amount.is_finite() || amount < 0.0)
    {
        return Err(invalid("amount", "give a number of 0 or more"));
    }
    if r.bot_flags.len() > MAX_BOT_FLAGS {
        return Err(invalid(
            "bot_flags",
            format!("{} named; give at most {MAX_BOT_FLAGS}", r.bot_flags.len()),
        ));
    }
    for flag in &r.bot_flags {
        if flag.is_empty()
            || flag.len() > 64
            || flag.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(invalid(
                "bot_flags",
                "each flag is 1 to 64 printable characters without spaces",
            ));
        }
    }
    Ok(Context {
        confidence: r.confidence,
        methods: MethodSet::parse(&r.methods).map_err(invalid_name("methods"))?,
        failed_attempts: r.attempts,
        amount: r.amount,
        handoff_from_bot: r.handoff_from_bot,
        bot_flags: r.bot_flags.clone(),
    })
}

/// An outcome with its parameters, in words.
pub(crate) fn outcome_in_words(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Allow => "allow".to_string(),
        Outcome::Throttle(t) => format!("throttle: at most {} per {}s", t.max, t.window_seconds),
        Outcome::StepUp {
            required,
            attempts_left,
        } => format!(
            "step_up: confidence {} with {}; {attempts_left} attempt(s) left, then review queue {}",
            required.min_confidence,
            required.methods.names().collect::<Vec<_>>().join(" or "),
            required.escalate_queue
        ),
        Outcome::Review { queue, escalated } => format!(
            "review: queue {queue}{}",
            if *escalated {
                " (a step-up escalated here)"
            } else {
                ""
            }
        ),
        Outcome::ReadOnly(r) => match r.as_of {
            Some(at) => format!("read_only: data as of {at}"),
            None => "read_only: data as of when the mode was applied".to_string(),
        },
        Outcome::Route(r) => format!("route: to {}", r.to),
        Outcome::Deny(d) => match &d.alternative {
            Some(alternative) => format!("deny: alternative {alternative}"),
            None => "deny".to_string(),
        },
    }
}
