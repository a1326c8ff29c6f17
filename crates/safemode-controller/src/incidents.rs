//! Incidents: a runbook applied in a namespace at a severity. Declaring
//! applies the severity's stage atomically and records the incident;
//! escalating moves to another stage (a stage is the whole posture: its modes
//! are applied, the previous stage's other modes lifted); resolving lifts the
//! incident's modes. De-escalating and resolving remove protections, so when
//! the runbook or a mode says so they become pending requests for a second
//! approver.

use std::sync::Arc;

use jiff::Timestamp;
use tracing::info;

use super::change::{Act, ApprovalNeeded, ChangeId, Plan, Writes};
use super::modes::{describe, describe_modes, same_rules};
use super::preview::{DryRun, Preview};
use super::records::{
    ChangeRequest, Incident, IncidentId, IncidentStatus, RequestId, RequestKind, TimelineEvent,
};
use super::{Controller, Error, NamespaceView, Result, corrupt};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::paths::{DeadEnd, dead_ends};
use safemode_policy::runbook::{Runbook, RunbookName, Severity, Stage};
use safemode_policy::{
    Activation, ActivationId, Change, ChannelSet, Effect, EffectivePolicy, Mode, ModeCatalog,
    Namespace, Reason, Revision,
};

/// Declare an incident.
#[derive(Clone, Debug)]
pub struct DeclareRequest {
    /// Where.
    pub namespace: Namespace,
    /// The incident type.
    pub runbook: RunbookName,
    /// Which stage.
    pub severity: Severity,
    /// Why.
    pub reason: Reason,
    /// Limit every mode to these channels (all: as the runbook says).
    pub channels: ChannelSet,
    /// Who.
    pub actor: Principal,
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
    /// Only say what the change would do: nothing is written or audited.
    pub dry_run: bool,
}

/// Move an incident to another severity.
#[derive(Clone, Debug)]
pub struct EscalateRequest {
    /// The incident.
    pub incident: IncidentId,
    /// The severity to move to.
    pub severity: Severity,
    /// Why.
    pub reason: Reason,
    /// Who.
    pub actor: Principal,
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
    /// Only say what the change would do: nothing is written or audited.
    pub dry_run: bool,
}

/// Resolve an incident.
#[derive(Clone, Debug)]
pub struct ResolveRequest {
    /// The incident.
    pub incident: IncidentId,
    /// Why.
    pub reason: Reason,
    /// Who.
    pub actor: Principal,
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
    /// Only say what the change would do: nothing is written or audited.
    pub dry_run: bool,
}

/// What an incident change did.
#[derive(Clone, Debug)]
pub struct IncidentOutcome {
    /// The incident after the change.
    pub incident: Incident,
    /// Revision of the change.
    pub revision: Revision,
    /// Activations created.
    pub applied: Vec<Arc<Activation>>,
    /// Activations lifted.
    pub lifted: Vec<Arc<Activation>>,
    /// The incident's activations in force after the change (as they were,
    /// when it only created a request).
    pub in_force: Vec<Arc<Activation>>,
    /// Set when the change needs a second approver: nothing changed yet.
    pub pending: Option<ChangeRequest>,
    /// Set for a dry run: what the change would do (then nothing changed,
    /// and the rest of the outcome is what would be).
    pub preview: Option<Preview>,
}

/// What preparing a declaration came to.
pub(crate) enum Declaring {
    /// It is refused; nothing is written.
    Refused(Error),
    /// These writes declare it, recorded by its audit entry.
    Ready(Box<Declaration>),
}

/// A declaration prepared: its writes, the incident, the activations its
/// stage creates, and the audit entry that records them.
pub(crate) struct Declaration {
    /// The writes.
    pub writes: Writes,
    /// The incident declared.
    pub incident: Incident,
    /// The activations its stage creates.
    pub applied: Vec<Activation>,
    /// The change's audit entry.
    pub audit: crate::audit::AuditDraft,
}

/// How an incident's activations change to reach a stage.
pub(crate) struct StagePlan {
    /// Activations that stay (same mode, channels and rules).
    pub keep: Vec<Arc<Activation>>,
    /// Activations that stay with the new stage's texts (customer message,
    /// agent script): the same mode, channels and protection, so the same
    /// id, rewritten.
    pub retext: Vec<(Arc<Activation>, Activation)>,
    /// Activations to lift.
    pub lift: Vec<Arc<Activation>>,
    /// Activations to create.
    pub apply: Vec<Activation>,
}

