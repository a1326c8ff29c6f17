//! Modes: named, reusable bundles of rules `(channels, actions, condition) ->
//! effect` with an optional customer notice and agent script; and the
//! catalogue of modes a controller serves.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::effect::Effect;
use super::names::{ActionSelector, ChannelSet, MethodSet, NameError, validate_slug};

/// A mode's name: lowercase letters, digits and inner dashes, such as
/// `freeze-credential-changes`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModeName(String);

impl ModeName {
    /// Parses a mode name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        validate_slug("mode name", name, 63)?;
        Ok(ModeName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ModeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModeName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        ModeName::parse(&s)
    }
}

impl From<ModeName> for String {
    fn from(n: ModeName) -> String {
        n.0
    }
}

impl fmt::Display for ModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a channel knows about the customer and the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    /// Identity confidence, 0..=1.
    pub confidence: f64,
    /// Verification methods the customer passed in this session.
    pub methods: MethodSet,
    /// Failed verification attempts so far.
    pub failed_attempts: u32,
    /// Amount of money involved, if any.
    pub amount: Option<f64>,
    /// Whether a bot handed the session over to a human.
    pub handoff_from_bot: bool,
    /// What the bot flagged the session with.
    pub bot_flags: Vec<String>,
}

/// When a rule applies, beyond its channels and actions. Every part that is
/// set must hold.
///
/// Stored conditions accept fields this version does not know (mode files do
/// not): a part written by a newer version is ignored, which only makes the
/// rule apply more widely.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Holds when the session's hand-off-from-bot flag equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_from_bot: Option<bool>,
    /// Holds when the amount is strictly greater than this, or unknown: a
    /// channel that does not say how much money is involved gets the
    /// stricter rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_over: Option<f64>,
    /// Holds when the bot flagged the session with any of these (sorted,
    /// without duplicates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bot_flags_any: Vec<Arc<str>>,
}

impl Condition {
    /// Whether the condition holds for `ctx`.
    pub fn holds(&self, ctx: &Context) -> bool {
        self.handoff_from_bot
            .is_none_or(|want| want == ctx.handoff_from_bot)
            && self
                .amount_over
                .is_none_or(|limit| ctx.amount.is_none_or(|amount| amount > limit))
            && (self.bot_flags_any.is_empty()
                || self
                    .bot_flags_any
                    .iter()
                    .any(|flag| ctx.bot_flags.iter().any(|f| f.as_str() == &**flag)))
    }

    /// A total order, so that compiled conditional entries have one canonical
    /// order on every replica and client.
    pub fn canonical_cmp(&self, other: &Condition) -> Ordering {
        self.handoff_from_bot
            .cmp(&other.handoff_from_bot)
            .then_with(|| match (self.amount_over, other.amount_over) {
                (Some(a), Some(b)) => a.total_cmp(&b),
                (a, b) => a.is_some().cmp(&b.is_some()),
            })
            .then_with(|| self.bot_flags_any.cmp(&other.bot_flags_any))
    }

    /// Whether no part is set (such a condition always holds).
    pub fn is_empty(&self) -> bool {
        self.handoff_from_bot.is_none()
            && self.amount_over.is_none()
            && self.bot_flags_any.is_empty()
    }
}

/// One rule of a mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Channels the rule covers.
    pub channels: ChannelSet,
    /// Actions the rule covers...
    pub actions: Vec<ActionSelector>,
    /// ...except these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<ActionSelector>,
    /// When the rule applies; `None` is always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// What the channel must do.
    pub effect: Effect,
    /// Message for the customer; defaults to the mode's notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_message: Option<Arc<str>>,
    /// Script for the agent; defaults to the mode's script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_script: Option<Arc<str>>,
}

impl Rule {
    /// Whether the rule covers `action` (ignoring channels and condition).
    pub fn covers_action(&self, action: &str) -> bool {
        self.actions.iter().any(|s| s.matches(action))
            && !self.except.iter().any(|s| s.matches(action))
    }

    /// Whether the rule covers every action under `prefix.*` that no more
    /// specific selector singles out (ignoring channels and condition).
    pub fn covers_all_under(&self, prefix: &str) -> bool {
        self.actions.iter().any(|s| s.covers_all_under(prefix))
            && !self.except.iter().any(|s| s.covers_all_under(prefix))
    }

    /// How specifically the rule names `action`: its own name beats any
    /// prefix, and a longer prefix beats a shorter one. Among rules with the
    /// same effect, the most specific one speaks (messages, queue).
    pub fn specificity_for_action(&self, action: &str) -> usize {
        most_specific(self.actions.iter().filter(|s| s.matches(action)))
    }

    /// [`Rule::specificity_for_action`] for the actions under `prefix.*`.
    pub fn specificity_under(&self, prefix: &str) -> usize {
        most_specific(self.actions.iter().filter(|s| s.covers_all_under(prefix)))
    }
}

/// The specificity of the most specific of `selectors` (0 for none).
fn most_specific<'a>(selectors: impl Iterator<Item = &'a ActionSelector>) -> usize {
    selectors
        .map(|s| match s {
            ActionSelector::Exact(_) => usize::MAX,
            ActionSelector::Prefix(p) => p.len(),
        })
        .max()
        .unwrap_or(0)
}

/// A named bundle of rules with customer and agent messaging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mode {
    /// The mode's name.
    pub name: ModeName,
    /// Human title.
    pub title: String,
    /// What the mode does and when to use it.
    pub summary: String,
    /// Notice shown to customers while the mode is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_notice: Option<Arc<str>>,
    /// Script for agents while the mode is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_script: Option<Arc<str>>,
    /// The rules, at least one.
    pub rules: Vec<Rule>,
    /// Whether lifting the mode needs a second, different approver: set on
    /// the modes whose lifting would reopen the door an attacker is pushing
    /// on (credential changes, verified channels, money, bot hand-offs).
    /// Always stored; an activation stored before the flag existed reads as
    /// needing one, so an upgrade never makes a freeze easier to lift.
    #[serde(default = "needs_approval_when_unknown")]
    pub lift_requires_approval: bool,
}

fn needs_approval_when_unknown() -> bool {
    true
}

/// Why a catalogue could not be built.
#[derive(Debug, thiserror::Error)]
#[error("mode '{0}' is defined twice; every mode needs its own name")]
pub struct DuplicateMode(pub ModeName);

/// The modes a controller can apply, by name.
#[derive(Clone, Debug, Default)]
pub struct ModeCatalog {
    modes: BTreeMap<ModeName, Arc<Mode>>,
}

impl ModeCatalog {
    /// Builds a catalogue; names must be unique.
    pub fn new(modes: impl IntoIterator<Item = Mode>) -> Result<Self, DuplicateMode> {
        let mut map = BTreeMap::new();
        for mode in modes {
            let name = mode.name.clone();
            if map.insert(name.clone(), Arc::new(mode)).is_some() {
                return Err(DuplicateMode(name));
            }
        }
        Ok(ModeCatalog { modes: map })
    }

    /// The mode called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Mode>> {
        self.modes.get(name)
    }

    /// Every mode, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Mode>> {
        self.modes.values()
    }

    /// Number of modes.
    pub fn len(&self) -> usize {
        self.modes.len()
    }

    /// Whether there are no modes.
    pub fn is_empty(&self) -> bool {
        self.modes.is_empty()
    }
}
