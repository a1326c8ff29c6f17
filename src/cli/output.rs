//! Rendering answers as text for people or as JSON for scripts. Each
//! answer has one view: a serde struct built once from the proto message
//! (or the domain value) that implements [`View`]; [`show`] serializes it
//! for JSON or renders it for text, and `cli::emit` writes the result.
//!
//! Text output cannot be made to lie by what it prints: every line goes
//! through [`single_line`] (a view renders into [`Text`], whose only ways
//! in, the `say!` macro and `Text::table`, escape), so a reason, id or
//! message with a newline, a carriage return or a bidi override shows as
//! visible escapes on its own line instead of forging a row or a
//! "verified" verdict. JSON output is exact: serde escapes it.

use std::fmt::{self, Write as _};

use serde::{Serialize, Serializer};

use super::Format;
use crate::drill::DrillReport;
use crate::drill::report::{
    ChannelSubscribers, FaultReport, PrincipalSource, RestorationReport, StageReport,
};
use crate::sim::{ChannelTimes, RevisionReport};
use safemode_client::{ActivationInfo, DecisionReport, PolicySnapshot};
use safemode_controller::auth::{NewToken, Role};
use safemode_policy::{
    ActionPolicy, ActivationId, Channel, Condition, Effect, EffectKind, Entry, Namespace, Revision,
    Throttle,
};
use safemode_wire::{self as wire, proto};

/// One line into a [`Text`], with everything in it that could break or
/// reorder the line escaped (see [`single_line`]); `say!(out)` is an empty
/// line.
macro_rules! say {
    ($out:expr) => {
        $out.blank()
    };
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))
    };
}

// === one line per line ===

/// `text` for a terminal, on one line and shown as it is stored: control
/// characters (`\n`, `\r`, `\t`, and every other one as `\u{..}`), line and
/// paragraph separators, and invisible format characters (bidi embeddings,
/// overrides, isolates and marks such as U+202E, zero-width spaces and
/// joiners, tag characters) are written as visible escapes, and a backslash
/// as `\\`, so that no escape can be faked either.
pub fn single_line(text: &str) -> SingleLine<'_> {
    SingleLine(text)
}

/// A string displayed by [`single_line`]: escapes are written as it is
/// formatted, without a copy of the text.
pub struct SingleLine<'a>(&'a str);

impl fmt::Display for SingleLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(must_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char there");
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                other => write!(f, "\\u{{{:x}}}", u32::from(other))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Whether `c` must be escaped to keep a line honest: the backslash, and
/// every character of Unicode's general categories Cc (controls), Zl and Zp
/// (line and paragraph separators) and Cf (format characters: invisible, and
/// among them everything that reorders text). Written out by hand because
/// the standard library knows only `is_control` and a crate of Unicode
/// tables for one short list is not worth its weight; the list is Cf as of
/// Unicode 15.
fn must_escape(c: char) -> bool {
    matches!(
        c,
        '\\'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    ) || c.is_control()
}

// === views ===

/// An answer as the CLI shows it: one serde struct per response, built
/// once from the proto message (or the domain value), from which both
/// renderings come, so JSON and text cannot drift apart.
pub trait View: Serialize {
    /// The answer for people, line by line into `out`.
    fn render(&self, out: &mut Text);
}

/// `view` rendered as `format` asks, ready for `cli::emit`.
pub fn show(format: Format, view: &impl View) -> String {
    match format {
        Format::Json => {
            // Through a `Value`, whose maps keep their keys sorted (serde_json
            // without `preserve_order`): the key order this output has always
            // had, whatever order a view declares its fields in.
            let mut value = serde_json::to_value(view).expect("views serialize to JSON");
            // Every answer says which replica gave it.
            if let (serde_json::Value::Object(object), Some(replica)) = (&mut value, answering()) {
                object
                    .entry("replica")
                    .or_insert(serde_json::Value::String(replica));
            }
            format!("{value}\n")
        }
        Format::Text => {
            let mut out = Text::default();
            view.render(&mut out);
            // Every answer says which replica gave it.
            if let Some(replica) = answering() {
                say!(out, "answered by replica {replica}");
            }
            out.0
        }
    }
}

/// Text for a terminal, being rendered. The only ways in are
/// [`Text::line`] (the `say!` macro) and [`Text::table`], both through
/// [`single_line`], so no render function can print a caller's control
/// characters raw.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// One line, escaped by [`single_line`].
    fn line(&mut self, line: fmt::Arguments<'_>) {
        let line = line.to_string();
        let _ = writeln!(self.0, "{}", single_line(&line));
    }

    /// An empty line.
    fn blank(&mut self) {
        self.0.push('\n');
    }

    /// Rows under a header, in columns. Cells are escaped by
    /// [`single_line`] before they are measured, so the columns stay
    /// aligned and no cell can start a line of its own.
    fn table<const N: usize>(&mut self, header: [&str; N], rows: &[[String; N]]) {
        self.columns(header, rows, true);
    }

    /// [`Text::table`], with the header line left out when `show_header`
    /// is false (the columns are as wide as they would be with it), so
    /// that pages printed one after another read as one table.
    fn columns<const N: usize>(
        &mut self,
        header: [&str; N],
        rows: &[[String; N]],
        show_header: bool,
    ) {
        let escape = |row: &[String; N]| row.each_ref().map(|cell| single_line(cell).to_string());
        let rows: Vec<[String; N]> = rows.iter().map(escape).collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // Already escaped: written as is, not through `line`, which would
        // escape the escapes.
        let mut line = |cells: Vec<&str>| {
            let mut row = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == N {
                    row.push_str(cell);
                } else {
                    let _ = write!(row, "{cell:w$}  ", w = widths[i]);
                }
            }
            self.0.push_str(row.trim_end());
            self.0.push('\n');
        };
        if show_header {
            line(header.to_vec());
        }
        for row in &rows {
            line(row.iter().map(String::as_str).collect());
        }
    }

    /// The rendered text.
    fn into_string(self) -> String {
        self.0
    }
}

/// A time from the wire: in JSON at full precision, or `null` when absent
/// or unreadable; for people to the second, or `-`.
struct Time(Option<jiff::Timestamp>);

impl From<Option<prost_types::Timestamp>> for Time {
    fn from(t: Option<prost_types::Timestamp>) -> Self {
        Time(t.as_ref().and_then(|t| wire::timestamp_from_wire(t).ok()))
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(t) => serializer.collect_str(t),
            None => serializer.serialize_none(),
        }
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.and_then(|t| t.round(jiff::Unit::Second).ok()) {
            Some(t) => write!(f, "{t}"),
            None => f.write_str("-"),
        }
    }
}

/// The channels an activation or incident covers, where none named means
/// every one: `["*"]` in JSON, `all` for people.
struct Channels(Vec<String>);

impl Serialize for Channels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            ["*"].serialize(serializer)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl fmt::Display for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&self.0.join(","))
        }
    }
}

