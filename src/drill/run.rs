//! The drill of one runbook, step by step; every step is journaled, and
//! whatever goes wrong is a failure in the report, never a panic.
//!
//! Times to apply are taken on this machine's clock: from just before the
//! call that commits a change (the approval, when the change waited for
//! one) to when a simulated subscriber applied it, or to when a poll of the
//! controller first saw a real subscriber's ack.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use jiff::Timestamp;
use serde_json::json;

use super::report::{
    Approval, ChannelSubscribers, ChannelTiming, DrillReport, ExpectationCheck, FaultHit,
    FaultReport, JournalEvent, PrincipalSource, Reject, RestorationReport, StageReport, Step,
};
use super::{Control, DrillError, DrillOptions, Fault, Harness};
use crate::client_errors;
use crate::sim::{Sim, SimConfig, percentile};
use safemode_client::ClientError;
use safemode_policy::runbook::{Expectation, Runbook, Severity, Stage};
use safemode_policy::{Channel, Context, EffectKind, Namespace};
use safemode_wire::proto;

/// The drill of `runbook`: always a report, passed or not.
pub(super) async fn drill(
    harness: &mut Harness,
    runbook: &Runbook,
    options: &DrillOptions,
) -> DrillReport {
    let id = safemode_controller::IncidentId::random().to_string();
    let suffix = id.trim_start_matches("inc_").to_string();
    let namespace = options.namespace.clone().unwrap_or_else(|| {
        Namespace::parse(&format!("drill-{suffix}")).expect("a valid drill namespace")
    });
    let mut drill = Drill {
        report: DrillReport {
            runbook: runbook.name.to_string(),
            title: runbook.title.clone(),
            namespace: namespace.clone(),
            controller: harness.label.clone(),
            incident_id: None,
            safemode_version: super::VERSION.to_string(),
            catalog_fingerprint: options.source.catalog.fingerprint.clone(),
            runbook_file: options
                .source
                .file_of(runbook.name.as_str())
                .map(str::to_string),
            command_line: options.command_line.clone(),
            principal: options
                .principal
                .clone()
                .unwrap_or_else(|| "unknown".to_string()),
            principal_from: if options.principal.is_some() {
                PrincipalSource::Caller
            } else {
                PrincipalSource::Unknown
            },
            started_at: Timestamp::now(),
            finished_at: Timestamp::now(),
            passed: false,
            subscribers: Vec::new(),
            stages: Vec::new(),
            restoration: None,
            failures: Vec::new(),
            journal: Vec::new(),
        },
        namespace,
        id_prefix: format!("drill-{suffix}"),
        incident: None,
        attached: Vec::new(),
        mode_of: HashMap::new(),
    };
    drill.note(
        "drill_started",
        json!({
            "runbook": runbook.name.as_str(),
            "namespace": drill.namespace.as_str(),
            "controller": harness.label,
            "safemode_version": drill.report.safemode_version,
            "catalog_fingerprint": drill.report.catalog_fingerprint,
            "runbook_file": drill.report.runbook_file,
            "command_line": drill.report.command_line,
            "principal": drill.report.principal,
        }),
    );
    let outcome = drill.walk(harness, runbook, options).await;
    if let Err(failure) = outcome {
        drill.fail(failure.line());
    }
    drill.clean_up(harness).await;
    drill.report.finished_at = Timestamp::now();
    drill.report.passed = drill.report.failures.is_empty();
    let passed = drill.report.passed;
    drill.note(
        "drill_finished",
        json!({"passed": passed, "failures": drill.report.failures}),
    );
    drill.report
}

struct Drill {
    report: DrillReport,
    namespace: Namespace,
    /// Simulated subscribers' ids start with this.
    id_prefix: String,
    /// The incident the drill declared, while it may still be active.
    incident: Option<String>,
    /// Real subscribers attached to the namespace when the drill began: id
    /// and channel.
    attached: Vec<(String, Channel)>,
    /// The mode of every activation the drill saw in its namespace, by
    /// activation id: a report names modes, not ids.
    mode_of: HashMap<String, String>,
}

/// Where a drill stops early, and why.
type StepResult<T> = Result<T, StepError>;

