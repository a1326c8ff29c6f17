//! Early-warning proposals: the controller's suggestion to declare an
//! incident at a stage, raised when a runbook trigger fires over the signals
//! channels report (summed across the fleet), or by an external detector.
//! A proposal never declares anything: a commander accepts it (which
//! declares the incident through the same preparation as `declare`, in the
//! same transaction that marks the proposal accepted, the incident's
//! timeline citing the evidence) or dismisses it with a reason.
//!
//! ```text
//! {prefix}proposals/{namespace}/{proposal id}                          Proposal (JSON)
//! {prefix}triggers/{namespace}/{type}/{severity}/{signal or -external} the last proposal's id
//! ```
//!
//! **One firing condition raises one proposal.** Raising compares the
//! trigger's key (absent, or at the revision read) and puts the new
//! proposal's id there in the same audited transaction, so two replicas that
//! see the same sum race on one key: the loser prepares again, finds the
//! winner's proposal open, and raises nothing. While the trigger's last
//! proposal is open it raises no other; once that proposal is closed, the
//! trigger raises again only after its window has passed since it closed
//! (the sum over the window then holds nothing that was already decided).
//! An external detector's condition is its incident type and severity: while
//! its proposal is open, raising again answers with that one.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::change::{Act, ChangeId, Plan, Writes};
use super::incidents::{Declaration, DeclareRequest, Declaring, IncidentOutcome, stage, stored};
use super::records::{IncidentId, ProposalId};
use super::{Controller, Error, Result, corrupt};
use crate::audit::AuditAction;
use crate::auth::Principal;
use safemode_policy::runbook::{Runbook, RunbookName, Severity, Trigger, describe_window};
use safemode_policy::{ChannelSet, Namespace, Reason, Revision};

/// The principal named on proposals a runbook trigger raises (and on their
/// audit entries).
pub const TRIGGER_PRINCIPAL: &str = "trigger";

/// The most proposals one list answers with (newest first).
pub const MAX_LISTED: usize = 100;

/// How many closed proposals a namespace keeps: raising one removes the
/// oldest closed ones past this many (the audit log keeps every one).
#[cfg(not(test))]
pub(crate) const MAX_KEPT_CLOSED: usize = 200;
/// A short bound, so a unit test can go past it.
#[cfg(test)]
pub(crate) const MAX_KEPT_CLOSED: usize = 3;

/// The most characters of an external detector's summary.
pub const MAX_SUMMARY_CHARS: usize = 500;

/// The trigger key's last segment for an external detector's proposals:
/// no signal name can be it (signal names have no `-`).
const EXTERNAL: &str = "-external";

/// One channel's part of a signal's count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalCount {
    /// The channel.
    pub channel: String,
    /// How many it reported in the window.
    pub count: u64,
}

/// Why a proposal was raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Evidence {
    /// A runbook trigger fired.
    Trigger {
        /// The signal.
        signal: String,
        /// Its sum across the fleet over the window, when raised.
        count: u64,
        /// The trigger's threshold.
        above: u64,
        /// The window, in seconds.
        within_seconds: u64,
        /// The count per channel, largest first.
        channels: Vec<SignalCount>,
        /// Replicas that did not answer: the count may be low.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
    },
    /// An external detector raised it.
    External {
        /// What the detector saw, in its words.
        summary: String,
    },
}

impl Evidence {
    /// The evidence in one line, for timelines and text output.
    pub fn describe(&self) -> String {
        match self {
            Evidence::Trigger {
                signal,
                count,
                above,
                within_seconds,
                channels,
                partial,
            } => {
                let by: Vec<String> = channels
                    .iter()
                    .map(|c| format!("{} {}", c.channel, c.count))
                    .collect();
                format!(
                    "{signal} counted {count} in {} across the fleet, above {above}{}{}",
                    describe_window(Duration::from_secs(*within_seconds)),
                    if by.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", by.join(", "))
                    },
                    if *partial {
                        "; some replicas did not answer"
                    } else {
                        ""
                    }
                )
            }
            Evidence::External { summary } => format!("external detector: {summary}"),
        }
    }
}

