//! Activations: one mode switched on in a namespace, with its scope, who, why
//! and when. An activation keeps a copy of the mode as it was when applied, so
//! editing a mode file never silently changes what is live.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::effect::{Deny, Effect, ReadOnly};
use super::mode::{Mode, ModeName, Rule};
use super::names::{ActionSelector, Channel, ChannelSet, NameError};

/// The mode name of [`Activation::unreadable`] stand-ins.
pub const UNREADABLE_MODE: &str = "unreadable-activation";

/// A store revision, as carried by activations and snapshots.
pub type Revision = i64;

/// An activation's id: `act_` and 12 characters of lowercase base32.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ActivationId(String);

const ID_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const ID_PREFIX: &str = "act_";

/// `prefix` and 12 characters of lowercase base32 from the low 60 bits of
/// `random`: the shape of every safemode id (`act_`, `inc_`, `req_`).
pub fn random_id(prefix: &str, random: u64) -> String {
    let mut id = String::with_capacity(prefix.len() + 12);
    id.push_str(prefix);
    for i in (0..12).rev() {
        id.push(ID_ALPHABET[((random >> (i * 5)) & 31) as usize] as char);
    }
    id
}

/// Whether `text` is `prefix` followed by an id made by [`random_id`].
pub fn is_id(prefix: &str, text: &str) -> bool {
    text.strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 12 && rest.bytes().all(|b| ID_ALPHABET.contains(&b)))
}

impl ActivationId {
    /// The id whose 60 random bits are the low bits of `random`.
    pub fn from_random(random: u64) -> Self {
        ActivationId(random_id(ID_PREFIX, random))
    }

    /// Parses an id.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let ok = is_id(ID_PREFIX, text);
        if ok {
            Ok(ActivationId(text.to_string()))
        } else {
            Err(NameError(format!(
                "bad activation id '{text}': ids look like act_5mj2k0q8c1xv (see `safemode status`)"
            )))
        }
    }

    /// Whether `text` has the shape of an activation id (rather than a mode
    /// name).
    pub fn looks_like(text: &str) -> bool {
        text.starts_with(ID_PREFIX)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ActivationId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        ActivationId::parse(&s)
    }
}

impl From<ActivationId> for String {
    fn from(id: ActivationId) -> String {
        id.0
    }
}

impl fmt::Display for ActivationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a change was made: mandatory, not blank, at most 1,000 characters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reason(String);

impl Reason {
    /// Longest reason accepted, in characters.
    pub const MAX_CHARS: usize = 1000;

    /// Parses a reason, trimming surrounding white space.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(NameError(
                "a reason is required: say why, e.g. --reason \"ATO wave on password resets, INC-4211\"".into(),
            ));
        }
        if text.chars().count() > Self::MAX_CHARS {
            return Err(NameError(format!(
                "reason is longer than {} characters; link to the incident instead",
                Self::MAX_CHARS
            )));
        }
        if text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(NameError("reason contains control characters".into()));
        }
        Ok(Reason(text.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Reason {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Reason::parse(&s)
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.0
    }
}

/// One mode switched on in a namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    /// Unique id.
    pub id: ActivationId,
    /// The mode as it was when applied (read-only `as_of` filled in).
    pub mode: Mode,
    /// Channels covered.
    pub channels: ChannelSet,
    /// Why it was applied.
    pub reason: Reason,
    /// Who applied it.
    pub principal: String,
    /// When it was applied.
    pub applied_at: Timestamp,
    /// The incident it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    /// Revision of the change that last wrote it (applied it, or gave it a
    /// new stage's texts); known once stored, and taken from the store
    /// rather than from the stored value.
    #[serde(skip)]
    pub revision: Revision,
}

/// Who made a change, why, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Who made it.
    pub principal: String,
    /// Why.
    pub reason: Reason,
    /// When.
    pub at: Timestamp,
    /// The incident it belongs to, if any.
    pub incident_id: Option<String>,
}

impl Activation {
    /// Activates a copy of `mode` for `channels` as part of `change`.
    /// Read-only effects without an as-of time serve data as of `as_of`.
    pub fn new(
        id: ActivationId,
        mode: &Mode,
        channels: ChannelSet,
        as_of: Timestamp,
        change: &Change,
    ) -> Self {
        let mut mode = mode.clone();
        for rule in &mut mode.rules {
            if let Effect::ReadOnly(ReadOnly { as_of: at @ None }) = &mut rule.effect {
                *at = Some(as_of);
            }
        }
        Activation {
            id,
            mode,
            channels,
            reason: change.reason.clone(),
            principal: change.principal.clone(),
            applied_at: change.at,
            incident_id: change.incident_id.clone(),
            revision: 0,
        }
    }

    /// Stands in for an activation whose stored record cannot be read (it
    /// is damaged, or a newer version wrote something this one does not
    /// know): it denies every action on every channel. A protective mode must
    /// never silently turn into `allow`; this fails closed, loudly, until the
    /// record is fixed or lifted.
    pub fn unreadable(id: ActivationId, revision: Revision, error: &str, at: Timestamp) -> Self {
        let name = ModeName::parse(UNREADABLE_MODE).expect("a valid mode name");
        let error: String = error
            .chars()
            .filter(|c| !c.is_control())
            .take(500)
            .collect();
        Activation {
            id,
            mode: Mode {
                name,
                title: "Unreadable activation (failing closed)".into(),
                summary: format!("This replica cannot read the stored activation: {error}"),
                customer_notice: Some(Arc::from(
                    "This service is temporarily limited. Please try again later.",
                )),
                agent_script: Some(Arc::from(
                    "safemode cannot read an active protective mode (see `safemode status`). Do not carry out sensitive actions until it is fixed.",
                )),
                rules: vec![Rule {
                    channels: ChannelSet::ALL,
                    actions: vec![ActionSelector::Prefix(String::new())],
                    except: Vec::new(),
                    when: None,
                    effect: Effect::Deny(Deny { alternative: None }),
                    customer_message: None,
                    agent_script: None,
                }],
                // The record may have been a mode whose lifting needs a second
                // person; not knowing, ask for one.
                lift_requires_approval: true,
            },
            channels: ChannelSet::ALL,
            reason: Reason(format!("unreadable record: {error}")),
            principal: "safemode".into(),
            applied_at: at,
            incident_id: None,
            revision,
        }
    }

    /// Whether the activation covers `channel`.
    pub fn covers(&self, channel: Channel) -> bool {
        self.channels.contains(channel)
    }
}