/// Why a drill step failed. Its message is the failure line of the report;
/// the error behind it stays its source.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// The controller answered a call with an error.
    #[error("{message}")]
    Call {
        /// What failed, with the controller's message.
        message: String,
        /// The controller's answer (boxed: a `Status` is large, and every
        /// step returns this error).
        #[source]
        status: Box<tonic::Status>,
    },
    /// The controller cannot be reached.
    #[error(transparent)]
    Controller(#[from] DrillError),
    /// The drill's simulated subscribers cannot connect.
    #[error("{what}: {source}")]
    Subscribers {
        /// What they were doing.
        what: &'static str,
        /// Why they cannot.
        #[source]
        source: ClientError,
    },
    /// Anything else; the message says what.
    #[error("{0}")]
    Failed(String),
}

impl StepError {
    /// The failure as the report says it: one line, with a client error
    /// said in the flags of the `safemode` command that ran the drill.
    fn line(&self) -> String {
        match self {
            StepError::Subscribers { what, source } => {
                format!("{what}: {}", client_errors::in_flags(source))
            }
            StepError::Controller(DrillError::Client(client)) => client_errors::in_flags(client),
            other => other.to_string(),
        }
    }

    fn call(message: String, status: tonic::Status) -> Self {
        StepError::Call {
            message,
            status: Box::new(status),
        }
    }
}

impl From<String> for StepError {
    fn from(message: String) -> Self {
        StepError::Failed(message)
    }
}

impl From<&str> for StepError {
    fn from(message: &str) -> Self {
        StepError::Failed(message.to_owned())
    }
}

/// A committed change: its revision, its approval, and when the call that
/// committed it began.
struct Committed {
    revision: i64,
    approval: Option<Approval>,
    began: Timestamp,
}

impl Drill {
    fn note(&mut self, event: &str, detail: serde_json::Value) {
        self.report.journal.push(JournalEvent {
            at: Timestamp::now(),
            event: event.into(),
            detail,
        });
    }

    fn fail(&mut self, failure: String) {
        self.note("failure", json!({"failure": failure}));
        self.report.failures.push(failure);
    }

