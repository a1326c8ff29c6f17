//! Property-based fuzzing of everything safemode reads that someone else
//! wrote: mode files, runbook files, the tokens file, the last-known-good
//! file and snapshots off the wire (issue 10).
//!
//! Each reader gets arbitrary input (any text, any bytes) and
//! structure-aware input: documents built from the real grammar, and the
//! real files (the shipped modes and runbooks, a tokens file made by
//! `create_token`, a last-known-good file and a snapshot from a real
//! controller) put through mutations that keep them close to valid, where
//! the bugs live. The properties:
//!
//! - no input makes a reader panic;
//! - every error is located: a YAML reader's error carries file, line and
//!   column, and the position is inside the text; an error without a
//!   position (a file that cannot be read) names the file; a last-known-good
//!   or snapshot error names what is wrong;
//! - what is valid reads back as written (a generated mode, runbook or
//!   tokens file means what was generated; a mutated last-known-good file is
//!   either refused or yields exactly the policy that was saved; a snapshot
//!   survives its encoding), and a policy that is accepted can be decided
//!   with.
//!
//! Cases are bounded in code ([`config`]), so CI needs no environment
//! variable and the whole module runs in seconds in a debug build.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use safemode_client::{PolicySnapshot, Subscriber, SubscriberConfig, read_last_known_good};
use safemode_controller::auth::{ROLES, Role, Tokens, TokensError, TokensFile, create_token};
use safemode_policy::catalog::{CatalogError, load_modes_dir, load_runbooks_dir, standard_modes};
use safemode_policy::names::{ACTIONS, CHANNELS, METHODS};
use safemode_policy::{
    Action, Channel, ChannelSet, Context, EffectKind, Expectations, ModeCatalog, Namespace,
    parse_mode, parse_runbook, parse_runbook_checking,
};
use safemode_wire::{self as wire, proto};

use crate::support::{RawSubscriber, TestServer, wait_for};

/// Cases per property: enough to find the shallow bugs on every run,
/// bounded so that the module stays fast in CI.
fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// For properties that write a real file per case.
fn file_config() -> ProptestConfig {
    ProptestConfig::with_cases(64)
}

// === Where an error points ===

/// Checks that 1-based `line` and `column` point into `text` (or just past
/// its end, where "unexpected end of input" is). Lines end at `\n`, `\r\n`
/// or `\r`, as in YAML.
fn check_position(text: &str, line: u64, column: u64) -> Result<(), String> {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = normalized.split('\n').collect();
    if line == 0 || column == 0 {
        return Err(format!("position {line}:{column} is not 1-based"));
    }
    let Some(at) = lines.get(line as usize - 1) else {
        return Err(format!(
            "line {line} is past the end of a {}-line text",
            lines.len()
        ));
    };
    let width = at.chars().count() as u64;
    if column > width + 1 {
        return Err(format!(
            "column {column} is past the end of line {line} ({width} characters)"
        ));
    }
    Ok(())
}

/// Whether a message leaves its position to the error's own file:line:column
/// (a second one, in the YAML library's words, only confuses).
fn once_placed(message: &str) -> bool {
    !message.starts_with("line ") && !message.contains(" column ") && !message.contains('\n')
}

fn check_mode_file(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse_mode("fuzz/m.yaml", "m", text) {
        prop_assert_eq!(&e.file, "fuzz/m.yaml");
        prop_assert!(!e.message.trim().is_empty(), "empty message: {}", e);
        prop_assert!(once_placed(&e.message), "{}", e);
        check_position(text, e.line.into(), e.column.into())
            .map_err(|why| TestCaseError::fail(format!("{why}: {e}")))?;
        prop_assert!(e.to_string().starts_with("fuzz/m.yaml:"));
    }
    Ok(())
}

fn catalog() -> &'static ModeCatalog {
    static MODES: OnceLock<ModeCatalog> = OnceLock::new();
    MODES.get_or_init(standard_modes)
}

fn check_runbook_file(text: &str) -> Result<(), TestCaseError> {
    for expectations in [Expectations::MustHold, Expectations::CheckedByDrill] {
        let parsed = parse_runbook_checking("fuzz/r.yaml", "r", text, catalog(), expectations);
        if let Err(errors) = parsed {
            prop_assert!(!errors.is_empty(), "refused without an error");
            for e in errors {
                prop_assert_eq!(&e.file, "fuzz/r.yaml");
                prop_assert!(!e.message.trim().is_empty(), "empty message: {}", e);
                prop_assert!(once_placed(&e.message), "{}", e);
                check_position(text, e.line.into(), e.column.into())
                    .map_err(|why| TestCaseError::fail(format!("{why}: {e}")))?;
            }
        }
    }
    Ok(())
}

fn check_tokens_file(text: &str) -> Result<(), TestCaseError> {
    match Tokens::parse("fuzz/tokens.yaml", text) {
        Ok(_) => {}
        Err(TokensError::Invalid {
            file,
            line,
            column,
            message,
        }) => {
            prop_assert_eq!(file, "fuzz/tokens.yaml");
            prop_assert!(!message.trim().is_empty());
            prop_assert!(once_placed(&message), "{}", message);
            check_position(text, line, column)
                .map_err(|why| TestCaseError::fail(format!("{why}: {message}")))?;
        }
        Err(other) => prop_assert!(false, "parsing text gave {other}"),
    }
    Ok(())
}

// === Mutations: near-valid documents ===

