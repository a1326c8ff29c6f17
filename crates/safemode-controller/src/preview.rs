//! Dry runs: what a change would do, without doing it.
//!
//! A dry run is the change itself up to the commit: the operation prepares
//! its [`Plan`] with the same code, from the same view, with the same
//! refusals and the same approval decision (the permission check happens
//! before, at the edge, through the one table in [`crate::auth`]). Then,
//! instead of the transaction that writes the plan and appends its audit
//! entry, [`Controller::preview_change`] only confirms that the view is
//! current (a compare with no writes, as a refusal's answer is confirmed)
//! and reads the plan:
//!
//! - the namespace's activations after the plan's writes, or, when the plan
//!   would only create a request for a second approver, after approving that
//!   request (staged as approving stages it);
//! - both compiled into the effective policy, per channel, with
//!   [`EffectivePolicy::compile`], the compile every subscriber's snapshot
//!   comes from; the action keys whose effect (or customer message, or agent
//!   script) differ are the preview.
//!
//! Nothing is written, nothing is audited and no request is created: the
//! plan is dropped.

use std::sync::{Arc, OnceLock};

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use tracing::info;

use super::change::{Act, COMMIT_ATTEMPTS, Plan, pause};
use super::keys::NamespaceKey;
use super::records::{ChangeRequest, Incident, RequestKind};
use super::{Controller, Error, NamespaceHandle, NamespaceView, Result, corrupt};
use crate::audit::{AuditAction, AuditDraft};
use crate::auth::{Operation, roles_allowed};
use safemode_policy::compile::{ActionPolicy, EffectivePolicy, Entry};
use safemode_policy::mode::Condition;
use safemode_policy::{Activation, Change, Channel, Effect, Reason, Revision};
use safemode_store::{Compare, Op, Txn, TxnOutcome};

/// What a change would do, found by a dry run.
#[derive(Clone, Debug, PartialEq)]
pub struct Preview {
    /// The namespace revision it was prepared from.
    pub revision: Revision,
    /// The modes it would apply and lift, in words ("apply
    /// freeze-credential-changes on all; lift bots-faq-only on chatbot"),
    /// by name and channels: new activations have no id until they are
    /// made. Empty when no activation would change.
    pub summary: String,
    /// Set when the change would not take effect but wait for a second
    /// approver.
    pub approval: Option<ApprovalPreview>,
    /// The channels whose effective policy would change, in channel order.
    pub channels: Vec<ChannelChange>,
}

/// The approval a change would wait for.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalPreview {
    /// What approving it would do, as the request would say.
    pub summary: String,
    /// The roles whose holders may approve it in the namespace.
    pub roles: Vec<String>,
    /// Who may not: the requester.
    pub not_by: String,
}

/// How one channel's effective policy would change.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelChange {
    /// The channel.
    pub channel: Channel,
    /// The action keys that would change, in key order.
    pub effects: Vec<EffectChange>,
}

/// One action key (`account.password_reset`, `account.*`, `*`) whose
/// effective policy would change on a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectChange {
    /// The action key.
    pub action: String,
    /// The effect before ("allow", "deny", "step_up when amount over
    /// 500", ...).
    pub before: String,
    /// The effect after.
    pub after: String,
    /// The customer message before (empty: none).
    pub customer_message_before: String,
    /// The customer message after.
    pub customer_message_after: String,
    /// The agent script before (empty: none).
    pub agent_script_before: String,
    /// The agent script after.
    pub agent_script_after: String,
}

/// Where a dry run leaves its preview: an [`Act`] that carries one is
/// prepared as usual and never committed.
#[derive(Debug, Default)]
pub(crate) struct DryRun(OnceLock<Preview>);

impl DryRun {
    /// A slot for a dry run's preview when `dry_run`, else none.
    pub fn when(dry_run: bool) -> Option<DryRun> {
        dry_run.then(DryRun::default)
    }

