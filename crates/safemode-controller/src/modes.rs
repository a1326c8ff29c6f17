//! Applying and lifting modes. A lift of anything whose mode (or incident)
//! requires a second approver becomes a pending change request instead.

use std::sync::Arc;

use jiff::Timestamp;
use tracing::info;

use super::change::{Act, ApprovalNeeded, ChangeId, Plan, Writes};
use super::preview::{DryRun, Preview};
use super::records::{ChangeRequest, RequestKind};
use super::{Controller, Error, NamespaceView, Result};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::{
    Activation, ActivationId, Change, ChannelSet, Effect, Mode, ModeName, Namespace, Reason,
    Revision,
};

/// Apply modes to a namespace.
#[derive(Clone, Debug)]
pub struct ApplyRequest {
    /// The namespace.
    pub namespace: Namespace,
    /// Modes to apply, at least one.
    pub modes: Vec<ModeName>,
    /// Channels the activations cover.
    pub channels: ChannelSet,
    /// Read-only effects serve data as of this time; default: now.
    pub as_of: Option<Timestamp>,
    /// Who.
    pub actor: Principal,
    /// Why.
    pub reason: Reason,
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
    /// Only say what the change would do: nothing is written or audited.
    pub dry_run: bool,
}

/// What an apply did.
#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    /// Revision of the change (the namespace revision if nothing was new).
    pub revision: Revision,
    /// Activations created.
    pub applied: Vec<Arc<Activation>>,
    /// Requested modes already active with the same channels and rules.
    pub already_active: Vec<Arc<Activation>>,
    /// Set for a dry run: what the apply would do (then nothing was
    /// applied, and `applied` is what would be).
    pub preview: Option<Preview>,
}

/// What to lift: one activation, or every activation of a mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiftTarget {
    /// One activation.
    Activation(ActivationId),
    /// Every activation of this mode.
    Mode(ModeName),
}

impl LiftTarget {
    /// Parses an activation id (`act_...`) or a mode name.
    pub fn parse(text: &str) -> Result<Self, safemode_policy::NameError> {
        if ActivationId::looks_like(text) {
            ActivationId::parse(text).map(LiftTarget::Activation)
        } else {
            ModeName::parse(text).map(LiftTarget::Mode)
        }
    }
}

impl std::fmt::Display for LiftTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiftTarget::Activation(id) => id.fmt(f),
            LiftTarget::Mode(name) => name.fmt(f),
        }
    }
}

/// Lift activations in a namespace.
#[derive(Clone, Debug)]
pub struct LiftRequest {
    /// The namespace.
    pub namespace: Namespace,
    /// What to lift, at least one.
    pub targets: Vec<LiftTarget>,
    /// Who.
    pub actor: Principal,
    /// Why.
    pub reason: Reason,
    /// Lift every activation of a mode named in `targets`, when it has
    /// several (otherwise that is refused, so one commander does not lift
    /// another's scope by accident).
    pub all: bool,
    /// Lift activations of an active incident outside the incident
    /// (otherwise that is refused, naming the incident); each lift goes on
    /// the incident's timeline.
    pub incident_ok: bool,
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
    /// Only say what the change would do: nothing is written or audited.
    pub dry_run: bool,
}

/// What a lift did.
#[derive(Clone, Debug)]
pub struct LiftOutcome {
    /// Revision of the change.
    pub revision: Revision,
    /// Activations removed.
    pub lifted: Vec<Arc<Activation>>,
    /// Set instead when the lift needs a second approver.
    pub pending: Option<ChangeRequest>,
    /// Set for a dry run: what the lift would do (then nothing was lifted
    /// and no request made; `lifted` and `pending` are what would be).
    pub preview: Option<Preview>,
}

/// Whether an active activation's rules are those the catalogue's `mode`
/// would give now: the same mode, unchanged since, and (when the request names
/// one) the same read-only as-of time. Otherwise a new activation is applied
/// beside it, and the merge keeps the safer of the two.
pub(crate) fn same_rules(active: &Mode, mode: &Mode, as_of: Option<Timestamp>) -> bool {
    let with_as_of = |m: &Mode, at: Option<Timestamp>| {
        let mut m = m.clone();
        for rule in &mut m.rules {
            if let Effect::ReadOnly(r) = &mut rule.effect {
                r.as_of = at;
            }
        }
        m
    };
    match as_of {
        // No as-of asked for: any as-of time counts as the same.
        None => with_as_of(active, None) == with_as_of(mode, None),
        Some(at) => *active == with_as_of(mode, Some(at)),
    }
}

