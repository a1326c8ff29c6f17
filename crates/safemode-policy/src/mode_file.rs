//! Reading mode definitions from YAML text (`runbooks/modes/<name>.yaml`).
//!
//! Parsing is pure: callers hand in the file's name and text. Every error is
//! a [`LocatedError`] at the file, line and column of the offending value,
//! whether the YAML is malformed, a field is unknown, or a value makes no
//! sense (an unknown action, a confidence above 1, a route back to its own
//! channel).

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::effect::{Deny, Effect, ReadOnly, Review, Route, StepUp, Throttle};
use super::located::LocatedError;
use super::mode::{Condition, Mode, ModeName, Rule};
use super::names::{ActionSelector, ChannelSet, MethodSet, NameError, validate_label};
use super::text::Text;

/// A mode file that could not be read, with where and why.
pub type ModeFileError = LocatedError;

/// Parses the mode called `name` (the file's stem) from `text`; `file` names
/// the file in errors.
pub fn parse_mode(file: &str, name: &str, text: &str) -> Result<Mode, ModeFileError> {
    let name = ModeName::parse(name).map_err(|e| {
        LocatedError::at_start(file, format!("the file name must be the mode's name: {e}"))
    })?;
    let blank = |line: &str| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#')
    };
    if text.lines().all(blank) {
        return Err(LocatedError::at_start(
            file,
            "the file is empty; a mode needs a title, a summary and rules",
        ));
    }
    let spec: ModeSpec = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| LocatedError::from_yaml(file, &e))?;
    spec.into_mode(name)
        .map_err(|(at, message)| LocatedError::new(file, at, message))
}

/// How deep a safemode YAML file may nest (maps and lists). The deepest
/// valid file nests 6 levels (a runbook's stage modes with their channels,
/// a mode's step-up methods). The YAML library's own limit (64) lets the
/// deserializer recurse deep enough to overflow a 2 MiB thread stack in a
/// debug build, found by fuzzing (tests/it/fuzz.rs); a file nested deeper
/// than this is refused at the line and column where it goes too deep.
pub const MAX_YAML_DEPTH: usize = 16;

/// The YAML options every safemode file is read with (mode, runbook and
/// tokens files): the library's defaults with [`MAX_YAML_DEPTH`].
pub fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_YAML_DEPTH;
    serde_saphyr::options! { budget: Some(budget) }
}

type Invalid = (Location, String);

fn check<T>(spanned: &Spanned<T>, result: Result<(), NameError>) -> Result<(), Invalid> {
    result.map_err(|e| (spanned.referenced, e.0))
}

fn text(s: Option<String>) -> Option<Arc<str>> {
    s.map(|s| Arc::from(s.trim_end()))
}