/// Where a proposal stands, as its record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProposalState {
    /// Waiting for a commander.
    Open,
    /// Accepted: its incident was declared.
    Accepted {
        /// Who accepted it.
        by: String,
        /// When.
        at: Timestamp,
        /// Why.
        reason: String,
        /// The incident it declared.
        incident_id: IncidentId,
    },
    /// Dismissed: nothing was declared.
    Dismissed {
        /// Who dismissed it.
        by: String,
        /// When.
        at: Timestamp,
        /// Why.
        reason: String,
    },
}

impl ProposalState {
    /// `open`, `accepted` or `dismissed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProposalState::Open => "open",
            ProposalState::Accepted { .. } => "accepted",
            ProposalState::Dismissed { .. } => "dismissed",
        }
    }

    /// When it was closed, if it was.
    pub fn closed_at(&self) -> Option<Timestamp> {
        match self {
            ProposalState::Open => None,
            ProposalState::Accepted { at, .. } | ProposalState::Dismissed { at, .. } => Some(*at),
        }
    }

    /// In words: "open", "accepted by bob at ... (inc_x)".
    pub fn describe(&self) -> String {
        let at = |t: &Timestamp| t.round(jiff::Unit::Second).unwrap_or(*t);
        match self {
            ProposalState::Open => "open".to_string(),
            ProposalState::Accepted {
                by,
                at: when,
                incident_id,
                ..
            } => format!("accepted by {by} at {} ({incident_id})", at(when)),
            ProposalState::Dismissed { by, at: when, .. } => {
                format!("dismissed by {by} at {}", at(when))
            }
        }
    }
}

/// The suggestion to declare an incident at a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Its id.
    pub id: ProposalId,
    /// Where the incident would be declared.
    pub namespace: Namespace,
    /// The incident type.
    pub runbook: RunbookName,
    /// The stage proposed.
    pub severity: Severity,
    /// Why it was raised.
    pub evidence: Evidence,
    /// Who raised it: [`TRIGGER_PRINCIPAL`], or the detector's principal.
    pub raised_by: String,
    /// When.
    pub raised_at: Timestamp,
    /// Open, accepted or dismissed.
    #[serde(flatten)]
    pub state: ProposalState,
}

impl Proposal {
    /// "declare credential-stuffing sev3?"
    pub fn question(&self) -> String {
        format!("declare {} {}?", self.runbook, self.severity)
    }
}

/// What raising did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaiseOutcome {
    /// The proposal: the new one, or the open one that already stands for
    /// the same condition.
    pub proposal: Proposal,
    /// Whether this call raised it.
    pub created: bool,
}

/// What accepting did.
#[derive(Clone, Debug)]
pub struct AcceptOutcome {
    /// The proposal, now accepted.
    pub proposal: Proposal,
    /// The declaration.
    pub declared: IncidentOutcome,
}

/// What dismissing did.
#[derive(Clone, Debug)]
pub struct DismissOutcome {
    /// The proposal, now dismissed.
    pub proposal: Proposal,
    /// Revision of the change.
    pub revision: Revision,
}

/// Whether a trigger whose last proposal is `last` may raise again at `now`.
fn may_raise_again(last: &Proposal, within: Duration, now: Timestamp) -> bool {
    match last.state.closed_at() {
        None => false,
        Some(closed) => {
            let wait = jiff::SignedDuration::try_from(within).unwrap_or(jiff::SignedDuration::MAX);
            closed.saturating_add(wait).is_ok_and(|until| now >= until)
        }
    }
}

