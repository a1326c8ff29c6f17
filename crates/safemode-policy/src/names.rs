//! The vocabulary of policy: channels, actions and action selectors,
//! verification methods, namespaces, and the small name types built on them.
//!
//! Channels and verification methods are closed sets, held as bitsets, so that
//! merging and deciding never allocate. Actions are a closed catalogue plus the
//! open `bot.intent.<name>` family.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A name that failed validation; the message says what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

// === Channels ===

/// Every channel safemode knows, in bit order.
pub const CHANNELS: [&str; 6] = ["chatbot", "ivr", "agent-desk", "web", "mobile", "email"];

/// A customer-facing channel: where a contact happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(u8);

impl Channel {
    /// Parses a channel name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        CHANNELS
            .iter()
            .position(|c| *c == name)
            .map(|i| Channel(i as u8))
            .ok_or_else(|| {
                NameError(format!(
                    "unknown channel '{name}'; {}known channels: {}",
                    did_you_mean(name, CHANNELS),
                    CHANNELS.join(", ")
                ))
            })
    }

    /// The channel's name.
    pub fn as_str(self) -> &'static str {
        CHANNELS[self.0 as usize]
    }

    /// Every channel, in a fixed order.
    pub fn all() -> impl Iterator<Item = Channel> {
        (0..CHANNELS.len() as u8).map(Channel)
    }

    /// Position of the channel in [`CHANNELS`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of channels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelSet(u8);

impl ChannelSet {
    /// No channel.
    pub const NONE: ChannelSet = ChannelSet(0);
    /// Every channel.
    pub const ALL: ChannelSet = ChannelSet((1 << CHANNELS.len()) - 1);

    /// Parses a selector list: channel names, or the single entry `*` for
    /// every channel. An empty list is refused: say `*` to mean everything.
    pub fn parse_selector<S: AsRef<str>>(names: &[S]) -> Result<Self, NameError> {
        if names.is_empty() {
            return Err(NameError(
                "channel list is empty; name channels or use '*' for all".into(),
            ));
        }
        if names.iter().any(|n| n.as_ref() == "*") {
            if names.len() > 1 {
                return Err(NameError(
                    "'*' already means every channel; do not list channels beside it".into(),
                ));
            }
            return Ok(ChannelSet::ALL);
        }
        let mut set = ChannelSet::NONE;
        for name in names {
            set = set.with(Channel::parse(name.as_ref())?);
        }
        Ok(set)
    }

    /// This set plus `channel`.
    #[must_use]
    pub fn with(self, channel: Channel) -> Self {
        ChannelSet(self.0 | 1 << channel.0)
    }

    /// Whether `channel` is in the set.
    pub fn contains(self, channel: Channel) -> bool {
        self.0 & (1 << channel.0) != 0
    }

    /// Channels in both sets.
    #[must_use]
    pub fn intersection(self, other: Self) -> Self {
        ChannelSet(self.0 & other.0)
    }

    /// Whether every channel of `self` is in `other`.
    pub fn is_subset(self, other: Self) -> bool {
        self.0 & !other.0 == 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The channels in the set, in [`CHANNELS`] order.
    pub fn iter(self) -> impl Iterator<Item = Channel> {
        Channel::all().filter(move |c| self.contains(*c))
    }

    /// Channel names, with `*` standing for every channel.
    pub fn to_names(self) -> Vec<String> {
        if self == ChannelSet::ALL {
            vec!["*".to_string()]
        } else {
            self.iter().map(|c| c.as_str().to_string()).collect()
        }
    }
}

impl fmt::Display for ChannelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ChannelSet::ALL {
            return f.write_str("all channels");
        }
        let names: Vec<&str> = self.iter().map(Channel::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for ChannelSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_names().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChannelSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        ChannelSet::parse_selector(&names).map_err(serde::de::Error::custom)
    }
}

// === Actions ===