// === File shape ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeSpec {
    title: Spanned<String>,
    summary: Spanned<String>,
    #[serde(default)]
    customer_notice: Option<String>,
    #[serde(default)]
    agent_script: Option<String>,
    rules: Spanned<Vec<RuleSpec>>,
    #[serde(default)]
    lift_requires_approval: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    channels: Spanned<Vec<Spanned<String>>>,
    actions: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    except: Vec<Spanned<String>>,
    #[serde(default)]
    when: Option<Spanned<ConditionSpec>>,
    effect: Spanned<EffectSpec>,
    #[serde(default)]
    customer_message: Option<String>,
    #[serde(default)]
    agent_script: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionSpec {
    #[serde(default)]
    handoff_from_bot: Option<bool>,
    #[serde(default)]
    amount_over: Option<Spanned<f64>>,
    #[serde(default)]
    bot_flags_any: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleSpec {
    max: Spanned<u32>,
    window: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepUpSpec {
    min_confidence: Spanned<f64>,
    methods: Spanned<Vec<Spanned<String>>>,
    max_attempts: Spanned<u32>,
    escalate_to: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewSpec {
    queue: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    to: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DenySpec {
    #[serde(default)]
    alternative: Option<String>,
}

/// An effect is written as its name when it takes no parameters
/// (`effect: deny`) or as a one-key map (`effect: {review: {queue: fraud}}`).
/// Serde's derived enums take only one of the two forms, hence this visitor.
enum EffectSpec {
    Allow,
    Throttle(ThrottleSpec),
    StepUp(StepUpSpec),
    Review(ReviewSpec),
    ReadOnly,
    Route(RouteSpec),
    Deny(DenySpec),
}

fn unknown_effect(name: &str) -> String {
    format!(
        "unknown effect '{name}'; effects are allow, throttle, step_up, review, read_only, route, deny"
    )
}

impl<'de> Deserialize<'de> for EffectSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EffectVisitor;
        impl<'de> Visitor<'de> for EffectVisitor {
            type Value = EffectSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an effect: allow, deny, read_only, or a map such as {review: {queue: fraud-review}}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<EffectSpec, E> {
                match v {
                    "allow" => Ok(EffectSpec::Allow),
                    "deny" => Ok(EffectSpec::Deny(DenySpec::default())),
                    "read_only" => Ok(EffectSpec::ReadOnly),
                    "throttle" | "step_up" | "review" | "route" => Err(E::custom(format!(
                        "effect '{v}' needs parameters; write it as a map, e.g. {{{v}: {{...}}}}"
                    ))),
                    other => Err(E::custom(unknown_effect(other))),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EffectSpec, A::Error> {
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::custom("empty effect; name one, e.g. deny"))?;
                let spec = match key.as_str() {
                    "allow" => {
                        no_parameters(
                            &mut map,
                            "allow takes no parameters; to limit an action, use throttle",
                        )?;
                        EffectSpec::Allow
                    }
                    "throttle" => EffectSpec::Throttle(map.next_value()?),
                    "step_up" => EffectSpec::StepUp(map.next_value()?),
                    "review" => EffectSpec::Review(map.next_value()?),
                    "read_only" => {
                        no_parameters(
                            &mut map,
                            "read_only takes no parameters in a mode file; the as-of time is set when the mode is applied (safemode mode apply --as-of)",
                        )?;
                        EffectSpec::ReadOnly
                    }
                    "route" => EffectSpec::Route(map.next_value()?),
                    "deny" => {
                        EffectSpec::Deny(map.next_value::<Option<DenySpec>>()?.unwrap_or_default())
                    }
                    other => return Err(de::Error::custom(unknown_effect(other))),
                };
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(
                        "an effect has exactly one kind; split the rule in two",
                    ));
                }
                Ok(spec)
            }
        }
        d.deserialize_any(EffectVisitor)
    }
}

/// Reads an effect's value, which must be empty (`{}`) or absent (`~`).
fn no_parameters<'de, A: MapAccess<'de>>(map: &mut A, message: &str) -> Result<(), A::Error> {
    let params: Option<std::collections::BTreeMap<String, IgnoredAny>> = map.next_value()?;
    if params.is_some_and(|p| !p.is_empty()) {
        return Err(de::Error::custom(message));
    }
    Ok(())
}

// === Validation ===

impl ModeSpec {
    fn into_mode(self, name: ModeName) -> Result<Mode, Invalid> {
        if self.title.value.trim().is_empty() {
            return Err((
                self.title.referenced,
                "title is empty; give the mode a title".into(),
            ));
        }
        if self.summary.value.trim().is_empty() {
            return Err((
                self.summary.referenced,
                "summary is empty; say what the mode does".into(),
            ));
        }
        if self.rules.value.is_empty() {
            return Err((
                self.rules.referenced,
                "a mode needs at least one rule".into(),
            ));
        }
        let rules = self
            .rules
            .value
            .into_iter()
            .map(RuleSpec::into_rule)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Mode {
            name,
            title: self.title.value.trim().to_string(),
            summary: self.summary.value.trim().to_string(),
            customer_notice: text(self.customer_notice),
            agent_script: text(self.agent_script),
            rules,
            lift_requires_approval: self.lift_requires_approval,
        })
    }
}

fn channel_set(list: &Spanned<Vec<Spanned<String>>>) -> Result<ChannelSet, Invalid> {
    if list.value.is_empty() {
        return Err((
            list.referenced,
            "channel list is empty; name channels or use '*' for all".into(),
        ));
    }
    for name in &list.value {
        let parsed = ChannelSet::parse_selector(std::slice::from_ref(&name.value));
        check(name, parsed.map(drop))?;
    }
    let names: Vec<&str> = list.value.iter().map(|n| n.value.as_str()).collect();
    ChannelSet::parse_selector(&names).map_err(|e| (list.referenced, e.0))
}

fn selectors(list: &[Spanned<String>]) -> Result<Vec<ActionSelector>, Invalid> {
    list.iter()
        .map(|s| ActionSelector::parse(&s.value).map_err(|e| (s.referenced, e.0)))
        .collect()
}

impl RuleSpec {
    fn into_rule(self) -> Result<Rule, Invalid> {
        let channels = channel_set(&self.channels)?;
        if self.actions.value.is_empty() {
            return Err((
                self.actions.referenced,
                "actions is empty; name actions or use '*'".into(),
            ));
        }
        let actions = selectors(&self.actions.value)?;
        let except = selectors(&self.except)?;
        for (spec, selector) in self.except.iter().zip(&except) {
            if !actions.iter().any(|a| a.overlaps(selector)) {
                return Err((
                    spec.referenced,
                    format!("except '{selector}' excludes nothing this rule's actions cover"),
                ));
            }
        }
        let excluded = |a: &ActionSelector| {
            except.iter().any(|e| match a {
                ActionSelector::Exact(name) => e.matches(name),
                ActionSelector::Prefix(p) => e.covers_all_under(p),
            })
        };
        if actions.iter().all(excluded) {
            return Err((
                self.actions.referenced,
                "except excludes every action this rule names, so the rule would do nothing".into(),
            ));
        }
        let when = match self.when {
            None => None,
            Some(spec) => Some(spec.value.into_condition(spec.referenced)?),
        };
        let effect_at = self.effect.referenced;
        let effect = self.effect.value.into_effect()?;
        if let Effect::Route(route) = &effect
            && !route.to.intersection(channels).is_empty()
        {
            return Err((
                effect_at,
                format!(
                    "route sends customers from {channels} to {}; a route's targets must not be among the rule's own channels",
                    route.to
                ),
            ));
        }
        Ok(Rule {
            channels,
            actions,
            except,
            when,
            effect,
            customer_message: text(self.customer_message),
            agent_script: text(self.agent_script),
        })
    }
}

