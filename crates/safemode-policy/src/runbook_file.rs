//! Reading runbooks from YAML text (`runbooks/<incident-type>.yaml`).
//!
//! Parsing is pure: callers hand in the file's name, its text and the mode
//! catalogue its stages draw on. Unlike a mode file, a runbook reports every
//! error it has, each a [`LocatedError`] (as a mode file's is) at the line
//! and column of the offending value: an SRE linting a runbook before a drill
//! should see the whole list at once. Only malformed YAML stops at its first
//! error, because nothing after it can be read.
//!
//! serde's derived `Deserialize` stops at the first unknown field or bad
//! value, so the file is first read into a tree of [`Spanned`] YAML nodes (the
//! YAML library keeps every node's position), and the tree is then checked by
//! hand, field by field, gathering errors. Messages for unknown and missing
//! fields keep serde's wording so that mode files and runbooks read alike.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::effect::EffectKind;
use super::located::LocatedError;
use super::mode::Context;
use super::mode::{ModeCatalog, ModeName};
use super::names::{Action, Channel, ChannelSet, MethodSet, validate_label};
use super::paths::DeadEnd;
use super::runbook::{
    AcceptedDeadEnds, Expectation, Runbook, RunbookName, Severity, Stage, StageMode, Trigger,
};
use super::telemetry::SignalName;

/// How long every channel may take to apply a stage, unless the runbook's
/// `drill.apply_within` or the stage's `apply_within` says otherwise.
pub const DEFAULT_APPLY_WITHIN: Duration = Duration::from_secs(5);

/// A runbook file that could not be read, with where and why.
pub type RunbookFileError = LocatedError;

/// Parses the runbook for incident type `name` (the file's stem) from
/// `text`, checking its stages against `modes`; `file` names the file in
/// errors. Returns every error found, in the order they appear in the file.
pub fn parse_runbook(
    file: &str,
    name: &str,
    text: &str,
    modes: &ModeCatalog,
) -> Result<Runbook, Vec<RunbookFileError>> {
    parse_runbook_checking(file, name, text, modes, Expectations::MustHold)
}

/// Whether a runbook's drill expectations must hold against its own stages
/// for the runbook to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expectations {
    /// Lint and serving: an expectation the stage's modes contradict is an
    /// error.
    MustHold,
    /// A drill: load the runbook anyway, so that the drill shows what each
    /// channel actually decides and fails on the expectation there.
    CheckedByDrill,
}

/// [`parse_runbook`], with the expectations checked as `expectations` says.
pub fn parse_runbook_checking(
    file: &str,
    name: &str,
    text: &str,
    modes: &ModeCatalog,
    expectations: Expectations,
) -> Result<Runbook, Vec<RunbookFileError>> {
    read_runbook(file, name, text, modes, expectations, DeadEnds::Allowed)
}

/// [`parse_runbook`] for `safemode runbook lint`: also an error, at the
/// stage, for each stage that leaves a dead end it does not accept (see
/// [`crate::paths`]). A controller serves such a runbook, and says the dead
/// end when an incident declares or escalates to the stage.
pub fn lint_runbook(
    file: &str,
    name: &str,
    text: &str,
    modes: &ModeCatalog,
) -> Result<Runbook, Vec<RunbookFileError>> {
    read_runbook(
        file,
        name,
        text,
        modes,
        Expectations::MustHold,
        DeadEnds::Refused,
    )
}

/// Whether a stage may leave a dead end it does not accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeadEnds {
    /// Served: the incident says so when it declares or escalates.
    Allowed,
    /// Linted: an error at the stage.
    Refused,
}

fn read_runbook(
    file: &str,
    name: &str,
    text: &str,
    modes: &ModeCatalog,
    expectations: Expectations,
    dead_ends: DeadEnds,
) -> Result<Runbook, Vec<RunbookFileError>> {
    let blank = |line: &str| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    };
    if text.lines().all(blank) {
        return Err(vec![LocatedError::at_start(
            file,
            "the file is empty; a runbook needs a title, a summary, owners, a review interval, exit criteria and stages",
        )]);
    }
    // `yes`, `no`, `on` and `off` stay text: only `true` and `false` are
    // booleans, so `owners: [no-reply]`-like slips cannot turn into `false`.
    let mut options = super::mode_file::yaml_options();
    options.strict_booleans = true;
    let root: Node = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| vec![LocatedError::from_yaml(file, &e)])?;

    let mut checker = Checker {
        errors: Vec::new(),
        modes,
        expectations,
        dead_ends,
    };
    let name = match RunbookName::parse(name) {
        Ok(name) => Some(name),
        Err(e) => {
            checker.errors.push((
                None,
                format!("the file name must be the incident type: {}", e.0),
            ));
            None
        }
    };
    let runbook = checker.runbook(&root, name);
    let mut errors: Vec<RunbookFileError> = checker
        .errors
        .into_iter()
        .map(|(at, message)| match at {
            Some(at) => LocatedError::new(file, at, message),
            None => LocatedError::at_start(file, message),
        })
        .collect();
    match runbook {
        Some(runbook) if errors.is_empty() => Ok(runbook),
        _ => {
            errors.sort_by_key(|e| (e.line, e.column));
            Err(errors)
        }
    }
}