/// Values a YAML document can hold in place of another: every kind of
/// scalar and collection, anchors, tags, and values of the real grammar
/// that are wrong where they land.
const VALUES: &[&str] = &[
    "",
    "~",
    "null",
    "true",
    "no",
    "0",
    "-1",
    "1.5",
    "1e999",
    "-0.0",
    ".nan",
    ".inf",
    "99999999999999999999999",
    "0x1F",
    "[]",
    "{}",
    "[a, [b, {c: d}]]",
    "{a: 1, a: 2}",
    "'quoted'",
    "\"unterminated",
    "'unterminated",
    "|",
    ">-",
    "&anchor value",
    "*anchor",
    "*undefined",
    "!!binary aGk=",
    "!custom x",
    "!!int x",
    "? key",
    "- item",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\x\"",
    "30m",
    "0s",
    "-5m",
    "1y",
    "P1D",
    "*",
    "account.*",
    "account.password_reset",
    "deny",
    "allow",
    "read_only",
    "throttle",
    "{deny: {alternative: x}}",
    "{deny: ~}",
    "{allow: {x: 1}}",
    "{throttle: {max: 0, window: 1h}}",
    "{throttle: {max: 4294967296, window: 1h}}",
    "{step_up: {min_confidence: 2, methods: [], max_attempts: 0, escalate_to: x}}",
    "{route: {to: [web]}}",
    "{route: {to: []}}",
    "{review: {queue: \"\"}}",
    "{review: {queue: a}, deny: ~}",
    "sev0",
    "sev1",
    "sev4",
    "[freeze-credential-changes, freeze-credential-changes]",
    "{mode: bots-faq-only, channels: [web]}",
    "[{channel: web, action: order.view, effect: allow}]",
    "\u{202e}",
    "\t",
    "%",
    "@",
    "`",
    "a: b: c",
    "<<: *x",
];

/// Keys of every grammar here, and some that are not.
const KEYS: &[&str] = &[
    "title",
    "summary",
    "rules",
    "channels",
    "actions",
    "except",
    "when",
    "effect",
    "customer_message",
    "agent_script",
    "customer_notice",
    "lift_requires_approval",
    "amount_over",
    "handoff_from_bot",
    "bot_flags_any",
    "max",
    "window",
    "min_confidence",
    "methods",
    "max_attempts",
    "escalate_to",
    "queue",
    "to",
    "alternative",
    "owners",
    "review_interval",
    "exit_criteria",
    "drill",
    "apply_within",
    "stages",
    "severity",
    "modes",
    "mode",
    "expect",
    "channel",
    "action",
    "confidence",
    "attempts",
    "amount",
    "principal",
    "roles",
    "sha256",
    "<<",
    "unknown_field",
    "\"quoted key\"",
    "? complex",
    "[a]",
    "",
];

/// Whole lines to insert.
const LINES: &[&str] = &[
    "---",
    "...",
    "%YAML 1.2",
    "%TAG ! tag:example.com,2000:",
    "<<: *base",
    "base: &base {title: x}",
    "- ",
    "-",
    "  - {channel: web, action: account.password_reset, effect: deny}",
    "  - channels: [\"*\"]",
    "    effect: deny",
    "# a comment",
    "\t",
    "title: again",
    "&a [*a]",
    "? [a, b]\n: c",
    "key: |\n  block\n text",
    "- {principal: x, roles: [admin], sha256: 0000000000000000000000000000000000000000000000000000000000000000}",
];

/// One edit of a document, positions as indices into whatever is there.
#[derive(Clone, Debug)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// Adds (positive) or removes (negative) leading spaces.
    Indent(Index, i8),
    /// Replaces what follows the line's first `: ` (or `- `).
    ReplaceValue(Index, String),
    /// Replaces what precedes the line's first `:`.
    ReplaceKey(Index, String),
    InsertLine(Index, String),
    /// Inserts text at a character of a line.
    InsertText(Index, Index, String),
    /// Cuts the document at a character.
    Truncate(Index),
    /// Turns line ends into `\r\n` or `\r`.
    LineEnds(bool),
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(VALUES).prop_map(str::to_string),
        1 => "\\PC{0,12}",
        1 => ".{0,6}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => (any::<Index>(), -4i8..=4).prop_map(|(i, n)| Mutation::Indent(i, n)),
        3 => (any::<Index>(), scalar()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        1 => (any::<Index>(), prop::sample::select(KEYS)).prop_map(|(i, k)| Mutation::ReplaceKey(i, k.into())),
        1 => (any::<Index>(), prop_oneof![prop::sample::select(LINES).prop_map(str::to_string), scalar()])
            .prop_map(|(i, l)| Mutation::InsertLine(i, l)),
        1 => (any::<Index>(), any::<Index>(), scalar()).prop_map(|(i, at, t)| Mutation::InsertText(i, at, t)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => any::<bool>().prop_map(Mutation::LineEnds),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut crlf = None;
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::DeleteLine(i) => {
                lines.remove(i.index(n));
            }
            Mutation::DuplicateLine(i) => {
                let i = i.index(n);
                lines.insert(i, lines[i].clone());
            }
            Mutation::SwapLines(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::Indent(i, by) => {
                let line = &mut lines[i.index(n)];
                if *by >= 0 {
                    line.insert_str(0, &" ".repeat(*by as usize));
                } else {
                    let strip = line
                        .chars()
                        .take(by.unsigned_abs() as usize)
                        .take_while(|c| *c == ' ')
                        .count();
                    line.drain(..strip);
                }
            }
            Mutation::ReplaceValue(i, value) => {
                let line = &mut lines[i.index(n)];
                let at = line
                    .find(": ")
                    .map(|at| at + 2)
                    .or_else(|| line.find("- ").map(|at| at + 2));
                if let Some(at) = at {
                    line.replace_range(at.., value);
                } else {
                    line.push_str(": ");
                    line.push_str(value);
                }
            }
            Mutation::ReplaceKey(i, key) => {
                let line = &mut lines[i.index(n)];
                let indent = line.len() - line.trim_start_matches([' ', '-']).len();
                if let Some(colon) = line.find(':').filter(|c| *c >= indent) {
                    line.replace_range(indent..colon, key);
                }
            }
            Mutation::InsertLine(i, line) => lines.insert(i.index(n + 1), line.clone()),
            Mutation::InsertText(i, at, text) => {
                let line = &mut lines[i.index(n)];
                let chars = line.chars().count();
                let byte = line
                    .char_indices()
                    .nth(at.index(chars + 1))
                    .map_or(line.len(), |(b, _)| b);
                line.insert_str(byte, text);
            }
            Mutation::Truncate(at) => {
                let whole = lines.join("\n");
                let chars = whole.chars().count();
                let cut: String = whole.chars().take(at.index(chars + 1)).collect();
                lines = cut.split('\n').map(str::to_string).collect();
            }
            Mutation::LineEnds(cr_only) => crlf = Some(*cr_only),
        }
    }
    let end = match crlf {
        None => "\n",
        Some(false) => "\r\n",
        Some(true) => "\r",
    };
    lines.join(end)
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

/// Text that nests `depth` levels deep, in one of YAML's ways.
fn deep(depth: usize, style: u8) -> String {
    match style % 4 {
        0 => "[".repeat(depth),
        1 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        2 => (0..depth)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect(),
        _ => (0..depth)
            .map(|i| format!("{}- \n", " ".repeat(i * 2)))
            .collect(),
    }
}

/// Past every limit (ours at 16, the library's at 64, its parser's at 256),
/// and small enough that indentation does not make each case megabytes.
fn deep_text() -> impl Strategy<Value = String> {
    (1usize..400, any::<u8>()).prop_map(|(depth, style)| deep(depth, style))
}

// === Mode files ===

fn standard_files(dir: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seed files in {}", dir.display());
    files
}

fn mode_seeds() -> &'static [(String, String)] {
    static SEEDS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SEEDS.get_or_init(|| standard_files("runbooks/modes"))
}