    async fn walk(
        &mut self,
        harness: &mut Harness,
        runbook: &Runbook,
        options: &DrillOptions,
    ) -> StepResult<()> {
        let path: Vec<Severity> = options
            .severity_path
            .clone()
            .unwrap_or_else(|| runbook.severities().collect());
        let stages: Vec<&Stage> = path
            .iter()
            .map(|s| {
                runbook.stage(*s).ok_or_else(|| {
                    StepError::from(format!("{} has no stage for {s}", runbook.name))
                })
            })
            .collect::<StepResult<_>>()?;
        let mut commander = harness.commander().await?;
        if harness.local.is_none() {
            self.check_served(&mut commander, runbook, options).await?;
        }
        let before = self.status(&mut commander).await?;
        if !before.activations.is_empty() {
            return Err(StepError::Failed(format!(
                "{} already has {} active modes; a drill needs an empty drill namespace (it lifts everything it applied, and must not touch what others did)",
                self.namespace,
                before.activations.len()
            )));
        }

        // The simulated channel services: every channel asked about in an
        // expectation has at least one.
        let mut channels = options.channels.clone();
        for stage in runbook.stages.iter() {
            for e in &stage.expectations {
                if !channels.iter().any(|(c, _)| *c == e.channel) {
                    channels.push((e.channel, 1));
                }
            }
        }
        let started = Timestamp::now();
        let mut sim = Sim::start(SimConfig {
            base: harness.subscriber_base(self.namespace.clone(), channels[0].0),
            channels: channels.clone(),
            id_prefix: self.id_prefix.clone(),
            complete_within: options.converge_within,
        })
        .await
        .map_err(|source| StepError::Subscribers {
            what: "the simulated subscribers cannot connect",
            source,
        })?;
        // Real subscribers: anyone there before the drill's own (and not
        // left over from an earlier drill's simulation).
        self.attached = before
            .subscribers
            .iter()
            .filter(|s| !s.subscriber_id.starts_with("drill-"))
            .filter_map(|s| Some((s.subscriber_id.clone(), Channel::parse(&s.channel).ok()?)))
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect();
        self.attached.sort();
        for (channel, simulated) in &channels {
            let attached = self.attached.iter().filter(|(_, c)| c == channel).count();
            self.report.subscribers.push(ChannelSubscribers {
                channel: *channel,
                simulated: *simulated,
                attached,
            });
        }
        self.note(
            "subscribers_connected",
            json!({
                "simulated": sim.len(),
                "attached": self.attached.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                "ms": ms_since(started),
            }),
        );

        let fault_at = path.len() / 2;
        let mut previous: Option<Severity> = None;
        for (i, (severity, stage)) in path.iter().zip(&stages).enumerate() {
            let (step, committed) = match (&self.incident, previous) {
                (None, _) => (
                    Step::Declare,
                    self.declare(&mut commander, runbook, *severity, harness.local.is_none())
                        .await?,
                ),
                (Some(id), Some(from)) => {
                    let step = if *severity > from {
                        Step::Escalate
                    } else {
                        Step::Deescalate
                    };
                    let id = id.clone();
                    let committed = self
                        .escalate(harness, &mut commander, &id, *severity, step)
                        .await?;
                    (step, committed)
                }
                (Some(_), None) => unreachable!("an incident is declared before it moves"),
            };
            previous = Some(*severity);
            let report = self
                .stage(harness, &sim, stage, step, committed, options)
                .await?;
            self.report.stages.push(report);
            if i == fault_at
                && let Some(fault) = options.fault
            {
                let revision = self.report.stages.last().map_or(0, |s| s.revision);
                self.inject(harness, &mut sim, fault, *severity, revision, options)
                    .await?;
            }
        }

        // Resolve, then every channel must be back to allow.
        let resolved = self.resolve(harness, &mut commander).await?;
        let revision = resolved.revision;
        if !sim.wait_applied(revision, options.converge_within).await {
            self.fail(format!(
                "not every simulated subscriber applied the resolution (revision {revision}) within {:?}",
                options.converge_within
            ));
        }
        let (status, seen) = self
            .wait_attached(&mut commander, revision, options.converge_within)
            .await?;
        let mut not_restored = Vec::new();
        for (id, _) in &self.attached {
            if !seen.contains_key(id) {
                not_restored.push(format!("subscriber {id} never acked the resolution"));
            }
        }
        let mut decisions = Vec::new();
        let mut seen_checks = HashSet::new();
        for stage in &runbook.stages {
            for e in &stage.expectations {
                let key = (
                    e.channel,
                    e.action.as_str().to_string(),
                    context_text(&e.context),
                );
                if !seen_checks.insert(key) {
                    continue;
                }
                let check = expectation_check(&sim, e, EffectKind::Allow, &self.mode_of);
                if !check.passed {
                    not_restored.push(if check.actual == "none" {
                        format!("no subscriber of {} to ask", e.channel)
                    } else {
                        format!(
                            "{} {} ({}) is still {}",
                            check.channel, check.action, check.context, check.actual
                        )
                    });
                }
                decisions.push(check);
            }
        }
        let checked = decisions.len();
        let mut holding: HashMap<Channel, usize> = HashMap::new();
        for (channel, active) in sim.active_counts() {
            if active > 0 {
                *holding.entry(channel).or_default() += 1;
            }
        }
        for (channel, count) in holding {
            not_restored.push(format!(
                "{count} {channel} subscribers still hold activations"
            ));
        }
        for line in &not_restored {
            self.report.failures.push(format!("restoration: {line}"));
        }
        self.rejects_since(&status, revision, "resolution");
        self.note(
            "restoration_checked",
            json!({"checked": checked, "not_restored": not_restored}),
        );
        self.report.restoration = Some(RestorationReport {
            revision,
            approval: resolved.approval,
            checked,
            decisions,
            not_restored,
            left_active: 0,
        });
        Ok(())
    }