/// Every action safemode knows by name. `bot.intent.<name>` actions are the
/// open family [`BOT_INTENT_FAMILY`].
pub const ACTIONS: [&str; 11] = [
    "account.password_reset",
    "account.email_change",
    "account.phone_change",
    "account.mfa_reset",
    "account.recovery",
    "payment.refund",
    "payment.payout",
    "order.view",
    "balance.view",
    "contact.intake",
    "handoff.ai_to_human",
];

/// Actions `bot.intent.<name>`: one per chatbot or voice-bot intent.
pub const BOT_INTENT_FAMILY: &str = "bot.intent";

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks that `name` is an action: one from [`ACTIONS`] or `bot.intent.<name>`.
pub fn validate_action(name: &str) -> Result<(), NameError> {
    if ACTIONS.contains(&name) {
        return Ok(());
    }
    if let Some(intent) = name
        .strip_prefix(BOT_INTENT_FAMILY)
        .and_then(|r| r.strip_prefix('.'))
    {
        if is_segment(intent) {
            return Ok(());
        }
        return Err(NameError(format!(
            "bad bot intent action '{name}': the intent name uses a-z, 0-9 and _"
        )));
    }
    Err(NameError(format!(
        "unknown action '{name}'; {}known actions: {}, and bot.intent.<name>",
        did_you_mean(name, ACTIONS),
        ACTIONS.join(", ")
    )))
}

/// An action name checked against the catalogue. A channel service parses
/// the actions it asks about once, at start, so a misspelt action is an error
/// there rather than a silent `allow` on every request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    name: Box<str>,
    /// Its position in [`ACTIONS`], found once when parsed (`None`: a bot
    /// intent), so that a decision counted per action does not look again.
    known: Option<u8>,
}

impl Action {
    /// Parses an action: one from [`ACTIONS`] or `bot.intent.<name>`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        validate_action(name)?;
        Ok(Action {
            name: name.into(),
            known: ACTIONS
                .iter()
                .position(|known| *known == name)
                .and_then(|i| u8::try_from(i).ok()),
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Its position in [`ACTIONS`]; `None` for a `bot.intent.*` action.
    pub fn known_index(&self) -> Option<usize> {
        self.known.map(usize::from)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Which actions a rule covers: one action, or every action under a dotted
/// prefix (`account.*`), or every action (`*`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionSelector {
    /// Exactly this action.
    Exact(String),
    /// Every action starting with this prefix and a dot; the empty prefix is
    /// `*`, every action.
    Prefix(String),
}

impl ActionSelector {
    /// Parses `account.password_reset`, `account.*` or `*`.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        if text == "*" {
            return Ok(ActionSelector::Prefix(String::new()));
        }
        if let Some(prefix) = text.strip_suffix(".*") {
            let covers_known = ACTIONS
                .iter()
                .any(|a| a.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')))
                || BOT_INTENT_FAMILY == prefix
                || BOT_INTENT_FAMILY
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('.'));
            if !covers_known {
                return Err(NameError(format!(
                    "action selector '{text}' matches no known action; use '*', a prefix such as 'account.*' or 'bot.intent.*', or an action name"
                )));
            }
            return Ok(ActionSelector::Prefix(prefix.to_string()));
        }
        if text.contains('*') {
            return Err(NameError(format!(
                "bad action selector '{text}': '*' may only stand alone or end a dotted prefix, as in 'account.*'"
            )));
        }
        validate_action(text)?;
        Ok(ActionSelector::Exact(text.to_string()))
    }

    /// Whether the selector covers `action`.
    pub fn matches(&self, action: &str) -> bool {
        match self {
            ActionSelector::Exact(a) => a == action,
            ActionSelector::Prefix(p) => covers_prefix(p, action),
        }
    }

    /// Whether the selector covers every action under prefix `p` (`p.*`).
    pub fn covers_all_under(&self, p: &str) -> bool {
        match self {
            ActionSelector::Exact(_) => false,
            ActionSelector::Prefix(q) => q == p || covers_prefix(q, p),
        }
    }

    /// Whether some action is covered by both selectors.
    pub fn overlaps(&self, other: &ActionSelector) -> bool {
        use ActionSelector::*;
        match (self, other) {
            (Exact(a), Exact(b)) => a == b,
            (Exact(a), p @ Prefix(_)) | (p @ Prefix(_), Exact(a)) => p.matches(a),
            (Prefix(a), Prefix(b)) => a == b || covers_prefix(a, b) || covers_prefix(b, a),
        }
    }
}

/// Whether `name` lies under `prefix.` (every name lies under the empty prefix).
fn covers_prefix(prefix: &str, name: &str) -> bool {
    prefix.is_empty()
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

impl fmt::Display for ActionSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActionSelector::Exact(a) => f.write_str(a),
            ActionSelector::Prefix(p) if p.is_empty() => f.write_str("*"),
            ActionSelector::Prefix(p) => write!(f, "{p}.*"),
        }
    }
}