fn runbook_seeds() -> &'static [(String, String)] {
    static SEEDS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SEEDS.get_or_init(|| standard_files("runbooks"))
}

const SELECTORS: &[&str] = &[
    "account.*",
    "payment.*",
    "order.*",
    "bot.intent.*",
    "bot.intent.faq",
    "*",
];
const QUEUES: &[&str] = &["account-review", "payments-review", "fraud-review"];

/// A rule of a generated mode: its YAML lines, and what it must read as.
#[derive(Clone, Debug)]
struct GenRule {
    yaml: String,
    channels: ChannelSet,
    kind: EffectKind,
}

/// `items` as a YAML list, flow or block style, each item quoted or not.
fn list(items: &[String], block: bool, indent: usize) -> String {
    if block {
        items
            .iter()
            .map(|i| format!("\n{}- \"{i}\"", " ".repeat(indent)))
            .collect()
    } else {
        format!(
            " [{}]",
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    let channels = prop_oneof![
        Just(None),
        prop::sample::subsequence(&CHANNELS[..], 1..=5).prop_map(Some),
    ];
    let actions = prop::collection::vec(
        prop_oneof![
            prop::sample::select(&ACTIONS[..]),
            prop::sample::select(SELECTORS)
        ],
        1..4,
    );
    let effect = (
        0u8..7,
        1u32..1000,
        prop::sample::select(&["30s", "15m", "1h", "24h"][..]),
        0u32..=20,
        prop::sample::subsequence(&METHODS[..], 1..=4),
        1u32..10,
        prop::sample::select(QUEUES),
    );
    let when = prop_oneof![
        Just(String::new()),
        (0u32..100_000).prop_map(|a| format!("\n    when: {{amount_over: {a}}}")),
        any::<bool>().prop_map(|b| format!("\n    when:\n      handoff_from_bot: {b}")),
        Just("\n    when: {bot_flags_any: [suspected_takeover]}".to_string()),
    ];
    (channels, actions, effect, when, any::<bool>()).prop_map(
        |(channels, actions, (kind, max, window, confidence, methods, attempts, queue), when, block)| {
            let names: Vec<String> = match &channels {
                None => vec!["*".to_string()],
                Some(c) => c.iter().map(|c| c.to_string()).collect(),
            };
            let set = ChannelSet::parse_selector(&names).expect("generated channels are valid");
            // A route must lead off the rule's own channels: to a channel
            // the rule does not cover, or, for every channel, nowhere
            // (which decides as deny).
            let outside: Vec<String> = Channel::all()
                .filter(|c| !set.contains(*c))
                .map(|c| c.as_str().to_string())
                .collect();
            let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
            let (effect, kind) = match kind {
                0 => ("deny".to_string(), EffectKind::Deny),
                1 => (
                    "\n      deny: {alternative: Use the app.}".to_string(),
                    EffectKind::Deny,
                ),
                2 => (
                    format!("\n      throttle:\n        max: {max}\n        window: {window}"),
                    EffectKind::Throttle,
                ),
                3 => (
                    format!(
                        "\n      step_up:\n        min_confidence: {}\n        methods:{}\n        max_attempts: {attempts}\n        escalate_to: {queue}",
                        f64::from(confidence) / 20.0,
                        list(&methods, block, 10)
                    ),
                    EffectKind::StepUp,
                ),
                4 => (format!(" {{review: {{queue: {queue}}}}}"), EffectKind::Review),
                5 => ("read_only".to_string(), EffectKind::ReadOnly),
                _ if !outside.is_empty() => (
                    format!("\n      route:\n        to:{}", list(&outside, block, 10)),
                    EffectKind::Route,
                ),
                _ => ("allow".to_string(), EffectKind::Allow),
            };
            let actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
            let effect = if effect.starts_with('\n') {
                effect
            } else {
                format!(" {effect}")
            };
            let yaml = format!(
                "  - channels:{}\n    actions:{}{when}\n    effect:{effect}\n",
                list(&names, block, 6),
                list(&actions, block, 6),
            );
            GenRule {
                yaml,
                channels: set,
                kind,
            }
        },
    )
}

/// A mode file from the grammar, and what it must read as.
fn gen_mode() -> impl Strategy<Value = (String, String, Vec<GenRule>, bool)> {
    (
        "[A-Za-z][A-Za-z0-9 ,.()-]{0,40}",
        prop::collection::vec(gen_rule(), 1..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(title, rules, approval, comments)| {
            let title = title.trim().to_string();
            let mut yaml = String::new();
            if comments {
                yaml.push_str("# generated\n");
            }
            yaml.push_str(&format!(
                "title: \"{title}\"\nsummary: >\n  What it does,\n  in two lines.\ncustomer_notice: We are on it.\nlift_requires_approval: {approval}\nrules:\n"
            ));
            for rule in &rules {
                yaml.push_str(&rule.yaml);
                if comments {
                    yaml.push_str("  # next rule\n");
                }
            }
            (yaml, title, rules, approval)
        })
}

proptest! {
    #![proptest_config(config())]

    /// Any text: no panic, and an error points into the text.
    #[test]
    fn a_mode_file_of_any_text_is_read_or_refused_at_a_position(text in ".{0,400}") {
        check_mode_file(&text)?;
    }

    /// Any bytes, read as a file would be (lossily, so that it is text).
    #[test]
    fn a_mode_file_of_any_bytes_is_read_or_refused_at_a_position(
        bytes in prop::collection::vec(any::<u8>(), 0..400)
    ) {
        check_mode_file(&String::from_utf8_lossy(&bytes))?;
    }

    /// The shipped modes, edited: errors still point into the text.
    #[test]
    fn a_mutated_mode_file_is_read_or_refused_at_a_position(
        seed in any::<Index>(), edits in mutations()
    ) {
        let (_, text) = seed.get(mode_seeds());
        check_mode_file(&mutate(text, &edits))?;
    }

    /// Nesting deep enough to exhaust a recursive parser.
    #[test]
    fn a_deeply_nested_mode_file_is_refused_at_a_position(text in deep_text()) {
        check_mode_file(&text)?;
    }

    /// A mode built from the grammar reads as what was written.
    #[test]
    fn a_generated_mode_file_reads_as_written(
        (yaml, title, rules, approval) in gen_mode()
    ) {
        let mode = parse_mode("gen.yaml", "generated", &yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert_eq!(mode.name.as_str(), "generated");
        prop_assert_eq!(&mode.title, &title);
        prop_assert_eq!(mode.summary.as_str(), "What it does, in two lines.");
        prop_assert_eq!(mode.lift_requires_approval, approval);
        prop_assert_eq!(mode.rules.len(), rules.len());
        for (rule, want) in mode.rules.iter().zip(&rules) {
            prop_assert_eq!(rule.channels, want.channels, "{}", yaml);
            prop_assert_eq!(rule.effect.kind(), want.kind, "{}", yaml);
        }
    }
}

proptest! {
    #![proptest_config(file_config())]

    /// A directory with a file of any bytes (not UTF-8 included): every
    /// error names the file.
    #[test]
    fn a_modes_directory_names_the_file_it_cannot_use(
        bytes in prop::collection::vec(any::<u8>(), 0..200)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzzed.yaml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = load_modes_dir(dir.path()) {
            let shown = path.display().to_string();
            let lines = e.lines();
            prop_assert!(!lines.is_empty());
            for line in lines {
                prop_assert!(line.contains(&shown), "{line:?} does not name {shown}");
            }
            if let CatalogError::Invalid(errors) = &e {
                let text = String::from_utf8_lossy(&bytes);
                for error in errors {
                    check_position(&text, error.line.into(), error.column.into())
                        .map_err(|why| TestCaseError::fail(format!("{why}: {error}")))?;
                }
            }
        }
    }
}

// === Runbook files ===

const SEVERITIES: [&str; 4] = ["sev4", "sev3", "sev2", "sev1"];
const EFFECTS: [&str; 7] = [
    "allow",
    "throttle",
    "step_up",
    "review",
    "read_only",
    "route",
    "deny",
];

/// A stage of a generated runbook: severity, modes, and how many
/// expectations.
type GenStage = (&'static str, Vec<String>, usize);

fn gen_runbook() -> impl Strategy<Value = (String, Vec<GenStage>)> {
    let mode_names: Vec<String> = mode_seeds().iter().map(|(n, _)| n.clone()).collect();
    let stage = (
        prop::sample::subsequence(mode_names, 1..4),
        prop::collection::vec(
            (
                prop::sample::select(&CHANNELS[..]),
                prop::sample::select(&ACTIONS[..]),
                prop::sample::select(&EFFECTS[..]),
                prop::option::of(0u32..=20),
                prop::option::of(0u32..10_000),
            ),
            1..4,
        ),
    );
    (
        prop::sample::subsequence(&SEVERITIES[..], 1..=4),
        prop::collection::vec(stage, 4),
        prop::sample::select(&["30m", "1h", "15m"][..]),
        any::<bool>(),
    )
        .prop_map(|(severities, stages, interval, approval)| {
            let mut yaml = format!(
                "title: Generated incident\nsummary: Something is happening.\nowners: [security@example.com]\nlift_requires_approval: {approval}\nreview_interval: {interval}\nexit_criteria:\n  - It stopped.\nstages:\n"
            );
            let mut want = Vec::new();
            for (severity, (modes, expect)) in severities.into_iter().zip(stages) {
                yaml.push_str(&format!(
                    "  - severity: {severity}\n    modes: [{}]\n    expect:\n",
                    modes.join(", ")
                ));
                for (channel, action, effect, confidence, amount) in &expect {
                    yaml.push_str(&format!(
                        "      - {{channel: {channel}, action: {action}, effect: {effect}"
                    ));
                    if let Some(c) = confidence {
                        yaml.push_str(&format!(", confidence: {}", f64::from(*c) / 20.0));
                    }
                    if let Some(a) = amount {
                        yaml.push_str(&format!(", amount: {a}"));
                    }
                    yaml.push_str("}\n");
                }
                want.push((severity, modes, expect.len()));
            }
            (yaml, want)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_runbook_file_of_any_text_is_read_or_refused_at_positions(text in ".{0,400}") {
        check_runbook_file(&text)?;
    }

    #[test]
    fn a_runbook_file_of_any_bytes_is_read_or_refused_at_positions(
        bytes in prop::collection::vec(any::<u8>(), 0..400)
    ) {
        check_runbook_file(&String::from_utf8_lossy(&bytes))?;
    }

    /// The shipped runbooks, edited.
    #[test]
    fn a_mutated_runbook_file_is_read_or_refused_at_positions(
        seed in any::<Index>(), edits in mutations()
    ) {
        let (_, text) = seed.get(runbook_seeds());
        check_runbook_file(&mutate(text, &edits))?;
    }

    #[test]
    fn a_deeply_nested_runbook_file_is_refused_at_a_position(text in deep_text()) {
        check_runbook_file(&text)?;
    }

    /// A runbook built from the grammar reads as written (its expectations
    /// left to a drill, since random ones need not hold).
    #[test]
    fn a_generated_runbook_file_reads_as_written((yaml, stages) in gen_runbook()) {
        let runbook = parse_runbook_checking(
            "gen.yaml", "generated", &yaml, catalog(), Expectations::CheckedByDrill,
        )
        .map_err(|errors| TestCaseError::fail(format!(
            "{}\n{yaml}",
            errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        )))?;
        prop_assert_eq!(runbook.name.as_str(), "generated");
        prop_assert_eq!(runbook.stages.len(), stages.len());
        for (stage, (severity, modes, expectations)) in runbook.stages.iter().zip(&stages) {
            prop_assert_eq!(stage.severity.as_str(), *severity);
            let mut read: Vec<&str> = stage.modes.iter().map(|m| m.mode.as_str()).collect();
            let mut written: Vec<&str> = modes.iter().map(String::as_str).collect();
            read.sort_unstable();
            written.sort_unstable();
            prop_assert_eq!(read, written);
            prop_assert!(stage.modes.iter().all(|m| m.channels == ChannelSet::ALL));
            prop_assert_eq!(stage.expectations.len(), *expectations);
        }
    }
}

proptest! {
    #![proptest_config(file_config())]

    /// A runbooks directory with a file of any bytes, or a shipped runbook
    /// edited: every error names the file.
    #[test]
    fn a_runbooks_directory_names_the_file_it_cannot_use(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (any::<Index>(), mutations())
                .prop_map(|(seed, edits)| mutate(&seed.get(runbook_seeds()).1, &edits).into_bytes()),
        ]
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzzed.yaml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = load_runbooks_dir(dir.path(), catalog()) {
            let shown = path.display().to_string();
            let lines = e.lines();
            prop_assert!(!lines.is_empty());
            for line in lines {
                prop_assert!(line.contains(&shown), "{line:?} does not name {shown}");
            }
        }
    }
}

/// Regression (found by [`a_deeply_nested_runbook_file_is_refused_at_a_position`]):
/// a runbook of 3,635 nested one-key maps overflowed a test thread's 2 MiB
/// stack in the YAML deserializer (the library let it recurse 64 levels).
/// Every loader now stops at 16 levels, with the position. Run on a thread
/// of exactly 2 MiB, whatever RUST_MIN_STACK says.
#[test]
fn a_file_nested_too_deep_is_refused_not_a_stack_overflow() {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            for style in 0..4 {
                for depth in [17, 65, 3635] {
                    let text = deep(depth, style);
                    let what = format!("style {style}, depth {depth}");
                    let e = parse_mode("deep.yaml", "m", &text).expect_err(&what);
                    check_position(&text, e.line.into(), e.column.into()).expect(&what);
                    let errors =
                        parse_runbook("deep.yaml", "r", &text, catalog()).expect_err(&what);
                    for e in errors {
                        check_position(&text, e.line.into(), e.column.into()).expect(&what);
                    }
                    match Tokens::parse("deep.yaml", &text) {
                        Err(TokensError::Invalid { line, column, .. }) => {
                            check_position(&text, line, column).expect(&what)
                        }
                        other => panic!("{what}: {other:?}"),
                    }
                }
            }
            let text = deep(3635, 2);
            let e = parse_runbook("deep.yaml", "r", &text, catalog()).unwrap_err();
            assert_eq!(e[0].line, 17, "{}", e[0]);
            assert!(
                e[0].message.contains("nested deeper than 16 levels"),
                "{}",
                e[0]
            );
            // A mode file reads untyped only where parameters are ignored.
            let text = format!(
                "title: t\nsummary: s\nrules:\n  - channels: ['*']\n    actions: ['*']\n    effect: {{allow: {}1{}}}\n",
                "{a: ".repeat(100),
                "}".repeat(100)
            );
            let e = parse_mode("deep.yaml", "m", &text).unwrap_err();
            assert!(e.message.contains("nested deeper than 16 levels"), "{e}");
        })
        .unwrap()
        .join()
        .expect("deep files are refused on a 2 MiB stack");
}

/// The shipped runbooks load with their expectations checked: the seeds
/// the mutations start from are valid.
#[test]
fn the_seed_runbooks_and_modes_are_valid() {
    for (name, text) in mode_seeds() {
        parse_mode("seed.yaml", name, text).unwrap_or_else(|e| panic!("{e}"));
    }
    for (name, text) in runbook_seeds() {
        parse_runbook("seed.yaml", name, text, catalog()).unwrap_or_else(|errors| {
            panic!("{}", errors[0]);
        });
    }
}

// === The tokens file ===

fn principal_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
}

fn roles() -> impl Strategy<Value = Vec<Role>> {
    prop::sample::subsequence(&ROLES[..], 1..=3)
}

/// Entries made by `create_token`, their lines joined as a file in flow or
/// block style, with the tokens that must authenticate.
fn gen_tokens() -> impl Strategy<Value = (String, Vec<(String, String, Vec<Role>)>)> {
    (
        prop::collection::vec((principal_name(), roles()), 1..5),
        any::<bool>(),
    )
        .prop_map(|(entries, block)| {
            let mut text = String::from("# tokens\n");
            let mut made = Vec::new();
            for (principal, roles) in entries {
                let new = create_token(&principal, &roles).expect("a valid principal");
                if block {
                    let sha = new
                        .line
                        .rsplit("sha256: ")
                        .next()
                        .unwrap()
                        .trim_end_matches('}');
                    text.push_str(&format!(
                        "- principal: {principal}\n  roles:\n{}  sha256: {sha}\n",
                        roles
                            .iter()
                            .map(|r| format!("    - {}\n", r.as_str()))
                            .collect::<String>()
                    ));
                } else {
                    text.push_str(&new.line);
                    text.push('\n');
                }
                made.push((new.token, principal, roles));
            }
            (text, made)
        })
}

fn token_seed() -> &'static str {
    static SEED: OnceLock<String> = OnceLock::new();
    SEED.get_or_init(|| {
        let mut text = String::from("# who may call\n");
        for (name, roles) in [
            ("alice", &[Role::Commander, Role::Viewer][..]),
            ("bob", &[Role::Approver][..]),
            ("web-1", &[Role::Subscriber][..]),
        ] {
            text.push_str(&create_token(name, roles).unwrap().line);
            text.push('\n');
        }
        text.push_str("- principal: carol\n  roles: [admin]\n  sha256: ");
        text.push_str(&"ab".repeat(32));
        text.push('\n');
        text
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_tokens_file_of_any_text_is_read_or_refused_at_a_position(text in ".{0,400}") {
        check_tokens_file(&text)?;
    }

    #[test]
    fn a_mutated_tokens_file_is_read_or_refused_at_a_position(edits in mutations()) {
        check_tokens_file(&mutate(token_seed(), &edits))?;
    }

    #[test]
    fn a_deeply_nested_tokens_file_is_refused_at_a_position(text in deep_text()) {
        check_tokens_file(&text)?;
    }

    /// What `create_token` makes is read back: each token is its principal
    /// with its roles, and a made-up token is nobody.
    #[test]
    fn a_generated_tokens_file_authenticates_each_token((text, made) in gen_tokens()) {
        let tokens = Tokens::parse("gen.yaml", &text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        for (token, principal, roles) in &made {
            let who = tokens.authenticate(token);
            prop_assert!(who.is_some(), "{} is not authenticated", principal);
            let who = who.unwrap();
            // Compared without case: principals may be stored lower-case.
            prop_assert!(who.name.eq_ignore_ascii_case(principal), "{} != {}", who.name, principal);
            let mut want = roles.clone();
            want.sort();
            want.dedup();
            prop_assert_eq!(&who.roles, &want);
        }
        prop_assert!(tokens.authenticate("smt_not_a_token").is_none());
    }
}

proptest! {
    #![proptest_config(file_config())]

    /// A tokens file of any bytes on disk: refused with the file named.
    #[test]
    fn a_tokens_file_on_disk_names_itself_when_refused(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            mutations().prop_map(|edits| mutate(token_seed(), &edits).into_bytes()),
        ]
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = TokensFile::open(&path) {
            let shown = path.display().to_string();
            prop_assert!(e.to_string().contains(&shown), "{e} does not name {shown}");
            if let TokensError::Invalid { line, column, .. } = &e {
                check_position(&String::from_utf8_lossy(&bytes), *line, *column)
                    .map_err(|why| TestCaseError::fail(format!("{why}: {e}")))?;
            }
        }
    }
}

// === Policy from a real controller: the last-known-good file and snapshots ===

/// A snapshot and a last-known-good file made by a real controller and the
/// real client, with modes of every effect kind active.
struct Saved {
    snapshot: proto::Snapshot,
    lkg: Vec<u8>,
}

const SAVED_MODES: &[&str] = &[
    "step-up-account-changes",
    "throttle-high-risk",
    "review-refunds-payouts",
    "verified-channels-only",
    "handoff-guard",
    "freeze-phone-changes",
];

fn saved() -> &'static Saved {
    static SAVED: OnceLock<Saved> = OnceLock::new();
    SAVED.get_or_init(|| {
        // Proptest bodies are synchronous; the controller gets a runtime of
        // its own for as long as it takes to save a policy.
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(save_a_policy())
        })
        .join()
        .expect("a policy is saved")
    })
}

fn web() -> Channel {
    Channel::parse("web").unwrap()
}

/// The key of the controller that saved the policy: the reader trusts it.
static SAVED_BY: std::sync::OnceLock<safemode_signing::TrustedKeys> = std::sync::OnceLock::new();

fn lkg_config(path: &Path) -> SubscriberConfig {
    let mut config = SubscriberConfig::new(
        ["http://127.0.0.1:1".to_string()],
        Namespace::live(),
        web(),
        "fuzz-1",
    );
    config.last_known_good = Some(path.to_path_buf());
    config.trusted_keys = SAVED_BY.get().cloned();
    config
}

async fn save_a_policy() -> Saved {
    let server = TestServer::start().await;
    SAVED_BY
        .set(server.trusted_keys())
        .expect("one policy is saved per run");
    let revision = server.apply(SAVED_MODES).await;
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("web.lkg");
    let mut config = lkg_config(&path);
    config.servers = vec![server.url.clone()];
    let subscriber = Subscriber::start(config.clone()).expect("the subscriber starts");
    let lkg = wait_for("the policy is saved", || {
        let path = path.clone();
        async move {
            let bytes = std::fs::read(&path).ok()?;
            let read = read_last_known_good(&lkg_config(&path)).ok()??;
            (read.revision == revision).then_some(bytes)
        }
    })
    .await;
    drop(subscriber);
    let raw = RawSubscriber::connect(server.channel().await, "live", "web", "fuzz-raw", 0)
        .await
        .expect("the raw subscriber connects");
    let snapshot = wait_for("a snapshot arrives", || async {
        raw.latest().filter(|s| s.revision == revision)
    })
    .await;
    Saved { snapshot, lkg }
}

/// Every known action, decided in a few contexts: an accepted policy must
/// be one a service can decide with.
fn decide_everything(snapshot: &PolicySnapshot) {
    let contexts = [
        Context::default(),
        Context {
            confidence: 1.0,
            amount: Some(1e9),
            failed_attempts: u32::MAX,
            handoff_from_bot: true,
            bot_flags: vec!["suspected_takeover".into()],
            ..Context::default()
        },
        Context {
            confidence: f64::NAN,
            amount: Some(f64::NAN),
            ..Context::default()
        },
    ];
    for action in ACTIONS
        .iter()
        .chain(&["bot.intent.faq", "bot.intent.unheard_of"])
    {
        let action = Action::parse(action).unwrap();
        for ctx in &contexts {
            let decision = snapshot.decide(&action, ctx);
            let _ = (decision.outcome.kind(), decision.customer_message());
            let _ = decision.reasons().count();
        }
    }
}

/// One edit of a file's bytes.
#[derive(Clone, Debug)]
enum ByteEdit {
    Flip(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, Index),
    /// Replaces one value of a JSON object on some line with another value
    /// (whatever the line's fields are).
    JsonValue(Index, Index, serde_json::Value),
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        ".{0,20}".prop_map(|s| json!(s)),
        Just(json!("2099-01-01T00:00:00Z")),
        Just(json!("9999-12-31T23:59:59Z")),
        Just(json!([])),
        Just(json!({})),
        Just(json!("live")),
        Just(json!("mobile")),
    ]
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        1 => (any::<Index>(), 1u8..=255).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| ByteEdit::Remove(a, b)),
        2 => (any::<Index>(), any::<Index>(), json_value())
            .prop_map(|(line, key, v)| ByteEdit::JsonValue(line, key, v)),
    ]
}

