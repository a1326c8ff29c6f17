//! Runbooks: the pre-agreed response to one type of incident. A runbook has
//! stages by severity, each the whole posture at that severity (which modes
//! on which channels, with which customer and agent texts), and drill
//! expectations: decisions that must hold while a stage is active.
//!
//! Everything here is pure: a stage's activations and its expectations are
//! computed from the runbook and a mode catalogue, so a drill can be checked
//! without a server, and the same check lints a runbook file
//! ([`super::runbook_file`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::activation::{Activation, ActivationId, Change, Reason};
use super::compile::EffectivePolicy;
use super::decide::Outcome;
use super::effect::EffectKind;
use super::mode::Context;
use super::mode::{Mode, ModeCatalog, ModeName};
use super::names::{Action, Channel, ChannelSet, NameError, did_you_mean, validate_slug};
use super::paths::{DeadEnd, dead_ends};
use super::telemetry::SignalName;

// === Severity ===

/// How bad an incident is. `Sev1` is the most severe, and the greatest:
/// `Sev4 < Sev3 < Sev2 < Sev1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Minor: watch closely, light protections.
    Sev4,
    /// Moderate.
    Sev3,
    /// Major.
    Sev2,
    /// Critical: the strongest posture.
    Sev1,
}

impl Severity {
    /// Every severity, least severe first.
    pub const ALL: [Severity; 4] = [
        Severity::Sev4,
        Severity::Sev3,
        Severity::Sev2,
        Severity::Sev1,
    ];

    /// Parses `sev4`, `sev3`, `sev2` or `sev1`.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                NameError(format!(
                    "unknown severity '{text}'; {}severities are sev4, sev3, sev2, sev1 (sev1 is the most severe)",
                    did_you_mean(text, Self::ALL.map(Severity::as_str))
                ))
            })
    }

    /// The name, such as `sev2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Sev4 => "sev4",
            Severity::Sev3 => "sev3",
            Severity::Sev2 => "sev2",
            Severity::Sev1 => "sev1",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Severity::parse(s)
    }
}

// === Names ===

/// A runbook's name, which is the incident type (the file's stem):
/// lowercase letters, digits and inner dashes, such as `credential-stuffing`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunbookName(String);

impl RunbookName {
    /// Parses a runbook name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        validate_slug("runbook name", name, 63)?;
        Ok(RunbookName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for RunbookName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunbookName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        RunbookName::parse(&s)
    }
}

impl From<RunbookName> for String {
    fn from(n: RunbookName) -> String {
        n.0
    }
}

impl fmt::Display for RunbookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === Stages ===

/// One mode of a stage, on the channels it covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StageMode {
    /// The mode.
    pub mode: ModeName,
    /// The channels it is applied to ([`ChannelSet::ALL`] unless the runbook
    /// narrows it).
    pub channels: ChannelSet,
}

/// A decision that must hold while a stage is active.
#[derive(Clone, Debug, PartialEq)]
pub struct Expectation {
    /// The channel asking.
    pub channel: Channel,
    /// The action it asks about.
    pub action: Action,
    /// What it knows about the customer.
    pub context: Context,
    /// The effect the decision must have.
    pub effect: EffectKind,
}

/// The whole posture at one severity. Stages are not cumulative: moving to a
/// stage applies its modes and lifts the previous stage's modes that it does
/// not list.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// The severity the stage is for.
    pub severity: Severity,
    /// The modes to apply, each on its channels; at least one, each mode
    /// once.
    pub modes: Vec<StageMode>,
    /// Replaces the customer notice of every mode the stage applies (the
    /// stage's own, else the runbook's default). `None` keeps each mode's.
    pub customer_message: Option<Arc<str>>,
    /// Replaces the agent script of every mode the stage applies, like
    /// `customer_message`.
    pub agent_script: Option<Arc<str>>,
    /// How long every channel may take to apply the stage in a drill.
    pub apply_within: Duration,
    /// Decisions that must hold while the stage is active.
    pub expectations: Vec<Expectation>,
    /// The dead ends the stage means to leave (actions no customer can get
    /// done on any channel while it is active), and why; any other dead end
    /// is an error in the runbook.
    pub accepts_dead_ends: Option<AcceptedDeadEnds>,
}

/// Dead ends a stage leaves on purpose: its `accepts_dead_ends`.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedDeadEnds {
    /// The actions.
    pub actions: Vec<Action>,
    /// Why genuine customers are not trapped, or why it is worth it.
    pub reason: Arc<str>,
}

impl AcceptedDeadEnds {
    /// Whether `action` is accepted.
    pub fn accepts(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a.as_str() == action)
    }
}

impl Stage {
    /// `mode` as this stage applies it: with the stage's customer message
    /// and agent script, where it has them, instead of the mode's own notice
    /// and script. (A rule's own message still beats either.)
    pub fn staged_mode(&self, mode: &Mode) -> Mode {
        let mut mode = mode.clone();
        if let Some(message) = &self.customer_message {
            mode.customer_notice = Some(message.clone());
        }
        if let Some(script) = &self.agent_script {
            mode.agent_script = Some(script.clone());
        }
        mode
    }