// === The YAML tree ===

/// A YAML node with its position.
type Node = Spanned<Kind>;

/// What a YAML node holds. Plain scalars are typed by the YAML library
/// (`3` is a number, `true` a boolean); quoted ones are always text.
enum Kind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Kind {
    /// What the node is, for "found ..." in messages.
    fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "nothing",
            Kind::Bool(_) => "true/false",
            Kind::Int(_) | Kind::Float(_) => "a number",
            Kind::Str(_) => "text",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a map",
        }
    }

    /// A scalar as written (near enough: `1.50` reads back as `1.5`).
    fn scalar_text(&self) -> Option<String> {
        match self {
            Kind::Bool(b) => Some(b.to_string()),
            Kind::Int(i) => Some(i.to_string()),
            Kind::Float(f) => Some(f.to_string()),
            Kind::Str(s) => Some(s.clone()),
            Kind::Null | Kind::Seq(_) | Kind::Map(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl<'de> Visitor<'de> for KindVisitor {
            type Value = Kind;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
                Ok(Kind::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
                Ok(Kind::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
                Kind::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
                Ok(Kind::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
                Ok(Kind::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
                Ok(Kind::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Kind, E> {
                Ok(Kind::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
                Ok(Kind::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
                Ok(Kind::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                Ok(Kind::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
                Ok(Kind::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Kind::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Node>()? {
                    let value = map.next_value::<Node>()?;
                    entries.push((key, value));
                }
                Ok(Kind::Map(entries))
            }
        }
        d.deserialize_any(KindVisitor)
    }
}

// === Checking ===

/// Field names, in the order the format documents them.
const RUNBOOK_FIELDS: &[&str] = &[
    "title",
    "summary",
    "owners",
    "lift_requires_approval",
    "review_interval",
    "exit_criteria",
    "customer_message",
    "agent_script",
    "drill",
    "stages",
    "triggers",
];
const DRILL_FIELDS: &[&str] = &["apply_within"];
const STAGE_FIELDS: &[&str] = &[
    "severity",
    "modes",
    "customer_message",
    "agent_script",
    "apply_within",
    "expect",
    "accepts_dead_ends",
];
const TRIGGER_FIELDS: &[&str] = &["signal", "above", "within", "severity"];
const ACCEPTS_DEAD_ENDS_FIELDS: &[&str] = &["actions", "reason"];
const STAGE_MODE_FIELDS: &[&str] = &["mode", "channels"];
const EXPECTATION_FIELDS: &[&str] = &[
    "channel",
    "action",
    "effect",
    "confidence",
    "methods",
    "attempts",
    "amount",
    "handoff",
    "bot_flags",
];

/// The effects an expectation can name, least restrictive first.
const EFFECT_KINDS: [EffectKind; 7] = [
    EffectKind::Allow,
    EffectKind::Throttle,
    EffectKind::StepUp,
    EffectKind::Review,
    EffectKind::ReadOnly,
    EffectKind::Route,
    EffectKind::Deny,
];

/// Gathers errors while walking the tree. A check that fails records its
/// error and returns `None`; its caller goes on with the next field.
struct Checker<'a> {
    /// Errors with their position (`None`: the start of the file).
    errors: Vec<(Option<Location>, String)>,
    modes: &'a ModeCatalog,
    expectations: Expectations,
    dead_ends: DeadEnds,
}

/// The fields of a YAML map, after unknown fields were reported.
struct Fields<'n> {
    at: Location,
    /// (name, where the name is, value).
    entries: Vec<(&'n str, Location, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The field's value; `None` if it is absent or null (`key:` or `~`).
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, v)| *k == name && !matches!(v.value, Kind::Null))
            .map(|(_, _, v)| *v)
    }
}

/// A stage read from the file, with what its later checks need.
struct ParsedStage {
    stage: Stage,
    /// Where the stage is.
    at: Location,
    /// Where its `accepts_dead_ends` is, if it has one.
    accepts_at: Option<Location>,
    /// Where each expectation's `effect` is, in expectation order.
    effects_at: Vec<Location>,
    /// Whether the stage had no error of its own (its expectations can
    /// then be checked against its modes).
    clean: bool,
}

impl Checker<'_> {
    fn error(&mut self, at: Location, message: impl Into<String>) {
        self.errors.push((Some(at), message.into()));
    }

    /// The node as a map with only `known` fields (each unknown one is
    /// reported); `what` names the map in messages.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Kind::Map(entries) = &node.value else {
            self.error(
                node.referenced,
                format!(
                    "{what} must be a map with the fields {}; found {}",
                    known.join(", "),
                    node.value.describe()
                ),
            );
            return None;
        };
        let mut fields = Fields {
            at: node.referenced,
            entries: Vec::with_capacity(entries.len()),
        };
        for (key, value) in entries {
            match &key.value {
                Kind::Str(k) if known.contains(&k.as_str()) => {
                    fields.entries.push((k, key.referenced, value));
                }
                other => {
                    let shown = other
                        .scalar_text()
                        .unwrap_or_else(|| other.describe().into());
                    self.error(
                        key.referenced,
                        format!(
                            "unknown field `{shown}`, expected one of {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        Some(fields)
    }

    /// A field that must be present; reports it missing at its map.
    fn required<'n>(&mut self, fields: &Fields<'n>, name: &str, hint: &str) -> Option<&'n Node> {
        let value = fields.get(name);
        if value.is_none() {
            // `key:` with nothing after it: the key is where to look.
            match fields.entries.iter().find(|(k, _, _)| *k == name) {
                Some((_, key_at, _)) => self.error(*key_at, format!("{name} has no value; {hint}")),
                None => self.error(fields.at, format!("missing field `{name}`; {hint}")),
            }
        }
        value
    }

    /// Text, trimmed; refuses blank text. Numbers and booleans are taken as
    /// written.
    fn text(&mut self, node: &Node, field: &str) -> Option<String> {
        let Some(text) = node.value.scalar_text() else {
            self.error(
                node.referenced,
                format!("{field} must be text; found {}", node.value.describe()),
            );
            return None;
        };
        let text = text.trim();
        if text.is_empty() {
            self.error(node.referenced, format!("{field} is empty"));
            return None;
        }
        Some(text.to_string())
    }

    fn optional_text(&mut self, fields: &Fields, field: &str) -> Option<Arc<str>> {
        fields
            .get(field)
            .and_then(|n| self.text(n, field))
            .map(Arc::from)
    }

    /// The node as a list; `example` shows the expected shape.
    fn list<'n>(&mut self, node: &'n Node, field: &str, example: &str) -> Option<&'n [Node]> {
        match &node.value {
            Kind::Seq(items) => Some(items),
            other => {
                self.error(
                    node.referenced,
                    format!(
                        "{field} must be a list, e.g. {example}; found {}",
                        other.describe()
                    ),
                );
                None
            }
        }
    }

    /// A non-empty list of text.
    fn text_list(&mut self, node: &Node, field: &str, example: &str) -> Option<Vec<String>> {
        let items = self.list(node, field, example)?;
        if items.is_empty() {
            self.error(
                node.referenced,
                format!("{field} is empty; give at least one, e.g. {example}"),
            );
            return None;
        }
        let texts: Vec<Option<String>> = items.iter().map(|n| self.text(n, field)).collect();
        texts.into_iter().collect()
    }

    fn boolean(&mut self, node: &Node, field: &str) -> Option<bool> {
        match node.value {
            Kind::Bool(b) => Some(b),
            ref other => {
                self.error(
                    node.referenced,
                    format!("{field} must be true or false; found {}", other.describe()),
                );
                None
            }
        }
    }

    fn number(&mut self, node: &Node, field: &str) -> Option<f64> {
        match node.value {
            Kind::Int(i) => Some(i as f64),
            Kind::Float(f) if f.is_finite() => Some(f),
            ref other => {
                let found = other
                    .scalar_text()
                    .unwrap_or_else(|| other.describe().into());
                self.error(
                    node.referenced,
                    format!("{field} must be a number; found {found}"),
                );
                None
            }
        }
    }

    /// A duration such as `5s`, `30m` or `1h`, longer than zero.
    fn duration(&mut self, node: &Node, field: &str) -> Option<Duration> {
        let written = node
            .value
            .scalar_text()
            .unwrap_or_else(|| node.value.describe().into());
        let parsed = match &node.value {
            Kind::Str(s) => s
                .parse::<jiff::Span>()
                .ok()
                .and_then(|span| {
                    span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                        .ok()
                })
                .and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero()),
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                node.referenced,
                format!(
                    "bad duration '{written}' for {field}: write a length of time such as 5s, 30m or 1h"
                ),
            );
        }
        parsed
    }

    // === The runbook ===

    fn runbook(&mut self, root: &Node, name: Option<RunbookName>) -> Option<Runbook> {
        let fields = self.fields(root, "a runbook", RUNBOOK_FIELDS)?;
        let title = self
            .required(&fields, "title", "give the runbook a title")
            .and_then(|n| self.text(n, "title"));
        let summary = self
            .required(
                &fields,
                "summary",
                "say what the incident is and how the runbook answers it",
            )
            .and_then(|n| self.text(n, "summary"));
        let owners = self
            .required(
                &fields,
                "owners",
                "name the teams or addresses that own the runbook",
            )
            .and_then(|n| self.text_list(n, "owners", "[security-incident-response]"));
        let lift_requires_approval = match fields.get("lift_requires_approval") {
            Some(n) => self.boolean(n, "lift_requires_approval"),
            None => Some(false),
        };
        let review_interval = self
            .required(
                &fields,
                "review_interval",
                "say how often the commander reviews the incident, e.g. 30m",
            )
            .and_then(|n| self.duration(n, "review_interval"));
        let exit_criteria = self
            .required(
                &fields,
                "exit_criteria",
                "say when the incident may be resolved",
            )
            .and_then(|n| {
                self.text_list(
                    n,
                    "exit_criteria",
                    "[\"Failed sign-ins back to baseline for 24h\"]",
                )
            });
        let customer_message = self.optional_text(&fields, "customer_message");
        let agent_script = self.optional_text(&fields, "agent_script");
        let apply_within = match fields.get("drill") {
            None => Some(DEFAULT_APPLY_WITHIN),
            Some(drill) => self.fields(drill, "drill", DRILL_FIELDS).and_then(|d| {
                match d.get("apply_within") {
                    Some(n) => self.duration(n, "apply_within"),
                    None => Some(DEFAULT_APPLY_WITHIN),
                }
            }),
        };
        let defaults = StageDefaults {
            customer_message,
            agent_script,
            apply_within: apply_within.unwrap_or(DEFAULT_APPLY_WITHIN),
        };
        let stages = self
            .required(
                &fields,
                "stages",
                "give at least one stage: a severity, its modes and what must hold",
            )
            .map(|n| self.stages(n, &defaults));
        // Checked against the severities the stages name, whether or not
        // the rest of each stage reads.
        let stage_severities: Vec<Severity> = match fields.get("stages").map(|n| &n.value) {
            Some(Kind::Seq(items)) => items
                .iter()
                .filter_map(|s| peek_severity(s).map(|(s, _)| s))
                .collect(),
            _ => Vec::new(),
        };
        let triggers = match fields.get("triggers") {
            Some(n) => self.triggers(n, &stage_severities),
            None => Some(Vec::new()),
        };
        // Expectations are checked whatever else is wrong, so one run shows
        // every mistake.
        if let Some((stages, _)) = &stages
            && self.expectations == Expectations::MustHold
        {
            let check_name = name
                .clone()
                .unwrap_or_else(|| RunbookName::parse("unnamed").expect("a valid name"));
            self.check_expectations(&check_name, stages);
        }
        if let Some((stages, _)) = &stages
            && self.dead_ends == DeadEnds::Refused
        {
            let check_name = name
                .clone()
                .unwrap_or_else(|| RunbookName::parse("unnamed").expect("a valid name"));
            self.check_dead_ends(&check_name, stages);
        }
        let (stages, all_read) = stages?;
        if !all_read {
            return None;
        }
        Some(Runbook {
            name: name?,
            title: title?,
            summary: summary?,
            owners: owners?,
            lift_requires_approval: lift_requires_approval?,
            review_interval: review_interval?,
            exit_criteria: exit_criteria?,
            stages: stages.into_iter().map(|s| s.stage).collect(),
            triggers: triggers?,
        })
    }

    // === Triggers ===

    /// `triggers: [{signal, above, within, severity}, ...]`, each severity
    /// one of `stages`'.
    fn triggers(&mut self, node: &Node, stages: &[Severity]) -> Option<Vec<Trigger>> {
        let items = self.list(
            node,
            "triggers",
            "[{signal: login.failed, above: 200, within: 5m, severity: sev3}]",
        )?;
        if items.len() > Trigger::MAX_PER_RUNBOOK {
            self.error(
                node.referenced,
                format!(
                    "{} triggers, more than the {} a runbook may carry; keep the ones a commander would act on",
                    items.len(),
                    Trigger::MAX_PER_RUNBOOK
                ),
            );
            return None;
        }
        let mut read: Vec<(Trigger, Location)> = Vec::with_capacity(items.len());
        let mut all_read = true;
        for item in items {
            let Some(trigger) = self.trigger(item, stages) else {
                all_read = false;
                continue;
            };
            if let Some((_, first)) = read
                .iter()
                .find(|(t, _)| t.signal == trigger.signal && t.severity == trigger.severity)
            {
                let first = *first;
                self.error(
                    item.referenced,
                    format!(
                        "a trigger on {} for {} is already at line {}; give each signal one trigger per stage",
                        trigger.signal,
                        trigger.severity,
                        first.line()
                    ),
                );
                all_read = false;
                continue;
            }
            read.push((trigger, item.referenced));
        }
        all_read.then(|| read.into_iter().map(|(t, _)| t).collect())
    }

    fn trigger(&mut self, node: &Node, stages: &[Severity]) -> Option<Trigger> {
        let fields = self.fields(node, "a trigger", TRIGGER_FIELDS)?;
        let signal = self
            .required(
                &fields,
                "signal",
                "name the counter channels report, e.g. login.failed",
            )
            .and_then(|n| {
                let written = n
                    .value
                    .scalar_text()
                    .unwrap_or_else(|| n.value.describe().into());
                SignalName::parse(&written)
                    .map_err(|e| self.error(n.referenced, e.0))
                    .ok()
            });
        let above = self
            .required(
                &fields,
                "above",
                "say how many, summed across the fleet, fire it, e.g. 200",
            )
            .and_then(|n| match n.value {
                Kind::Int(i) if (1..=i128::from(u32::MAX)).contains(&i) => Some(i as u64),
                ref other => {
                    let found = other
                        .scalar_text()
                        .unwrap_or_else(|| other.describe().into());
                    self.error(
                        n.referenced,
                        format!(
                            "above must be a whole number from 1 to {}, the count summed across the fleet that fires the trigger; found {found}",
                            u32::MAX
                        ),
                    );
                    None
                }
            });
        let within = self
            .required(
                &fields,
                "within",
                "say over how long the signal is summed, e.g. 5m",
            )
            .and_then(|n| {
                let d = self.duration(n, "within")?;
                let step = Trigger::WINDOW_STEP.as_secs();
                if d < Trigger::MIN_WITHIN
                    || d > Trigger::MAX_WITHIN
                    || d.subsec_nanos() != 0
                    || d.as_secs() % step != 0
                {
                    self.error(
                        n.referenced,
                        format!(
                            "within must be from 10s to 15m in whole steps of {step}s (signals are counted in {step}-second buckets, kept for 15 minutes), e.g. 5m",
                        ),
                    );
                    return None;
                }
                Some(d)
            });
        let severity = self
            .required(
                &fields,
                "severity",
                "say which stage to propose: sev4, sev3, sev2 or sev1",
            )
            .and_then(|n| {
                let severity = self.severity(n)?;
                if !stages.contains(&severity) {
                    let have: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
                    self.error(
                        n.referenced,
                        format!(
                            "the runbook has no {severity} stage to propose; its stages are {}",
                            if have.is_empty() {
                                "none".to_string()
                            } else {
                                have.join(", ")
                            }
                        ),
                    );
                    return None;
                }
                Some(severity)
            });
        Some(Trigger {
            signal: signal?,
            above: above?,
            within: within?,
            severity: severity?,
        })
    }

    // === Stages ===

    /// The stages that could be read, and whether that is all of them, in
    /// order and without duplicates.
    fn stages(&mut self, node: &Node, defaults: &StageDefaults) -> (Vec<ParsedStage>, bool) {
        let Some(items) = self.list(
            node,
            "stages",
            "[{severity: sev3, modes: [...], expect: [...]}]",
        ) else {
            return (Vec::new(), false);
        };
        if items.is_empty() {
            self.error(
                node.referenced,
                "stages is empty; a runbook needs at least one stage",
            );
            return (Vec::new(), false);
        }
        let mut parsed = Vec::with_capacity(items.len());
        let mut all_read = true;
        // (severity, where it is) of every stage so far, to find duplicates
        // and stages out of order, whether or not the rest of the stage reads.
        let mut seen: Vec<(Severity, Location)> = Vec::new();
        for item in items {
            if let Some((severity, at)) = peek_severity(item) {
                if let Some((_, first)) = seen.iter().find(|(s, _)| *s == severity) {
                    let first = *first;
                    self.error(
                        at,
                        format!(
                            "unreachable: severity {severity} already has a stage at line {}; give each severity one stage",
                            first.line()
                        ),
                    );
                    all_read = false;
                } else if let Some((before, before_at)) = seen
                    .iter()
                    .filter(|(s, _)| *s > severity)
                    .max_by_key(|(s, _)| *s)
                {
                    let (before, before_at) = (*before, *before_at);
                    self.error(
                        at,
                        format!(
                            "stages out of order: {severity} comes after {before} (line {}); list stages from the least severe (sev4) to the most severe (sev1)",
                            before_at.line()
                        ),
                    );
                    all_read = false;
                }
                seen.push((severity, at));
            }
            match self.stage(item, defaults) {
                Some(stage) => parsed.push(stage),
                None => all_read = false,
            }
        }
        (parsed, all_read)
    }

    fn stage(&mut self, node: &Node, defaults: &StageDefaults) -> Option<ParsedStage> {
        let errors_before = self.errors.len();
        let fields = self.fields(node, "a stage", STAGE_FIELDS)?;
        let severity = self
            .required(
                &fields,
                "severity",
                "say which severity the stage is for: sev4, sev3, sev2 or sev1",
            )
            .and_then(|n| self.severity(n));
        let modes = self
            .required(
                &fields,
                "modes",
                "list the modes the stage applies, e.g. [freeze-credential-changes]",
            )
            .and_then(|n| self.stage_modes(n));
        let customer_message = self
            .optional_text(&fields, "customer_message")
            .or_else(|| defaults.customer_message.clone());
        let agent_script = self
            .optional_text(&fields, "agent_script")
            .or_else(|| defaults.agent_script.clone());
        let apply_within = match fields.get("apply_within") {
            Some(n) => self.duration(n, "apply_within"),
            None => Some(defaults.apply_within),
        };
        let expect = self
            .required(
                &fields,
                "expect",
                "say which decisions must hold while the stage is active",
            )
            .and_then(|n| self.expectations(n));
        let accepts = match fields.get("accepts_dead_ends") {
            Some(n) => Some((self.accepts_dead_ends(n)?, n.referenced)),
            None => None,
        };
        let (expectations, effects_at) = expect?;
        Some(ParsedStage {
            stage: Stage {
                severity: severity?,
                modes: modes?,
                customer_message,
                agent_script,
                apply_within: apply_within?,
                expectations,
                accepts_dead_ends: accepts.as_ref().map(|(a, _)| a.clone()),
            },
            at: node.referenced,
            accepts_at: accepts.map(|(_, at)| at),
            effects_at,
            clean: self.errors.len() == errors_before,
        })
    }

    fn severity(&mut self, node: &Node) -> Option<Severity> {
        let written = node
            .value
            .scalar_text()
            .unwrap_or_else(|| node.value.describe().into());
        match Severity::parse(&written) {
            Ok(s) => Some(s),
            Err(e) => {
                self.error(node.referenced, e.0);
                None
            }
        }
    }

    fn stage_modes(&mut self, node: &Node) -> Option<Vec<StageMode>> {
        let items = self.list(
            node,
            "modes",
            "[freeze-credential-changes, {mode: bots-faq-only, channels: [chatbot]}]",
        )?;
        if items.is_empty() {
            self.error(
                node.referenced,
                "modes is empty; a stage applies at least one mode",
            );
            return None;
        }
        let mut modes: Vec<(StageMode, Location)> = Vec::with_capacity(items.len());
        let mut all_read = true;
        for item in items {
            let Some((mode, at)) = self.stage_mode(item) else {
                all_read = false;
                continue;
            };
            if let Some((_, first)) = modes.iter().find(|(m, _)| m.mode == mode.mode) {
                let first = *first;
                self.error(
                    at,
                    format!(
                        "mode '{}' is already in this stage at line {}; list it once, with all its channels",
                        mode.mode,
                        first.line()
                    ),
                );
                all_read = false;
                continue;
            }
            modes.push((mode, at));
        }
        all_read.then(|| modes.into_iter().map(|(m, _)| m).collect())
    }

    /// `NAME` (every channel) or `{mode: NAME, channels: [...]}`; with where
    /// the name is.
    fn stage_mode(&mut self, node: &Node) -> Option<(StageMode, Location)> {
        let (name_node, channels) = match &node.value {
            Kind::Map(_) => {
                let fields = self.fields(node, "a stage's mode", STAGE_MODE_FIELDS)?;
                let name = self.required(
                    &fields,
                    "mode",
                    "name the mode, e.g. {mode: bots-faq-only, channels: [chatbot]}",
                );
                let channels = self
                    .required(
                        &fields,
                        "channels",
                        "name the channels, or write the mode's name alone to mean every channel",
                    )
                    .and_then(|n| self.channel_set(n));
                (name?, channels?)
            }
            _ => (node, ChannelSet::ALL),
        };
        let name = self.mode_name(name_node)?;
        let mode = self.modes.get(name.as_str())?;
        let covered = mode
            .rules
            .iter()
            .flat_map(|r| r.channels.iter())
            .fold(ChannelSet::NONE, ChannelSet::with);
        if channels.intersection(covered).is_empty() {
            self.error(
                node.referenced,
                format!(
                    "mode '{name}' has no rule for {channels}, so applying it there does nothing; its rules cover {covered}"
                ),
            );
            return None;
        }
        Some((
            StageMode {
                mode: name,
                channels,
            },
            name_node.referenced,
        ))
    }

    /// A mode name the catalogue knows.
    fn mode_name(&mut self, node: &Node) -> Option<ModeName> {
        let Kind::Str(written) = &node.value else {
            self.error(
                node.referenced,
                format!(
                    "a mode is its name, or {{mode: NAME, channels: [...]}}; found {}",
                    node.value.describe()
                ),
            );
            return None;
        };
        let known = ModeName::parse(written)
            .ok()
            .filter(|n| self.modes.get(n.as_str()).is_some());
        if known.is_none() {
            let names: Vec<&str> = self.modes.iter().map(|m| m.name.as_str()).collect();
            self.error(
                node.referenced,
                format!(
                    "unknown mode '{written}'; `safemode mode list` shows the modes, here: {}",
                    names.join(", ")
                ),
            );
        }
        known
    }

    /// A channel selector, as in mode files: names, or `["*"]`.
    fn channel_set(&mut self, node: &Node) -> Option<ChannelSet> {
        let items = self.list(node, "channels", "[chatbot, ivr] or [\"*\"]")?;
        if items.is_empty() {
            self.error(
                node.referenced,
                "channel list is empty; name channels or use '*' for all",
            );
            return None;
        }
        let mut names = Vec::with_capacity(items.len());
        for item in items {
            let name = item.value.scalar_text().unwrap_or_default();
            if let Err(e) = ChannelSet::parse_selector(std::slice::from_ref(&name)) {
                self.error(item.referenced, e.0);
                return None;
            }
            names.push(name);
        }
        match ChannelSet::parse_selector(&names) {
            Ok(set) => Some(set),
            Err(e) => {
                self.error(node.referenced, e.0);
                None
            }
        }
    }

    // === Expectations ===

    fn expectations(&mut self, node: &Node) -> Option<(Vec<Expectation>, Vec<Location>)> {
        let items = self.list(
            node,
            "expect",
            "[{channel: chatbot, action: account.password_reset, effect: deny}]",
        )?;
        if items.is_empty() {
            self.error(
                node.referenced,
                "expect is empty; say at least one decision that must hold while the stage is active",
            );
            return None;
        }
        let read: Vec<Option<(Expectation, Location)>> =
            items.iter().map(|n| self.expectation(n)).collect();
        let read: Vec<(Expectation, Location)> = read.into_iter().collect::<Option<_>>()?;
        Some(read.into_iter().unzip())
    }

    /// `accepts_dead_ends: {actions: [...], reason: ...}`.
    fn accepts_dead_ends(&mut self, node: &Node) -> Option<AcceptedDeadEnds> {
        let fields = self.fields(node, "accepts_dead_ends", ACCEPTS_DEAD_ENDS_FIELDS)?;
        let actions = self
            .required(
                &fields,
                "actions",
                "list the actions the stage leaves with no path on purpose, e.g. [account.password_reset]",
            )
            .and_then(|n| {
                let names = self.text_list(n, "actions", "[account.password_reset]")?;
                if names.is_empty() {
                    self.error(
                        n.referenced,
                        "actions is empty; list the actions the stage leaves with no path, or drop accepts_dead_ends",
                    );
                    return None;
                }
                let mut actions = Vec::with_capacity(names.len());
                for name in names {
                    match Action::parse(&name) {
                        Ok(action) if !actions.contains(&action) => actions.push(action),
                        Ok(_) => {
                            self.error(n.referenced, format!("{name} is listed twice"));
                            return None;
                        }
                        Err(e) => {
                            self.error(n.referenced, e.0);
                            return None;
                        }
                    }
                }
                Some(actions)
            });
        let reason = self
            .required(
                &fields,
                "reason",
                "say why genuine customers are not trapped, or why it is worth it",
            )
            .and_then(|n| self.text(n, "reason"));
        Some(AcceptedDeadEnds {
            actions: actions?,
            reason: Arc::from(reason?.trim()),
        })
    }

    fn expectation(&mut self, node: &Node) -> Option<(Expectation, Location)> {
        let fields = self.fields(node, "an expectation", EXPECTATION_FIELDS)?;
        let channel = self
            .required(&fields, "channel", "say which channel asks, e.g. chatbot")
            .and_then(|n| {
                let written = n.value.scalar_text().unwrap_or_default();
                Channel::parse(&written)
                    .map_err(|e| self.error(n.referenced, e.0))
                    .ok()
            });
        let action = self
            .required(
                &fields,
                "action",
                "say which action it asks about, e.g. account.password_reset",
            )
            .and_then(|n| {
                let written = n.value.scalar_text().unwrap_or_default();
                Action::parse(&written)
                    .map_err(|e| self.error(n.referenced, e.0))
                    .ok()
            });
        let effect_node = self.required(
            &fields,
            "effect",
            "say which effect the decision must have, e.g. deny",
        );
        let effect = effect_node.and_then(|n| {
            let written = n.value.scalar_text().unwrap_or_default();
            let kind = EFFECT_KINDS.into_iter().find(|k| k.as_str() == written);
            if kind.is_none() {
                self.error(
                    n.referenced,
                    format!(
                        "unknown effect '{written}'; effects are allow, throttle, step_up, review, read_only, route, deny"
                    ),
                );
            }
            kind
        });
        let context = self.context(&fields);
        Some((
            Expectation {
                channel: channel?,
                action: action?,
                context: context?,
                effect: effect?,
            },
            effect_node?.referenced,
        ))
    }

    /// The request's context: every field optional, defaults as a fresh,
    /// unverified session.
    fn context(&mut self, fields: &Fields) -> Option<Context> {
        let mut ok = true;
        let mut context = Context::default();
        if let Some(n) = fields.get("confidence") {
            match self.number(n, "confidence") {
                Some(c) if (0.0..=1.0).contains(&c) => context.confidence = c,
                Some(c) => {
                    self.error(n.referenced, format!("confidence {c} is outside 0..1"));
                    ok = false;
                }
                None => ok = false,
            }
        }
        if let Some(n) = fields.get("methods") {
            match self.methods(n) {
                Some(m) => context.methods = m,
                None => ok = false,
            }
        }
        if let Some(n) = fields.get("attempts") {
            match n.value {
                Kind::Int(i) if (0..=i128::from(u32::MAX)).contains(&i) => {
                    context.failed_attempts = i as u32;
                }
                ref other => {
                    let found = other
                        .scalar_text()
                        .unwrap_or_else(|| other.describe().into());
                    self.error(
                        n.referenced,
                        format!(
                            "attempts must be a whole number of failed attempts, 0 or more; found {found}"
                        ),
                    );
                    ok = false;
                }
            }
        }
        if let Some(n) = fields.get("amount") {
            match self.number(n, "amount") {
                Some(a) if a >= 0.0 => context.amount = Some(a),
                Some(_) => {
                    self.error(n.referenced, "amount must be a number >= 0");
                    ok = false;
                }
                None => ok = false,
            }
        }
        if let Some(n) = fields.get("handoff") {
            match self.boolean(n, "handoff") {
                Some(h) => context.handoff_from_bot = h,
                None => ok = false,
            }
        }
        if let Some(n) = fields.get("bot_flags") {
            match self.list(n, "bot_flags", "[suspected_takeover]") {
                Some(items) => {
                    for item in items {
                        let flag = item.value.scalar_text().unwrap_or_default();
                        match validate_label("bot flag", &flag) {
                            Ok(()) => context.bot_flags.push(flag),
                            Err(e) => {
                                self.error(item.referenced, e.0);
                                ok = false;
                            }
                        }
                    }
                }
                None => ok = false,
            }
        }
        ok.then_some(context)
    }

    fn methods(&mut self, node: &Node) -> Option<MethodSet> {
        let items = self.list(node, "methods", "[push, webauthn]")?;
        let mut names = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let name = item.value.scalar_text().unwrap_or_default();
            match MethodSet::parse(std::slice::from_ref(&name)) {
                Ok(_) => names.push(name),
                Err(e) => {
                    self.error(item.referenced, e.0);
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        MethodSet::parse(&names).ok()
    }

    /// Reports every expectation of a clean stage that the stage's own
    /// modes contradict.
    fn check_expectations(&mut self, name: &RunbookName, stages: &[ParsedStage]) {
        let runbook = Runbook::named(name.clone());
        for parsed in stages.iter().filter(|s| s.clean) {
            let results = runbook.check_expectations(&parsed.stage, self.modes);
            for (result, at) in results.iter().zip(&parsed.effects_at) {
                if result.holds {
                    continue;
                }
                let e = &result.expectation;
                self.error(
                    *at,
                    format!(
                        "expectation says {} but the stage's modes give {} for {} {}",
                        e.effect.as_str(),
                        result.actual.kind().as_str(),
                        e.channel,
                        e.action
                    ),
                );
            }
        }
    }
}

impl Checker<'_> {
    /// Reports every clean stage that leaves a dead end it does not accept
    /// (at the stage), and every accepted action that is not a dead end (at
    /// its `accepts_dead_ends`), so the declaration stays true.
    fn check_dead_ends(&mut self, name: &RunbookName, stages: &[ParsedStage]) {
        let runbook = Runbook::named(name.clone());
        for parsed in stages.iter().filter(|s| s.clean) {
            let stage = &parsed.stage;
            let found = runbook.stage_dead_ends(stage, self.modes);
            let unaccepted: Vec<&DeadEnd> = found
                .iter()
                .filter(|d| !stage.accepts_dead_end(d.action))
                .collect();
            if !unaccepted.is_empty() {
                let actions: Vec<&str> = unaccepted.iter().map(|d| d.action).collect();
                let why: Vec<String> = unaccepted.iter().map(|d| d.describe()).collect();
                self.error(
                    parsed.at,
                    format!(
                        "stage {} leaves a dead end, an action no customer can get done on any channel: {}; change the stage's modes so that some channel offers a path, or say that it is meant: accepts_dead_ends: {{actions: [{}], reason: ...}}",
                        stage.severity,
                        why.join("; "),
                        actions.join(", ")
                    ),
                );
            }
            if let (Some(accepted), Some(at)) = (&stage.accepts_dead_ends, parsed.accepts_at) {
                let open: Vec<&str> = accepted
                    .actions
                    .iter()
                    .map(Action::as_str)
                    .filter(|a| !found.iter().any(|d| d.action == *a))
                    .collect();
                if !open.is_empty() {
                    self.error(
                        at,
                        format!(
                            "accepts_dead_ends names {}, which stage {} leaves a path through; list only the actions it leaves with none",
                            open.join(", "),
                            stage.severity
                        ),
                    );
                }
            }
        }
    }
}

/// A stage's severity and where it is, if it has a valid one; errors are
/// reported when the stage is read.
fn peek_severity(stage: &Node) -> Option<(Severity, Location)> {
    let Kind::Map(entries) = &stage.value else {
        return None;
    };
    entries
        .iter()
        .find_map(|(key, value)| match (&key.value, &value.value) {
            (Kind::Str(k), Kind::Str(v)) if k == "severity" => {
                Severity::parse(v).ok().map(|s| (s, value.referenced))
            }
            _ => None,
        })
}

/// What a stage takes from its runbook unless it says otherwise.
struct StageDefaults {
    customer_message: Option<Arc<str>>,
    agent_script: Option<Arc<str>>,
    apply_within: Duration,
}