/// A proto string field that is empty when unset: absent (`null`) instead.
fn given(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Ordered pairs as one JSON object, keyed by the first of each.
fn as_map<S: Serializer, K: Serialize, V: Serialize>(
    pairs: &[(K, V)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// "1 subscriber", "2 subscribers".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// An activation, as every answer that lists activations shows it.
#[derive(Serialize)]
struct Activation {
    id: String,
    mode: String,
    title: String,
    channels: Channels,
    reason: String,
    principal: String,
    applied_at: Time,
    revision: i64,
    /// The incident that applied it; `None` for a mode applied by hand.
    incident_id: Option<String>,
}

impl From<proto::Activation> for Activation {
    fn from(a: proto::Activation) -> Self {
        Activation {
            id: a.id,
            mode: a.mode,
            title: a.title,
            channels: Channels(a.channels),
            reason: a.reason,
            principal: a.principal,
            applied_at: a.applied_at.into(),
            revision: a.revision,
            incident_id: given(a.incident_id),
        }
    }
}

fn activations(list: Vec<proto::Activation>) -> Vec<Activation> {
    list.into_iter().map(Activation::from).collect()
}

/// "bots-faq-only on chatbot (act_x), ...", or "none": modes by name first,
/// their ids for whoever needs one.
fn modes_text(list: &[Activation]) -> String {
    if list.is_empty() {
        return "none".to_string();
    }
    list.iter()
        .map(|a| format!("{} on {} ({})", a.mode, a.channels, a.id))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The replica that gave this command's last answer, as its answers name it.
static ANSWERED_BY: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Notes that `replica` gave the command's latest answer.
pub fn answered_by(replica: &str) {
    *ANSWERED_BY.lock().unwrap_or_else(|e| e.into_inner()) = Some(replica.to_string());
}

/// The replica that gave the command's latest answer, if one named itself.
fn answering() -> Option<String> {
    ANSWERED_BY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// "namespace X at revision N", the last line of every write (before the
/// replica that answered).
fn at_revision(out: &mut Text, namespace: &str, revision: i64) {
    say!(out, "namespace {namespace} at revision {revision}");
}

// === mode list ===

/// `safemode mode list`.
#[derive(Serialize)]
pub struct Modes {
    modes: Vec<ModeSummary>,
}

#[derive(Serialize)]
struct ModeSummary {
    name: String,
    title: String,
    summary: String,
    rules: usize,
    lift_requires_approval: bool,
}

impl From<proto::ListModesResponse> for Modes {
    fn from(response: proto::ListModesResponse) -> Self {
        Modes {
            modes: response
                .modes
                .into_iter()
                .map(|m| ModeSummary {
                    rules: m.rules.len(),
                    name: m.name,
                    title: m.title,
                    summary: m.summary,
                    lift_requires_approval: m.lift_requires_approval,
                })
                .collect(),
        }
    }
}

impl View for Modes {
    fn render(&self, out: &mut Text) {
        let width = self.modes.iter().map(|m| m.name.len()).max().unwrap_or(4);
        say!(out, "{:width$}  TITLE", "MODE");
        for m in &self.modes {
            say!(out, "{:width$}  {}", m.name, m.title);
        }
    }
}

// === mode apply / lift ===

/// `safemode mode apply`.
#[derive(Serialize)]
pub struct Applied {
    namespace: String,
    revision: i64,
    applied: Vec<Activation>,
    already_active: Vec<Activation>,
}

impl From<proto::ApplyModesResponse> for Applied {
    fn from(response: proto::ApplyModesResponse) -> Self {
        Applied {
            namespace: response.namespace,
            revision: response.revision,
            applied: activations(response.applied),
            already_active: activations(response.already_active),
        }
    }
}

impl View for Applied {
    fn render(&self, out: &mut Text) {
        for a in &self.applied {
            say!(
                out,
                "applied {} as {} on {} channels",
                a.mode,
                a.id,
                a.channels
            );
        }
        for a in &self.already_active {
            say!(
                out,
                "{} was already active as {} on {} channels (applied by {} at {})",
                a.mode,
                a.id,
                a.channels,
                a.principal,
                a.applied_at
            );
        }
        at_revision(out, &self.namespace, self.revision);
    }
}

/// `safemode mode lift`: what was lifted, or the request that waits for a
/// second approver.
#[derive(Serialize)]
pub struct Lifted {
    namespace: String,
    revision: i64,
    lifted: Vec<Activation>,
    pending: Option<Request>,
}

impl From<proto::LiftActivationsResponse> for Lifted {
    fn from(response: proto::LiftActivationsResponse) -> Self {
        Lifted {
            namespace: response.namespace,
            revision: response.revision,
            lifted: activations(response.lifted),
            pending: response.pending.map(Request::from),
        }
    }
}

impl View for Lifted {
    fn render(&self, out: &mut Text) {
        if let Some(pending) = &self.pending {
            pending.render_pending(out);
            return;
        }
        for a in &self.lifted {
            say!(out, "lifted {} on {} ({})", a.mode, a.channels, a.id);
        }
        at_revision(out, &self.namespace, self.revision);
    }
}

// === --dry-run ===

/// `--dry-run` of `mode apply|lift` and `incident declare|escalate|resolve`:
/// what the change would do, per channel, and whether it needs a second
/// approver. Nothing changed.
#[derive(Serialize)]
pub struct Previewed {
    namespace: String,
    dry_run: bool,
    preview: Preview,
}

/// What a change would do ([`proto::ChangePreview`]).
#[derive(Serialize)]
struct Preview {
    revision: i64,
    /// The modes it would apply and lift; `null` when none.
    summary: Option<String>,
    needs_approval: bool,
    /// Who may approve, when it needs a second approver.
    approval: Option<ApprovalPreview>,
    channels: Vec<ChannelPreview>,
}

#[derive(Serialize)]
struct ApprovalPreview {
    roles: Vec<String>,
    not_by: String,
    summary: String,
}

#[derive(Serialize)]
struct ChannelPreview {
    channel: String,
    effects: Vec<EffectPreview>,
}

#[derive(Serialize)]
struct EffectPreview {
    action: String,
    before: String,
    after: String,
    customer_message_before: Option<String>,
    customer_message_after: Option<String>,
    agent_script_before: Option<String>,
    agent_script_after: Option<String>,
}

/// A customer message or agent script that a change alters the same way
/// for these actions on these channels.
struct TextChange<'a> {
    what: &'static str,
    before: &'a Option<String>,
    after: &'a Option<String>,
    actions: Vec<&'a str>,
    channels: Vec<&'a str>,
}

impl Previewed {
    /// The preview of a change in `namespace`. A server that answers
    /// without one does not know `--dry-run`, and may have made the change.
    pub fn new(namespace: String, preview: Option<proto::ChangePreview>) -> anyhow::Result<Self> {
        let Some(p) = preview else {
            anyhow::bail!(
                "the server answered without a preview: it is older than --dry-run and may have made the change; check `safemode status` and `safemode audit`"
            );
        };
        let needs_approval = p.needs_approval;
        Ok(Previewed {
            namespace,
            dry_run: true,
            preview: Preview {
                revision: p.revision,
                summary: given(p.summary),
                needs_approval,
                approval: needs_approval.then_some(ApprovalPreview {
                    roles: p.approver_roles,
                    not_by: p.not_approver,
                    summary: p.approval_summary,
                }),
                channels: p
                    .channels
                    .into_iter()
                    .map(|c| ChannelPreview {
                        channel: c.channel,
                        effects: c
                            .effects
                            .into_iter()
                            .map(|e| EffectPreview {
                                action: e.action,
                                before: e.before,
                                after: e.after,
                                customer_message_before: given(e.customer_message_before),
                                customer_message_after: given(e.customer_message_after),
                                agent_script_before: given(e.agent_script_before),
                                agent_script_after: given(e.agent_script_after),
                            })
                            .collect(),
                    })
                    .collect(),
            },
        })
    }

    /// The preview of an incident change, in the incident's namespace.
    pub fn of_incident(change: proto::IncidentChange) -> anyhow::Result<Self> {
        let namespace = change.incident.map(|i| i.namespace).unwrap_or_default();
        Previewed::new(namespace, change.preview)
    }
}

impl View for Previewed {
    fn render(&self, out: &mut Text) {
        let p = &self.preview;
        say!(
            out,
            "dry run in {}: {} (at revision {})",
            self.namespace,
            p.summary
                .as_deref()
                .unwrap_or("no mode would be applied or lifted"),
            p.revision
        );
        let rows: Vec<[String; 4]> = p
            .channels
            .iter()
            .flat_map(|c| {
                c.effects.iter().map(|e| {
                    [
                        c.channel.clone(),
                        e.action.clone(),
                        e.before.clone(),
                        format!("-> {}", e.after),
                    ]
                })
            })
            .collect();
        if rows.is_empty() {
            say!(out, "no effect would change on any channel");
        } else {
            out.table(["CHANNEL", "ACTION", "BEFORE", "AFTER"], &rows);
        }
        // A message that changes the same way for many actions and
        // channels is said once.
        let mut texts: Vec<TextChange<'_>> = Vec::new();
        for c in &p.channels {
            for e in &c.effects {
                for (what, before, after) in [
                    (
                        "customer message",
                        &e.customer_message_before,
                        &e.customer_message_after,
                    ),
                    (
                        "agent script",
                        &e.agent_script_before,
                        &e.agent_script_after,
                    ),
                ] {
                    if before == after {
                        continue;
                    }
                    let at = match texts
                        .iter()
                        .position(|t| (t.what, t.before, t.after) == (what, before, after))
                    {
                        Some(at) => at,
                        None => {
                            texts.push(TextChange {
                                what,
                                before,
                                after,
                                actions: Vec::new(),
                                channels: Vec::new(),
                            });
                            texts.len() - 1
                        }
                    };
                    let text = &mut texts[at];
                    if !text.actions.contains(&e.action.as_str()) {
                        text.actions.push(&e.action);
                    }
                    if !text.channels.contains(&c.channel.as_str()) {
                        text.channels.push(&c.channel);
                    }
                }
            }
        }
        let quoted = |t: &Option<String>| {
            t.as_ref()
                .map_or_else(|| "(none)".to_string(), |t| format!("{t:?}"))
        };
        for text in &texts {
            let channels = if text.channels.len() == safemode_policy::names::CHANNELS.len() {
                "every channel".to_string()
            } else {
                text.channels.join(", ")
            };
            say!(
                out,
                "{} for {} on {channels}: {} -> {}",
                text.what,
                text.actions.join(", "),
                quoted(text.before),
                quoted(text.after)
            );
        }
        if let Some(approval) = &p.approval {
            say!(
                out,
                "needs a second approver: someone with role {} other than {}; the request would {}",
                approval.roles.join(" or "),
                approval.not_by,
                approval.summary
            );
        }
        say!(out, "dry run: nothing changed");
    }
}

// === status ===

/// `safemode status`.
#[derive(Serialize)]
pub struct Status {
    namespace: String,
    revision: i64,
    server_time: Time,
    replica: String,
    activations: Vec<Activation>,
    /// Subscribers the filters admit, on every replica that answered.
    subscriber_count: u32,
    /// Per channel, how many subscribers are in each state.
    channels: Vec<ChannelSummary>,
    /// Every replica of the fleet, and whether it answered.
    replicas: Vec<ReplicaAnswer>,
    /// Some replica did not answer: its subscribers are missing.
    partial: bool,
    subscribers: Vec<Subscriber>,
    problems: Vec<String>,
    /// Absent from a server that does not say.
    store: Option<StoreHealth>,
    /// Early-warning proposals waiting for a commander, newest first.
    open_proposals: Vec<Proposal>,
}

/// How many subscribers of one channel are in each state.
#[derive(Serialize)]
struct ChannelSummary {
    channel: String,
    synced: u32,
    not_acked: u32,
    stale: u32,
    rejected: u32,
}

impl ChannelSummary {
    fn not_synced(&self) -> u32 {
        self.not_acked
            .saturating_add(self.stale)
            .saturating_add(self.rejected)
    }
}

/// One replica of the fleet, as the replica asked heard from it.
#[derive(Serialize)]
struct ReplicaAnswer {
    replica: String,
    address: String,
    answered: bool,
    error: Option<String>,
    subscriber_count: u32,
    applied_revision: i64,
}

impl From<proto::ReplicaAnswer> for ReplicaAnswer {
    fn from(r: proto::ReplicaAnswer) -> Self {
        ReplicaAnswer {
            replica: r.replica,
            address: r.address,
            answered: r.answered,
            error: given(r.error),
            subscriber_count: r.subscriber_count,
            applied_revision: r.applied_revision,
        }
    }
}

/// The store behind the replica that answered, and its lag behind it.
#[derive(Serialize)]
pub struct StoreHealth {
    kind: String,
    endpoints: Vec<String>,
    reachable: bool,
    error: Option<String>,
    store_revision: i64,
    namespace_revision: i64,
    applied_revision: i64,
    lag_revisions: i64,
    follower_failing_ms: u64,
    follower_error: Option<String>,
}

impl From<proto::StoreHealth> for StoreHealth {
    fn from(h: proto::StoreHealth) -> Self {
        StoreHealth {
            kind: h.kind,
            endpoints: h.endpoints,
            reachable: h.reachable,
            error: given(h.error),
            store_revision: h.store_revision,
            namespace_revision: h.namespace_revision,
            applied_revision: h.applied_revision,
            lag_revisions: h.lag_revisions,
            follower_failing_ms: h.follower_failing_ms,
            follower_error: given(h.follower_error),
        }
    }
}

impl StoreHealth {
    /// `etcd at URL,URL`, `embedded store at FILE`.
    pub fn place(&self) -> String {
        match self.kind.as_str() {
            "etcd" => format!("etcd at {}", self.endpoints.join(",")),
            "embedded" => format!("embedded store at {}", self.endpoints.join(",")),
            _ => self.endpoints.join(","),
        }
    }

    /// The STORE line of `status`.
    fn render(&self, out: &mut Text, namespace: &str) {
        if !self.reachable {
            say!(
                out,
                "STORE {}: UNREACHABLE ({}); showing what this replica last read (revision {})",
                self.place(),
                self.error.as_deref().unwrap_or("no answer"),
                self.applied_revision
            );
            return;
        }
        let lag = match self.lag_revisions {
            0 => format!(
                "this replica is up to date in namespace {namespace} (revision {})",
                self.applied_revision
            ),
            n => format!(
                "this replica is behind in namespace {namespace}: revision {} here, {} in the store ({n} behind)",
                self.applied_revision, self.namespace_revision
            ),
        };
        let watch = match (&self.follower_error, self.follower_failing_ms) {
            (Some(error), ms) => {
                format!("; its watch has been failing for {}s ({error})", ms / 1000)
            }
            (None, _) => String::new(),
        };
        say!(
            out,
            "STORE {}: reachable, at revision {}; {lag}{watch}",
            self.place(),
            self.store_revision
        );
    }
}

/// How many subscribers `--wait-synced` names before a count.
const NAMED_NOT_SYNCED: usize = 10;

impl Status {
    /// The status with the namespace's open proposals (`ListProposals`).
    pub fn with_proposals(mut self, proposals: proto::ListProposalsResponse) -> Self {
        self.open_proposals = proposals
            .proposals
            .into_iter()
            .map(Proposal::from)
            .filter(|p| p.state == "open")
            .collect();
        self
    }

    /// Subscribers that are not SYNCED, and replicas that did not answer,
    /// in one line; `None` when every subscriber of a whole answer is
    /// SYNCED and there is at least one (of `channel`, when the status was
    /// asked for one).
    pub fn not_synced(&self, channel: Option<&str>) -> Option<String> {
        // Nobody to apply it is not "everyone applied it": a wrong
        // namespace or channel, or every channel service down.
        if self.subscriber_count == 0 && !self.partial {
            return Some(format!(
                "no subscriber{} is connected to any replica in namespace {}: nothing has applied revision {}",
                channel
                    .map(|c| format!(" of channel {c}"))
                    .unwrap_or_default(),
                self.namespace,
                self.revision
            ));
        }
        let silent: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| !r.answered)
            .map(|r| {
                format!(
                    "replica {} ({}) did not answer ({})",
                    r.replica,
                    r.address,
                    r.error.as_deref().unwrap_or("no answer")
                )
            })
            .collect();
        let behind: Vec<&Subscriber> = self
            .subscribers
            .iter()
            .filter(|x| x.state != "SYNCED")
            .collect();
        let counted: u32 = self.channels.iter().map(ChannelSummary::not_synced).sum();
        if silent.is_empty() && behind.is_empty() && counted == 0 && !self.partial {
            return None;
        }
        let mut named: Vec<String> = behind
            .iter()
            .take(NAMED_NOT_SYNCED)
            .map(|x| {
                let why = match (&x.reject_reason, x.state.as_str()) {
                    (Some(reason), "REJECTED") => format!(": {reason}"),
                    _ => format!(", acked {}", x.acked_revision),
                };
                format!(
                    "{} ({} on {}) {}{why}",
                    x.subscriber_id, x.channel, x.replica, x.state
                )
            })
            .collect();
        if behind.len() > NAMED_NOT_SYNCED {
            named.push(format!("and {} more", behind.len() - NAMED_NOT_SYNCED));
        }
        named.extend(silent);
        let head = match counted {
            0 => format!(
                "the {} subscribers that answered are SYNCED at revision {} in namespace {}, but",
                self.subscriber_count, self.revision, self.namespace
            ),
            n => format!(
                "{} not SYNCED at revision {} in namespace {} ({} in all):",
                if n == 1 {
                    "1 subscriber is".to_string()
                } else {
                    format!("{n} subscribers are")
                },
                self.revision,
                self.namespace,
                self.subscriber_count
            ),
        };
        Some(format!("{head} {}", named.join("; ")))
    }

    /// `--wait-synced`'s progress line: how many are SYNCED, and the rest.
    pub fn progress(&self) -> String {
        let sum = |f: fn(&ChannelSummary) -> u32| self.channels.iter().map(f).sum::<u32>();
        let silent = self.replicas.iter().filter(|r| !r.answered).count();
        format!(
            "{}/{} SYNCED at revision {} ({} NOT_ACKED, {} STALE, {} REJECTED{})",
            sum(|c| c.synced),
            self.subscriber_count,
            self.revision,
            sum(|c| c.not_acked),
            sum(|c| c.stale),
            sum(|c| c.rejected),
            match silent {
                0 => String::new(),
                n => format!("; {} not answering", count(n, "replica")),
            }
        )
    }

    /// Why `status` must exit 1: the store is unreachable (what it shows is
    /// what the replica last read, and no change can be made).
    pub fn store_unreachable(&self) -> Option<String> {
        let store = self.store.as_ref().filter(|s| !s.reachable)?;
        Some(format!(
            "the store ({}) is unreachable: {}; status shows what replica {} last read, and no change can be made until the store is back",
            store.place(),
            store.error.as_deref().unwrap_or("no answer"),
            self.replica
        ))
    }
}

/// One subscriber as the controller sees it.
#[derive(Serialize)]
struct Subscriber {
    subscriber_id: String,
    channel: String,
    /// The replica it is connected to.
    replica: String,
    /// SYNCED, NOT_ACKED, STALE or REJECTED.
    state: String,
    peer: String,
    connected_at: Time,
    sent_revision: i64,
    acked_revision: i64,
    acked_at: Time,
    /// Present when the subscriber rejected a revision.
    rejected_revision: Option<i64>,
    reject_reason: Option<String>,
    rejected_at: Time,
}

impl From<proto::GetStatusResponse> for Status {
    fn from(s: proto::GetStatusResponse) -> Self {
        Status {
            namespace: s.namespace,
            revision: s.revision,
            server_time: s.server_time.into(),
            replica: s.replica,
            activations: activations(s.activations),
            subscriber_count: s.subscriber_count,
            channels: s
                .channels
                .into_iter()
                .map(|c| ChannelSummary {
                    channel: c.channel,
                    synced: c.synced,
                    not_acked: c.not_acked,
                    stale: c.stale,
                    rejected: c.rejected,
                })
                .collect(),
            replicas: s.replicas.into_iter().map(ReplicaAnswer::from).collect(),
            partial: s.partial,
            subscribers: s
                .subscribers
                .into_iter()
                .map(|sub| Subscriber {
                    rejected_revision: (sub.rejected_revision > 0 || !sub.reject_reason.is_empty())
                        .then_some(sub.rejected_revision),
                    subscriber_id: sub.subscriber_id,
                    channel: sub.channel,
                    replica: sub.replica,
                    state: sub.state,
                    peer: sub.peer,
                    connected_at: sub.connected_at.into(),
                    sent_revision: sub.sent_revision,
                    acked_revision: sub.acked_revision,
                    acked_at: sub.acked_at.into(),
                    reject_reason: given(sub.reject_reason),
                    rejected_at: sub.rejected_at.into(),
                })
                .collect(),
            problems: s.problems,
            store: s.store.map(StoreHealth::from),
            open_proposals: Vec::new(),
        }
    }
}

impl View for Status {
    fn render(&self, out: &mut Text) {
        let synced: u32 = self.channels.iter().map(|c| c.synced).sum();
        let answered = self.replicas.iter().filter(|r| r.answered).count().max(1);
        let silent = self.replicas.iter().filter(|r| !r.answered).count();
        say!(
            out,
            "namespace {} at revision {}: {} active, {} on {}, {} SYNCED{}",
            self.namespace,
            self.revision,
            self.activations.len(),
            count(self.subscriber_count as usize, "subscriber"),
            count(answered, "replica"),
            synced,
            match silent {
                0 => String::new(),
                n => format!("; PARTIAL: {} did not answer", count(n, "replica")),
            }
        );
        if let Some(store) = &self.store {
            store.render(out, &self.namespace);
        }
        for problem in &self.problems {
            say!(out, "PROBLEM: {problem}");
        }
        if !self.open_proposals.is_empty() {
            say!(
                out,
                "OPEN PROPOSALS ({}): `safemode proposals accept ID --reason R` declares, `safemode proposals dismiss ID --reason R` does not",
                self.open_proposals.len()
            );
            for p in &self.open_proposals {
                say!(out, "  {} {}: {}", p.id, p.question, p.evidence);
            }
        }
        if !self.channels.is_empty() {
            say!(out);
            let rows: Vec<[String; 5]> = self
                .channels
                .iter()
                .map(|c| {
                    [
                        c.channel.clone(),
                        c.synced.to_string(),
                        c.not_acked.to_string(),
                        c.stale.to_string(),
                        c.rejected.to_string(),
                    ]
                })
                .collect();
            out.table(
                ["CHANNEL", "SYNCED", "NOT_ACKED", "STALE", "REJECTED"],
                &rows,
            );
        }
        if !self.activations.is_empty() {
            say!(out);
            let rows: Vec<[String; 7]> = self
                .activations
                .iter()
                .map(|a| {
                    [
                        a.id.clone(),
                        a.mode.clone(),
                        a.channels.to_string(),
                        a.incident_id.clone().unwrap_or_else(|| "-".into()),
                        a.revision.to_string(),
                        format!("{} at {}", a.principal, a.applied_at),
                        a.reason.clone(),
                    ]
                })
                .collect();
            out.table(
                [
                    "ACTIVATION",
                    "MODE",
                    "CHANNELS",
                    "INCIDENT",
                    "REVISION",
                    "APPLIED",
                    "REASON",
                ],
                &rows,
            );
        }
        if !self.subscribers.is_empty() {
            say!(out);
            let rows: Vec<[String; 8]> = self
                .subscribers
                .iter()
                .map(|x| {
                    // An older rejection, answered since by an ack, is
                    // history: the state says where it stands now.
                    let rejected = match &x.reject_reason {
                        Some(reason) if x.state == "REJECTED" => {
                            format!("{}: {reason}", x.rejected_revision.unwrap_or_default())
                        }
                        _ => "-".to_string(),
                    };
                    let acked = match x.acked_at {
                        Time(None) => "-".to_string(),
                        _ => x.acked_revision.to_string(),
                    };
                    [
                        x.subscriber_id.clone(),
                        x.channel.clone(),
                        x.state.clone(),
                        x.replica.clone(),
                        acked,
                        x.acked_at.to_string(),
                        x.peer.clone(),
                        rejected,
                    ]
                })
                .collect();
            out.table(
                [
                    "SUBSCRIBER",
                    "CHANNEL",
                    "STATE",
                    "REPLICA",
                    "ACKED",
                    "ACKED AT",
                    "PEER",
                    "REJECTED",
                ],
                &rows,
            );
        }
    }
}

// === watch ===

fn effect_text(effect: &Effect) -> String {
    match effect {
        Effect::Throttle(t) => format!("throttle {}/{}s", t.max, t.window_seconds),
        Effect::StepUp(s) => format!(
            "step_up >={} via {} ({} tries, then {})",
            s.min_confidence,
            s.methods.names().collect::<Vec<_>>().join("|"),
            s.max_attempts,
            s.escalate_queue
        ),
        Effect::Review(r) => format!("review {}", r.queue),
        Effect::Route(r) => format!("route to {}", r.to),
        other => other.kind().as_str().to_string(),
    }
}

/// `safemode watch`: one snapshot a subscriber applied.
#[derive(Serialize)]
pub struct Snapshot<'a> {
    namespace: &'a str,
    channel: &'a str,
    revision: Revision,
    issued_at: String,
    activations: &'a [ActivationInfo],
    /// In the channel policy's order for people; JSON keys them.
    #[serde(serialize_with = "as_map")]
    rules: Vec<(String, Rule<'a>)>,
}

/// What one action (or action prefix) gets.
#[derive(Serialize)]
struct Rule<'a> {
    base: Option<RuleEntry<'a>>,
    conditional: Vec<RuleEntry<'a>>,
}

/// One effect of a rule. `when` is there for conditional entries only
/// (and is `null` there when the condition is empty).
#[derive(Serialize)]
struct RuleEntry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    when: Option<&'a Option<Condition>>,
    effect: &'a Effect,
    throttle: Option<&'a Throttle>,
    activation_ids: &'a [ActivationId],
}

impl<'a> RuleEntry<'a> {
    fn new(entry: &'a Entry, conditional: bool) -> Self {
        RuleEntry {
            when: conditional.then_some(&entry.when),
            effect: &entry.effect,
            throttle: entry.throttle.as_ref().map(|t| &t.limit),
            activation_ids: &entry.activation_ids,
        }
    }
}

impl<'a> From<&'a ActionPolicy> for Rule<'a> {
    fn from(policy: &'a ActionPolicy) -> Self {
        Rule {
            base: policy.base.as_ref().map(|e| RuleEntry::new(e, false)),
            conditional: policy
                .conditional
                .iter()
                .map(|e| RuleEntry::new(e, true))
                .collect(),
        }
    }
}