/// What moving an incident did, for its audit entry.
pub(crate) struct Moved {
    /// The severity it moved from.
    pub from: Severity,
    /// "escalated" or "deescalated", as its timeline says.
    pub what: &'static str,
}

/// Whether `after` protects exactly as `before` does: the same rules, read
/// as effects on channels and actions under conditions. Texts (a stage's own
/// customer message and agent script) and a read-only as-of time may differ.
fn same_protection(after: &Mode, before: &Mode) -> bool {
    let protection = |m: &Mode| -> Vec<_> {
        m.rules
            .iter()
            .map(|r| {
                let mut effect = r.effect.clone();
                if let Effect::ReadOnly(read_only) = &mut effect {
                    read_only.as_of = None;
                }
                (
                    r.channels,
                    r.actions.clone(),
                    r.except.clone(),
                    r.when.clone(),
                    effect,
                )
            })
            .collect()
    };
    protection(after) == protection(before)
}

impl StagePlan {
    /// Whether the change needs a second approver: it lifts, without putting
    /// it back, a protection whose lifting needs one.
    ///
    /// Going down a severity or resolving, that is any activation of a
    /// runbook or mode that says so. Going up, the runbook's more severe
    /// stage replaces the milder one's modes by design, so only a mode that
    /// itself says so counts (as the catalogue has it; an unknown mode
    /// counts): a more severe stage that drops a freeze still lifts the
    /// freeze.
    pub fn lift_needs_approval(&self, going_down: bool, modes: &ModeCatalog) -> bool {
        self.weakening_lifts().any(|a| {
            if going_down {
                a.mode.lift_requires_approval
            } else {
                modes
                    .get(a.mode.name.as_str())
                    .is_none_or(|m| m.lift_requires_approval)
            }
        })
    }

    /// The lifted activations whose protection the change does not put back:
    /// no kept or applied activation has the same mode, the same rules and at
    /// least the same channels.
    fn weakening_lifts(&self) -> impl Iterator<Item = &Arc<Activation>> {
        self.lift.iter().filter(|lifted| {
            !self
                .keep
                .iter()
                .map(|a| &**a)
                .chain(self.retext.iter().map(|(_, after)| after))
                .chain(self.apply.iter())
                .any(|after| {
                    after.mode.name == lifted.mode.name
                        && lifted.channels.is_subset(after.channels)
                        && same_protection(&after.mode, &lifted.mode)
                })
        })
    }

    /// The incident's activations after the change.
    pub fn activation_ids(&self) -> Vec<ActivationId> {
        self.keep
            .iter()
            .map(|a| a.id.clone())
            .chain(self.retext.iter().map(|(_, after)| after.id.clone()))
            .chain(self.apply.iter().map(|a| a.id.clone()))
            .collect()
    }

    /// The incident's activations in force after the change; those it
    /// writes have revision 0 until it commits (see [`stored`]).
    pub fn in_force(&self) -> Vec<Arc<Activation>> {
        let written = self
            .retext
            .iter()
            .map(|(_, after)| after)
            .chain(&self.apply);
        self.keep
            .iter()
            .cloned()
            .chain(written.cloned().map(Arc::new))
            .collect()
    }

    /// One line for the audit log ("applied ...; lifted ...").
    pub fn describe(&self) -> String {
        self.describe_as(
            ["applied", "lifted", "kept", "kept with new texts"],
            |list| describe(list),
        )
    }

    /// One line for a request, of what approval will do ("apply ...; lift
    /// ...").
    pub fn describe_pending(&self) -> String {
        self.describe_as(["apply", "lift", "keep", "keep with new texts"], |list| {
            describe(list)
        })
    }

    /// One line for the incident's timeline, by mode name ("applied
    /// bots-faq-only on chatbot; lifted ...").
    pub fn describe_modes(&self) -> String {
        self.describe_as(
            ["applied", "lifted", "kept", "kept with new texts"],
            |list| describe_modes(list),
        )
    }

    fn describe_as(
        &self,
        [apply, lift, keep, retext]: [&str; 4],
        named: fn(&[&Activation]) -> String,
    ) -> String {
        let mut parts = Vec::new();
        let lists: [(&str, Vec<&Activation>); 4] = [
            (apply, self.apply.iter().collect()),
            (lift, self.lift.iter().map(|a| &**a).collect()),
            (keep, self.keep.iter().map(|a| &**a).collect()),
            (retext, self.retext.iter().map(|(_, after)| after).collect()),
        ];
        for (word, list) in lists {
            if !list.is_empty() {
                parts.push(format!("{word} {}", named(&list)));
            }
        }
        parts.join("; ")
    }
}

