//! What a drill found: the data behind `report.md`, `journal.json` and
//! `junit.xml`. Plain data, filled in by the drill as it goes, in the
//! domain's types (namespace, channel, severity, step, fault); each
//! serializes as the name people know it by (`drill-0001`, `web`, `sev3`,
//! `declare`, `kill-subscribers=10%`).

use std::fmt;

use jiff::Timestamp;
use serde::{Serialize, Serializer};

use super::Fault;
use safemode_policy::runbook::Severity;
use safemode_policy::{Channel, Namespace};

/// One drilled runbook.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    /// The incident type (runbook name).
    pub runbook: String,
    /// The runbook's title.
    pub title: String,
    /// The drill's own namespace, `drill-<id>`.
    pub namespace: Namespace,
    /// The controller drilled against (`local` for `--local`).
    pub controller: String,
    /// The incident the drill declared.
    pub incident_id: Option<String>,
    /// The version of the `safemode` that ran the drill.
    pub safemode_version: String,
    /// SHA-256 (hex) of the mode and runbook files the drill read, as a
    /// controller serving the same files computes it.
    pub catalog_fingerprint: String,
    /// The runbook's file as given (`None`: built into `safemode`).
    pub runbook_file: Option<String>,
    /// The command that ran the drill, with token values redacted.
    pub command_line: String,
    /// Who ran the drill.
    pub principal: String,
    /// Where [`DrillReport::principal`] comes from.
    pub principal_from: PrincipalSource,
    /// When the drill started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// Whether every check passed.
    pub passed: bool,
    /// Subscribers that took part, per channel.
    pub subscribers: Vec<ChannelSubscribers>,
    /// Each stage of the severity path, in order (a fault is reported
    /// under the stage it struck).
    pub stages: Vec<StageReport>,
    /// After resolving: is every channel back to allow?
    pub restoration: Option<RestorationReport>,
    /// Why the drill failed, one line each (empty when it passed).
    pub failures: Vec<String>,
    /// Everything that happened, in order.
    pub journal: Vec<JournalEvent>,
}

impl DrillReport {
    /// The fault injected, if any, and the number (from 1) of the stage it
    /// struck.
    pub fn fault(&self) -> Option<(usize, &FaultReport)> {
        self.stages
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.fault.as_ref().map(|f| (i + 1, f)))
    }
}

/// Where the principal of a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalSource {
    /// The controller named it: who declared the drill's incident, as the
    /// controller authenticated them.
    Controller,
    /// `--principal`, else `$USER`: the drill ran its own controller
    /// (`--local`), or never got to declare.
    Caller,
    /// Nobody said: no `--principal`, no `$USER`, and no controller named
    /// one (the principal is `unknown`).
    Unknown,
}

impl PrincipalSource {
    /// How a report says it.
    pub fn describe(self) -> &'static str {
        match self {
            PrincipalSource::Controller => "as the controller saw it",
            PrincipalSource::Caller => "from --principal or $USER",
            PrincipalSource::Unknown => "give --principal to name who ran it",
        }
    }
}

/// How many subscribers of one channel took part.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelSubscribers {
    /// The channel.
    #[serde(serialize_with = "by_name")]
    pub channel: Channel,
    /// Simulated by the drill.
    pub simulated: usize,
    /// Real subscribers already attached to the drill namespace.
    pub attached: usize,
}

/// One stage of the severity path.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// The severity (`sev3`).
    pub severity: Severity,
    /// How the drill got there.
    pub step: Step,
    /// The namespace revision that applied the stage.
    pub revision: i64,
    /// The modes in force at the stage, by name, as the controller listed
    /// them.
    pub modes: Vec<String>,
    /// The approval request, when moving there needed a second approver.
    pub approval: Option<Approval>,
    /// The runbook's limit on how long every channel may take to apply the
    /// stage, in milliseconds.
    pub apply_within_ms: u64,
    /// Per channel: how long its subscribers took to apply the stage.
    pub channels: Vec<ChannelTiming>,
    /// Each drill expectation of the stage, checked with the client's
    /// evaluator.
    pub expectations: Vec<ExpectationCheck>,
    /// Snapshots subscribers rejected while the stage was applied.
    pub rejects: Vec<Reject>,
    /// The fault injected while this stage was active, if any.
    pub fault: Option<FaultReport>,
}