fn edit_bytes(bytes: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    for edit in edits {
        let n = bytes.len();
        match edit {
            ByteEdit::Flip(i, b) if n > 0 => bytes[i.index(n)] ^= b,
            ByteEdit::Set(i, b) if n > 0 => bytes[i.index(n)] = *b,
            ByteEdit::Truncate(i) => bytes.truncate(i.index(n + 1)),
            ByteEdit::Insert(i, b) => {
                let at = i.index(n + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            ByteEdit::Remove(a, b) if n > 0 => {
                let (a, b) = (a.index(n), b.index(n));
                bytes.drain(a.min(b)..a.max(b));
            }
            ByteEdit::JsonValue(line, key, value) => {
                let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
                let objects: Vec<usize> = (0..lines.len())
                    .filter(|i| {
                        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(
                            lines[*i],
                        )
                        .is_ok()
                    })
                    .collect();
                if objects.is_empty() {
                    continue;
                }
                let at = objects[line.index(objects.len())];
                let mut object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(lines[at]).unwrap();
                if object.is_empty() {
                    continue;
                }
                let field = key.get(&object.keys().cloned().collect::<Vec<_>>()).clone();
                object.insert(field, value.clone());
                let replaced = serde_json::to_vec(&object).unwrap();
                let mut out = Vec::with_capacity(bytes.len());
                for (i, l) in lines.iter().enumerate() {
                    if i > 0 {
                        out.push(b'\n');
                    }
                    out.extend_from_slice(if i == at { &replaced } else { l });
                }
                bytes = out;
            }
            _ => {}
        }
    }
    bytes
}

/// What a snapshot holds that a policy is judged by.
fn policy_of(snapshot: &PolicySnapshot) -> (i64, Vec<String>, proto::ChannelRules) {
    (
        snapshot.revision,
        snapshot.activations.iter().map(|a| a.id.clone()).collect(),
        wire::channel_policy_to_wire(&snapshot.policy),
    )
}

proptest! {
    #![proptest_config(file_config())]

    /// A saved file, edited anywhere (header, payload, or whatever the
    /// format adds): refused with the file and the reason named, or read as
    /// exactly the policy that was saved, never another.
    #[test]
    fn an_edited_last_known_good_file_is_refused_or_exactly_the_saved_policy(
        edits in prop::collection::vec(byte_edit(), 1..4)
    ) {
        let saved = saved();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.lkg");
        std::fs::write(&path, edit_bytes(&saved.lkg, &edits)).unwrap();
        let original = PolicySnapshot::from_wire(saved.snapshot.clone(), &Namespace::live(), web())
            .expect("the saved snapshot is valid");
        match read_last_known_good(&lkg_config(&path)) {
            Ok(Some(read)) => {
                prop_assert_eq!(policy_of(&read), policy_of(&original));
                decide_everything(&read);
            }
            Ok(None) => prop_assert!(false, "an existing file reads as none"),
            Err(e) => {
                prop_assert_eq!(&e.path, &path.display().to_string());
                prop_assert!(!e.reason.trim().is_empty());
                prop_assert!(e.to_string().contains(&e.path));
            }
        }
    }

    /// Any bytes where the file should be.
    #[test]
    fn a_last_known_good_file_of_any_bytes_is_refused_with_its_name(
        bytes in prop::collection::vec(any::<u8>(), 0..300)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.lkg");
        std::fs::write(&path, &bytes).unwrap();
        let e = read_last_known_good(&lkg_config(&path));
        prop_assert!(e.is_err(), "random bytes were taken as a policy");
        let e = e.unwrap_err();
        prop_assert_eq!(&e.path, &path.display().to_string());
        prop_assert!(!e.reason.trim().is_empty());
    }
}

/// One edit of a decoded snapshot.
#[derive(Clone, Debug)]
enum SnapshotEdit {
    SchemaVersion(u32),
    Namespace(String),
    Channel(String),
    Revision(i64),
    IssuedAt(Option<(i64, i32)>),
    DropRules,
    /// Renames an action key.
    Key(Index, String),
    /// Clears an entry's effect.
    NoEffect(Index),
    /// Sets every number of an entry's effect and condition.
    Numbers(Index, u32, f64),
    /// Replaces the strings of an entry's effect (methods, channels, queue).
    Strings(Index, Vec<String>),
    AsOf(Index, i64, i32),
}

fn snapshot_edit() -> impl Strategy<Value = SnapshotEdit> {
    let word = prop_oneof![
        1 => prop::sample::select(&CHANNELS[..]).prop_map(str::to_string),
        1 => prop::sample::select(&METHODS[..]).prop_map(str::to_string),
        1 => prop::sample::select(SELECTORS).prop_map(str::to_string),
        1 => ".{0,12}",
    ];
    let number = prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(0.5)
    ];
    prop_oneof![
        1 => (0u32..3).prop_map(SnapshotEdit::SchemaVersion),
        1 => prop_oneof![Just("live".to_string()), ".{0,10}"].prop_map(SnapshotEdit::Namespace),
        1 => prop_oneof![Just("web".to_string()), ".{0,10}"].prop_map(SnapshotEdit::Channel),
        1 => any::<i64>().prop_map(SnapshotEdit::Revision),
        1 => prop::option::of((any::<i64>(), any::<i32>())).prop_map(SnapshotEdit::IssuedAt),
        1 => Just(SnapshotEdit::DropRules),
        2 => (any::<Index>(), word.clone()).prop_map(|(i, k)| SnapshotEdit::Key(i, k)),
        1 => any::<Index>().prop_map(SnapshotEdit::NoEffect),
        3 => (any::<Index>(), any::<u32>(), number).prop_map(|(i, n, f)| SnapshotEdit::Numbers(i, n, f)),
        3 => (any::<Index>(), prop::collection::vec(word, 0..4)).prop_map(|(i, w)| SnapshotEdit::Strings(i, w)),
        1 => (any::<Index>(), any::<i64>(), any::<i32>()).prop_map(|(i, s, n)| SnapshotEdit::AsOf(i, s, n)),
    ]
}

/// Every compiled entry of a snapshot, base and conditional, in key order.
fn entries(s: &mut proto::Snapshot) -> Vec<&mut proto::CompiledEntry> {
    let Some(rules) = s.rules.as_mut() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut policies: Vec<(&String, &mut proto::ActionPolicy)> = rules.actions.iter_mut().collect();
    policies.sort_by(|a, b| a.0.cmp(b.0));
    for (_, policy) in policies {
        out.extend(policy.base.as_mut());
        out.extend(policy.conditional.iter_mut());
    }
    out
}

fn edit_snapshot(mut s: proto::Snapshot, edits: &[SnapshotEdit]) -> proto::Snapshot {
    use proto::effect::Kind;
    for edit in edits {
        match edit {
            SnapshotEdit::SchemaVersion(v) => s.schema_version = *v,
            SnapshotEdit::Namespace(n) => s.namespace = n.clone(),
            SnapshotEdit::Channel(c) => s.channel = c.clone(),
            SnapshotEdit::Revision(r) => s.revision = *r,
            SnapshotEdit::IssuedAt(t) => {
                s.issued_at = t.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
            }
            SnapshotEdit::DropRules => s.rules = None,
            SnapshotEdit::Key(i, key) => {
                if let Some(rules) = s.rules.as_mut() {
                    let mut keys: Vec<String> = rules.actions.keys().cloned().collect();
                    keys.sort();
                    if !keys.is_empty() {
                        let old = i.get(&keys);
                        let policy = rules.actions.remove(old).unwrap();
                        rules.actions.insert(key.clone(), policy);
                    }
                }
            }
            SnapshotEdit::NoEffect(i) => {
                let mut all = entries(&mut s);
                if !all.is_empty() {
                    let n = all.len();
                    all[i.index(n)].effect = None;
                }
            }
            SnapshotEdit::Numbers(i, n, f) => {
                let mut all = entries(&mut s);
                if all.is_empty() {
                    continue;
                }
                let len = all.len();
                let entry = &mut all[i.index(len)];
                if let Some(when) = entry.when.as_mut() {
                    when.amount_over = Some(*f);
                }
                if let Some(t) = entry.throttle.as_mut().and_then(|t| t.limit.as_mut()) {
                    t.max = *n;
                    t.window_seconds = n.wrapping_mul(7);
                }
                match entry.effect.as_mut().and_then(|e| e.kind.as_mut()) {
                    Some(Kind::Throttle(t)) => {
                        t.max = *n;
                        t.window_seconds = n.rotate_left(5);
                    }
                    Some(Kind::StepUp(step)) => {
                        step.min_confidence = *f;
                        step.max_attempts = *n;
                    }
                    _ => {}
                }
            }
            SnapshotEdit::Strings(i, words) => {
                let mut all = entries(&mut s);
                if all.is_empty() {
                    continue;
                }
                let len = all.len();
                let entry = &mut all[i.index(len)];
                if let Some(when) = entry.when.as_mut() {
                    when.bot_flags_any = words.clone();
                }
                match entry.effect.as_mut().and_then(|e| e.kind.as_mut()) {
                    Some(Kind::StepUp(step)) => {
                        step.methods = words.clone();
                        step.escalate_queue = words.concat();
                    }
                    Some(Kind::Route(route)) => route.to_channels = words.clone(),
                    Some(Kind::Review(review)) => review.queue = words.concat(),
                    Some(Kind::Deny(deny)) => deny.alternative = words.concat(),
                    _ => entry.activation_ids = words.clone(),
                }
            }
            SnapshotEdit::AsOf(i, seconds, nanos) => {
                let mut all = entries(&mut s);
                if all.is_empty() {
                    continue;
                }
                let len = all.len();
                all[i.index(len)].effect = Some(proto::Effect {
                    kind: Some(Kind::ReadOnly(proto::ReadOnly {
                        as_of: Some(prost_types::Timestamp {
                            seconds: *seconds,
                            nanos: *nanos,
                        }),
                    })),
                });
            }
        }
    }
    s
}

/// Decodes `bytes` as a client does: no panic; a refusal says what is wrong;
/// what is accepted can be decided with.
fn check_snapshot_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    let wire = match proto::Snapshot::decode(bytes) {
        Ok(wire) => wire,
        Err(e) => {
            prop_assert!(!e.to_string().trim().is_empty());
            return Ok(());
        }
    };
    check_snapshot(wire)
}