impl Controller {
    /// The activations `stage` calls for, as `existing` activations of the
    /// incident become: those that already match are kept, the others
    /// lifted, the missing ones created (for `change`).
    pub(crate) fn stage_plan(
        &self,
        runbook: &Runbook,
        stage: &Stage,
        scope: ChannelSet,
        existing: Vec<Arc<Activation>>,
        change: &Change,
    ) -> StagePlan {
        let mut plan = StagePlan {
            keep: Vec::new(),
            retext: Vec::new(),
            lift: Vec::new(),
            apply: Vec::new(),
        };
        let mut wanted = Vec::new();
        for staged in &stage.modes {
            let channels = staged.channels.intersection(scope);
            let Some(mode) = self.catalog().get(staged.mode.as_str()) else {
                continue;
            };
            if channels.is_empty() {
                continue;
            }
            let mut copy = stage.staged_mode(mode);
            copy.lift_requires_approval = runbook.lift_needs_approval(mode);
            wanted.push((copy, channels));
        }
        let mut existing = existing;
        for (mode, channels) in wanted {
            let found = existing
                .iter()
                .position(|a| a.channels == channels && same_rules(&a.mode, &mode, None));
            // The same protection with another stage's texts stays the same
            // activation: a mode that stays on keeps its id.
            let retexted = || {
                existing.iter().position(|a| {
                    a.channels == channels
                        && a.mode.name == mode.name
                        && same_protection(&mode, &a.mode)
                })
            };
            match found {
                Some(i) => plan.keep.push(existing.remove(i)),
                None if let Some(i) = retexted() => {
                    // What a stage changes in a mode: its texts and
                    // whether lifting needs approval; the rules, with their
                    // read-only as-of time, stay as they were applied.
                    let before = existing.remove(i);
                    let mut after = (*before).clone();
                    after.mode.customer_notice = mode.customer_notice;
                    after.mode.agent_script = mode.agent_script;
                    after.mode.lift_requires_approval = mode.lift_requires_approval;
                    plan.retext.push((before, after));
                }
                None => plan.apply.push(Activation::new(
                    ActivationId::from_random(rand::random()),
                    &mode,
                    channels,
                    change.at,
                    change,
                )),
            }
        }
        plan.lift = existing;
        plan
    }

    /// Declares an incident: applies the runbook's stage for the severity and
    /// records the incident, in one change. One incident of a type may be
    /// active in a namespace at a time.
    pub async fn declare(&self, request: DeclareRequest) -> Result<IncidentOutcome> {
        let runbook = self
            .runbooks()
            .get(request.runbook.as_str())
            .cloned()
            .ok_or_else(|| self.unknown_runbook(request.runbook.as_str()))?;
        let stage = stage(&runbook, request.severity)?;
        let (request, runbook) = (&request, &runbook);
        let namespace = &request.namespace;
        let dry_run = DryRun::when(request.dry_run);
        let act = &Act {
            action: AuditAction::Declare,
            actor: &request.actor,
            namespace,
            change_id: request.change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |_view| {
                Box::pin(async move {
                    Ok(
                        match self
                            .prepare_declare(act, request, runbook, stage, None)
                            .await?
                        {
                            Declaring::Refused(refusal) => Plan::answer(Err(refusal)),
                            Declaring::Ready(ready) => {
                                let Declaration {
                                    writes,
                                    incident,
                                    applied,
                                    audit,
                                } = *ready;
                                writes.audited(audit, Ok((incident, applied)))
                            }
                        },
                    )
                })
            })
            .await?;
        let (incident, applied) = outcome?;
        let preview = DryRun::take(dry_run);
        if preview.is_none() {
            info!(incident = %incident.id, runbook = %incident.runbook, severity = %incident.severity,
                namespace = %namespace, revision, principal = %request.actor.name, "incident declared");
        }
        let applied = stored(applied, revision);
        Ok(IncidentOutcome {
            incident,
            revision,
            in_force: applied.clone(),
            applied,
            lifted: Vec::new(),
            pending: None,
            preview,
        })
    }

