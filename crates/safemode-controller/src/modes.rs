//! Applying and lifting modes. A lift of anything whose mode (or incident)
//! requires a second approver becomes a pending change request instead.

use std::sync::Arc;

use jiff::Timestamp;
use tracing::info;

use super::approvals::ApprovalNeeded;
use super::change::{ChangeId, ChangeOf, Plan};
use super::keys::NamespaceChange;
use super::records::{ChangeRequest, RequestKind};
use super::{Controller, Error, NamespaceView, Result};
use crate::audit::{AuditAction, AuditDraft};
use crate::auth::Principal;
use safemode_policy::{
    Activation, ActivationId, Change, ChannelSet, Effect, Mode, ModeName, Namespace, Reason,
    Revision,
};
use safemode_store::{Compare, Op};

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
    /// The change's id, if the caller gave one (a retry gives the same):
    /// a change id that already committed is answered, not applied again.
    pub change_id: Option<ChangeId>,
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
fn resolve_lift(view: &NamespaceView, request: &LiftRequest) -> Result<Vec<Arc<Activation>>> {
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

/// Puts new activations (each key must be absent).
pub(crate) fn put_activations<T>(
    plan: &mut Plan<T>,
    controller: &Controller,
    namespace: &Namespace,
    activations: &[Activation],
) {
    for activation in activations {
        let key = controller
            .config
            .layout
            .activation_key(namespace, &activation.id);
        plan.compares.push(Compare::ModRevision {
            key: key.clone(),
            revision: 0,
        });
        plan.ops.push(Op::Put {
            key,
            value: serde_json::to_vec(activation).expect("activations serialize"),
        });
    }
}

/// Deletes activations (each must be unchanged since it was read).
pub(crate) fn delete_activations<T>(
    plan: &mut Plan<T>,
    controller: &Controller,
    namespace: &Namespace,
    activations: &[Arc<Activation>],
) {
    for activation in activations {
        let key = controller
            .config
            .layout
            .activation_key(namespace, &activation.id);
        plan.compares.push(Compare::ModRevision {
            key: key.clone(),
            revision: activation.revision,
        });
        plan.ops.push(Op::Delete { key });
    }
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

/// An audit draft for `actor` in `namespace`.
pub(crate) fn draft(
    action: AuditAction,
    actor: &Principal,
    namespace: &Namespace,
    reason: &str,
    detail: String,
) -> AuditDraft {
    AuditDraft {
        action,
        principal: actor.name.clone(),
        roles: actor.role_names(),
        namespace: Some(namespace.to_string()),
        reason: Some(reason.to_string()),
        incident_id: None,
        request_id: None,
        activation_ids: Vec::new(),
        detail,
        change_id: None,
    }
}

/// A change of `operation`, with the caller's change id if given.
pub(crate) fn change<'a>(operation: &'static str, id: &'a Option<ChangeId>) -> ChangeOf<'a> {
    ChangeOf {
        operation,
        id: id.as_ref(),
    }
}

/// The namespace's last-change record.
pub(crate) fn record(
    action: AuditAction,
    actor: &Principal,
    reason: &str,
    at: Timestamp,
    activations: impl IntoIterator<Item = ActivationId>,
) -> NamespaceChange {
    NamespaceChange {
        action,
        principal: actor.name.clone(),
        reason: reason.to_string(),
        at,
        activation_ids: activations.into_iter().collect(),
        // Filled in by `Controller::commit`, which knows the whole change.
        state: None,
    }
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
                    .ok_or_else(|| Error::UnknownMode(name.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let (request, modes) = (&request, &modes);
        let namespace = &request.namespace;
        let (outcome, revision) = self
            .commit_change(
                change("apply", &request.change_id),
                Some(namespace),
                |view| {
                    Box::pin(async move {
                        let view = view.expect("a namespace change has a view");
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
                        let mut plan = Plan::answer((Vec::new(), already_active));
                        plan.at = at;
                        put_activations(&mut plan, self, namespace, &applied);
                        plan.uses_catalog = true;
                        plan.record = Some(record(
                            AuditAction::Apply,
                            &request.actor,
                            reason,
                            at,
                            applied.iter().map(|a| a.id.clone()),
                        ));
                        let mut audit = draft(
                            AuditAction::Apply,
                            &request.actor,
                            namespace,
                            reason,
                            format!("applied {}", describe(&applied)),
                        );
                        audit.activation_ids = applied.iter().map(|a| a.id.to_string()).collect();
                        plan.audit = Some(audit);
                        plan.outcome.0 = applied;
                        Ok(plan)
                    })
                },
            )
            .await?;
        let (applied, already_active) = outcome;
        if !applied.is_empty() {
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
        })
    }

    /// Lifts activations in one atomic change, or, when any of them needs a
    /// second approver, records a pending request for them.
    pub async fn lift(&self, request: LiftRequest) -> Result<LiftOutcome> {
        let request = &request;
        let namespace = &request.namespace;
        let (outcome, revision) = self
            .commit_change(
                change("lift", &request.change_id),
                Some(namespace),
                |view| {
                    Box::pin(async move {
                        let view = view.expect("a namespace change has a view");
                        let lifted = match resolve_lift(&view, request) {
                            Ok(lifted) => lifted,
                            // Answered once the store confirms the view is current.
                            Err(refusal) => return Ok(Plan::answer(Err(refusal))),
                        };
                        let at = Timestamp::now();
                        let reason = request.reason.as_str();
                        let needs_approval = lifted.iter().any(|a| a.mode.lift_requires_approval);
                        let mut plan = Plan::answer(Ok((Vec::new(), None)));
                        plan.at = at;
                        if needs_approval {
                            let pending = self.request_approval(
                                &mut plan,
                                ApprovalNeeded {
                                    kind: RequestKind::Lift,
                                    namespace,
                                    actor: &request.actor,
                                    reason,
                                    activation_ids: lifted.iter().map(|a| a.id.clone()).collect(),
                                    incident: None,
                                    summary: format!("lift {}", describe(&lifted)),
                                },
                            );
                            if let Some(audit) = plan.audit.as_mut() {
                                audit.incident_id = shared_incident(&lifted);
                            }
                            plan.outcome = Ok((Vec::new(), Some(pending)));
                            return Ok(plan);
                        }
                        delete_activations(&mut plan, self, namespace, &lifted);
                        plan.record = Some(record(
                            AuditAction::Lift,
                            &request.actor,
                            reason,
                            at,
                            lifted.iter().map(|a| a.id.clone()),
                        ));
                        let mut audit = draft(
                            AuditAction::Lift,
                            &request.actor,
                            namespace,
                            reason,
                            format!("lifted {}", describe(&lifted)),
                        );
                        audit.activation_ids = lifted.iter().map(|a| a.id.to_string()).collect();
                        audit.incident_id = shared_incident(&lifted);
                        plan.audit = Some(audit);
                        plan.outcome = Ok((lifted, None));
                        Ok(plan)
                    })
                },
            )
            .await?;
        let (lifted, pending) = outcome?;
        if !lifted.is_empty() {
            info!(%namespace, revision, principal = %request.actor.name,
                lifted = ?lifted.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                reason = %request.reason.as_str(), "activations lifted");
        }
        Ok(LiftOutcome {
            revision,
            lifted,
            pending,
        })
    }
}