impl Controller {
    /// The proposals of `namespace`, newest first, at most [`MAX_LISTED`];
    /// only the open ones unless `include_closed`.
    pub async fn list_proposals(
        &self,
        namespace: &Namespace,
        include_closed: bool,
    ) -> Result<Vec<Proposal>> {
        let prefix = self.config.layout.proposals_prefix(namespace);
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        let mut proposals = Vec::new();
        for kv in range.kvs {
            let proposal: Proposal =
                serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            if include_closed || proposal.state == ProposalState::Open {
                proposals.push(proposal);
            }
        }
        proposals.sort_by_key(|p| std::cmp::Reverse(p.raised_at));
        proposals.truncate(MAX_LISTED);
        Ok(proposals)
    }

    /// How many proposals are open in `namespace` (for status and metrics).
    pub async fn open_proposals(&self, namespace: &Namespace) -> Result<usize> {
        Ok(self.list_proposals(namespace, false).await?.len())
    }

    /// One proposal and the revision of its record.
    async fn read_proposal(
        &self,
        namespace: &Namespace,
        id: &ProposalId,
    ) -> Result<(Proposal, Revision)> {
        let key = self.config.layout.proposal_key(namespace, id);
        let range = self.store.range(&key).await?;
        let kv = range
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .ok_or_else(|| Error::UnknownProposal(id.to_string()))?;
        let proposal = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?;
        Ok((proposal, kv.mod_revision))
    }

    /// One proposal of `namespace`.
    pub async fn proposal(&self, namespace: &Namespace, id: &ProposalId) -> Result<Proposal> {
        Ok(self.read_proposal(namespace, id).await?.0)
    }