    /// What declaring `request`'s incident writes, prepared against the
    /// store as it is: the refusal, or the writes (the stage's activations,
    /// the incident, its active pointer) with their audit entry, not yet a
    /// plan, so that accepting a proposal adds its own record to the same
    /// transaction. `cited`, when set, is put before the declared event's
    /// detail (a proposal's evidence).
    pub(crate) async fn prepare_declare(
        &self,
        act: &Act<'_>,
        request: &DeclareRequest,
        runbook: &Runbook,
        stage: &Stage,
        cited: Option<&str>,
    ) -> Result<Declaring> {
        let namespace = &request.namespace;
        let reason = request.reason.as_str();
        let pointer = self
            .config
            .layout
            .active_incident_key(namespace, &request.runbook);
        let range = self.store.range(&pointer).await?;
        if let Some(kv) = range.kvs.iter().find(|kv| kv.key == pointer) {
            return Ok(Declaring::Refused(Error::AlreadyDeclared {
                id: String::from_utf8_lossy(&kv.value).into_owned(),
                runbook: request.runbook.to_string(),
                namespace: namespace.clone(),
            }));
        }
        let at = Timestamp::now();
        let id = IncidentId::random();
        let change = Change {
            principal: request.actor.name.clone(),
            reason: request.reason.clone(),
            at,
            incident_id: Some(id.to_string()),
        };
        let staged = self.stage_plan(runbook, stage, request.channels, Vec::new(), &change);
        if staged.apply.is_empty() {
            return Ok(Declaring::Refused(Error::NothingToApply(format!(
                "runbook {} applies nothing at {} on {}",
                runbook.name, request.severity, request.channels
            ))));
        }
        let incident = Incident {
            id: id.clone(),
            runbook: runbook.name.clone(),
            title: runbook.title.clone(),
            namespace: namespace.clone(),
            severity: request.severity,
            channels: request.channels,
            status: IncidentStatus::Active,
            activation_ids: staged.activation_ids(),
            lift_requires_approval: runbook.lift_requires_approval,
            review_interval_seconds: runbook.review_interval.as_secs(),
            exit_criteria: runbook.exit_criteria.clone(),
            declared_by: request.actor.name.clone(),
            declared_at: at,
            timeline: vec![
                TimelineEvent::new(
                    at,
                    "declared",
                    &request.actor,
                    request.severity,
                    Some(reason),
                    None,
                )
                .with_detail(match cited {
                    Some(evidence) => {
                        format!("{evidence}; {}", staged.describe_modes())
                    }
                    None => staged.describe_modes(),
                }),
            ],
        };
        let mut writes = Writes::new(at);
        self.put_activations(&mut writes, namespace, &staged.apply);
        self.put_incident(&mut writes, &incident, 0);
        // One active incident per type and namespace.
        writes.unchanged(pointer.clone(), 0);
        writes.put(pointer.clone(), id.to_string().into_bytes());
        writes.uses_catalog();
        writes.record_namespace(incident.activation_ids.iter().cloned());
        let mut audit = act.entry(
            reason,
            format!(
                "declared {} ({id}) at {}: {}",
                runbook.name,
                request.severity,
                staged.describe()
            ),
        );
        audit.incident_id = Some(id.to_string());
        audit.activation_ids = incident
            .activation_ids
            .iter()
            .map(ToString::to_string)
            .collect();
        Ok(Declaring::Ready(Box::new(Declaration {
            writes,
            incident,
            applied: staged.apply,
            audit,
        })))
    }