impl<'a> From<&'a PolicySnapshot> for Snapshot<'a> {
    fn from(s: &'a PolicySnapshot) -> Self {
        Snapshot {
            namespace: s.namespace.as_str(),
            channel: s.channel.as_str(),
            revision: s.revision,
            issued_at: s.issued_at.to_string(),
            activations: &s.activations,
            rules: s
                .policy
                .entries()
                .into_iter()
                .map(|(key, policy)| (key, Rule::from(policy)))
                .collect(),
        }
    }
}

impl Rule<'_> {
    fn text(&self) -> String {
        let mut text = self.base.as_ref().map_or_else(
            || EffectKind::Allow.as_str().to_string(),
            |e| effect_text(e.effect),
        );
        for entry in &self.conditional {
            text.push_str(&format!(
                "; if {}: {}",
                serde_json::to_string(&entry.when).unwrap_or_default(),
                effect_text(entry.effect)
            ));
        }
        text
    }
}

impl View for Snapshot<'_> {
    fn render(&self, out: &mut Text) {
        let active: Vec<String> = self
            .activations
            .iter()
            .map(|a| format!("{} ({})", a.mode, a.id))
            .collect();
        say!(
            out,
            "revision {} for {} in {} (issued {}): {}",
            self.revision,
            self.channel,
            self.namespace,
            self.issued_at,
            if active.is_empty() {
                "no active modes".to_string()
            } else {
                active.join(", ")
            }
        );
        for (key, rule) in &self.rules {
            say!(out, "  {key}: {}", rule.text());
        }
    }
}