    async fn declare(
        &mut self,
        commander: &mut Control,
        runbook: &Runbook,
        severity: Severity,
        remote: bool,
    ) -> StepResult<Committed> {
        let began = Timestamp::now();
        let declared = commander
            .declare_incident(proto::DeclareIncidentRequest {
                namespace: self.namespace.to_string(),
                r#type: runbook.name.to_string(),
                severity: severity.to_string(),
                reason: format!("drill of {}", runbook.name),
                channels: Vec::new(),
                change_id: String::new(),
                dry_run: false,
            })
            .await
            .map_err(|s| {
                StepError::call(
                    format!(
                        "declaring {} at {severity} failed: {}",
                        runbook.name,
                        s.message()
                    ),
                    s,
                )
            })?
            .into_inner();
        let incident = declared.incident.unwrap_or_default();
        // Against a running controller, who ran the drill is whom it
        // authenticated; a local controller knows only the drill's own
        // principals.
        if remote && !incident.declared_by.is_empty() {
            self.report.principal = incident.declared_by.clone();
            self.report.principal_from = PrincipalSource::Controller;
        }
        let id = incident.id;
        self.report.incident_id = Some(id.clone());
        self.note(
            "declared",
            json!({
                "incident": id,
                "severity": severity.to_string(),
                "revision": declared.revision,
                "declared_by": incident.declared_by,
            }),
        );
        self.incident = Some(id);
        Ok(Committed {
            revision: declared.revision,
            approval: None,
            began,
        })
    }

    async fn escalate(
        &mut self,
        harness: &Harness,
        commander: &mut Control,
        id: &str,
        severity: Severity,
        step: Step,
    ) -> StepResult<Committed> {
        let began = Timestamp::now();
        let moved = commander
            .escalate_incident(proto::EscalateIncidentRequest {
                incident_id: id.to_string(),
                severity: severity.to_string(),
                reason: format!("drill: {step} to {severity}"),
                change_id: String::new(),
                dry_run: false,
            })
            .await
            .map_err(|s| {
                StepError::call(format!("moving to {severity} failed: {}", s.message()), s)
            })?
            .into_inner();
        let committed = match moved.pending {
            None => Committed {
                revision: moved.revision,
                approval: None,
                began,
            },
            Some(request) => {
                self.approve(harness, request, &format!("moving to {severity}"))
                    .await?
            }
        };
        self.note(
            step.as_str(),
            json!({"incident": id, "severity": severity.to_string(), "revision": committed.revision}),
        );
        Ok(committed)
    }

    /// Resolves the drill's incident (with the second principal approving
    /// where needed); it is no longer the drill's to clean up.
    async fn resolve(
        &mut self,
        harness: &Harness,
        commander: &mut Control,
    ) -> StepResult<Committed> {
        let id = self.incident.clone().ok_or("no incident to resolve")?;
        let began = Timestamp::now();
        let resolved = commander
            .resolve_incident(proto::ResolveIncidentRequest {
                incident_id: id.clone(),
                reason: format!("drill of {} over", self.report.runbook),
                change_id: String::new(),
                dry_run: false,
            })
            .await
            .map_err(|s| StepError::call(format!("resolving failed: {}", s.message()), s))?
            .into_inner();
        let committed = match resolved.pending {
            None => Committed {
                revision: resolved.revision,
                approval: None,
                began,
            },
            Some(request) => self.approve(harness, request, "resolving").await?,
        };
        self.incident = None;
        self.note(
            "resolved",
            json!({"incident": id, "revision": committed.revision}),
        );
        Ok(committed)
    }