impl Serialize for ActionSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ActionSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ActionSelector::parse(&text).map_err(serde::de::Error::custom)
    }
}

// === Verification methods ===

/// Every verification method a step-up can name, in bit order.
pub const METHODS: [&str; 10] = [
    "password",
    "sms_otp",
    "email_otp",
    "voice_otp",
    "totp",
    "push",
    "webauthn",
    "id_document",
    "kba",
    "callback",
];

/// A set of verification methods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodSet(u16);

impl MethodSet {
    /// No method.
    pub const NONE: MethodSet = MethodSet(0);

    /// Parses method names.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, NameError> {
        let mut bits = 0u16;
        for name in names {
            let name = name.as_ref();
            let i = METHODS.iter().position(|m| *m == name).ok_or_else(|| {
                NameError(format!(
                    "unknown verification method '{name}'; known methods: {}",
                    METHODS.join(", ")
                ))
            })?;
            bits |= 1 << i;
        }
        Ok(MethodSet(bits))
    }

    /// Methods in both sets.
    #[must_use]
    pub fn intersection(self, other: Self) -> Self {
        MethodSet(self.0 & other.0)
    }

    /// Whether the sets share a method.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether every method of `self` is in `other`.
    pub fn is_subset(self, other: Self) -> bool {
        self.0 & !other.0 == 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set as bits, bit `i` for `METHODS[i]`.
    pub fn bits(self) -> u16 {
        self.0
    }

    /// Method names in [`METHODS`] order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        METHODS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, m)| *m)
    }
}

impl Serialize for MethodSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for MethodSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        MethodSet::parse(&names).map_err(serde::de::Error::custom)
    }
}

// === Names ===

/// Checks a name made of lowercase letters, digits and inner dashes, at most
/// `max` long; `what` names the thing in the error.
pub fn validate_slug(what: &str, name: &str, max: usize) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError(format!(
            "bad {what} '{name}': use 1 to {max} lowercase letters, digits and inner dashes"
        )))
    }
}

/// An isolated set of activations. `live` is production; drills run in
/// `drill-<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Namespace(String);

impl Namespace {
    /// The production namespace.
    pub const LIVE: &'static str = "live";

    /// Parses a namespace: `live`, or `drill-<id>`; empty means `live`.
    /// Nothing else is accepted, so a typo (`liev`) cannot send a protective
    /// mode to a namespace nobody subscribes to.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() || name == Self::LIVE {
            return Ok(Namespace(Self::LIVE.to_string()));
        }
        match name.strip_prefix("drill-") {
            Some(id) if validate_slug("drill id", id, 56).is_ok() => {
                Ok(Namespace(name.to_string()))
            }
            _ => Err(NameError(format!(
                "unknown namespace '{name}': use live (production) or drill-<id> for rehearsals, e.g. drill-2026-11-21"
            ))),
        }
    }

    /// The production namespace, `live`.
    pub fn live() -> Self {
        Namespace(Self::LIVE.to_string())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a drill namespace (`drill-<id>`).
    pub fn is_drill(&self) -> bool {
        self.0.starts_with("drill-")
    }
}

impl TryFrom<String> for Namespace {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Namespace::parse(&s)
    }
}

impl From<Namespace> for String {
    fn from(n: Namespace) -> String {
        n.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a review queue name or bot flag: lowercase letters, digits, `_` and
/// `-`, at most 64 long.
pub fn validate_label(what: &str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError(format!(
            "bad {what} '{name}': use 1 to 64 lowercase letters, digits, '_' and '-'"
        )))
    }
}