// === decide ===

/// `safemode decide`: the client's own report, as it serializes; the text
/// names the modes behind it, from the activations of the policy decided
/// with.
#[derive(Serialize)]
pub struct Decision<'a> {
    #[serde(flatten)]
    report: &'a DecisionReport,
    #[serde(skip)]
    activations: &'a [ActivationInfo],
}

impl<'a> Decision<'a> {
    /// `report`, decided with a policy holding `activations`.
    pub fn new(report: &'a DecisionReport, activations: &'a [ActivationInfo]) -> Self {
        Decision {
            report,
            activations,
        }
    }

    /// An activation as a person knows it: its mode, then its id.
    fn named(&self, id: &str) -> String {
        match self.activations.iter().find(|a| a.id == id) {
            Some(a) => format!("{} ({id})", a.mode),
            None => id.to_string(),
        }
    }
}

impl View for Decision<'_> {
    fn render(&self, out: &mut Text) {
        let d = self.report;
        let params = serde_json::to_value(&d.outcome).expect("outcomes serialize");
        let detail: Vec<String> = params
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "effect")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        say!(
            out,
            "{}",
            [d.outcome.kind().as_str().to_string(), detail.join(" ")]
                .join(" ")
                .trim_end()
        );
        say!(
            out,
            "  {} {} at revision {}{}",
            d.channel.as_deref().unwrap_or("-"),
            d.action,
            d.revision.map_or("-".to_string(), |r| r.to_string()),
            match (d.stale, d.fail_closed) {
                (_, true) => " (STALE too long: failed closed)",
                (true, false) => " (STALE)",
                (false, false) => "",
            }
        );
        if !d.reasons.is_empty() {
            let named: Vec<String> = d.reasons.iter().map(|id| self.named(id)).collect();
            say!(out, "  because: {}", named.join(", "));
        }
        if let Some(m) = &d.customer_message {
            say!(out, "  customer: {m}");
        }
        if let Some(s) = &d.agent_script {
            say!(out, "  agent: {s}");
        }
    }
}

// === sim ===

/// `safemode sim`, once its subscribers are connected.
#[derive(Serialize)]
pub struct SimStarted<'a> {
    /// Always true: tells this line from the revision reports after it.
    started: bool,
    namespace: &'a str,
    subscribers: usize,
    channels: Vec<SimChannel<'a>>,
}

#[derive(Serialize)]
struct SimChannel<'a> {
    channel: &'a str,
    subscribers: usize,
}

impl<'a> SimStarted<'a> {
    pub fn new(
        namespace: &'a Namespace,
        channels: &'a [(Channel, usize)],
        subscribers: usize,
    ) -> Self {
        SimStarted {
            started: true,
            namespace: namespace.as_str(),
            subscribers,
            channels: channels
                .iter()
                .map(|(c, n)| SimChannel {
                    channel: c.as_str(),
                    subscribers: *n,
                })
                .collect(),
        }
    }
}

impl View for SimStarted<'_> {
    fn render(&self, out: &mut Text) {
        let spread: Vec<String> = self
            .channels
            .iter()
            .map(|c| format!("{}={}", c.channel, c.subscribers))
            .collect();
        say!(
            out,
            "simulating {} subscribers ({}) in namespace {}; each revision is reported once all applied it (Ctrl-C stops)",
            self.subscribers,
            spread.join(", "),
            self.namespace
        );
    }
}

/// `safemode sim`: one revision, once every subscriber applied it (or the
/// wait ran out).
#[derive(Serialize)]
pub struct SimRevision<'a> {
    revision: Revision,
    issued_at: String,
    complete: bool,
    channels: &'a [ChannelTimes],
    decisions: &'a [DecisionReport],
}

impl<'a> SimRevision<'a> {
    pub fn new(report: &'a RevisionReport, decisions: &'a [DecisionReport]) -> Self {
        SimRevision {
            revision: report.revision,
            issued_at: report.issued_at.to_string(),
            complete: report.complete,
            channels: &report.channels,
            decisions,
        }
    }
}

impl View for SimRevision<'_> {
    fn render(&self, out: &mut Text) {
        let applied: usize = self.channels.iter().map(|c| c.applied).sum();
        let total: usize = self.channels.iter().map(|c| c.subscribers).sum();
        say!(
            out,
            "revision {}: applied by {applied}/{total}{}",
            self.revision,
            if self.complete { "" } else { " (INCOMPLETE)" }
        );
        let rows: Vec<[String; 5]> = self
            .channels
            .iter()
            .map(|c| {
                [
                    format!("  {}", c.channel),
                    format!("{}/{}", c.applied, c.subscribers),
                    format!("{:.1}ms", c.p50_ms),
                    format!("{:.1}ms", c.p99_ms),
                    format!("{:.1}ms", c.max_ms),
                ]
            })
            .collect();
        out.table(["  CHANNEL", "APPLIED", "P50", "P99", "MAX"], &rows);
        for d in self.decisions {
            say!(
                out,
                "  {} {}: {}",
                d.channel.as_deref().unwrap_or("-"),
                d.action,
                d.outcome.kind().as_str()
            );
        }
    }
}

// === drills ===

/// `safemode drill run`: every drilled runbook, and the report files
/// written.
#[derive(Serialize)]
pub struct Drills<'a> {
    passed: bool,
    drills: Vec<Drill<'a>>,
    reports: Vec<String>,
}

/// One drilled runbook, without its journal (that goes to the files).
#[derive(Serialize)]
struct Drill<'a> {
    runbook: &'a str,
    namespace: &'a str,
    passed: bool,
    incident_id: &'a Option<String>,
    safemode_version: &'a str,
    catalog_fingerprint: &'a str,
    runbook_file: &'a Option<String>,
    command_line: &'a str,
    principal: &'a str,
    principal_from: PrincipalSource,
    started_at: Time,
    finished_at: Time,
    subscribers: &'a [ChannelSubscribers],
    /// Each with the fault that struck it, if any.
    stages: &'a [StageReport],
    /// The fault again, as before it moved under its stage, for scripts
    /// that read it here.
    fault: Option<&'a FaultReport>,
    restoration: &'a Option<RestorationReport>,
    failures: &'a [String],
}