impl ConditionSpec {
    fn into_condition(self, at: Location) -> Result<Condition, Invalid> {
        if let Some(amount) = &self.amount_over
            && (!amount.value.is_finite() || amount.value < 0.0)
        {
            return Err((
                amount.referenced,
                "amount_over must be a number >= 0".into(),
            ));
        }
        let mut flags = Vec::with_capacity(self.bot_flags_any.len());
        for flag in &self.bot_flags_any {
            check(flag, validate_label("bot flag", &flag.value))?;
            flags.push(Arc::<str>::from(flag.value.as_str()));
        }
        flags.sort();
        flags.dedup();
        let condition = Condition {
            handoff_from_bot: self.handoff_from_bot,
            amount_over: self.amount_over.map(|a| a.value),
            bot_flags_any: flags,
        };
        if condition.is_empty() {
            return Err((at, "empty condition; set handoff_from_bot, amount_over or bot_flags_any, or drop 'when'".into()));
        }
        Ok(condition)
    }
}

impl EffectSpec {
    fn into_effect(self) -> Result<Effect, Invalid> {
        Ok(match self {
            EffectSpec::Allow => Effect::Allow,
            EffectSpec::Throttle(t) => {
                if t.max.value == 0 {
                    return Err((
                        t.max.referenced,
                        "throttle max must be at least 1; use deny to refuse outright".into(),
                    ));
                }
                let window = parse_window(&t.window)?;
                Effect::Throttle(Throttle {
                    max: t.max.value,
                    window_seconds: window,
                })
            }
            EffectSpec::StepUp(s) => {
                let c = s.min_confidence.value;
                if !(0.0..=1.0).contains(&c) {
                    return Err((
                        s.min_confidence.referenced,
                        format!("min_confidence {c} is outside 0..1"),
                    ));
                }
                if s.methods.value.is_empty() {
                    return Err((
                        s.methods.referenced,
                        "a step-up needs at least one verification method".into(),
                    ));
                }
                for m in &s.methods.value {
                    check(
                        m,
                        MethodSet::parse(std::slice::from_ref(&m.value)).map(drop),
                    )?;
                }
                let names: Vec<&str> = s.methods.value.iter().map(|m| m.value.as_str()).collect();
                let methods = MethodSet::parse(&names).map_err(|e| (s.methods.referenced, e.0))?;
                if s.max_attempts.value == 0 {
                    return Err((
                        s.max_attempts.referenced,
                        "max_attempts must be at least 1".into(),
                    ));
                }
                check(
                    &s.escalate_to,
                    validate_label("review queue", &s.escalate_to.value),
                )?;
                Effect::StepUp(StepUp {
                    min_confidence: c,
                    methods,
                    max_attempts: s.max_attempts.value,
                    escalate_queue: Text::intern(&s.escalate_to.value),
                })
            }
            EffectSpec::Review(r) => {
                check(&r.queue, validate_label("review queue", &r.queue.value))?;
                Effect::Review(Review {
                    queue: Text::intern(&r.queue.value),
                })
            }
            EffectSpec::ReadOnly => Effect::ReadOnly(ReadOnly { as_of: None }),
            EffectSpec::Route(r) => {
                let to = channel_set(&r.to)?;
                if to == ChannelSet::ALL {
                    return Err((
                        r.to.referenced,
                        "a route must name the verified channels to send customers to, not '*'"
                            .into(),
                    ));
                }
                Effect::Route(Route { to })
            }
            EffectSpec::Deny(d) => Effect::Deny(Deny {
                alternative: d.alternative.map(|a| Text::intern(a.trim_end())),
            }),
        })
    }
}

/// Parses a throttle window such as `30m`, `1h` or `1d` into seconds.
fn parse_window(window: &Spanned<String>) -> Result<u32, Invalid> {
    let bad = || {
        (
            window.referenced,
            format!(
                "bad window '{}': write a duration such as 30m, 1h or 1d",
                window.value
            ),
        )
    };
    let span: jiff::Span = window.value.parse().map_err(|_| bad())?;
    let relative = jiff::SpanRelativeTo::days_are_24_hours();
    let secs = span
        .total((jiff::Unit::Second, relative))
        .map_err(|_| bad())?;
    if secs < 1.0 || secs.fract() != 0.0 || secs > f64::from(u32::MAX) {
        return Err(bad());
    }
    Ok(secs as u32)
}