// === Suggestions ===

/// Inputs longer than this get no suggestion: a name is never this long, and
/// the edit distance costs the product of the two lengths.
pub const SUGGEST_MAX_LEN: usize = 64;

/// The candidate nearest to `input`, if one is near enough to be what the
/// person meant and no other is as near. Near enough is at most one edit per
/// three characters of input (at least one edit); letters differing only in
/// case cost nothing, and swapping two neighbours is one edit.
pub fn closest<'a, I>(input: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let input: Vec<char> = input.chars().collect();
    if input.is_empty() || input.len() > SUGGEST_MAX_LEN {
        return None;
    }
    let limit = (input.len() / 3).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    let mut tied = false;
    for candidate in candidates {
        let Some(d) = distance(&input, candidate, limit) else {
            continue;
        };
        match best {
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tied = true,
            _ => {
                best = Some((d, candidate));
                tied = false;
            }
        }
    }
    if tied { None } else { best.map(|(_, c)| c) }
}

/// `did you mean 'y'? ` for the [`closest`] candidate, or the empty string: a
/// message puts it right after the part that names the unknown input.
pub fn did_you_mean<'a, I>(input: &str, candidates: I) -> String
where
    I: IntoIterator<Item = &'a str>,
{
    closest(input, candidates)
        .map(|c| format!("did you mean '{c}'? "))
        .unwrap_or_default()
}

/// Edit distance (insert, delete, substitute, swap neighbours) between `a`
/// and `b`, or `None` when it is over `limit`; the work stays bounded by
/// [`SUGGEST_MAX_LEN`] because longer candidates are skipped.
fn distance(a: &[char], b: &str, limit: usize) -> Option<usize> {
    let b: Vec<char> = b.chars().collect();
    if b.len() > SUGGEST_MAX_LEN || a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let same = |x: char, y: char| x.to_lowercase().eq(y.to_lowercase());
    // Three rows of the table: two back (for swaps), one back, and this one.
    let mut older: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut row: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        row[0] = i;
        let mut row_min = row[0];
        for j in 1..=b.len() {
            let cost = usize::from(!same(a[i - 1], b[j - 1]));
            let mut d = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && same(a[i - 1], b[j - 2]) && same(a[i - 2], b[j - 1]) {
                d = d.min(older[j - 2] + 1);
            }
            row[j] = d;
            row_min = row_min.min(d);
        }
        if row_min > limit {
            return None;
        }
        std::mem::swap(&mut older, &mut prev);
        std::mem::swap(&mut prev, &mut row);
    }
    Some(prev[b.len()]).filter(|d| *d <= limit)
}

#[cfg(test)]
mod suggestion_tests {
    use super::*;

    #[test]
    fn suggests_the_one_near_name() {
        let modes = ["freeze-credential-changes", "pause-payouts"];
        assert_eq!(
            closest("freez-credential-changes", modes),
            Some("freeze-credential-changes")
        );
        assert_eq!(closest("chatbto", CHANNELS), Some("chatbot"));
        assert_eq!(
            closest("SEV2", ["sev4", "sev3", "sev2", "sev1"]),
            Some("sev2")
        );
        assert_eq!(closest("mobil", CHANNELS), Some("mobile"));
    }

    #[test]
    fn says_nothing_when_far_tied_or_too_long() {
        assert_eq!(closest("fax", CHANNELS), None);
        // sev0 is one edit from every severity: no one of them is meant.
        assert_eq!(closest("sev0", ["sev4", "sev3", "sev2", "sev1"]), None);
        assert_eq!(closest("", CHANNELS), None);
        let long = "w".repeat(SUGGEST_MAX_LEN + 1);
        assert_eq!(closest(&long, [long.as_str()]), None);
        assert_eq!(did_you_mean("fax", CHANNELS), "");
        assert_eq!(did_you_mean("emial", CHANNELS), "did you mean 'email'? ");
    }
}