impl<'a> Drills<'a> {
    pub fn new(reports: &'a [DrillReport], written: &[std::path::PathBuf]) -> Self {
        Drills {
            passed: reports.iter().all(|r| r.passed),
            drills: reports
                .iter()
                .map(|r| Drill {
                    runbook: &r.runbook,
                    namespace: r.namespace.as_str(),
                    passed: r.passed,
                    incident_id: &r.incident_id,
                    safemode_version: &r.safemode_version,
                    catalog_fingerprint: &r.catalog_fingerprint,
                    runbook_file: &r.runbook_file,
                    command_line: &r.command_line,
                    principal: &r.principal,
                    principal_from: r.principal_from,
                    started_at: Time(Some(r.started_at)),
                    finished_at: Time(Some(r.finished_at)),
                    subscribers: &r.subscribers,
                    stages: &r.stages,
                    fault: r.fault().map(|(_, f)| f),
                    restoration: &r.restoration,
                    failures: &r.failures,
                })
                .collect(),
            reports: written.iter().map(|p| p.display().to_string()).collect(),
        }
    }
}

impl View for Drills<'_> {
    fn render(&self, out: &mut Text) {
        for r in &self.drills {
            let expectations: usize = r.stages.iter().map(|s| s.expectations.len()).sum();
            let subscribers: usize = r.subscribers.iter().map(|s| s.simulated + s.attached).sum();
            let plural = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            say!(
                out,
                "{} {} in {} ({}, {}, {})",
                if r.passed { "PASS" } else { "FAIL" },
                r.runbook,
                r.namespace,
                plural(r.stages.len(), "stage", "stages"),
                plural(expectations, "expectation", "expectations"),
                plural(subscribers, "subscriber", "subscribers")
            );
            say!(
                out,
                "  safemode {}, catalogue {}, runbook file {}",
                r.safemode_version,
                r.catalog_fingerprint,
                r.runbook_file.as_deref().unwrap_or("built in")
            );
            say!(
                out,
                "  run by {} ({}), started {}",
                r.principal,
                r.principal_from.describe(),
                r.started_at
            );
            say!(out, "  command: {}", r.command_line);
            for stage in r.stages {
                let slowest = stage
                    .channels
                    .iter()
                    .max_by(|a, b| a.max_ms.total_cmp(&b.max_ms));
                say!(
                    out,
                    "  {} ({}) at revision {}, modes {}: {}/{} expectations hold; slowest channel {} ({:.1} ms, limit {} ms){}",
                    stage.severity,
                    stage.step,
                    stage.revision,
                    if stage.modes.is_empty() {
                        "none".to_string()
                    } else {
                        stage.modes.join(", ")
                    },
                    stage.expectations.iter().filter(|e| e.passed).count(),
                    stage.expectations.len(),
                    slowest.map_or("-", |c| c.channel.as_str()),
                    slowest.map_or(0.0, |c| c.max_ms),
                    stage.apply_within_ms,
                    stage
                        .approval
                        .as_ref()
                        .map(|a| format!("; approved by {}", a.approved_by))
                        .unwrap_or_default()
                );
                if let Some(fault) = &stage.fault {
                    say!(
                        out,
                        "    fault {}: {} affected, {} in {:.1} ms",
                        fault.kind,
                        fault.affected,
                        if fault.recovered {
                            "recovered"
                        } else {
                            "NOT recovered"
                        },
                        fault.recovery_ms
                    );
                    for hit in &fault.hit {
                        say!(
                            out,
                            "      hit {}: {}",
                            hit.channel,
                            bounded(&hit.subscribers, DRILL_LIST_LIMIT)
                        );
                    }
                }
            }
            if let Some(restoration) = r.restoration {
                say!(
                    out,
                    "  restoration at revision {}: {}/{} decisions back to allow",
                    restoration.revision,
                    restoration.decisions.iter().filter(|d| d.passed).count(),
                    restoration.decisions.len()
                );
                for d in restoration.decisions.iter().take(DRILL_LIST_LIMIT) {
                    say!(
                        out,
                        "    {} {} {} ({}): {}",
                        if d.passed { "ok" } else { "NOT RESTORED" },
                        d.channel,
                        d.action,
                        d.context,
                        d.decision
                    );
                }
                if restoration.decisions.len() > DRILL_LIST_LIMIT {
                    say!(
                        out,
                        "    ... and {} more (all in the report: --report DIR)",
                        restoration.decisions.len() - DRILL_LIST_LIMIT
                    );
                }
            }
            for failure in r.failures {
                say!(out, "  FAILED: {failure}");
            }
        }
        for path in &self.reports {
            say!(out, "wrote {path}");
        }
    }
}

/// How many subscribers or decisions one drill line lists on a terminal;
/// the report files list them all.
const DRILL_LIST_LIMIT: usize = 20;

/// Up to `limit` of `items`, comma-separated, then how many more.
fn bounded(items: &[String], limit: usize) -> String {
    let mut text = items
        .iter()
        .take(limit)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > limit {
        text.push_str(&format!(" and {} more", items.len() - limit));
    }
    text
}

// === incidents, requests, audit, runbooks, tokens ===

/// A change request, waiting for a second approver or decided.
#[derive(Serialize)]
struct Request {
    id: String,
    namespace: String,
    kind: String,
    incident_id: Option<String>,
    severity: Option<String>,
    activation_ids: Vec<String>,
    requested_by: String,
    reason: String,
    requested_at: Time,
    expires_at: Time,
    status: String,
    approved_by: Option<String>,
    summary: String,
    /// For a superseded request: what overtook it.
    superseded_by: Option<String>,
    /// For a withdrawn request: who withdrew it.
    withdrawn_by: Option<String>,
}

impl From<proto::ChangeRequest> for Request {
    fn from(r: proto::ChangeRequest) -> Self {
        Request {
            id: r.id,
            namespace: r.namespace,
            kind: r.kind,
            incident_id: given(r.incident_id),
            severity: given(r.severity),
            activation_ids: r.activation_ids,
            requested_by: r.requested_by,
            reason: r.reason,
            requested_at: r.requested_at.into(),
            expires_at: r.expires_at.into(),
            status: r.status,
            approved_by: given(r.approved_by),
            summary: r.summary,
            superseded_by: given(r.superseded_by),
            withdrawn_by: given(r.withdrawn_by),
        }
    }
}

impl Request {
    /// What a commander sees when a change waits for a second approver.
    fn render_pending(&self, out: &mut Text) {
        say!(
            out,
            "needs a second approver: request {}, asked by {} at {}, is pending; nothing changed yet",
            self.id,
            self.requested_by,
            self.requested_at
        );
        say!(out, "  it will {}", self.summary);
        say!(
            out,
            "  another principal with the approver role runs: safemode approve {}",
            self.id
        );
        say!(out, "  it expires at {}", self.expires_at);
    }

    /// Its status, with who decided or what overtook it.
    fn status_text(&self) -> String {
        match (&self.approved_by, &self.superseded_by, &self.withdrawn_by) {
            (Some(by), _, _) => format!("{} by {by}", self.status),
            (_, Some(what), _) => format!("{}: {what}", self.status),
            (_, _, Some(by)) => format!("{} by {by}", self.status),
            _ => self.status.clone(),
        }
    }
}

/// An incident with its timeline (`safemode incident show`), and as
/// listed or changed.
#[derive(Serialize)]
pub struct Incident {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    title: String,
    namespace: String,
    severity: String,
    status: String,
    channels: Channels,
    /// The activations in force now, as `activations` lists them.
    activation_ids: Vec<String>,
    activations: Vec<Activation>,
    lift_requires_approval: bool,
    declared_by: String,
    declared_at: Time,
    review_due: Time,
    exit_criteria: Vec<String>,
    timeline: Vec<TimelineEvent>,
}

#[derive(Serialize)]
struct TimelineEvent {
    at: Time,
    event: String,
    principal: String,
    severity: String,
    reason: String,
    request_id: Option<String>,
    /// What changed in force, by mode name.
    detail: Option<String>,
    revision: i64,
}

impl From<proto::Incident> for Incident {
    fn from(i: proto::Incident) -> Self {
        Incident {
            id: i.id,
            kind: i.r#type,
            title: i.title,
            namespace: i.namespace,
            severity: i.severity,
            status: i.status,
            channels: Channels(i.channels),
            activation_ids: i.activation_ids,
            activations: activations(i.activations),
            lift_requires_approval: i.lift_requires_approval,
            declared_by: i.declared_by,
            declared_at: i.declared_at.into(),
            review_due: i.review_due.into(),
            exit_criteria: i.exit_criteria,
            timeline: i
                .timeline
                .into_iter()
                .map(|e| TimelineEvent {
                    at: e.at.into(),
                    event: e.event,
                    principal: e.principal,
                    severity: e.severity,
                    reason: e.reason,
                    request_id: given(e.request_id),
                    detail: given(e.detail),
                    revision: e.revision,
                })
                .collect(),
        }
    }
}