/// The activations a lift names, or why it cannot go ahead.
/// A mode target that matches nothing and is not in the catalogue (`known`
/// says) is refused as an unknown mode, so a typo gets a suggestion rather
/// than "nothing active".
fn resolve_lift(
    view: &NamespaceView,
    request: &LiftRequest,
    known: impl Fn(&str) -> Option<Error>,
) -> Result<Vec<Arc<Activation>>> {
    let mut lifted: Vec<Arc<Activation>> = Vec::new();
    for target in &request.targets {
        let matching: Vec<&Arc<Activation>> = view
            .activations
            .iter()
            .filter(|a| match target {
                LiftTarget::Activation(id) => a.id == *id,
                LiftTarget::Mode(name) => a.mode.name == *name,
            })
            .collect();
        if matching.is_empty() {
            if let LiftTarget::Mode(name) = target
                && let Some(unknown) = known(name.as_str())
            {
                return Err(unknown);
            }
            return Err(Error::NotActive {
                namespace: request.namespace.clone(),
                target: target.to_string(),
            });
        }
        if matching.len() > 1 && !request.all && matches!(target, LiftTarget::Mode(_)) {
            return Err(Error::Ambiguous {
                namespace: request.namespace.clone(),
                target: target.to_string(),
                matches: matching
                    .iter()
                    .map(|a| format!("{} on {}", a.id, a.channels))
                    .collect(),
            });
        }
        for a in matching {
            if !lifted.iter().any(|l| l.id == a.id) {
                lifted.push(a.clone());
            }
        }
    }
    Ok(lifted)
}