    /// Against a running controller: it must serve this runbook, and the
    /// modes it applies, as drilled here; otherwise the drill would test
    /// something else than it checks.
    async fn check_served(
        &mut self,
        commander: &mut Control,
        runbook: &Runbook,
        options: &DrillOptions,
    ) -> StepResult<()> {
        let served = commander
            .list_runbooks(proto::ListRunbooksRequest {})
            .await
            .map_err(|s| {
                StepError::call(
                    format!("cannot list the controller's runbooks: {}", s.message()),
                    s,
                )
            })?
            .into_inner();
        let Some(theirs) = served
            .runbooks
            .iter()
            .find(|r| r.name == runbook.name.as_str())
        else {
            return Err(StepError::Failed(format!(
                "the controller does not serve runbook {}; deploy it there (serve --runbooks DIR), or drill with --local",
                runbook.name
            )));
        };
        let ours = safemode_wire::runbook_to_wire(runbook);
        let same_stages = ours.stages.len() == theirs.stages.len()
            && ours.stages.iter().zip(&theirs.stages).all(|(a, b)| {
                a.severity == b.severity
                    && a.modes == b.modes
                    && a.apply_within_ms == b.apply_within_ms
            });
        if !same_stages || ours.lift_requires_approval != theirs.lift_requires_approval {
            return Err(StepError::Failed(format!(
                "the controller serves another version of runbook {}; deploy this one, or drill with --local",
                runbook.name
            )));
        }
        let modes = commander
            .list_modes(proto::ListModesRequest {})
            .await
            .map_err(|s| {
                StepError::call(
                    format!("cannot list the controller's modes: {}", s.message()),
                    s,
                )
            })?
            .into_inner();
        for stage in &runbook.stages {
            for staged in &stage.modes {
                let ours = options
                    .source
                    .catalog
                    .modes
                    .get(staged.mode.as_str())
                    .map(|m| safemode_wire::mode_to_wire(m));
                let theirs = modes.modes.iter().find(|m| m.name == staged.mode.as_str());
                if ours.as_ref() != theirs {
                    return Err(StepError::Failed(format!(
                        "the controller serves another version of mode {} than the one runbook {} is drilled with here; deploy the same modes, or drill with --local",
                        staged.mode, runbook.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The drill namespace's status; remembers the mode of every activation
    /// in it.
    async fn status(&mut self, commander: &mut Control) -> StepResult<proto::GetStatusResponse> {
        let status = safemode_wire::full_status(commander, self.namespace.as_str())
            .await
            .map_err(|s| {
                StepError::call(
                    format!("cannot read the drill namespace's status: {}", s.message()),
                    s,
                )
            })?;
        for a in &status.activations {
            self.mode_of
                .entry(a.id.clone())
                .or_insert_with(|| a.mode.clone());
        }
        Ok(status)
    }

    /// Has the second principal approve `request`; the change commits with
    /// the approval, so its clock starts there.
    async fn approve(
        &mut self,
        harness: &Harness,
        request: proto::ChangeRequest,
        what: &str,
    ) -> StepResult<Committed> {
        self.note(
            "approval_requested",
            json!({"request": request.id, "requested_by": request.requested_by, "what": what}),
        );
        let mut approver = harness.approver().await?;
        let began = Timestamp::now();
        let approved = approver
            .approve(proto::ApproveRequest {
                request_id: request.id.clone(),
                reason: "drill".into(),
                change_id: String::new(),
                dry_run: false,
            })
            .await
            .map_err(|s| {
                StepError::call(
                    format!(
                        "{what} needs a second approver and approving {} failed: {}{}",
                        request.id,
                        s.message(),
                        harness.approver_hint()
                    ),
                    s,
                )
            })?
            .into_inner();
        let by = approved.request.map(|r| r.approved_by).unwrap_or_default();
        self.note(
            "approved",
            json!({"request": request.id, "by": by, "revision": approved.revision}),
        );
        Ok(Committed {
            revision: approved.revision,
            approval: Some(Approval {
                request_id: request.id,
                requested_by: request.requested_by,
                approved_by: by,
            }),
            began,
        })
    }

    /// Waits for every subscriber, times each channel, checks the
    /// expectations and looks for rejects.
    async fn stage(
        &mut self,
        harness: &Harness,
        sim: &Sim,
        stage: &Stage,
        step: Step,
        committed: Committed,
        options: &DrillOptions,
    ) -> StepResult<StageReport> {
        let Committed {
            revision,
            approval,
            began,
        } = committed;
        let severity = stage.severity;
        let limit_ms = stage.apply_within.as_millis() as u64;
        sim.wait_applied(revision, options.converge_within).await;
        let mut commander = harness.commander().await?;
        let (status, seen) = self
            .wait_attached(&mut commander, revision, options.converge_within)
            .await?;

        // Per channel: from the change to each subscriber's apply.
        let mut times: Vec<(Channel, Option<f64>)> = sim
            .applied_at(revision)
            .into_iter()
            .map(|(channel, at)| (channel, at.map(|at| ms_between(began, at))))
            .collect();
        for (id, channel) in &self.attached {
            times.push((*channel, seen.get(id).map(|at| ms_between(began, *at))));
        }
        let mut channels = Vec::new();
        for channel in unique_channels(&times) {
            let mut applied: Vec<f64> = times
                .iter()
                .filter(|(c, _)| *c == channel)
                .filter_map(|(_, ms)| *ms)
                .collect();
            applied.sort_by(f64::total_cmp);
            let subscribers = times.iter().filter(|(c, _)| *c == channel).count();
            let max = applied.last().copied().unwrap_or(0.0);
            let within = applied.len() == subscribers && max <= limit_ms as f64;
            if !within {
                self.report.failures.push(if applied.len() < subscribers {
                    format!(
                        "{severity}: {} of {subscribers} {channel} subscribers never applied it",
                        subscribers - applied.len()
                    )
                } else {
                    format!(
                        "{severity}: {channel} took {max:.1} ms to apply, over the runbook's {limit_ms} ms"
                    )
                });
            }
            channels.push(ChannelTiming {
                channel,
                subscribers,
                applied: applied.len(),
                p50_ms: percentile(&applied, 0.50),
                p99_ms: percentile(&applied, 0.99),
                max_ms: max,
                within_limit: within,
            });
        }
        self.note(
            "stage_applied",
            json!({"severity": severity, "revision": revision, "channels": channels}),
        );

        // The modes in force, by name, once each.
        let mut modes: Vec<String> = Vec::new();
        for a in &status.activations {
            if !modes.contains(&a.mode) {
                modes.push(a.mode.clone());
            }
        }

        // The runbook's expectations, decided by the channels themselves.
        let mut expectations = Vec::new();
        for e in &stage.expectations {
            let check = expectation_check(sim, e, e.effect, &self.mode_of);
            if !check.passed {
                self.report.failures.push(format!(
                    "{severity}: {} {} ({}) should be {} but is {}",
                    check.channel, check.action, check.context, check.expected, check.actual
                ));
            }
            self.note(
                "expectation",
                serde_json::to_value(&check).expect("checks serialize"),
            );
            expectations.push(check);
        }
        let rejects = self.rejects_since(&status, revision, severity.as_str());
        Ok(StageReport {
            severity,
            step,
            revision,
            modes,
            approval,
            apply_within_ms: limit_ms,
            channels,
            expectations,
            rejects,
            fault: None,
        })
    }

    /// Snapshots anyone rejected at `revision` or later: failures.
    fn rejects_since(
        &mut self,
        status: &proto::GetStatusResponse,
        revision: i64,
        what: &str,
    ) -> Vec<Reject> {
        let rejects: Vec<Reject> = status
            .subscribers
            .iter()
            .filter(|s| s.rejected_revision > 0 && s.rejected_revision >= revision)
            .map(|s| Reject {
                subscriber: s.subscriber_id.clone(),
                revision: s.rejected_revision,
                reason: s.reject_reason.clone(),
            })
            .collect();
        for r in &rejects {
            self.report.failures.push(format!(
                "{what}: subscriber {} rejected revision {}: {}",
                r.subscriber, r.revision, r.reason
            ));
            self.note(
                "rejected",
                json!({"subscriber": r.subscriber, "revision": r.revision, "reason": r.reason}),
            );
        }
        rejects
    }

    /// Waits (bounded) until every attached subscriber acked `revision`;
    /// returns the last status read, and when (on this machine's clock) a
    /// poll first saw each attached subscriber's ack. A subscriber that left
    /// never acks.
    async fn wait_attached(
        &mut self,
        commander: &mut Control,
        revision: i64,
        within: Duration,
    ) -> StepResult<(proto::GetStatusResponse, HashMap<String, Timestamp>)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen: HashMap<String, Timestamp> = HashMap::new();
        loop {
            let status = self.status(commander).await?;
            let now = Timestamp::now();
            for s in &status.subscribers {
                if s.acked_revision >= revision
                    && self.attached.iter().any(|(id, _)| *id == s.subscriber_id)
                {
                    seen.entry(s.subscriber_id.clone()).or_insert(now);
                }
            }
            if seen.len() >= self.attached.len() || tokio::time::Instant::now() >= deadline {
                return Ok((status, seen));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Injects `fault` and measures how long every subscriber takes to
    /// converge on `revision` again: the controller sees each of them on a
    /// new stream (connected after the fault) that acked it.
    async fn inject(
        &mut self,
        harness: &mut Harness,
        sim: &mut Sim,
        fault: Fault,
        severity: Severity,
        revision: i64,
        options: &DrillOptions,
    ) -> StepResult<()> {
        let mut commander = harness.commander().await?;
        // The fault's moment on the controller's clock, to compare with its
        // connected_at times.
        let before = self.status(&mut commander).await?.server_time;
        let began = Timestamp::now();
        let affected: Vec<String> = match fault {
            Fault::KillSubscribers { percent } => {
                let count = (sim.len() * usize::from(percent)).div_ceil(100).max(1);
                let killed = sim.kill(count);
                self.note(
                    "fault",
                    json!({"fault": fault.describe(), "severity": severity, "killed": killed.len()}),
                );
                sim.revive(&killed)
                    .await
                    .map_err(|source| StepError::Subscribers {
                        what: "killed subscribers could not come back",
                        source,
                    })?;
                let ids = sim.subscriber_ids();
                killed.iter().map(|&i| ids[i].clone()).collect()
            }
            Fault::RestartController => {
                let local = harness
                    .local
                    .as_mut()
                    .ok_or("restart-controller needs --local")?;
                self.note(
                    "fault",
                    json!({"fault": fault.describe(), "severity": severity, "subscribers": sim.len()}),
                );
                local
                    .restart()
                    .await
                    .map_err(|e| format!("the controller did not come back: {e}"))?;
                sim.subscriber_ids()
            }
        };
        let after = |s: &proto::SubscriberStatus| match (&s.connected_at, &before) {
            (Some(c), Some(b)) => (c.seconds, c.nanos) > (b.seconds, b.nanos),
            _ => false,
        };
        let mut commander = harness.commander().await?;
        let deadline = tokio::time::Instant::now() + options.converge_within;
        let recovered = loop {
            let converged = match self.status(&mut commander).await {
                Ok(status) => affected.iter().all(|id| {
                    status
                        .subscribers
                        .iter()
                        .any(|s| s.subscriber_id == *id && after(s) && s.acked_revision >= revision)
                }),
                Err(_) => false,
            };
            if converged && sim.wait_applied(revision, Duration::ZERO).await {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let recovery_ms = ms_since(began);
        if !recovered {
            self.report.failures.push(format!(
                "{}: after {}, not every subscriber converged within {:?}",
                severity,
                fault.describe(),
                options.converge_within
            ));
        }
        // Which subscribers it hit, per channel (the sim lists its
        // subscribers' channels in the order of their ids).
        let channel_of: HashMap<String, Channel> = sim
            .subscriber_ids()
            .into_iter()
            .zip(sim.applied_at(0).into_iter().map(|(channel, _)| channel))
            .collect();
        let mut hit: Vec<FaultHit> = Vec::new();
        for id in &affected {
            let Some(channel) = channel_of.get(id) else {
                continue;
            };
            match hit.iter_mut().find(|h| h.channel == *channel) {
                Some(h) => h.subscribers.push(id.clone()),
                None => hit.push(FaultHit {
                    channel: *channel,
                    subscribers: vec![id.clone()],
                }),
            }
        }
        for h in &mut hit {
            h.subscribers.sort();
        }
        self.note(
            "recovered",
            json!({"recovered": recovered, "ms": recovery_ms, "hit": hit}),
        );
        let report = FaultReport {
            kind: fault,
            severity,
            affected: affected.len(),
            hit,
            recovered,
            recovery_ms,
        };
        match self.report.stages.last_mut() {
            Some(stage) => stage.fault = Some(report),
            None => return Err("a fault struck before any stage was applied".into()),
        }
        Ok(())
    }

    /// After a failure: resolves the incident if it is still active (with
    /// the second principal approving where needed), so that the namespace
    /// is left as the drill found it.
    async fn clean_up(&mut self, harness: &Harness) {
        let Ok(mut commander) = harness.commander().await else {
            self.fail("cannot reach the controller to clean up the drill namespace".into());
            return;
        };
        if self.incident.is_some()
            && let Err(e) = self.resolve(harness, &mut commander).await
        {
            self.fail(format!("cleanup: {}", e.line()));
        }
        let left = match self.status(&mut commander).await {
            Ok(status) => status.activations,
            Err(e) => {
                self.fail(e.line());
                return;
            }
        };
        let ours: Vec<&proto::Activation> = left
            .iter()
            .filter(|a| Some(&a.incident_id) == self.report.incident_id.as_ref())
            .collect();
        if !ours.is_empty() {
            self.fail(format!(
                "{} activations of the drill's incident are still active in {} after cleanup",
                ours.len(),
                self.namespace
            ));
        }
        let left_active = ours.len();
        self.note("cleaned_up", json!({"left_active": left_active}));
        if let Some(restoration) = self.report.restoration.as_mut() {
            restoration.left_active = left_active;
        }
    }
}

/// `e`'s channel, action and context decided by the channel itself, and
/// whether the effect is `expected` (the runbook's, or allow once
/// restored).
fn expectation_check(
    sim: &Sim,
    e: &Expectation,
    expected: EffectKind,
    mode_of: &HashMap<String, String>,
) -> ExpectationCheck {
    let decided = sim.decide(e.channel, &e.action, &e.context);
    let (actual, decision, modes) = match &decided {
        Some(d) => {
            let modes = modes_behind(d, mode_of);
            (
                d.outcome.kind().as_str().to_string(),
                decision_text(d, &modes),
                modes,
            )
        }
        None => (
            "none".to_string(),
            format!("no {} subscriber to ask", e.channel),
            Vec::new(),
        ),
    };
    ExpectationCheck {
        channel: e.channel,
        action: e.action.to_string(),
        context: context_text(&e.context),
        expected: expected.as_str().to_string(),
        passed: decided.is_some_and(|d| d.outcome.kind() == expected),
        actual,
        decision,
        modes,
    }
}

/// The modes behind a decision, by name, once each; an activation the
/// drill never saw in its namespace's status keeps its id (the drill
/// cannot name it).
fn modes_behind(
    d: &safemode_client::DecisionReport,
    mode_of: &HashMap<String, String>,
) -> Vec<String> {
    let mut modes: Vec<String> = Vec::new();
    for id in &d.reasons {
        let mode = mode_of.get(id).unwrap_or(id);
        if !modes.contains(mode) {
            modes.push(mode.clone());
        }
    }
    modes
}

/// A decision in one line: the effect, its parameters, and the modes behind
/// it (`step_up min_confidence=0.8 ... because freeze-credential-changes`).
fn decision_text(d: &safemode_client::DecisionReport, modes: &[String]) -> String {
    let parameters = serde_json::to_value(&d.outcome).expect("outcomes serialize");
    let mut text = d.outcome.kind().as_str().to_string();
    for (key, value) in parameters.as_object().into_iter().flatten() {
        if key != "effect" {
            text.push_str(&format!(" {key}={value}"));
        }
    }
    if !modes.is_empty() {
        text.push_str(&format!(" because {}", modes.join(", ")));
    }
    text
}

/// A context as a runbook would write it, or `default`.
pub(crate) fn context_text(ctx: &Context) -> String {
    let mut parts = Vec::new();
    if ctx.confidence != 0.0 {
        parts.push(format!("confidence {}", ctx.confidence));
    }
    if !ctx.methods.is_empty() {
        parts.push(format!(
            "methods {}",
            ctx.methods.names().collect::<Vec<_>>().join(",")
        ));
    }
    if ctx.failed_attempts > 0 {
        parts.push(format!("attempts {}", ctx.failed_attempts));
    }
    if let Some(amount) = ctx.amount {
        parts.push(format!("amount {amount}"));
    }
    if ctx.handoff_from_bot {
        parts.push("handoff".into());
    }
    if !ctx.bot_flags.is_empty() {
        parts.push(format!("bot flags {}", ctx.bot_flags.join(",")));
    }
    if parts.is_empty() {
        "default".into()
    } else {
        parts.join(", ")
    }
}

fn unique_channels(times: &[(Channel, Option<f64>)]) -> Vec<Channel> {
    let mut channels: Vec<Channel> = Vec::new();
    for (channel, _) in times {
        if !channels.contains(channel) {
            channels.push(*channel);
        }
    }
    channels
}

fn ms_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.duration_since(from).as_secs_f64() * 1000.0).max(0.0)
}

fn ms_since(from: Timestamp) -> f64 {
    ms_between(from, Timestamp::now())
}