fn check_snapshot(wire: proto::Snapshot) -> Result<(), TestCaseError> {
    match PolicySnapshot::from_wire(wire, &Namespace::live(), web()) {
        Ok(snapshot) => decide_everything(&snapshot),
        Err(e) => {
            prop_assert!(!e.field.trim().is_empty(), "no field named: {}", e);
            prop_assert!(!e.problem.trim().is_empty(), "no problem named: {}", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_snapshot_of_any_bytes_is_decided_with_or_refused_with_a_field(
        bytes in prop::collection::vec(any::<u8>(), 0..300)
    ) {
        check_snapshot_bytes(&bytes)?;
    }

    /// A real snapshot's encoding, edited byte by byte.
    #[test]
    fn an_edited_snapshot_encoding_is_decided_with_or_refused_with_a_field(
        edits in prop::collection::vec(byte_edit(), 1..4)
    ) {
        check_snapshot_bytes(&edit_bytes(&saved().snapshot.encode_to_vec(), &edits))?;
    }

    /// A real snapshot with fields set to what a rogue or a bug could send.
    #[test]
    fn an_edited_snapshot_is_decided_with_or_refused_with_a_field(
        edits in prop::collection::vec(snapshot_edit(), 1..4)
    ) {
        let edited = edit_snapshot(saved().snapshot.clone(), &edits);
        check_snapshot(edited)?;
    }
}

/// A real snapshot survives its encoding and the client's reading of it:
/// the compiled rules read back to the same wire form.
#[test]
fn a_real_snapshot_reads_back_as_sent() {
    let sent = &saved().snapshot;
    let decoded = proto::Snapshot::decode(sent.encode_to_vec().as_slice()).unwrap();
    assert_eq!(&decoded, sent);
    let read = PolicySnapshot::from_wire(decoded, &Namespace::live(), web()).unwrap();
    assert_eq!(
        Some(wire::channel_policy_to_wire(&read.policy)),
        sent.rules,
        "the rules changed on the way in"
    );
    assert_eq!(read.activations.len(), SAVED_MODES.len());
    let kinds: std::collections::BTreeSet<&str> = read
        .policy
        .entries()
        .into_iter()
        .flat_map(|(_, p)| p.base.iter().chain(&p.conditional))
        .map(|e| e.effect.kind().as_str())
        .collect();
    assert!(
        kinds.len() >= 3,
        "the seed covers too few effects: {kinds:?}"
    );
    decide_everything(&read);
}