/// A change that waited for a second approver during the drill.
#[derive(Clone, Debug, Serialize)]
pub struct Approval {
    /// The request id.
    pub request_id: String,
    /// Who asked.
    pub requested_by: String,
    /// Who approved.
    pub approved_by: String,
}

/// How long one channel's subscribers took to apply a stage.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelTiming {
    /// The channel.
    #[serde(serialize_with = "by_name")]
    pub channel: Channel,
    /// Subscribers of the channel.
    pub subscribers: usize,
    /// How many of them applied the stage.
    pub applied: usize,
    /// Milliseconds from the change to the apply: median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Every subscriber applied it within the stage's limit.
    pub within_limit: bool,
}

/// One drill expectation and what the channel decided.
#[derive(Clone, Debug, Serialize)]
pub struct ExpectationCheck {
    /// The channel asking.
    #[serde(serialize_with = "by_name")]
    pub channel: Channel,
    /// The action.
    pub action: String,
    /// The context, as the runbook wrote it (`confidence 0.9, methods
    /// push`), or `default`.
    pub context: String,
    /// The effect the runbook expects.
    pub expected: String,
    /// The effect decided.
    pub actual: String,
    /// The decision in full (parameters, and the modes behind it by name),
    /// for the report.
    pub decision: String,
    /// The modes behind the decision, by name.
    pub modes: Vec<String>,
    /// Whether it held.
    pub passed: bool,
}

/// A snapshot a subscriber rejected.
#[derive(Clone, Debug, Serialize)]
pub struct Reject {
    /// The subscriber.
    pub subscriber: String,
    /// The revision it rejected.
    pub revision: i64,
    /// Why.
    pub reason: String,
}

/// The fault injected while a stage was active.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// `kill-subscribers=10%` or `restart-controller`.
    #[serde(serialize_with = "by_name")]
    pub kind: Fault,
    /// The stage it was injected in.
    pub severity: Severity,
    /// Subscribers killed (or, for a controller restart, subscribers that had
    /// to reconnect).
    pub affected: usize,
    /// Which subscribers it hit, per channel.
    pub hit: Vec<FaultHit>,
    /// Whether every subscriber converged on the latest revision again.
    pub recovered: bool,
    /// Milliseconds from the fault to full convergence (to giving up, if it
    /// did not recover).
    pub recovery_ms: f64,
}

/// The subscribers of one channel a fault hit.
#[derive(Clone, Debug, Serialize)]
pub struct FaultHit {
    /// The channel.
    #[serde(serialize_with = "by_name")]
    pub channel: Channel,
    /// Their ids.
    pub subscribers: Vec<String>,
}

/// After the incident was resolved.
#[derive(Clone, Debug, Serialize)]
pub struct RestorationReport {
    /// The revision that resolved the incident.
    pub revision: i64,
    /// The approval request, when resolving needed a second approver.
    pub approval: Option<Approval>,
    /// Decisions checked (every expectation's channel and action).
    pub checked: usize,
    /// Each decision checked, expected back to allow.
    pub decisions: Vec<ExpectationCheck>,
    /// Those that were not back to allow, one line each.
    pub not_restored: Vec<String>,
    /// Activations left in the drill namespace after cleanup.
    pub left_active: usize,
}

/// One thing that happened.
#[derive(Clone, Debug, Serialize)]
pub struct JournalEvent {
    /// When.
    pub at: Timestamp,
    /// What, as a short name (`declared`, `stage_applied`, `expectation`,
    /// `fault`, `recovered`, `resolved`, ...).
    pub event: String,
    /// The details.
    pub detail: serde_json::Value,
}

/// How a drill moved to a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Declared the incident at the stage's severity.
    Declare,
    /// Moved up to a more severe stage.
    Escalate,
    /// Moved down to a less severe stage.
    Deescalate,
}

impl Step {
    /// The name: `declare`, `escalate` or `deescalate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Declare => "declare",
            Step::Escalate => "escalate",
            Step::Deescalate => "deescalate",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serializes a name type as its name, for the types that do not serialize
/// themselves (a channel, a fault).
fn by_name<T: fmt::Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}