    /// The preview, once the dry run has prepared its plan.
    pub fn take(slot: Option<DryRun>) -> Option<Preview> {
        slot.and_then(|slot| slot.0.into_inner())
    }

    /// Leaves the preview.
    pub(crate) fn set(&self, preview: Preview) {
        // One act prepares one plan that is kept: a second preview cannot
        // happen, and would say the same.
        let _ = self.0.set(preview);
    }
}

impl Controller {
    /// A dry run of `act`: prepares its plan from the namespace's view as
    /// [`Controller::commit_change`] does, confirms the view is current
    /// without writing, and returns the plan's outcome (a refusal is the
    /// same as the change's), the revision it was prepared from and what it
    /// would do.
    pub(crate) async fn preview_change<'a, T>(
        &'a self,
        act: &Act<'_>,
        handle: Arc<NamespaceHandle>,
        mut prepare: impl FnMut(Arc<NamespaceView>) -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision, Preview)> {
        let meta_key = self.config.layout.meta_key(act.namespace);
        for attempt in 0..COMMIT_ATTEMPTS {
            let view = NamespaceHandle::current(&handle);
            let plan = prepare(view.clone()).await?;
            let txn = Txn {
                compares: vec![Compare::ModRevision {
                    key: meta_key.clone(),
                    revision: view.meta_revision,
                }],
                ops: Vec::new(),
            };
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { .. } => {
                    let (outcome, written) = plan.into_parts();
                    let preview = self.preview(act, &view, written).await?;
                    info!(namespace = %act.namespace, action = act.action.as_str(),
                        principal = %act.actor.name, revision = view.revision,
                        needs_approval = preview.approval.is_some(),
                        "dry run: previewed, nothing written");
                    return Ok((outcome, view.revision, preview));
                }
                TxnOutcome::CompareFailed { .. } => {
                    pause(attempt).await;
                    self.catch_up(&handle, &view).await?;
                }
            }
        }
        Err(Error::Conflict(act.namespace.clone()))
    }

    /// What a plan prepared from `view` would do: `written` is its writes
    /// and audit entry, if it writes.
    async fn preview(
        &self,
        act: &Act<'_>,
        view: &NamespaceView,
        written: Option<(Vec<Op>, AuditDraft)>,
    ) -> Result<Preview> {
        let before = &view.activations;
        let Some((ops, audit)) = written else {
            // Nothing would be written: already active, or a refusal (which
            // the caller answers with).
            return Ok(Preview {
                revision: view.revision,
                summary: String::new(),
                approval: None,
                channels: Vec::new(),
            });
        };
        let (after, approval) = match (audit.action, &audit.request_id) {
            (AuditAction::Request, Some(id)) => {
                let request = self.written_request(&ops, id)?;
                let after = self.approved(view, &ops, &request).await?;
                let approval = ApprovalPreview {
                    summary: request.summary.clone(),
                    roles: roles_allowed(Operation::Approve, Some(act.namespace))
                        .into_iter()
                        .map(|r| r.as_str().to_string())
                        .collect(),
                    not_by: request.requested_by.clone(),
                };
                (after, Some(approval))
            }
            _ => (self.after_writes(view, &ops)?, None),
        };
        Ok(Preview {
            revision: view.revision,
            summary: modes_changed(before, &after),
            approval,
            channels: differences(before, &after),
        })
    }

    /// The namespace's activations once `ops` are written.
    fn after_writes(&self, view: &NamespaceView, ops: &[Op]) -> Result<Vec<Arc<Activation>>> {
        let layout = &self.config.layout;
        let mut after = view.activations.clone();
        for op in ops {
            let (Op::Put { key, .. } | Op::Delete { key }) = op;
            let NamespaceKey::Activation(id) = layout.classify(&view.namespace, key) else {
                continue;
            };
            after.retain(|a| a.id != id);
            if let Op::Put { value, .. } = op {
                let activation: Activation =
                    serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
                after.push(Arc::new(activation));
            }
        }
        Ok(after)
    }

    /// The request `id` that a plan's `ops` would create (a plan may write
    /// other requests too, such as those the new one replaces).
    fn written_request(&self, ops: &[Op], id: &str) -> Result<ChangeRequest> {
        let prefix = self.config.layout.requests_prefix();
        ops.iter()
            .find_map(|op| match op {
                Op::Put { key, value } if key.strip_prefix(&prefix) == Some(id) => {
                    Some((key, value))
                }
                _ => None,
            })
            .map(|(key, value)| serde_json::from_slice(value).map_err(|e| corrupt(key, e)))
            .unwrap_or_else(|| {
                Err(corrupt(
                    &format!("{prefix}{id}"),
                    "the plan that requests it does not write it",
                ))
            })
    }

    /// The namespace's activations once `request` (written by `ops`, from
    /// `view`) is approved: its activations lifted, and for a move the
    /// stage staged as approving it stages it.
    async fn approved(
        &self,
        view: &NamespaceView,
        ops: &[Op],
        request: &ChangeRequest,
    ) -> Result<Vec<Arc<Activation>>> {
        let lifting = |after: &mut Vec<Arc<Activation>>| {
            after.retain(|a| !request.activation_ids.contains(&a.id));
        };
        let mut after = view.activations.clone();
        let RequestKind::Move { severity } = request.kind else {
            lifting(&mut after);
            return Ok(after);
        };
        let Some(incident) = self.written_incident(ops, request).await? else {
            lifting(&mut after);
            return Ok(after);
        };
        let change = || {
            Ok(Change {
                principal: request.requested_by.clone(),
                reason: Reason::parse(&request.reason)
                    .map_err(|e| corrupt(&self.config.layout.request_key(&request.id), e))?,
                at: Timestamp::now(),
                incident_id: Some(incident.id.to_string()),
            })
        };
        let staged = self.stage_move(view, &incident, severity, change)??;
        after.retain(|a| !staged.lift.iter().any(|l| l.id == a.id));
        after.extend(staged.apply.into_iter().map(Arc::new));
        Ok(after)
    }

    /// The incident of `request`, as the plan writes it, else as stored.
    async fn written_incident(
        &self,
        ops: &[Op],
        request: &ChangeRequest,
    ) -> Result<Option<Incident>> {
        let Some(id) = &request.incident_id else {
            return Ok(None);
        };
        let key = self.config.layout.incident_key(id);
        let written = ops.iter().find_map(|op| match op {
            Op::Put { key: k, value } if *k == key => Some(value),
            _ => None,
        });
        match written {
            Some(value) => serde_json::from_slice(value)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
            None => Ok(Some(self.read_incident(id).await?.0)),
        }
    }
}