/// "freeze-credential-changes (act_x) on all channels; ...".
pub(crate) fn describe(activations: &[impl std::borrow::Borrow<Activation>]) -> String {
    activations
        .iter()
        .map(|a| {
            let a = a.borrow();
            format!("{} ({}) on {}", a.mode.name, a.id, a.channels)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// "freeze-credential-changes on all channels, bots-faq-only on chatbot":
/// what a person reads on an incident's timeline.
pub(crate) fn describe_modes(activations: &[impl std::borrow::Borrow<Activation>]) -> String {
    activations
        .iter()
        .map(|a| {
            let a = a.borrow();
            format!("{} on {}", a.mode.name, a.channels)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The incident every one of `activations` belongs to, if they share one
/// (so that `safemode audit --incident` finds a lift of its modes).
pub(crate) fn shared_incident(activations: &[Arc<Activation>]) -> Option<String> {
    let first = activations.first()?.incident_id.as_ref()?;
    activations
        .iter()
        .all(|a| a.incident_id.as_ref() == Some(first))
        .then(|| first.clone())
}

impl Controller {
    /// Applies modes in one atomic change. A mode already active with the
    /// same channels and rules is reported, not applied twice.
    pub async fn apply(&self, request: ApplyRequest) -> Result<ApplyOutcome> {
        let modes = request
            .modes
            .iter()
            .map(|name| {
                self.catalog()
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| self.unknown_mode(name.as_str()))
            })
            .collect::<Result<Vec<_>>>()?;
        let (request, modes) = (&request, &modes);
        let namespace = &request.namespace;
        let dry_run = DryRun::when(request.dry_run);
        let act = &Act {
            action: AuditAction::Apply,
            actor: &request.actor,
            namespace,
            change_id: request.change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
                    let at = Timestamp::now();
                    let change = Change {
                        principal: request.actor.name.clone(),
                        reason: request.reason.clone(),
                        at,
                        incident_id: None,
                    };
                    let as_of = request.as_of.unwrap_or(at);
                    let mut already_active = Vec::new();
                    let mut applied = Vec::new();
                    for mode in modes {
                        let active = view.activations.iter().find(|a| {
                            a.channels == request.channels
                                && same_rules(&a.mode, mode, request.as_of)
                        });
                        match active {
                            Some(a) => already_active.push(a.clone()),
                            None => applied.push(Activation::new(
                                ActivationId::from_random(rand::random()),
                                mode,
                                request.channels,
                                as_of,
                                &change,
                            )),
                        }
                    }
                    if applied.is_empty() {
                        return Ok(Plan::answer((Vec::new(), already_active)));
                    }
                    let reason = request.reason.as_str();
                    let mut writes = Writes::new(at);
                    self.put_activations(&mut writes, namespace, &applied);
                    writes.uses_catalog();
                    writes.record_namespace(applied.iter().map(|a| a.id.clone()));
                    let mut audit = act.entry(reason, format!("applied {}", describe(&applied)));
                    audit.activation_ids = applied.iter().map(|a| a.id.to_string()).collect();
                    Ok(writes.audited(audit, (applied, already_active)))
                })
            })
            .await?;
        let (applied, already_active) = outcome;
        let preview = DryRun::take(dry_run);
        if !applied.is_empty() && preview.is_none() {
            info!(%namespace, revision, principal = %request.actor.name,
                modes = ?applied.iter().map(|a| a.mode.name.as_str()).collect::<Vec<_>>(),
                reason = %request.reason.as_str(), "modes applied");
        }
        Ok(ApplyOutcome {
            revision,
            applied: applied
                .into_iter()
                .map(|a| Arc::new(Activation { revision, ..a }))
                .collect(),
            already_active,
            preview,
        })
    }

    /// Lifts activations in one atomic change, or, when any of them needs a
    /// second approver, records a pending request for them.
    pub async fn lift(&self, request: LiftRequest) -> Result<LiftOutcome> {
        let request = &request;
        let namespace = &request.namespace;
        let dry_run = DryRun::when(request.dry_run);
        let act = &Act {
            action: AuditAction::Lift,
            actor: &request.actor,
            namespace,
            change_id: request.change_id.as_ref(),
            dry_run: dry_run.as_ref(),
        };
        let (outcome, revision) = self
            .commit_change(act, |view| {
                Box::pin(async move {
                    let unknown = |name: &str| {
                        self.catalog()
                            .get(name)
                            .is_none()
                            .then(|| self.unknown_mode(name))
                    };
                    let lifted = match resolve_lift(&view, request, unknown) {
                        Ok(lifted) => lifted,
                        // Answered once the store confirms the view is current.
                        Err(refusal) => return Ok(Plan::answer(Err(refusal))),
                    };
                    let owners = self.owning_incidents(&lifted).await?;
                    if let Some((incident, _)) = owners.first()
                        && !request.incident_ok
                    {
                        return Ok(Plan::answer(Err(Error::IncidentModes {
                            activations: describe(
                                &lifted
                                    .iter()
                                    .filter(|a| {
                                        a.incident_id.as_deref() == Some(incident.id.as_str())
                                    })
                                    .cloned()
                                    .collect::<Vec<_>>(),
                            ),
                            incident: incident.id.to_string(),
                            runbook: incident.runbook.to_string(),
                            namespace: namespace.clone(),
                        })));
                    }
                    let at = Timestamp::now();
                    let reason = request.reason.as_str();
                    let needs_approval = lifted.iter().any(|a| a.mode.lift_requires_approval);
                    let mut writes = Writes::new(at);
                    if needs_approval {
                        let ids: Vec<ActivationId> = lifted.iter().map(|a| a.id.clone()).collect();
                        // A lift of one active incident's modes is that
                        // incident's request: on its timeline, and
                        // superseded once the incident changes.
                        let mut owner = match owners.len() {
                            1 => owners.into_iter().next(),
                            _ => None,
                        };
                        // Asking again returns the first request (a dry
                        // run shows what the request does instead).
                        if act.dry_run.is_none()
                            && let Some(first) = self
                                .same_request(
                                    namespace,
                                    &RequestKind::Lift,
                                    owner.as_ref().map(|(i, r)| (&i.id, *r)),
                                    &ids,
                                )
                                .await?
                        {
                            return Ok(Plan::answer(Ok((Vec::new(), Some(first)))));
                        }
                        let (pending, mut audit) = self.request_approval(
                            act,
                            &mut writes,
                            ApprovalNeeded {
                                kind: RequestKind::Lift,
                                reason,
                                activation_ids: ids,
                                incident: owner.as_mut().map(|(i, r)| (i, *r)),
                                summary: format!("lift {}", describe(&lifted)),
                            },
                        );
                        audit.incident_id = shared_incident(&lifted);
                        return Ok(writes.audited(audit, Ok((Vec::new(), Some(pending)))));
                    }
                    self.delete_activations(&mut writes, namespace, &lifted);
                    self.record_lifts(&mut writes, owners, &lifted, (&request.actor, reason, None));
                    writes.record_namespace(lifted.iter().map(|a| a.id.clone()));
                    let mut audit = act.entry(reason, format!("lifted {}", describe(&lifted)));
                    audit.activation_ids = lifted.iter().map(|a| a.id.to_string()).collect();
                    audit.incident_id = shared_incident(&lifted);
                    Ok(writes.audited(audit, Ok((lifted, None))))
                })
            })
            .await?;
        let (lifted, pending) = outcome?;
        let preview = DryRun::take(dry_run);
        if !lifted.is_empty() && preview.is_none() {
            info!(%namespace, revision, principal = %request.actor.name,
                lifted = ?lifted.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                reason = %request.reason.as_str(), "activations lifted");
        }
        Ok(LiftOutcome {
            revision,
            lifted,
            pending,
            preview,
        })
    }
}