    /// Whether the stage says it leaves `action` a dead end on purpose.
    pub fn accepts_dead_end(&self, action: &str) -> bool {
        self.accepts_dead_ends
            .as_ref()
            .is_some_and(|accepted| accepted.accepts(action))
    }

    /// Whether the stage applies `mode` (on any channels).
    pub fn has_mode(&self, mode: &str) -> bool {
        self.modes.iter().any(|m| m.mode.as_str() == mode)
    }

    /// What moving from `previous` (`None`: nothing active yet) to this
    /// stage changes. A mode kept on the same channels is kept; a mode on
    /// other channels is lifted and applied again with the new ones.
    pub fn transition_from(&self, previous: Option<&Stage>) -> Transition {
        let before: &[StageMode] = previous.map_or(&[], |p| &p.modes);
        let mut transition = Transition::default();
        for m in &self.modes {
            if before.contains(m) {
                transition.keep.push(m.clone());
            } else {
                transition.apply.push(m.clone());
            }
        }
        transition.lift = before
            .iter()
            .filter(|m| !self.modes.contains(m))
            .cloned()
            .collect();
        transition
    }
}

/// What changes when an incident moves from one stage to another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    /// Modes to apply (not active before, or active on other channels).
    pub apply: Vec<StageMode>,
    /// Modes active before and after, on the same channels.
    pub keep: Vec<StageMode>,
    /// Modes active before that the new stage does not list (on those
    /// channels).
    pub lift: Vec<StageMode>,
}

// === Runbooks ===

/// The pre-agreed response to one type of incident.
#[derive(Clone, Debug, PartialEq)]
pub struct Runbook {
    /// The incident type.
    pub name: RunbookName,
    /// Human title.
    pub title: String,
    /// What the incident is and how the runbook answers it.
    pub summary: String,
    /// Who owns the runbook: teams or addresses; at least one.
    pub owners: Vec<String>,
    /// Whether lifting this incident's modes, de-escalating or resolving
    /// needs a second, different approver. (A mode's own
    /// [`Mode::lift_requires_approval`] asks for one too.)
    pub lift_requires_approval: bool,
    /// How often the commander must review the incident.
    pub review_interval: Duration,
    /// When the incident may be resolved; at least one.
    pub exit_criteria: Vec<String>,
    /// The stages, least severe first, one per severity at most.
    pub stages: Vec<Stage>,
    /// When to propose declaring this incident: conditions over the signals
    /// channels report; at most [`Trigger::MAX_PER_RUNBOOK`].
    pub triggers: Vec<Trigger>,
}

// === Triggers ===

/// A condition over a reported signal that proposes declaring the runbook's
/// incident at a stage: `signal` counted more than `above` times across the
/// fleet within the last `within`. A trigger only ever proposes; a commander
/// declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trigger {
    /// The counter channels report, such as `login.failed`.
    pub signal: SignalName,
    /// The threshold: the trigger fires when the fleet-wide sum is greater.
    pub above: u64,
    /// The sliding window the sum is over: a whole multiple of
    /// [`Trigger::WINDOW_STEP`], from [`Trigger::MIN_WITHIN`] to
    /// [`Trigger::MAX_WITHIN`].
    pub within: Duration,
    /// The stage to propose: one the runbook has.
    pub severity: Severity,
}

impl Trigger {
    /// The most triggers one runbook may carry.
    pub const MAX_PER_RUNBOOK: usize = 8;
    /// The granularity of windows: the controller counts signals in buckets
    /// this long.
    pub const WINDOW_STEP: Duration = Duration::from_secs(10);
    /// The shortest window.
    pub const MIN_WITHIN: Duration = Duration::from_secs(10);
    /// The longest window: what the controller keeps of reports.
    pub const MAX_WITHIN: Duration = Duration::from_secs(15 * 60);

    /// Whether `count` (summed across the fleet over [`Trigger::within`])
    /// fires the trigger.
    pub fn fires(&self, count: u64) -> bool {
        count > self.above
    }

    /// The trigger in the runbook's words, such as
    /// `login.failed above 200 within 5m -> sev3`.
    pub fn describe(&self) -> String {
        format!(
            "{} above {} within {} -> {}",
            self.signal,
            self.above,
            describe_window(self.within),
            self.severity
        )
    }
}

/// A window as a person writes it: `5m`, `90s`, `15m`.
pub fn describe_window(window: Duration) -> String {
    let secs = window.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// The principal named on the activations a runbook check creates.
pub const RUNBOOK_PRINCIPAL: &str = "runbook";

/// The result of checking one expectation.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectationResult {
    /// The expectation.
    pub expectation: Expectation,
    /// What the stage's modes decide.
    pub actual: Outcome,
    /// Whether `actual` has the expected effect.
    pub holds: bool,
}