impl View for Incident {
    fn render(&self, out: &mut Text) {
        say!(
            out,
            "{} {}: {} ({})",
            self.id,
            self.title,
            self.severity,
            self.status
        );
        say!(
            out,
            "  type {} in {}, on {} channels; declared by {} at {}",
            self.kind,
            self.namespace,
            self.channels,
            self.declared_by,
            self.declared_at
        );
        if self.status == "active" {
            say!(out, "  review due {}", self.review_due);
        }
        say!(
            out,
            "  lifting needs a second approver: {}",
            if self.lift_requires_approval {
                "yes"
            } else {
                "no"
            }
        );
        say!(out, "  modes in force: {}", modes_text(&self.activations));
        if !self.exit_criteria.is_empty() {
            say!(out, "  exit criteria:");
            for c in &self.exit_criteria {
                say!(out, "    - {c}");
            }
        }
        say!(out);
        let rows: Vec<[String; 7]> = self
            .timeline
            .iter()
            .map(|e| {
                [
                    e.at.to_string(),
                    e.event.clone(),
                    e.severity.clone(),
                    e.principal.clone(),
                    if e.revision > 0 {
                        e.revision.to_string()
                    } else {
                        "-".into()
                    },
                    e.detail.clone().unwrap_or_else(|| "-".into()),
                    [Some(e.reason.as_str()), e.request_id.as_deref()]
                        .into_iter()
                        .flatten()
                        .filter(|t| !t.is_empty())
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        out.table(
            [
                "AT", "EVENT", "SEVERITY", "BY", "REVISION", "CHANGE", "REASON",
            ],
            &rows,
        );
    }
}

/// `safemode incident declare|escalate|resolve`: the incident after the
/// change, or the request that waits for a second approver.
#[derive(Serialize)]
pub struct IncidentChanged {
    /// What happened, for people ("declared", "moved", "resolved").
    #[serde(skip)]
    what: &'static str,
    incident: Incident,
    revision: i64,
    pending: Option<Request>,
    /// Actions the modes in force leave with no path on any channel, each
    /// with what the runbook says of it.
    dead_ends: Vec<String>,
}

impl IncidentChanged {
    pub fn new(what: &'static str, change: proto::IncidentChange) -> Self {
        IncidentChanged {
            what,
            incident: change.incident.unwrap_or_default().into(),
            revision: change.revision,
            pending: change.pending.map(Request::from),
            dead_ends: change.dead_ends,
        }
    }
}

impl View for IncidentChanged {
    fn render(&self, out: &mut Text) {
        if let Some(pending) = &self.pending {
            pending.render_pending(out);
            return;
        }
        let incident = &self.incident;
        say!(
            out,
            "{} {} {} ({}) at {} in {}",
            self.what,
            incident.kind,
            incident.id,
            incident.status,
            incident.severity,
            incident.namespace
        );
        say!(
            out,
            "  modes in force: {}",
            modes_text(&incident.activations)
        );
        for dead_end in &self.dead_ends {
            say!(
                out,
                "  DEAD ENDS (no customer can do these on any channel): {dead_end}"
            );
        }
        at_revision(out, &incident.namespace, self.revision);
    }
}

/// Says so when a list answer was cut to its bound.
fn cut_note(out: &mut Text, shown: usize, total: u32, what: &str) {
    if (total as usize) > shown {
        say!(out, "(the newest {shown} of {total} {what})");
    }
}

/// `safemode incident list`.
#[derive(Serialize)]
pub struct Incidents {
    incidents: Vec<Incident>,
    total: u32,
}

impl From<proto::ListIncidentsResponse> for Incidents {
    fn from(response: proto::ListIncidentsResponse) -> Self {
        Incidents {
            incidents: response.incidents.into_iter().map(Incident::from).collect(),
            total: response.total,
        }
    }
}

impl View for Incidents {
    fn render(&self, out: &mut Text) {
        if self.incidents.is_empty() {
            say!(out, "no incidents");
            return;
        }
        let rows: Vec<[String; 6]> = self
            .incidents
            .iter()
            .map(|i| {
                [
                    i.id.clone(),
                    i.kind.clone(),
                    i.severity.clone(),
                    i.status.clone(),
                    format!("{} at {}", i.declared_by, i.declared_at),
                    i.review_due.to_string(),
                ]
            })
            .collect();
        out.table(
            [
                "INCIDENT",
                "TYPE",
                "SEVERITY",
                "STATUS",
                "DECLARED",
                "REVIEW DUE",
            ],
            &rows,
        );
        cut_note(out, self.incidents.len(), self.total, "incidents");
    }
}

/// `safemode requests`.
#[derive(Serialize)]
pub struct Requests {
    requests: Vec<Request>,
    total: u32,
    /// Whether decided ones were asked for too (`--all`).
    #[serde(skip)]
    all: bool,
}

impl Requests {
    /// The answer to `safemode requests`, `all` when `--all` was given.
    pub fn new(response: proto::ListRequestsResponse, all: bool) -> Self {
        Requests {
            requests: response.requests.into_iter().map(Request::from).collect(),
            total: response.total,
            all,
        }
    }
}

impl View for Requests {
    fn render(&self, out: &mut Text) {
        if self.requests.is_empty() {
            if self.all {
                say!(out, "no requests in this namespace");
            } else {
                say!(out, "no requests waiting for an approver");
            }
            return;
        }
        let rows: Vec<[String; 5]> = self
            .requests
            .iter()
            .map(|r| {
                [
                    r.id.clone(),
                    r.status_text(),
                    r.requested_by.clone(),
                    r.expires_at.to_string(),
                    r.summary.clone(),
                ]
            })
            .collect();
        out.table(
            ["REQUEST", "STATUS", "REQUESTED BY", "EXPIRES", "WILL"],
            &rows,
        );
        cut_note(out, self.requests.len(), self.total, "requests");
    }
}

/// `safemode approve`.
#[derive(Serialize)]
pub struct Approved {
    request: Request,
    revision: i64,
}

impl From<proto::ApproveResponse> for Approved {
    fn from(response: proto::ApproveResponse) -> Self {
        Approved {
            request: response.request.unwrap_or_default().into(),
            revision: response.revision,
        }
    }
}

impl View for Approved {
    fn render(&self, out: &mut Text) {
        let request = &self.request;
        say!(
            out,
            "approved {} (requested by {}): {}",
            request.id,
            request.requested_by,
            request.summary
        );
        at_revision(out, &request.namespace, self.revision);
    }
}

/// `safemode withdraw`.
#[derive(Serialize)]
pub struct Withdrawn {
    request: Request,
    revision: i64,
}

impl From<proto::WithdrawResponse> for Withdrawn {
    fn from(response: proto::WithdrawResponse) -> Self {
        Withdrawn {
            request: response.request.unwrap_or_default().into(),
            revision: response.revision,
        }
    }
}

impl View for Withdrawn {
    fn render(&self, out: &mut Text) {
        let request = &self.request;
        say!(
            out,
            "withdrew {} (requested by {}); nothing of it was done: {}",
            request.id,
            request.requested_by,
            request.summary
        );
        at_revision(out, &request.namespace, self.revision);
    }
}

/// `safemode audit`: the log, and what verification found. JSON is the
/// whole report as one document; text is printed page by page with
/// [`Audit::rows`] and ends with [`Audit::summary`], so the log is never
/// held whole.
#[derive(Serialize)]
pub struct Audit {
    entries: Vec<AuditEntry>,
    verified: bool,
    problems: Vec<String>,
    problems_total: u64,
    /// The newest entry, to keep somewhere else; absent for an empty log.
    head: Option<AuditHead>,
}

#[derive(Serialize)]
struct AuditEntry {
    seq: u64,
    at: Time,
    action: String,
    principal: String,
    roles: Vec<String>,
    namespace: Option<String>,
    reason: Option<String>,
    incident_id: Option<String>,
    request_id: Option<String>,
    activation_ids: Vec<String>,
    detail: String,
    revision: i64,
    state_digest: Option<String>,
    prev_hash: String,
    hash: String,
    key_id: Option<String>,
    signature: Option<String>,
}

#[derive(Serialize)]
struct AuditHead {
    seq: u64,
    hash: String,
}

impl From<proto::GetAuditResponse> for Audit {
    fn from(response: proto::GetAuditResponse) -> Self {
        Audit {
            entries: response
                .entries
                .into_iter()
                .map(|e| AuditEntry {
                    seq: e.seq,
                    at: e.at.into(),
                    action: e.action,
                    principal: e.principal,
                    roles: e.roles,
                    namespace: given(e.namespace),
                    reason: given(e.reason),
                    incident_id: given(e.incident_id),
                    request_id: given(e.request_id),
                    activation_ids: e.activation_ids,
                    detail: e.detail,
                    revision: e.revision,
                    state_digest: given(e.state_digest),
                    prev_hash: e.prev_hash,
                    hash: e.hash,
                    key_id: given(e.key_id),
                    signature: given(e.signature),
                })
                .collect(),
            verified: response.verified,
            problems: response.problems,
            problems_total: response.problems_total,
            head: (response.head_seq > 0).then_some(AuditHead {
                seq: response.head_seq,
                hash: response.head_hash,
            }),
        }
    }
}

impl Audit {
    /// The entries of a later page, after this one's.
    pub fn extend(&mut self, page: Audit) {
        self.entries.extend(page.entries);
    }

    /// How many problems verification found, listed or not.
    pub fn problems_total(&self) -> u64 {
        self.problems_total
    }

    /// This page of the log as table rows (text), with the header when it
    /// is the first.
    pub fn rows(&self, header: bool) -> String {
        let mut out = Text::default();
        self.render_rows(&mut out, header);
        out.into_string()
    }

    /// What verification found (text): the head to keep, and each problem.
    pub fn summary(&self) -> String {
        let mut out = Text::default();
        self.render_summary(&mut out);
        out.into_string()
    }

    fn render_rows(&self, out: &mut Text, header: bool) {
        let rows: Vec<[String; 7]> = self
            .entries
            .iter()
            .map(|e| {
                [
                    e.seq.to_string(),
                    e.at.to_string(),
                    e.action.clone(),
                    e.namespace.clone().unwrap_or_else(|| "-".into()),
                    if e.roles.is_empty() {
                        e.principal.clone()
                    } else {
                        format!("{} ({})", e.principal, e.roles.join(","))
                    },
                    e.revision.to_string(),
                    [Some(e.detail.as_str()), e.reason.as_deref()]
                        .into_iter()
                        .flatten()
                        .filter(|t| !t.is_empty())
                        .collect::<Vec<_>>()
                        .join(" / reason: "),
                ]
            })
            .collect();
        out.columns(
            [
                "SEQ",
                "AT",
                "ACTION",
                "NAMESPACE",
                "BY",
                "REVISION",
                "DETAIL",
            ],
            &rows,
            header,
        );
    }

    fn render_summary(&self, out: &mut Text) {
        if !self.verified {
            return;
        }
        say!(out);
        if let Some(head) = &self.head {
            // Kept somewhere else, it shows later whether the whole
            // store was rewritten.
            say!(out, "head: entry {} with hash {}", head.seq, head.hash);
        }
        if self.problems.is_empty() {
            say!(
                out,
                "verified: the hash chain is intact, every entry is signed by a trusted key, and the activations are those the log committed to"
            );
        } else {
            for problem in &self.problems {
                say!(out, "TAMPERED: {problem}");
            }
            let listed = self.problems.len() as u64;
            if self.problems_total > listed {
                say!(
                    out,
                    "TAMPERED: and {} more problem(s) not listed",
                    self.problems_total - listed
                );
            }
        }
    }
}

impl View for Audit {
    fn render(&self, out: &mut Text) {
        self.render_rows(out, true);
        self.render_summary(out);
    }
}

/// `safemode runbook list`.
#[derive(Serialize)]
pub struct Runbooks {
    runbooks: Vec<Runbook>,
}

#[derive(Serialize)]
struct Runbook {
    name: String,
    title: String,
    summary: String,
    owners: Vec<String>,
    lift_requires_approval: bool,
    review_interval_seconds: u64,
    exit_criteria: Vec<String>,
    stages: Vec<RunbookStage>,
}

#[derive(Serialize)]
struct RunbookStage {
    severity: String,
    modes: Vec<String>,
    expectations: u32,
    apply_within_ms: u64,
}

impl From<proto::ListRunbooksResponse> for Runbooks {
    fn from(response: proto::ListRunbooksResponse) -> Self {
        Runbooks {
            runbooks: response
                .runbooks
                .into_iter()
                .map(|r| Runbook {
                    name: r.name,
                    title: r.title,
                    summary: r.summary,
                    owners: r.owners,
                    lift_requires_approval: r.lift_requires_approval,
                    review_interval_seconds: r.review_interval_seconds,
                    exit_criteria: r.exit_criteria,
                    stages: r
                        .stages
                        .into_iter()
                        .map(|s| RunbookStage {
                            severity: s.severity,
                            modes: s.modes,
                            expectations: s.expectations,
                            apply_within_ms: s.apply_within_ms,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl View for Runbooks {
    fn render(&self, out: &mut Text) {
        for r in &self.runbooks {
            say!(out, "{}: {}", r.name, r.title);
            for s in &r.stages {
                say!(out, "  {}: {}", s.severity, s.modes.join(", "));
            }
        }
    }
}

/// `safemode runbook lint`: how many files are clean, or every error.
#[derive(Serialize)]
pub struct Lint {
    /// Present when every file is clean.
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<usize>,
    errors: Vec<String>,
}

impl From<&Result<usize, Vec<String>>> for Lint {
    fn from(result: &Result<usize, Vec<String>>) -> Self {
        match result {
            Ok(files) => Lint {
                files: Some(*files),
                errors: Vec::new(),
            },
            Err(errors) => Lint {
                files: None,
                errors: errors.clone(),
            },
        }
    }
}

impl View for Lint {
    fn render(&self, out: &mut Text) {
        match self.files {
            Some(files) => say!(out, "{} ok", count(files, "file")),
            None => {
                for error in &self.errors {
                    say!(out, "{error}");
                }
            }
        }
    }
}

/// `safemode token create`: the token, shown only now, and the line for
/// the server's tokens file.
#[derive(Serialize)]
pub struct Token<'a> {
    principal: &'a str,
    roles: Vec<&'a str>,
    token: &'a str,
    line: &'a str,
}

impl<'a> Token<'a> {
    pub fn new(roles: &'a [Role], new: &'a NewToken) -> Self {
        Token {
            principal: &new.principal,
            roles: roles.iter().map(|r| r.as_str()).collect(),
            token: &new.token,
            line: &new.line,
        }
    }
}

impl View for Token<'_> {
    fn render(&self, out: &mut Text) {
        say!(
            out,
            "token for {} ({}), shown only now:",
            self.principal,
            self.roles.join(", ")
        );
        say!(out, "  {}", self.token);
        say!(
            out,
            "add this line to the server's tokens file (it holds only the hash):"
        );
        say!(out, "{}", self.line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let shown = single_line(input).to_string();
        assert_eq!(shown, expected, "single_line({input:?})");
        // Nothing that breaks, reorders or hides text is left.
        assert!(!shown.chars().any(must_escape_but_backslash), "{shown:?}");
    }

    fn must_escape_but_backslash(c: char) -> bool {
        c != '\\' && must_escape(c)
    }

    #[test]
    fn text_is_shown_on_one_line_with_hidden_characters_visible() {
        let cases = [
            ("", ""),
            ("plain reason, INC-4211", "plain reason, INC-4211"),
            ("ünïcödé stays: 日本語 ✓", "ünïcödé stays: 日本語 ✓"),
            ("two\nlines", "two\\nlines"),
            (
                "x\nverified: the hash chain is intact",
                "x\\nverified: the hash chain is intact",
            ),
            ("cr\roverwrite", "cr\\roverwrite"),
            ("crlf\r\n", "crlf\\r\\n"),
            ("tab\there", "tab\\there"),
            ("nul\0", "nul\\u{0}"),
            ("escape \u{1b}[2J clears", "escape \\u{1b}[2J clears"),
            ("del\u{7f}", "del\\u{7f}"),
            ("c1 \u{85} next line", "c1 \\u{85} next line"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("rtl \u{202e}txt.exe", "rtl \\u{202e}txt.exe"),
            (
                "\u{202a}\u{202b}\u{202c}\u{202d}",
                "\\u{202a}\\u{202b}\\u{202c}\\u{202d}",
            ),
            (
                "\u{2066}\u{2067}\u{2068}\u{2069}",
                "\\u{2066}\\u{2067}\\u{2068}\\u{2069}",
            ),
            ("\u{200e}\u{200f}\u{61c}", "\\u{200e}\\u{200f}\\u{61c}"),
            ("line\u{2028}para\u{2029}", "line\\u{2028}para\\u{2029}"),
            (
                "zero\u{200b}width\u{200c}\u{200d}\u{2060}\u{feff}",
                "zero\\u{200b}width\\u{200c}\\u{200d}\\u{2060}\\u{feff}",
            ),
            ("soft\u{ad}hyphen", "soft\\u{ad}hyphen"),
            ("tag\u{e0041}\u{e007f}", "tag\\u{e0041}\\u{e007f}"),
            // A backslash is escaped too, so text cannot pretend to be an
            // escape: "\n" typed as two characters is not a newline shown.
            ("a\\nb", "a\\\\nb"),
            ("\\u{202e}", "\\\\u{202e}"),
            ("\\", "\\\\"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn a_table_keeps_one_row_per_line_and_its_columns_aligned() {
        let mut out = Text::default();
        out.table(
            ["ID", "REASON"],
            &[
                ["a\u{202e}b".to_string(), "x\nverified: forged".to_string()],
                ["c".to_string(), "fine".to_string()],
            ],
        );
        assert_eq!(
            out.into_string(),
            "ID          REASON\n\
             a\\u{202e}b  x\\nverified: forged\n\
             c           fine\n"
        );
    }

    #[test]
    fn say_writes_one_line_whatever_it_is_given() {
        let mut out = Text::default();
        let reason = "ok\nTAMPERED: nothing\u{2028}";
        say!(out, "reason: {reason}");
        assert_eq!(
            out.into_string(),
            "reason: ok\\nTAMPERED: nothing\\u{2028}\n"
        );
    }
}

/// `safemode signal`.
#[derive(Serialize)]
pub struct Signalled {
    pub signal: String,
    pub count: u64,
    pub channel: String,
    pub namespace: String,
}

impl View for Signalled {
    fn render(&self, out: &mut Text) {
        say!(
            out,
            "reported {} {} on {} in {}",
            self.signal,
            self.count,
            self.channel,
            self.namespace
        );
    }
}

/// `safemode insights`.
#[derive(Serialize)]
pub struct Insights {
    namespace: String,
    revision: i64,
    window_seconds: u32,
    decisions: u64,
    static_map: Vec<InsightActionMap>,
    live: Vec<InsightLive>,
    soft_downtime: Vec<InsightSoftDowntime>,
    dead_ends: Vec<InsightDeadEnd>,
    signals: Vec<InsightSignal>,
    /// Reports refused or cut short in the window, and by whom.
    refused_reports: u64,
    refused: Vec<InsightRefused>,
    replicas: Vec<ReplicaAnswer>,
    partial: bool,
    problems: Vec<String>,
}

#[derive(Serialize)]
struct InsightRefused {
    principal: String,
    channel: String,
    /// Empty: the principal's other subscribers, beyond those named.
    subscriber: String,
    why: String,
    count: u64,
}

#[derive(Serialize)]
struct InsightActionMap {
    action: String,
    /// Weakest first.
    channels: Vec<InsightChannelOutcome>,
    differs: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    easiest_channel: String,
}

#[derive(Serialize)]
struct InsightChannelOutcome {
    channel: String,
    effect: String,
    detail: String,
}

#[derive(Serialize)]
struct InsightLive {
    action: String,
    context: String,
    total: u64,
    across_channels: bool,
    outcomes: Vec<InsightOutcome>,
}

#[derive(Serialize)]
struct InsightOutcome {
    channel: String,
    revision: i64,
    effect: String,
    count: u64,
    stale: bool,
    failed_closed: bool,
    old_revision: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    subscribers: Vec<String>,
}

#[derive(Serialize)]
struct InsightSoftDowntime {
    channel: String,
    kind: String,
    detail: String,
}

#[derive(Serialize)]
struct InsightDeadEnd {
    action: String,
    channels: Vec<String>,
}

#[derive(Serialize)]
struct InsightSignal {
    channel: String,
    name: String,
    count: u64,
}

impl From<proto::GetInsightsResponse> for Insights {
    fn from(r: proto::GetInsightsResponse) -> Self {
        Insights {
            namespace: r.namespace,
            revision: r.revision,
            window_seconds: r.window_seconds,
            decisions: r.decisions,
            static_map: r
                .static_map
                .into_iter()
                .map(|m| InsightActionMap {
                    action: m.action,
                    channels: m
                        .channels
                        .into_iter()
                        .map(|c| InsightChannelOutcome {
                            channel: c.channel,
                            effect: c.effect,
                            detail: c.detail,
                        })
                        .collect(),
                    differs: m.differs,
                    easiest_channel: m.easiest_channel,
                })
                .collect(),
            live: r
                .live
                .into_iter()
                .map(|d| InsightLive {
                    action: d.action,
                    context: d.context_text,
                    total: d.total,
                    across_channels: d.across_channels,
                    outcomes: d
                        .outcomes
                        .into_iter()
                        .map(|o| InsightOutcome {
                            channel: o.channel,
                            revision: o.revision,
                            effect: o.effect,
                            count: o.count,
                            stale: o.stale,
                            failed_closed: o.failed_closed,
                            old_revision: o.old_revision,
                            subscribers: o
                                .subscriber
                                .split(", ")
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            soft_downtime: r
                .soft_downtime
                .into_iter()
                .map(|s| InsightSoftDowntime {
                    channel: s.channel,
                    kind: s.kind,
                    detail: s.detail,
                })
                .collect(),
            dead_ends: r
                .dead_ends
                .into_iter()
                .map(|d| InsightDeadEnd {
                    action: d.action,
                    channels: d.channels,
                })
                .collect(),
            signals: r
                .signals
                .into_iter()
                .map(|s| InsightSignal {
                    channel: s.channel,
                    name: s.name,
                    count: s.count,
                })
                .collect(),
            refused_reports: r.refused_reports,
            refused: r
                .refused
                .into_iter()
                .map(|x| InsightRefused {
                    principal: x.principal,
                    channel: x.channel,
                    subscriber: x.subscriber,
                    why: x.why,
                    count: x.count,
                })
                .collect(),
            replicas: r.replicas.into_iter().map(ReplicaAnswer::from).collect(),
            partial: r.partial,
            problems: r.problems,
        }
    }
}

impl View for Insights {
    fn render(&self, out: &mut Text) {
        let window = if self.window_seconds == 60 {
            "1m"
        } else {
            "15m"
        };
        let partial = if self.partial { "PARTIAL: " } else { "" };
        say!(
            out,
            "{partial}insights for {} at revision {}, last {window}: {} decisions reported",
            self.namespace,
            self.revision,
            self.decisions
        );
        say!(out);
        say!(
            out,
            "INCONSISTENCY MAP (an unverified customer, weakest channel first)"
        );
        for m in &self.static_map {
            if !m.differs {
                let effect = m.channels.first().map_or("", |c| c.effect.as_str());
                say!(out, "  {}: {effect} on every channel", m.action);
                continue;
            }
            // The easiest channel, and every channel tied with it.
            let easiest = m
                .channels
                .iter()
                .find(|c| c.channel == m.easiest_channel)
                .map(|c| c.effect.as_str());
            let channels: Vec<String> = m
                .channels
                .iter()
                .map(|c| {
                    if Some(c.effect.as_str()) == easiest {
                        format!("{} {} ← easiest path", c.channel, c.effect.to_uppercase())
                    } else {
                        format!("{} {}", c.channel, c.effect)
                    }
                })
                .collect();
            say!(out, "  {}: {}", m.action, channels.join(", "));
        }
        say!(out);
        say!(
            out,
            "LIVE (the same action and context decided differently, most decided first)"
        );
        if self.live.is_empty() {
            say!(out, "  none in the window");
        }
        for d in &self.live {
            say!(out, "  {} ({}): {} decisions", d.action, d.context, d.total);
            for o in &d.outcomes {
                let mut notes = Vec::new();
                if o.old_revision {
                    notes.push(format!("OLD revision {}", o.revision));
                }
                if o.failed_closed {
                    notes.push("FAILING CLOSED".to_string());
                } else if o.stale {
                    notes.push("STALE".to_string());
                }
                if !o.subscribers.is_empty() {
                    notes.push(o.subscribers.join(", "));
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                };
                say!(out, "    {} {} ×{}{notes}", o.channel, o.effect, o.count);
            }
        }
        say!(out);
        say!(out, "SOFT DOWNTIME");
        if self.soft_downtime.is_empty() {
            say!(out, "  none seen");
        }
        for s in &self.soft_downtime {
            say!(
                out,
                "  {} {}: {}",
                s.channel,
                s.kind.to_uppercase(),
                s.detail
            );
        }
        say!(out);
        say!(out, "DEAD ENDS (no path on any channel)");
        if self.dead_ends.is_empty() {
            say!(out, "  none");
        }
        for d in &self.dead_ends {
            say!(out, "  {}: {}", d.action, d.channels.join(", "));
        }
        if !self.signals.is_empty() {
            say!(out);
            say!(out, "SIGNALS");
            for s in &self.signals {
                say!(out, "  {} {} {}", s.channel, s.name, s.count);
            }
        }
        if self.refused_reports > 0 {
            say!(out);
            say!(
                out,
                "REFUSED REPORTS: {} in the window, by subscriber and why",
                self.refused_reports
            );
            for r in &self.refused {
                let who = if r.subscriber.is_empty() {
                    format!("other subscribers of {}", r.principal)
                } else {
                    format!("{} ({})", r.subscriber, r.principal)
                };
                say!(
                    out,
                    "  {} {who} {} ×{}",
                    r.channel,
                    r.why.replace('_', " "),
                    r.count
                );
            }
        }
        for problem in &self.problems {
            say!(out, "PROBLEM: {problem}");
        }
    }
}

// === proposals ===

/// One early-warning proposal.
#[derive(Serialize)]
struct Proposal {
    id: String,
    namespace: String,
    #[serde(rename = "type")]
    kind: String,
    severity: String,
    /// "declare credential-stuffing sev3?"
    question: String,
    /// trigger or external.
    source: String,
    /// The evidence in one line.
    evidence: String,
    signal: Option<String>,
    count: Option<u64>,
    above: Option<u64>,
    within_seconds: Option<u32>,
    channels: Vec<ProposalChannel>,
    partial: bool,
    summary: Option<String>,
    raised_by: String,
    raised_at: Time,
    /// open, accepted or dismissed.
    state: String,
    closed_by: Option<String>,
    closed_at: Time,
    closed_reason: Option<String>,
    incident_id: Option<String>,
}

#[derive(Serialize)]
struct ProposalChannel {
    channel: String,
    count: u64,
}

impl From<proto::Proposal> for Proposal {
    fn from(p: proto::Proposal) -> Self {
        let trigger = p.source == "trigger";
        Proposal {
            id: p.id,
            namespace: p.namespace,
            kind: p.r#type,
            severity: p.severity,
            question: p.question,
            source: p.source,
            evidence: p.evidence,
            signal: given(p.signal),
            count: trigger.then_some(p.count),
            above: trigger.then_some(p.above),
            within_seconds: trigger.then_some(p.within_seconds),
            channels: p
                .channels
                .into_iter()
                .map(|c| ProposalChannel {
                    channel: c.channel,
                    count: c.count,
                })
                .collect(),
            partial: p.partial,
            summary: given(p.summary),
            raised_by: p.raised_by,
            raised_at: p.raised_at.into(),
            state: p.state,
            closed_by: given(p.closed_by),
            closed_at: p.closed_at.into(),
            closed_reason: given(p.closed_reason),
            incident_id: given(p.incident_id),
        }
    }
}

impl Proposal {
    /// "open", "accepted by bob (inc_x)", "dismissed by bob".
    fn state_text(&self) -> String {
        match (&self.closed_by, &self.incident_id) {
            (Some(by), Some(incident)) => format!("{} by {by} ({incident})", self.state),
            (Some(by), None) => format!("{} by {by}", self.state),
            _ => self.state.clone(),
        }
    }
}

/// `safemode proposals`.
#[derive(Serialize)]
pub struct Proposals {
    namespace: String,
    proposals: Vec<Proposal>,
    /// Whether closed ones were asked for too (`--all`).
    #[serde(skip)]
    all: bool,
}

impl Proposals {
    /// The answer to `safemode proposals` in `namespace`.
    pub fn new(namespace: String, response: proto::ListProposalsResponse, all: bool) -> Self {
        Proposals {
            namespace,
            proposals: response.proposals.into_iter().map(Proposal::from).collect(),
            all,
        }
    }
}

impl View for Proposals {
    fn render(&self, out: &mut Text) {
        if self.proposals.is_empty() {
            if self.all {
                say!(out, "no proposals in namespace {}", self.namespace);
            } else {
                say!(out, "no open proposals in namespace {}", self.namespace);
            }
            return;
        }
        let rows: Vec<[String; 6]> = self
            .proposals
            .iter()
            .map(|p| {
                [
                    p.id.clone(),
                    p.state_text(),
                    p.question.clone(),
                    p.raised_by.clone(),
                    p.raised_at.to_string(),
                    p.evidence.clone(),
                ]
            })
            .collect();
        out.table(
            [
                "PROPOSAL",
                "STATE",
                "PROPOSES",
                "RAISED BY",
                "RAISED AT",
                "EVIDENCE",
            ],
            &rows,
        );
        if self.proposals.iter().any(|p| p.state == "open") {
            say!(
                out,
                "accept (declares the incident): safemode proposals accept ID --reason R; dismiss: safemode proposals dismiss ID --reason R"
            );
        }
    }
}

/// `safemode proposals accept`: the incident it declared.
#[derive(Serialize)]
pub struct ProposalAccepted {
    proposal_id: String,
    #[serde(flatten)]
    change: IncidentChanged,
}

impl ProposalAccepted {
    pub fn new(proposal_id: String, change: proto::IncidentChange) -> Self {
        ProposalAccepted {
            proposal_id,
            change: IncidentChanged::new("declared", change),
        }
    }
}

impl View for ProposalAccepted {
    fn render(&self, out: &mut Text) {
        say!(out, "accepted proposal {}", self.proposal_id);
        self.change.render(out);
    }
}

/// `safemode proposals dismiss`.
#[derive(Serialize)]
pub struct ProposalDismissed {
    proposal: Proposal,
    revision: i64,
}

impl From<proto::DismissProposalResponse> for ProposalDismissed {
    fn from(response: proto::DismissProposalResponse) -> Self {
        ProposalDismissed {
            proposal: response.proposal.unwrap_or_default().into(),
            revision: response.revision,
        }
    }
}

impl View for ProposalDismissed {
    fn render(&self, out: &mut Text) {
        let p = &self.proposal;
        say!(
            out,
            "dismissed {} ({}); nothing was declared: {}",
            p.id,
            p.question,
            p.closed_reason.as_deref().unwrap_or_default()
        );
    }
}

/// `safemode proposals raise`.
#[derive(Serialize)]
pub struct ProposalRaised {
    proposal: Proposal,
    created: bool,
}

impl From<proto::RaiseProposalResponse> for ProposalRaised {
    fn from(response: proto::RaiseProposalResponse) -> Self {
        ProposalRaised {
            proposal: response.proposal.unwrap_or_default().into(),
            created: response.created,
        }
    }
}

impl View for ProposalRaised {
    fn render(&self, out: &mut Text) {
        let p = &self.proposal;
        if self.created {
            say!(out, "raised {}: {} {}", p.id, p.question, p.evidence);
        } else {
            say!(
                out,
                "{} is already open for this: {} {}",
                p.id,
                p.question,
                p.evidence
            );
        }
        say!(
            out,
            "nothing is declared until a commander accepts it (safemode proposals accept {} --reason R)",
            p.id
        );
    }
}