/// The modes on channels that `after` applies and lifts compared with
/// `before` (a mode kept on the same channels is neither).
fn modes_changed(before: &[Arc<Activation>], after: &[Arc<Activation>]) -> String {
    let scopes = |of: &[Arc<Activation>]| -> Vec<(String, String)> {
        let mut scopes: Vec<(String, String)> = of
            .iter()
            .map(|a| (a.mode.name.to_string(), a.channels.to_string()))
            .collect();
        scopes.sort();
        scopes.dedup();
        scopes
    };
    let (was, will) = (scopes(before), scopes(after));
    let listed = |verb: &str, these: &[(String, String)], not_in: &[(String, String)]| {
        let named: Vec<String> = these
            .iter()
            .filter(|s| !not_in.contains(s))
            .map(|(mode, channels)| format!("{mode} on {channels}"))
            .collect();
        (!named.is_empty()).then(|| format!("{verb} {}", named.join(", ")))
    };
    [listed("apply", &will, &was), listed("lift", &was, &will)]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

/// Per channel, the action keys whose effective policy differs between the
/// activations `before` and `after`.
pub(crate) fn differences(
    before: &[Arc<Activation>],
    after: &[Arc<Activation>],
) -> Vec<ChannelChange> {
    let compiled = |activations: &[Arc<Activation>]| {
        EffectivePolicy::compile(activations.iter().map(|a| &**a))
    };
    let (was, will) = (compiled(before), compiled(after));
    Channel::all()
        .filter_map(|channel| {
            let (was, will) = (was.channel(channel), will.channel(channel));
            let mut keys: Vec<String> = was
                .entries()
                .into_iter()
                .chain(will.entries())
                .map(|(key, _)| key)
                .collect();
            keys.sort();
            keys.dedup();
            let effects: Vec<EffectChange> = keys
                .into_iter()
                // A key absent on one side is looked up as a channel looks
                // up an action: `account.*` falls back to `*`, then allow.
                .filter_map(|key| {
                    let (b, a) = (
                        Described::of(was.lookup(&key)),
                        Described::of(will.lookup(&key)),
                    );
                    (b != a).then_some(EffectChange {
                        action: key,
                        before: b.effect,
                        after: a.effect,
                        customer_message_before: b.customer_message,
                        customer_message_after: a.customer_message,
                        agent_script_before: b.agent_script,
                        agent_script_after: a.agent_script,
                    })
                })
                .collect();
            (!effects.is_empty()).then_some(ChannelChange { channel, effects })
        })
        .collect()
}

/// An action key's policy, as people read it.
#[derive(PartialEq, Eq)]
struct Described {
    effect: String,
    customer_message: String,
    agent_script: String,
}

impl Described {
    fn of(policy: Option<&ActionPolicy>) -> Described {
        let base = policy.and_then(|p| p.base.as_ref());
        let mut effect = base.map_or_else(|| "allow".to_string(), describe_entry);
        for entry in policy.map_or(&[][..], |p| &p.conditional[..]) {
            let when = entry
                .when
                .as_ref()
                .map(describe_condition)
                .unwrap_or_default();
            effect.push_str(&format!("; {} when {when}", describe_entry(entry)));
        }
        let text = |t: Option<&Arc<str>>| t.map(|t| t.to_string()).unwrap_or_default();
        Described {
            effect,
            customer_message: text(base.and_then(|e| e.customer_message.as_ref())),
            agent_script: text(base.and_then(|e| e.agent_script.as_ref())),
        }
    }
}

/// "deny", "throttle 5 per 3600s", "route to web,app", ...; a standing
/// throttle under another effect is added ("step_up + throttle ...").
fn describe_entry(entry: &Entry) -> String {
    let mut text = describe_effect(&entry.effect);
    if let Some(throttle) = &entry.throttle
        && !matches!(entry.effect, Effect::Throttle(_))
    {
        text.push_str(&format!(
            " + throttle {} per {}s",
            throttle.limit.max, throttle.limit.window_seconds
        ));
    }
    text
}

fn describe_effect(effect: &Effect) -> String {
    match effect {
        Effect::Throttle(t) => format!("throttle {} per {}s", t.max, t.window_seconds),
        Effect::StepUp(s) => format!("step_up to {}", s.min_confidence),
        Effect::Review(r) => format!("review in {}", r.queue),
        Effect::Route(r) => format!("route to {}", r.to),
        other => other.kind().as_str().to_string(),
    }
}

/// "handoff from bot and amount over 500".
fn describe_condition(when: &Condition) -> String {
    let mut parts = Vec::new();
    match when.handoff_from_bot {
        Some(true) => parts.push("handoff from bot".to_string()),
        Some(false) => parts.push("no handoff from bot".to_string()),
        None => {}
    }
    if let Some(amount) = when.amount_over {
        parts.push(format!("amount over {amount}"));
    }
    if !when.bot_flags_any.is_empty() {
        parts.push(format!("bot flag {}", when.bot_flags_any.join("|")));
    }
    if parts.is_empty() {
        "always".to_string()
    } else {
        parts.join(" and ")
    }
}