impl Runbook {
    /// The stage for `severity`, if the runbook has one.
    pub fn stage(&self, severity: Severity) -> Option<&Stage> {
        self.stages.iter().find(|s| s.severity == severity)
    }

    /// The severities the runbook has stages for, least severe first.
    pub fn severities(&self) -> impl Iterator<Item = Severity> + '_ {
        self.stages.iter().map(|s| s.severity)
    }

    /// The least severe stage at or above `severity`: where an incident
    /// declared at a severity the runbook has no stage for should start.
    pub fn stage_at_least(&self, severity: Severity) -> Option<&Stage> {
        self.stages.iter().find(|s| s.severity >= severity)
    }

    /// The activations `stage` would create, with the stage's messages, ids
    /// from a counter, revision 0 and principal [`RUNBOOK_PRINCIPAL`], so
    /// that expectations can be checked without a store. Modes missing from
    /// `catalog` are skipped (a parsed runbook names only known modes).
    pub fn stage_activations(
        &self,
        stage: &Stage,
        catalog: &ModeCatalog,
        at: Timestamp,
    ) -> Vec<Activation> {
        let reason = Reason::parse(&format!("runbook {} stage {}", self.name, stage.severity))
            .expect("a runbook name and a severity make a valid reason");
        let change = Change {
            principal: RUNBOOK_PRINCIPAL.to_string(),
            reason,
            at,
            incident_id: None,
        };
        stage
            .modes
            .iter()
            .filter_map(|m| catalog.get(m.mode.as_str()).map(|mode| (m, mode)))
            .enumerate()
            .map(|(i, (m, mode))| {
                Activation::new(
                    ActivationId::from_random(i as u64),
                    &stage.staged_mode(mode),
                    m.channels,
                    at,
                    &change,
                )
            })
            .collect()
    }

    /// A runbook with only a name, to decide a stage with (only the name
    /// shows, in the activations' reason).
    pub fn named(name: RunbookName) -> Runbook {
        Runbook {
            name,
            title: String::new(),
            summary: String::new(),
            owners: Vec::new(),
            lift_requires_approval: false,
            review_interval: Duration::ZERO,
            exit_criteria: Vec::new(),
            stages: Vec::new(),
            triggers: Vec::new(),
        }
    }

    /// The dead ends `stage` leaves by its own modes (whatever it accepts):
    /// actions no customer can get done on any channel while it is active.
    pub fn stage_dead_ends(&self, stage: &Stage, catalog: &ModeCatalog) -> Vec<DeadEnd> {
        let activations = self.stage_activations(stage, catalog, Timestamp::UNIX_EPOCH);
        dead_ends(&EffectivePolicy::compile(activations.iter()))
    }

    /// Decides every expectation of `stage` against the stage's own modes
    /// and says, for each, whether it holds.
    pub fn check_expectations(
        &self,
        stage: &Stage,
        catalog: &ModeCatalog,
    ) -> Vec<ExpectationResult> {
        let activations = self.stage_activations(stage, catalog, Timestamp::UNIX_EPOCH);
        let policy = EffectivePolicy::compile(&activations);
        stage
            .expectations
            .iter()
            .map(|e| {
                let actual = policy
                    .decide(e.channel, e.action.as_str(), &e.context)
                    .outcome;
                ExpectationResult {
                    holds: actual.kind() == e.effect,
                    expectation: e.clone(),
                    actual,
                }
            })
            .collect()
    }

    /// Whether lifting `mode` as part of this runbook's incident needs a
    /// second approver: the runbook or the mode says so.
    pub fn lift_needs_approval(&self, mode: &Mode) -> bool {
        self.lift_requires_approval || mode.lift_requires_approval
    }
}

// === The catalogue ===

/// Why a runbook catalogue could not be built.
#[derive(Debug, thiserror::Error)]
#[error("runbook '{0}' is defined twice; every incident type needs its own runbook")]
pub struct DuplicateRunbook(pub RunbookName);

/// The runbooks a controller knows, by incident type.
#[derive(Clone, Debug, Default)]
pub struct RunbookCatalog {
    runbooks: BTreeMap<RunbookName, Arc<Runbook>>,
}

impl RunbookCatalog {
    /// Builds a catalogue; names must be unique.
    pub fn new(runbooks: Vec<Runbook>) -> Result<Self, DuplicateRunbook> {
        let mut map = BTreeMap::new();
        for runbook in runbooks {
            let name = runbook.name.clone();
            if map.insert(name.clone(), Arc::new(runbook)).is_some() {
                return Err(DuplicateRunbook(name));
            }
        }
        Ok(RunbookCatalog { runbooks: map })
    }

    /// The runbook for incident type `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Runbook>> {
        self.runbooks.get(name)
    }

    /// Every runbook, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Runbook>> {
        self.runbooks.values()
    }

    /// Number of runbooks.
    pub fn len(&self) -> usize {
        self.runbooks.len()
    }

    /// Whether there are no runbooks.
    pub fn is_empty(&self) -> bool {
        self.runbooks.is_empty()
    }
}