    /// Moves an incident to another severity's stage. Moving down removes
    /// protections: when the runbook or a lifted mode says so, that becomes a
    /// pending request for a second approver.
    pub async fn escalate(&self, request: EscalateRequest) -> Result<IncidentOutcome> {
        let (found, _) = self.read_incident(&request.incident).await?;
        let request = &request;
        let namespace = &found.namespace;
        let reason = request.reason.as_str();
        let dry_run = DryRun::when(request.dry_run);
        let act = &Act {
            action: AuditAction::Escalate,
            actor: &request.actor,
            namespace,
            change_id: request.change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
                    let (mut incident, incident_revision) =
                        self.read_incident(&request.incident).await?;
                    if incident.status != IncidentStatus::Active {
                        return Ok(Plan::answer(Err(Error::Resolved(incident.id.to_string()))));
                    }
                    if incident.severity == request.severity {
                        return Ok(Plan::answer(Err(Error::SameSeverity {
                            id: incident.id.to_string(),
                            severity: incident.severity.to_string(),
                        })));
                    }
                    let at = Timestamp::now();
                    let change = || {
                        Ok(Change {
                            principal: request.actor.name.clone(),
                            reason: request.reason.clone(),
                            at,
                            incident_id: Some(incident.id.to_string()),
                        })
                    };
                    let staged =
                        match self.stage_move(&view, &incident, request.severity, change)? {
                            Ok(staged) => staged,
                            Err(refusal) => return Ok(Plan::answer(Err(refusal))),
                        };
                    let down = request.severity < incident.severity;
                    let mut writes = Writes::new(at);
                    if staged.lift_needs_approval(down, self.catalog()) {
                        let kind = RequestKind::Move {
                            severity: request.severity,
                        };
                        let ids: Vec<ActivationId> =
                            staged.lift.iter().map(|a| a.id.clone()).collect();
                        // Asking again returns the first request (a dry
                        // run shows what the request does instead).
                        if act.dry_run.is_none()
                            && let Some(first) = self
                                .same_request(
                                    namespace,
                                    &kind,
                                    Some((&incident.id, incident_revision)),
                                    &ids,
                                )
                                .await?
                        {
                            let in_force = incident_activations(&view, &incident);
                            return Ok(Plan::answer(Ok((
                                incident,
                                Vec::new(),
                                Vec::new(),
                                in_force,
                                Some(first),
                            ))));
                        }
                        let summary = format!(
                            "move incident {} from {} to {}: {}",
                            incident.id,
                            incident.severity,
                            request.severity,
                            staged.describe_pending()
                        );
                        let (pending, audit) = self.request_approval(
                            act,
                            &mut writes,
                            ApprovalNeeded {
                                kind: RequestKind::Move {
                                    severity: request.severity,
                                },
                                reason,
                                activation_ids: staged.lift.iter().map(|a| a.id.clone()).collect(),
                                incident: Some((&mut incident, incident_revision)),
                                summary,
                            },
                        );
                        let in_force = incident_activations(&view, &incident);
                        return Ok(writes.audited(
                            audit,
                            Ok((incident, Vec::new(), Vec::new(), in_force, Some(pending))),
                        ));
                    }
                    let moved = self.move_incident(
                        &mut writes,
                        &mut incident,
                        incident_revision,
                        &staged,
                        request.severity,
                        (&request.actor, reason, None),
                    );
                    writes.record_namespace(incident.activation_ids.iter().cloned());
                    let mut audit = act.entry(
                        reason,
                        format!(
                            "{} {} from {} to {}: {}",
                            moved.what,
                            incident.id,
                            moved.from,
                            request.severity,
                            staged.describe()
                        ),
                    );
                    audit.incident_id = Some(incident.id.to_string());
                    audit.activation_ids = incident
                        .activation_ids
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let in_force = staged.in_force();
                    Ok(writes.audited(
                        audit,
                        Ok((incident, staged.apply, staged.lift, in_force, None)),
                    ))
                })
            })
            .await?;
        let (incident, applied, lifted, in_force, pending) = outcome?;
        // What the change wrote (revision 0) is stored at its revision.
        let in_force = in_force
            .into_iter()
            .map(|a| match a.revision {
                0 => Arc::new(Activation {
                    revision,
                    ..(*a).clone()
                }),
                _ => a,
            })
            .collect();
        let applied = stored(applied, revision);
        let preview = DryRun::take(dry_run);
        if preview.is_none() {
            info!(incident = %incident.id, severity = %incident.severity, pending = pending.is_some(),
                revision, principal = %request.actor.name, "incident severity changed");
        }
        Ok(IncidentOutcome {
            incident,
            revision,
            applied,
            lifted,
            in_force,
            pending,
            preview,
        })
    }

    /// Resolves an incident: lifts its modes and closes it, or, when the
    /// runbook or a mode says so, records a pending request for a second
    /// approver.
    pub async fn resolve(&self, request: ResolveRequest) -> Result<IncidentOutcome> {
        let (found, _) = self.read_incident(&request.incident).await?;
        let request = &request;
        let namespace = &found.namespace;
        let reason = request.reason.as_str();
        let dry_run = DryRun::when(request.dry_run);
        let act = &Act {
            action: AuditAction::Resolve,
            actor: &request.actor,
            namespace,
            change_id: request.change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
                    let (mut incident, incident_revision) =
                        self.read_incident(&request.incident).await?;
                    if incident.status != IncidentStatus::Active {
                        return Ok(Plan::answer(Err(Error::Resolved(incident.id.to_string()))));
                    }
                    let at = Timestamp::now();
                    let staged = StagePlan {
                        keep: Vec::new(),
                        retext: Vec::new(),
                        lift: incident_activations(&view, &incident),
                        apply: Vec::new(),
                    };
                    let mut writes = Writes::new(at);
                    if staged.lift_needs_approval(true, self.catalog()) {
                        let ids: Vec<ActivationId> =
                            staged.lift.iter().map(|a| a.id.clone()).collect();
                        // Asking again returns the first request (a dry
                        // run shows what the request does instead).
                        if act.dry_run.is_none()
                            && let Some(first) = self
                                .same_request(
                                    namespace,
                                    &RequestKind::Resolve,
                                    Some((&incident.id, incident_revision)),
                                    &ids,
                                )
                                .await?
                        {
                            let in_force = staged.lift.clone();
                            return Ok(Plan::answer(Ok((
                                incident,
                                Vec::new(),
                                in_force,
                                Some(first),
                            ))));
                        }
                        let summary = format!(
                            "resolve incident {}: {}",
                            incident.id,
                            staged.describe_pending()
                        );
                        let (pending, audit) = self.request_approval(
                            act,
                            &mut writes,
                            ApprovalNeeded {
                                kind: RequestKind::Resolve,
                                reason,
                                activation_ids: staged.lift.iter().map(|a| a.id.clone()).collect(),
                                incident: Some((&mut incident, incident_revision)),
                                summary,
                            },
                        );
                        let in_force = staged.lift.clone();
                        return Ok(writes
                            .audited(audit, Ok((incident, Vec::new(), in_force, Some(pending)))));
                    }
                    self.close(
                        &mut writes,
                        &mut incident,
                        incident_revision,
                        &staged,
                        &request.actor,
                        reason,
                    );
                    writes.record_namespace(staged.lift.iter().map(|a| a.id.clone()));
                    let mut audit = act.entry(
                        reason,
                        format!("resolved {}: {}", incident.id, staged.describe()),
                    );
                    audit.incident_id = Some(incident.id.to_string());
                    audit.activation_ids = staged.lift.iter().map(|a| a.id.to_string()).collect();
                    Ok(writes.audited(audit, Ok((incident, staged.lift, Vec::new(), None))))
                })
            })
            .await?;
        let (incident, lifted, in_force, pending) = outcome?;
        let preview = DryRun::take(dry_run);
        if preview.is_none() {
            info!(incident = %incident.id, pending = pending.is_some(), revision,
                principal = %request.actor.name, "incident resolution");
        }
        Ok(IncidentOutcome {
            incident,
            revision,
            applied: Vec::new(),
            lifted,
            in_force,
            pending,
            preview,
        })
    }

    /// Stages moving `incident` to `severity` (escalating, or approving a
    /// requested move): its runbook's stage for `severity`, as the
    /// incident's activations in `view` become, for the change `change`
    /// makes (read only once the stage is known). The inner error is a
    /// refusal to answer with, the outer one a failure.
    pub(crate) fn stage_move(
        &self,
        view: &NamespaceView,
        incident: &Incident,
        severity: Severity,
        change: impl FnOnce() -> Result<Change>,
    ) -> Result<Result<StagePlan>> {
        let Some(runbook) = self.runbooks().get(incident.runbook.as_str()).cloned() else {
            return Ok(Err(self.unknown_runbook(incident.runbook.as_str())));
        };
        let stage = match stage(&runbook, severity) {
            Ok(stage) => stage,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let change = change()?;
        let existing = incident_activations(view, incident);
        Ok(Ok(self.stage_plan(
            &runbook,
            stage,
            incident.channels,
            existing,
            &change,
        )))
    }

    /// Adds to `writes` what moving `incident` to `severity` as `staged`
    /// writes: the stage's activations applied and lifted, the incident at
    /// its new severity with the move on its timeline, by `by` (who, why,
    /// and the request approved, if any).
    pub(crate) fn move_incident(
        &self,
        writes: &mut Writes,
        incident: &mut Incident,
        incident_revision: Revision,
        staged: &StagePlan,
        severity: Severity,
        (actor, reason, request): (&Principal, &str, Option<&RequestId>),
    ) -> Moved {
        let from = incident.severity;
        let what = if severity < from {
            "deescalated"
        } else {
            "escalated"
        };
        self.put_activations(writes, &incident.namespace, &staged.apply);
        self.rewrite_activations(writes, &incident.namespace, &staged.retext);
        self.delete_activations(writes, &incident.namespace, &staged.lift);
        incident.severity = severity;
        incident.activation_ids = staged.activation_ids();
        incident.timeline.push(
            TimelineEvent::new(writes.at(), what, actor, severity, Some(reason), request)
                .with_detail(staged.describe_modes()),
        );
        self.put_incident(writes, incident, incident_revision);
        writes.uses_catalog();
        Moved { from, what }
    }

    /// Adds to `writes` what resolving `incident` writes: its activations
    /// lifted, the incident closed, by `actor` for `reason`.
    pub(crate) fn close(
        &self,
        writes: &mut Writes,
        incident: &mut Incident,
        incident_revision: Revision,
        staged: &StagePlan,
        actor: &Principal,
        reason: &str,
    ) {
        self.delete_activations(writes, &incident.namespace, &staged.lift);
        writes.delete(
            self.config
                .layout
                .active_incident_key(&incident.namespace, &incident.runbook),
        );
        incident.status = IncidentStatus::Resolved;
        incident.activation_ids.clear();
        incident.timeline.push(
            TimelineEvent::new(
                writes.at(),
                "resolved",
                actor,
                incident.severity,
                Some(reason),
                None,
            )
            .with_detail(staged.describe_modes()),
        );
        self.put_incident(writes, incident, incident_revision);
    }

    /// The active incidents that `lifted` activations belong to, with the
    /// revisions of their records. An incident that is resolved or gone no
    /// longer owns anything.
    pub(crate) async fn owning_incidents(
        &self,
        lifted: &[Arc<Activation>],
    ) -> Result<Vec<(Incident, Revision)>> {
        let mut owners: Vec<(Incident, Revision)> = Vec::new();
        for activation in lifted {
            let Some(id) = activation.incident_id.as_deref() else {
                continue;
            };
            if owners.iter().any(|(i, _)| i.id.as_str() == id) {
                continue;
            }
            let Ok(id) = IncidentId::parse(id) else {
                continue;
            };
            match self.read_incident(&id).await {
                Ok((incident, revision)) if incident.status == IncidentStatus::Active => {
                    owners.push((incident, revision));
                }
                Ok(_) | Err(Error::UnknownIncident(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(owners)
    }

    /// Adds to `writes` each owning incident's record without the `lifted`
    /// activations and with a "lifted" event naming them, by `by` (who, why,
    /// and the request approved, if any): the record keeps saying what is
    /// in force.
    pub(crate) fn record_lifts(
        &self,
        writes: &mut Writes,
        owners: Vec<(Incident, Revision)>,
        lifted: &[Arc<Activation>],
        (actor, reason, request): (&Principal, &str, Option<&RequestId>),
    ) {
        for (mut incident, revision) in owners {
            let theirs: Vec<Arc<Activation>> = lifted
                .iter()
                .filter(|a| incident.activation_ids.contains(&a.id))
                .cloned()
                .collect();
            incident
                .activation_ids
                .retain(|id| !theirs.iter().any(|a| a.id == *id));
            incident.timeline.push(
                TimelineEvent::new(
                    writes.at(),
                    "lifted",
                    actor,
                    incident.severity,
                    Some(reason),
                    request,
                )
                .with_detail(format!("lifted {}", describe_modes(&theirs))),
            );
            self.put_incident(writes, &incident, revision);
        }
    }

    /// The incident's activations in force now, as this replica's view of
    /// its namespace has them (none once it is resolved): what an answer
    /// about the incident lists, whatever its record says.
    pub async fn in_force(&self, incident: &Incident) -> Result<Vec<Arc<Activation>>> {
        if incident.status != IncidentStatus::Active {
            return Ok(Vec::new());
        }
        let view = self.view(&incident.namespace).await?;
        Ok(in_force_in(&view, incident))
    }

    /// Every incident, with the revision of its record.
    pub(crate) async fn incidents(&self) -> Result<Vec<(Incident, Revision)>> {
        let prefix = self.config.layout.incidents_prefix();
        // In pages: resolved incidents stay, so the list only grows.
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        range
            .kvs
            .into_iter()
            .map(|kv| {
                Ok((
                    parse_incident(&kv.key, &kv.value, kv.mod_revision)?,
                    kv.mod_revision,
                ))
            })
            .collect()
    }

    /// Incidents in `namespace`, newest first; resolved ones only if asked.
    pub async fn list_incidents(
        &self,
        namespace: &Namespace,
        include_resolved: bool,
    ) -> Result<Vec<Incident>> {
        let mut incidents: Vec<Incident> = self
            .incidents()
            .await?
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| {
                i.namespace == *namespace
                    && (include_resolved || i.status == IncidentStatus::Active)
            })
            .collect();
        incidents.sort_by_key(|i| std::cmp::Reverse(i.declared_at));
        Ok(incidents)
    }

    /// One incident, with the revision of each timeline event.
    pub async fn incident(&self, id: &IncidentId) -> Result<Incident> {
        Ok(self.read_incident(id).await?.0)
    }

    /// An incident and the revision of its record.
    pub(crate) async fn read_incident(&self, id: &IncidentId) -> Result<(Incident, Revision)> {
        let key = self.config.layout.incident_key(id);
        let range = self.store.range(&key).await?;
        let kv = range
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .ok_or_else(|| Error::UnknownIncident(id.to_string()))?;
        Ok((
            parse_incident(&key, &kv.value, kv.mod_revision)?,
            kv.mod_revision,
        ))
    }
}

/// The incident's activations in force in `view`, its namespace's (none
/// once it is resolved).
pub fn in_force_in(view: &NamespaceView, incident: &Incident) -> Vec<Arc<Activation>> {
    if incident.status != IncidentStatus::Active {
        return Vec::new();
    }
    incident_activations(view, incident)
}

/// The incident's activations still present in `view`.
pub(crate) fn incident_activations(
    view: &NamespaceView,
    incident: &Incident,
) -> Vec<Arc<Activation>> {
    view.activations
        .iter()
        .filter(|a| incident.activation_ids.contains(&a.id))
        .cloned()
        .collect()
}

/// New activations as stored at `revision`.
pub(crate) fn stored(activations: Vec<Activation>, revision: Revision) -> Vec<Arc<Activation>> {
    activations
        .into_iter()
        .map(|a| Arc::new(Activation { revision, ..a }))
        .collect()
}

/// Reads an incident record last written at `revision`. Timeline events are
/// stored with revision 0, because a change's revision is known only once it
/// commits; every change to an incident reads it first, so the events still
/// at 0 are exactly those of the change that wrote the record, at `revision`.
fn parse_incident(key: &str, value: &[u8], revision: Revision) -> Result<Incident> {
    let mut incident: Incident = serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
    for event in &mut incident.timeline {
        if event.revision == 0 {
            event.revision = revision;
        }
    }
    Ok(incident)
}

impl Controller {
    /// The dead ends `in_force` (an active incident's activations) leaves,
    /// the actions no customer can get done on any channel: those the
    /// runbook's stage accepts in one line with its reason, any others in
    /// another.
    pub fn dead_end_warnings(
        &self,
        incident: &Incident,
        in_force: &[Arc<Activation>],
    ) -> Vec<String> {
        if incident.status != IncidentStatus::Active || in_force.is_empty() {
            return Vec::new();
        }
        let stage = self
            .runbooks()
            .get(incident.runbook.as_str())
            .and_then(|runbook| runbook.stage(incident.severity));
        let accepted = stage.and_then(|stage| stage.accepts_dead_ends.as_ref());
        let policy = EffectivePolicy::compile(in_force.iter().map(|a| &**a));
        let (kept, trapped): (Vec<DeadEnd>, Vec<DeadEnd>) = dead_ends(&policy)
            .into_iter()
            .partition(|dead| stage.is_some_and(|stage| stage.accepts_dead_end(dead.action)));
        let said = |ends: &[DeadEnd]| {
            ends.iter()
                .map(DeadEnd::describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lines = Vec::new();
        if let Some(accepted) = accepted.filter(|_| !kept.is_empty()) {
            lines.push(format!(
                "{}; accepted by the runbook: {}",
                said(&kept),
                accepted.reason
            ));
        }
        if !trapped.is_empty() {
            lines.push(format!(
                "{}; the runbook's stage does not accept it: genuine customers have no way through",
                said(&trapped)
            ));
        }
        lines
    }
}

/// The runbook's stage for `severity`, or a refusal naming the stages it
/// has.
pub(crate) fn stage(runbook: &Runbook, severity: Severity) -> Result<&Stage> {
    runbook.stage(severity).ok_or_else(|| Error::NoStage {
        runbook: runbook.name.to_string(),
        severity: severity.to_string(),
        stages: runbook
            .severities()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