    /// Raises a proposal for `trigger` of `runbook` in `namespace`, whose
    /// signal counted `count` across the fleet (`channels`: by channel),
    /// unless the trigger's last proposal is open, or was closed less than
    /// its window ago, or the runbook's incident is active there. Returns the
    /// proposal raised, if any. Audited; declares nothing.
    pub async fn raise_from_trigger(
        &self,
        namespace: &Namespace,
        runbook: &Runbook,
        trigger: &Trigger,
        count: u64,
        channels: Vec<SignalCount>,
        partial: bool,
    ) -> Result<Option<Proposal>> {
        let actor = Principal {
            name: TRIGGER_PRINCIPAL.to_string(),
            roles: Vec::new(),
        };
        let evidence = Evidence::Trigger {
            signal: trigger.signal.to_string(),
            count,
            above: trigger.above,
            within_seconds: trigger.within.as_secs(),
            channels,
            partial,
        };
        let reason = format!(
            "runbook {} trigger fired: {} (replica {})",
            runbook.name,
            trigger.describe(),
            self.config.replica
        );
        let raised = self
            .raise(
                namespace,
                &runbook.name,
                trigger.severity,
                trigger.signal.as_str(),
                Some(trigger.within),
                evidence,
                &reason,
                &actor,
                None,
            )
            .await;
        match raised {
            Ok(raised) => Ok(raised.and_then(|r| r.created.then_some(r.proposal))),
            // The incident is already declared: nothing to propose.
            Err(Error::AlreadyDeclared { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// Raises a proposal for an external detector (`actor`): declare
    /// `runbook` at `severity` in `namespace`, because of `summary`. While a
    /// detector's proposal for the same type and severity is open, answers
    /// with it instead of raising another.
    #[allow(clippy::too_many_arguments)]
    pub async fn raise_external(
        &self,
        namespace: &Namespace,
        runbook: &RunbookName,
        severity: Severity,
        summary: &str,
        reason: &Reason,
        actor: &Principal,
        change_id: Option<ChangeId>,
    ) -> Result<RaiseOutcome> {
        let found = self
            .runbooks()
            .get(runbook.as_str())
            .cloned()
            .ok_or_else(|| self.unknown_runbook(runbook.as_str()))?;
        stage(&found, severity)?;
        let evidence = Evidence::External {
            summary: summary.to_string(),
        };
        self.raise(
            namespace,
            runbook,
            severity,
            EXTERNAL,
            None,
            evidence,
            reason.as_str(),
            actor,
            change_id.as_ref(),
        )
        .await?
        .ok_or_else(|| {
            corrupt(
                "proposals",
                "an external raise was held back like a trigger's",
            )
        })
    }

    /// The one raise: compares the condition's trigger key and puts the new
    /// proposal's id there, so one condition raises one proposal across
    /// replicas. `AlreadyDeclared`: the runbook's incident is active in the
    /// namespace. `None`: (`again_after` set, a trigger) its last proposal
    /// was closed too recently. An open proposal of the condition is
    /// answered, not raised again.
    #[allow(clippy::too_many_arguments)]
    async fn raise(
        &self,
        namespace: &Namespace,
        runbook: &RunbookName,
        severity: Severity,
        source: &str,
        again_after: Option<Duration>,
        evidence: Evidence,
        reason: &str,
        actor: &Principal,
        change_id: Option<&ChangeId>,
    ) -> Result<Option<RaiseOutcome>> {
        let act = &Act {
            action: AuditAction::Propose,
            actor,
            namespace,
            change_id,
            dry_run: None,
        };
        let evidence = &evidence;
        let (outcome, revision) = self
            .commit_change(act, |_view| {
                Box::pin(async move {
                    let layout = &self.config.layout;
                    let at = Timestamp::now();
                    let pointer = layout.active_incident_key(namespace, runbook);
                    let active = self.store.range(&pointer).await?;
                    if let Some(kv) = active.kvs.iter().find(|kv| kv.key == pointer) {
                        return Ok(Plan::answer(Err(Error::AlreadyDeclared {
                            id: String::from_utf8_lossy(&kv.value).into_owned(),
                            runbook: runbook.to_string(),
                            namespace: namespace.clone(),
                        })));
                    }
                    let trigger_key = layout.trigger_key(namespace, runbook, severity, source);
                    let range = self.store.range(&trigger_key).await?;
                    let last = range.kvs.into_iter().find(|kv| kv.key == trigger_key);
                    let trigger_revision = last.as_ref().map_or(0, |kv| kv.mod_revision);
                    if let Some(kv) = &last {
                        let id = ProposalId::parse(&String::from_utf8_lossy(&kv.value))
                            .map_err(|e| corrupt(&trigger_key, e))?;
                        match self.read_proposal(namespace, &id).await {
                            Ok((last, _)) if last.state == ProposalState::Open => {
                                return Ok(Plan::answer(Ok(Some(RaiseOutcome {
                                    proposal: last,
                                    created: false,
                                }))));
                            }
                            Ok((last, _)) => {
                                if let Some(within) = again_after
                                    && !may_raise_again(&last, within, at)
                                {
                                    return Ok(Plan::answer(Ok(None)));
                                }
                            }
                            // A proposal record gone: raise afresh.
                            Err(Error::UnknownProposal(_)) => {}
                            Err(other) => return Err(other),
                        }
                    }
                    let proposal = Proposal {
                        id: ProposalId::random(),
                        namespace: namespace.clone(),
                        runbook: runbook.clone(),
                        severity,
                        evidence: evidence.clone(),
                        raised_by: actor.name.clone(),
                        raised_at: at,
                        state: ProposalState::Open,
                    };
                    let mut writes = Writes::new(at);
                    // Declared meanwhile: prepared again, and not raised.
                    writes.unchanged(pointer, 0);
                    writes.unchanged(trigger_key.clone(), trigger_revision);
                    writes.put(trigger_key, proposal.id.to_string().into_bytes());
                    let key = layout.proposal_key(namespace, &proposal.id);
                    writes.unchanged(key.clone(), 0);
                    writes.put(
                        key,
                        serde_json::to_vec(&proposal).expect("proposals serialize"),
                    );
                    writes.uses_catalog();
                    let removed = self.prune_closed(&mut writes, namespace).await?;
                    let audit = act.entry(
                        reason,
                        format!(
                            "raised {}: {} because {}{}",
                            proposal.id,
                            proposal.question(),
                            evidence.describe(),
                            match removed {
                                0 => String::new(),
                                n => format!(
                                    "; removed the {n} oldest closed proposals past the newest {MAX_KEPT_CLOSED}"
                                ),
                            }
                        ),
                    );
                    Ok(writes.audited(
                        audit,
                        Ok(Some(RaiseOutcome {
                            proposal,
                            created: true,
                        })),
                    ))
                })
            })
            .await?;
        let outcome = outcome?;
        if let Some(RaiseOutcome {
            proposal,
            created: true,
        }) = &outcome
        {
            info!(proposal = %proposal.id, runbook = %proposal.runbook, severity = %proposal.severity,
                namespace = %namespace, revision, principal = %actor.name, "proposal raised");
        }
        Ok(outcome)
    }

    /// Adds to `writes` the removal of the oldest closed proposals of
    /// `namespace` past [`MAX_KEPT_CLOSED`], so the records stay bounded;
    /// returns how many.
    async fn prune_closed(&self, writes: &mut Writes, namespace: &Namespace) -> Result<usize> {
        let prefix = self.config.layout.proposals_prefix(namespace);
        let range = safemode_store::read_all(&*self.store, &prefix).await?;
        let mut closed: Vec<(Timestamp, String, Revision)> = Vec::new();
        for kv in range.kvs {
            let proposal: Proposal =
                serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            if let Some(at) = proposal.state.closed_at() {
                closed.push((at, kv.key, kv.mod_revision));
            }
        }
        if closed.len() <= MAX_KEPT_CLOSED {
            return Ok(0);
        }
        closed.sort();
        let excess = closed.len() - MAX_KEPT_CLOSED;
        for (_, key, revision) in closed.into_iter().take(excess) {
            writes.unchanged(key.clone(), revision);
            writes.delete(key);
        }
        Ok(excess)
    }

    /// Accepts an open proposal, as `actor`: declares its incident at its
    /// severity (the incident's timeline citing the evidence) and marks the
    /// proposal accepted, in one transaction.
    pub async fn accept_proposal(
        &self,
        namespace: &Namespace,
        id: &ProposalId,
        reason: Reason,
        actor: &Principal,
        change_id: Option<ChangeId>,
    ) -> Result<AcceptOutcome> {
        let (found, _) = self.read_proposal(namespace, id).await?;
        let runbook = self
            .runbooks()
            .get(found.runbook.as_str())
            .cloned()
            .ok_or_else(|| self.unknown_runbook(found.runbook.as_str()))?;
        let stage = stage(&runbook, found.severity)?;
        let request = &DeclareRequest {
            namespace: namespace.clone(),
            runbook: found.runbook.clone(),
            severity: found.severity,
            reason,
            channels: ChannelSet::ALL,
            actor: actor.clone(),
            change_id: change_id.clone(),
            dry_run: false,
        };
        let runbook = &runbook;
        let act = &Act {
            action: AuditAction::Accept,
            actor,
            namespace,
            change_id: change_id.as_ref(),
            dry_run: None,
        };
        let (outcome, revision) = self
            .commit_change(act, |_view| {
                Box::pin(async move {
                    let (mut proposal, proposal_revision) =
                        self.read_proposal(namespace, id).await?;
                    if proposal.state != ProposalState::Open {
                        return Ok(Plan::answer(Err(Error::ProposalClosed {
                            id: id.to_string(),
                            state: proposal.state.describe(),
                        })));
                    }
                    let cited = format!(
                        "accepted proposal {}: {}",
                        proposal.id,
                        proposal.evidence.describe()
                    );
                    let (mut writes, incident, applied, mut audit) = match self
                        .prepare_declare(act, request, runbook, stage, Some(&cited))
                        .await?
                    {
                        Declaring::Refused(refusal) => return Ok(Plan::answer(Err(refusal))),
                        Declaring::Ready(ready) => {
                            let Declaration {
                                writes,
                                incident,
                                applied,
                                audit,
                            } = *ready;
                            (writes, incident, applied, audit)
                        }
                    };
                    proposal.state = ProposalState::Accepted {
                        by: actor.name.clone(),
                        at: writes.at(),
                        reason: request.reason.as_str().to_string(),
                        incident_id: incident.id.clone(),
                    };
                    let key = self.config.layout.proposal_key(namespace, id);
                    writes.unchanged(key.clone(), proposal_revision);
                    writes.put(
                        key,
                        serde_json::to_vec(&proposal).expect("proposals serialize"),
                    );
                    audit.detail = format!("accepted {}: {}", proposal.id, audit.detail);
                    Ok(writes.audited(audit, Ok((incident, applied, proposal))))
                })
            })
            .await?;
        let (incident, applied, proposal) = outcome?;
        info!(proposal = %proposal.id, incident = %incident.id, namespace = %namespace, revision,
            principal = %actor.name, "proposal accepted");
        let applied = stored(applied, revision);
        Ok(AcceptOutcome {
            proposal,
            declared: IncidentOutcome {
                incident,
                revision,
                in_force: applied.clone(),
                applied,
                lifted: Vec::new(),
                pending: None,
                preview: None,
            },
        })
    }

    /// Dismisses an open proposal, as `actor`, for `reason`: nothing is
    /// declared.
    pub async fn dismiss_proposal(
        &self,
        namespace: &Namespace,
        id: &ProposalId,
        reason: Reason,
        actor: &Principal,
        change_id: Option<ChangeId>,
    ) -> Result<DismissOutcome> {
        self.read_proposal(namespace, id).await?;
        let reason = &reason;
        let act = &Act {
            action: AuditAction::Dismiss,
            actor,
            namespace,
            change_id: change_id.as_ref(),
            dry_run: None,
        };
        let (outcome, revision) = self
            .commit_change(act, |_view| {
                Box::pin(async move {
                    let (mut proposal, proposal_revision) =
                        self.read_proposal(namespace, id).await?;
                    if proposal.state != ProposalState::Open {
                        return Ok(Plan::answer(Err(Error::ProposalClosed {
                            id: id.to_string(),
                            state: proposal.state.describe(),
                        })));
                    }
                    let at = Timestamp::now();
                    proposal.state = ProposalState::Dismissed {
                        by: actor.name.clone(),
                        at,
                        reason: reason.as_str().to_string(),
                    };
                    let mut writes = Writes::new(at);
                    let key = self.config.layout.proposal_key(namespace, id);
                    writes.unchanged(key.clone(), proposal_revision);
                    writes.put(
                        key,
                        serde_json::to_vec(&proposal).expect("proposals serialize"),
                    );
                    let audit = act.entry(
                        reason.as_str(),
                        format!(
                            "dismissed {} ({}) raised by {}: {}",
                            proposal.id,
                            proposal.question(),
                            proposal.raised_by,
                            proposal.evidence.describe()
                        ),
                    );
                    Ok(writes.audited(audit, Ok(proposal)))
                })
            })
            .await?;
        let proposal = outcome?;
        info!(proposal = %proposal.id, namespace = %namespace, revision, principal = %actor.name,
            "proposal dismissed");
        Ok(DismissOutcome { proposal, revision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::ControllerConfig;
    use crate::auth::Role;
    use safemode_policy::catalog::Catalog;
    use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};
    use tokio_util::sync::CancellationToken;

    /// Two replicas over one store.
    async fn replicas(dir: &tempfile::TempDir) -> [Arc<Controller>; 2] {
        let store: Arc<EmbeddedStore> = Arc::new(
            EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
                .unwrap(),
        );
        // One fleet: one signing key.
        let first = ControllerConfig::default();
        let start = |name: &str| {
            let store = store.clone();
            let config = ControllerConfig {
                replica: name.to_string(),
                signing_key: first.signing_key.clone(),
                trusted_keys: first.trusted_keys.clone(),
                ..ControllerConfig::default()
            };
            async move {
                Controller::start(
                    store,
                    Arc::new(Catalog::standard()),
                    config,
                    CancellationToken::new(),
                )
                .await
                .unwrap()
            }
        };
        [start("r1").await, start("r2").await]
    }

    fn commander() -> Principal {
        Principal {
            name: "carol".into(),
            roles: vec![Role::Commander],
        }
    }

    #[tokio::test]
    async fn two_replicas_that_see_one_condition_raise_one_proposal_and_accepting_declares() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = replicas(&dir).await;
        let live = Namespace::live();
        let runbook = a.runbooks().get("credential-stuffing").unwrap().clone();
        let trigger = runbook.triggers[0].clone();
        let counts = || {
            vec![SignalCount {
                channel: "web".into(),
                count: 250,
            }]
        };
        let (one, two) = tokio::join!(
            a.raise_from_trigger(&live, &runbook, &trigger, 250, counts(), false),
            b.raise_from_trigger(&live, &runbook, &trigger, 250, counts(), false),
        );
        let raised: Vec<Proposal> = [one.unwrap(), two.unwrap()].into_iter().flatten().collect();
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(a.list_proposals(&live, false).await.unwrap(), raised);
        assert_eq!(b.open_proposals(&live).await.unwrap(), 1);
        // Again while it is open: nothing new.
        let again = b
            .raise_from_trigger(&live, &runbook, &trigger, 900, counts(), false)
            .await
            .unwrap();
        assert_eq!(again, None);

        let id = raised[0].id.clone();
        let accepted = b
            .accept_proposal(
                &live,
                &id,
                Reason::parse("the wave is real").unwrap(),
                &commander(),
                None,
            )
            .await
            .unwrap();
        let incident = &accepted.declared.incident;
        assert_eq!(incident.severity, Severity::Sev3);
        let declared = &incident.timeline[0];
        assert_eq!(declared.reason.as_deref(), Some("the wave is real"));
        assert!(
            declared.detail.as_deref().unwrap().starts_with(&format!(
                "accepted proposal {id}: login.failed counted 250 in 5m across the fleet, above 200 (web 250)"
            )),
            "{declared:?}"
        );
        assert!(matches!(
            accepted.proposal.state,
            ProposalState::Accepted { ref incident_id, .. } if *incident_id == incident.id
        ));
        // Closed: neither accepted nor dismissed again.
        let refused = a
            .dismiss_proposal(
                &live,
                &id,
                Reason::parse("late").unwrap(),
                &commander(),
                None,
            )
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with(&format!("proposal {id} was accepted by carol at ")),
            "{refused}"
        );
        // The incident is active: the trigger raises nothing.
        assert_eq!(
            a.raise_from_trigger(&live, &runbook, &trigger, 900, counts(), false)
                .await
                .unwrap(),
            None
        );
        let (findings, _) = a.verify_audit().await.unwrap();
        assert_eq!(findings.total, 0, "{:?}", findings.problems);
    }

    #[tokio::test]
    async fn raising_removes_the_oldest_closed_proposals_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let [a, _] = replicas(&dir).await;
        let live = Namespace::live();
        let detector = Principal {
            name: "alertmanager".into(),
            roles: vec![Role::Detector],
        };
        let runbook = RunbookName::parse("fraud-spike").unwrap();
        let mut ids = Vec::new();
        for n in 0..=MAX_KEPT_CLOSED {
            let raised = a
                .raise_external(
                    &live,
                    &runbook,
                    Severity::Sev3,
                    &format!("spike {n}"),
                    &Reason::parse("alert").unwrap(),
                    &detector,
                    None,
                )
                .await
                .unwrap();
            assert!(raised.created);
            a.dismiss_proposal(
                &live,
                &raised.proposal.id,
                Reason::parse("noise").unwrap(),
                &commander(),
                None,
            )
            .await
            .unwrap();
            ids.push(raised.proposal.id);
        }
        assert_eq!(
            a.list_proposals(&live, true).await.unwrap().len(),
            MAX_KEPT_CLOSED + 1
        );
        // The next raise keeps the newest closed ones only.
        a.raise_external(
            &live,
            &runbook,
            Severity::Sev3,
            "spike again",
            &Reason::parse("alert").unwrap(),
            &detector,
            None,
        )
        .await
        .unwrap();
        let kept: Vec<ProposalId> = a
            .list_proposals(&live, true)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(kept.len(), MAX_KEPT_CLOSED + 1, "{kept:?}");
        assert!(!kept.contains(&ids[0]), "{kept:?}");
        assert!(ids[1..].iter().all(|id| kept.contains(id)), "{kept:?}");
        let (findings, _) = a.verify_audit().await.unwrap();
        assert_eq!(findings.total, 0, "{:?}", findings.problems);
    }

    #[tokio::test]
    async fn an_external_detector_raises_once_until_its_proposal_is_dismissed() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = replicas(&dir).await;
        let live = Namespace::live();
        let detector = Principal {
            name: "alertmanager".into(),
            roles: vec![Role::Detector],
        };
        let runbook = RunbookName::parse("fraud-spike").unwrap();
        let raise = |c: Arc<Controller>| {
            let (live, runbook, detector) = (live.clone(), runbook.clone(), detector.clone());
            async move {
                c.raise_external(
                    &live,
                    &runbook,
                    Severity::Sev3,
                    "refunds 4x baseline",
                    &Reason::parse("alert RefundSpike").unwrap(),
                    &detector,
                    None,
                )
                .await
                .unwrap()
            }
        };
        let first = raise(a.clone()).await;
        assert!(first.created);
        let second = raise(b.clone()).await;
        assert!(!second.created);
        assert_eq!(second.proposal.id, first.proposal.id);
        let dismissed = a
            .dismiss_proposal(
                &live,
                &first.proposal.id,
                Reason::parse("a sale, not fraud").unwrap(),
                &commander(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(dismissed.proposal.state.as_str(), "dismissed");
        assert_eq!(a.open_proposals(&live).await.unwrap(), 0);
        assert!(raise(b.clone()).await.created);
        let all = a.list_proposals(&live, true).await.unwrap();
        assert_eq!(all.len(), 2);
        let (findings, _) = b.verify_audit().await.unwrap();
        assert_eq!(findings.total, 0, "{:?}", findings.problems);
    }

    fn proposal(state: ProposalState) -> Proposal {
        Proposal {
            id: ProposalId::random(),
            namespace: Namespace::live(),
            runbook: RunbookName::parse("credential-stuffing").unwrap(),
            severity: Severity::Sev3,
            evidence: Evidence::Trigger {
                signal: "login.failed".into(),
                count: 250,
                above: 200,
                within_seconds: 300,
                channels: vec![
                    SignalCount {
                        channel: "web".into(),
                        count: 200,
                    },
                    SignalCount {
                        channel: "chatbot".into(),
                        count: 50,
                    },
                ],
                partial: false,
            },
            raised_by: TRIGGER_PRINCIPAL.into(),
            raised_at: Timestamp::UNIX_EPOCH,
            state,
        }
    }

    #[test]
    fn a_closed_trigger_raises_again_only_after_its_window() {
        let closed = "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap();
        let dismissed = proposal(ProposalState::Dismissed {
            by: "bob".into(),
            at: closed,
            reason: "drill".into(),
        });
        let five = Duration::from_secs(300);
        let after = |secs: i64| closed + jiff::SignedDuration::from_secs(secs);
        assert!(!may_raise_again(&dismissed, five, after(299)));
        assert!(may_raise_again(&dismissed, five, after(300)));
        assert!(!may_raise_again(
            &proposal(ProposalState::Open),
            five,
            after(10_000)
        ));
    }

    #[test]
    fn a_proposal_reads_back_as_written_and_says_its_evidence() {
        let p = proposal(ProposalState::Open);
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"state\":\"open\""), "{json}");
        assert_eq!(serde_json::from_str::<Proposal>(&json).unwrap(), p);
        assert_eq!(p.question(), "declare credential-stuffing sev3?");
        assert_eq!(
            p.evidence.describe(),
            "login.failed counted 250 in 5m across the fleet, above 200 (web 200, chatbot 50)"
        );
    }
}
