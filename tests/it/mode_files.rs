//! Mode files: every standard mode in `runbooks/modes/` parses to the modes
//! built into the binary, and every kind of bad file is refused at the line
//! and column of the offending value with a message that says what is wrong.
//!
//! One helper, [`check_refused`], takes a bad file and the error expected as
//! `line:column: message`; the message is matched as a prefix so that lists
//! of known names at its end may grow. Each bad file is loaded both through
//! `load_modes_dir` (from its own temporary directory) and `parse_mode`.

use std::path::Path;

use safemode_policy::catalog::{CatalogError, load_modes_dir, standard_modes};
use safemode_policy::{ChannelSet, Effect, Mode, ModeFileError, parse_mode};

fn standard_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/modes")
}

// === The standard modes ===

#[test]
fn standard_mode_files_parse_to_the_built_in_modes() {
    let loaded = load_modes_dir(&standard_dir()).unwrap_or_else(|e| panic!("{e}"));
    let built_in = standard_modes();
    let names: Vec<&str> = built_in.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "bots-faq-only",
            "freeze-credential-changes",
            "freeze-phone-changes",
            "handoff-guard",
            "incident-notice",
            "read-only-last-known-good",
            "recovery-verified-paths",
            "review-refunds-payouts",
            "step-up-account-changes",
            "step-up-no-sms",
            "throttle-high-risk",
            "verified-channels-only",
        ]
    );
    let loaded: Vec<&Mode> = loaded.iter().map(|m| &**m).collect();
    let built_in: Vec<&Mode> = built_in.iter().map(|m| &**m).collect();
    assert_eq!(loaded, built_in);
}

/// What the mode files must say, in brief: a reviewer's summary of each
/// standard mode, so that an edit that changes what a mode does shows here.
#[test]
fn standard_modes_say_what_their_comments_promise() {
    let modes = standard_modes();
    for mode in modes.iter() {
        assert!(
            !mode.title.is_empty() && !mode.summary.is_empty(),
            "{}",
            mode.name
        );
        assert!(
            mode.customer_notice.is_some(),
            "{} has no customer notice",
            mode.name
        );
        assert!(
            mode.agent_script.is_some(),
            "{} has no agent script",
            mode.name
        );
        for rule in &mode.rules {
            // Texts are trimmed: folded YAML scalars end in a newline.
            for t in [
                &mode.customer_notice,
                &mode.agent_script,
                &rule.customer_message,
            ]
            .into_iter()
            .flatten()
            {
                assert_eq!(t.trim(), &**t, "{}: untrimmed text", mode.name);
            }
            // A route never sends a customer to a channel it routes from.
            if let Effect::Route(route) = &rule.effect {
                assert!(
                    route.to.intersection(rule.channels).is_empty(),
                    "{}",
                    mode.name
                );
            }
        }
    }
    let kinds = |name: &str| -> Vec<&str> {
        let mode = modes.get(name).unwrap();
        mode.rules
            .iter()
            .map(|r| r.effect.kind().as_str())
            .collect()
    };
    assert_eq!(kinds("freeze-credential-changes"), ["deny", "review"]);
    assert_eq!(kinds("step-up-account-changes"), ["step_up"]);
    assert_eq!(kinds("bots-faq-only"), ["deny"]);
    assert_eq!(kinds("read-only-last-known-good"), ["read_only"]);
    assert_eq!(kinds("verified-channels-only"), ["route"]);
    assert_eq!(kinds("review-refunds-payouts"), ["review"]);
    assert_eq!(
        kinds("throttle-high-risk"),
        ["throttle", "throttle", "review"]
    );
    assert_eq!(kinds("handoff-guard"), ["step_up", "review"]);
    assert_eq!(kinds("incident-notice"), ["allow"]);
    let verified = modes.get("verified-channels-only").unwrap();
    assert_eq!(
        verified.rules[0].channels,
        ChannelSet::parse_selector(&["chatbot", "ivr", "email", "agent-desk"]).unwrap()
    );
}

// === Bad files ===

/// A bad mode file, written as its lines, and the error expected.
struct Bad {
    case: &'static str,
    /// The file's stem, which must be the mode's name.
    name: &'static str,
    lines: &'static [&'static str],
    /// `line:column: message` (a prefix of the message).
    error: &'static str,
}

const fn bad(case: &'static str, lines: &'static [&'static str], error: &'static str) -> Bad {
    Bad {
        case,
        name: "bad-mode",
        lines,
        error,
    }
}

/// Checks that `bad` is refused as expected, both from a directory and from
/// text; returns what went wrong otherwise.
fn check_refused(bad: &Bad) -> Result<(), String> {
    let text = bad.lines.join("\n") + "\n";
    let file_name = format!("{}.yaml", bad.name);

    let from_text = match parse_mode(&file_name, bad.name, &text) {
        Ok(_) => return Err("parse_mode accepted it".into()),
        Err(e) => e,
    };
    let want_display = format!("{file_name}:{}", bad.error);
    if !from_text.to_string().starts_with(&want_display) {
        return Err(format!("  want: {want_display}...\n   got: {from_text}"));
    }
    let position = format!("{}:{}:", from_text.line, from_text.column);
    if !bad.error.starts_with(&position) {
        return Err(format!(
            "line/column fields {position} do not match {}",
            bad.error
        ));
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(&file_name);
    std::fs::write(&path, &text).unwrap();
    match load_modes_dir(dir.path()) {
        Err(CatalogError::Invalid(errors)) => {
            let want = ModeFileError {
                file: path.display().to_string(),
                ..from_text
            };
            if errors != [want.clone()] {
                return Err(format!(
                    "load_modes_dir:\n  want: [{want}]\n   got: {errors:?}"
                ));
            }
            Ok(())
        }
        Ok(_) => Err("load_modes_dir accepted it".into()),
        Err(e) => Err(format!("load_modes_dir failed otherwise: {e}")),
    }
}

fn check_all_refused(cases: &[Bad]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|b| {
            check_refused(b)
                .err()
                .map(|e| format!("case '{}':\n{e}", b.case))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_files_are_refused_where_they_go_wrong() {
    check_all_refused(&[
        bad(
            "malformed YAML: a mapping inside a plain value",
            &["title: Freeze", "  summary: Refuse changes", "rules: []"],
            "2:10: mapping values are not allowed in this context",
        ),
        bad(
            "malformed YAML: a tab for indentation",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "\t- channels: [chatbot]",
            ],
            "4:2: tabs disallowed",
        ),
        bad(
            "unknown top-level field",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "severity: high",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "3:1: unknown field `severity`, expected one of title, summary, customer_notice, agent_script, rules",
        ),
        bad(
            "unknown rule field",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect: deny",
                "    priority: 1",
            ],
            "7:5: unknown field `priority`, expected one of channels, actions, except, when, effect",
        ),
        bad(
            "unknown condition field",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [payment.refund]",
                "    when:",
                "      amount_under: 5",
                "    effect: deny",
            ],
            "7:7: unknown field `amount_under`, expected one of handoff_from_bot, amount_over, bot_flags_any",
        ),
        bad(
            "unknown step_up parameter",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 0.8",
                "        methods: [push]",
                "        max_attempts: 3",
                "        escalate_to: account-review",
                "        fallback: kba",
            ],
            "12:9: unknown field `fallback`, expected one of min_confidence, methods, max_attempts, escalate_to",
        ),
        bad(
            "unknown review parameter",
            &[
                "title: Review",
                "summary: A human looks",
                "rules:",
                "  - channels: [\"*\"]",
                "    actions: [payment.refund]",
                "    effect:",
                "      review:",
                "        queue: payments-review",
                "        sla: 1h",
            ],
            "9:9: unknown field `sla`, expected one of queue",
        ),
        bad(
            "read_only takes no parameters",
            &[
                "title: Read only",
                "summary: Serve old data",
                "rules:",
                "  - channels: [web]",
                "    actions: [\"*\"]",
                "    effect:",
                "      read_only: {as_of: 2025-01-01}",
            ],
            "7:7: read_only takes no parameters in a mode file; the as-of time is set when the mode is applied",
        ),
        bad(
            "unknown effect",
            &[
                "title: Block",
                "summary: Refuse",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect: block",
            ],
            "6:13: unknown effect 'block'; effects are allow, throttle, step_up, review, read_only, route, deny",
        ),
        bad(
            "unknown effect written as a map",
            &[
                "title: Block",
                "summary: Refuse",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect:",
                "      block: {}",
            ],
            "7:7: unknown effect 'block'",
        ),
        bad(
            "effect needing parameters written bare",
            &[
                "title: Review",
                "summary: A human looks",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [payment.refund]",
                "    effect: review",
            ],
            "6:13: effect 'review' needs parameters; write it as a map, e.g. {review: {...}}",
        ),
        bad(
            "two effects in one rule",
            &[
                "title: Both",
                "summary: Two kinds",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [payment.refund]",
                "    effect:",
                "      deny: {}",
                "      review: {queue: payments-review}",
            ],
            "7:7: an effect has exactly one kind; split the rule in two",
        ),
        bad(
            "empty effect map",
            &[
                "title: Nothing",
                "summary: No effect",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [payment.refund]",
                "    effect: {}",
            ],
            "6:13: empty effect; name one, e.g. deny",
        ),
        bad(
            "unknown channel",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot, fax]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "4:25: unknown channel 'fax'; known channels: chatbot, ivr, agent-desk, web, mobile, email",
        ),
        bad(
            "'*' beside named channels",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot, \"*\"]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "4:15: '*' already means every channel; do not list channels beside it",
        ),
        bad(
            "empty channel list",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: []",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "4:15: channel list is empty; name channels or use '*' for all",
        ),
        bad(
            "unknown action",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.password_reset, account.delete]",
                "    effect: deny",
            ],
            "5:39: unknown action 'account.delete'; known actions: account.password_reset,",
        ),
        bad(
            "bad bot intent name",
            &[
                "title: Bots",
                "summary: Narrow bots",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [bot.intent.Refund]",
                "    effect: deny",
            ],
            "5:15: bad bot intent action 'bot.intent.Refund': the intent name uses a-z, 0-9 and _",
        ),
        bad(
            "bad selector syntax",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [\"acc*unt\"]",
                "    effect: deny",
            ],
            "5:15: bad action selector 'acc*unt': '*' may only stand alone or end a dotted prefix, as in 'account.*'",
        ),
        bad(
            "prefix that matches no action",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [\"accounts.*\"]",
                "    effect: deny",
            ],
            "5:15: action selector 'accounts.*' matches no known action",
        ),
        bad(
            "empty action list",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: []",
                "    effect: deny",
            ],
            "5:14: actions is empty; name actions or use '*'",
        ),
        bad(
            "except that excludes nothing",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [\"account.*\"]",
                "    except: [account.recovery, payment.refund]",
                "    effect: deny",
            ],
            "6:32: except 'payment.refund' excludes nothing this rule's actions cover",
        ),
        bad(
            "min_confidence above 1",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 1.5",
                "        methods: [push]",
                "        max_attempts: 3",
                "        escalate_to: account-review",
            ],
            "8:25: min_confidence 1.5 is outside 0..1",
        ),
        bad(
            "min_confidence below 0",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: -0.1",
                "        methods: [push]",
                "        max_attempts: 3",
                "        escalate_to: account-review",
            ],
            "8:25: min_confidence -0.1 is outside 0..1",
        ),
        bad(
            "unknown verification method",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 0.8",
                "        methods: [push, carrier_pigeon]",
                "        max_attempts: 3",
                "        escalate_to: account-review",
            ],
            "9:25: unknown verification method 'carrier_pigeon'; known methods: password,",
        ),
        bad(
            "no verification method",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 0.8",
                "        methods: []",
                "        max_attempts: 3",
                "        escalate_to: account-review",
            ],
            "9:18: a step-up needs at least one verification method",
        ),
        bad(
            "max_attempts 0",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 0.8",
                "        methods: [push]",
                "        max_attempts: 0",
                "        escalate_to: account-review",
            ],
            "10:23: max_attempts must be at least 1",
        ),
        bad(
            "bad escalation queue",
            &[
                "title: Step up",
                "summary: Verify first",
                "rules:",
                "  - channels: [ivr]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      step_up:",
                "        min_confidence: 0.8",
                "        methods: [push]",
                "        max_attempts: 3",
                "        escalate_to: Account Review",
            ],
            "11:22: bad review queue 'Account Review'",
        ),
        bad(
            "throttle max 0",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: 0",
                "        window: 1h",
            ],
            "8:14: throttle max must be at least 1; use deny to refuse outright",
        ),
        bad(
            "throttle max not a number",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: -3",
                "        window: 1h",
            ],
            "8:14: invalid u32",
        ),
        bad(
            "bad window",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: 3",
                "        window: 1 fortnight",
            ],
            "9:17: bad window '1 fortnight': write a duration such as 30m, 1h or 1d",
        ),
        bad(
            "window of zero",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: 3",
                "        window: 0s",
            ],
            "9:17: bad window '0s'",
        ),
        bad(
            "window in calendar months",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: 3",
                "        window: 1mo",
            ],
            "9:17: bad window '1mo'",
        ),
        bad(
            "window without a unit",
            &[
                "title: Throttle",
                "summary: Slow down",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    effect:",
                "      throttle:",
                "        max: 3",
                "        window: 30",
            ],
            "9:17: bad window '30'",
        ),
        bad(
            "route to its own channel",
            &[
                "title: Route",
                "summary: Go to the app",
                "rules:",
                "  - channels: [chatbot, mobile]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      route:",
                "        to: [mobile]",
            ],
            "7:7: route sends customers from chatbot,mobile to mobile; a route's targets must not be among the rule's own channels",
        ),
        bad(
            "route to every channel",
            &[
                "title: Route",
                "summary: Go to the app",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      route:",
                "        to: [\"*\"]",
            ],
            "8:13: a route must name the verified channels to send customers to, not '*'",
        ),
        bad(
            "route to nowhere",
            &[
                "title: Route",
                "summary: Go to the app",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [\"account.*\"]",
                "    effect:",
                "      route:",
                "        to: []",
            ],
            "8:13: channel list is empty",
        ),
        bad(
            "empty rules",
            &["title: Nothing", "summary: Does nothing", "rules: []"],
            "3:8: a mode needs at least one rule",
        ),
        bad(
            "empty condition",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    when: {}",
                "    effect: deny",
            ],
            "6:11: empty condition; set handoff_from_bot, amount_over or bot_flags_any, or drop 'when'",
        ),
        bad(
            "condition with only an empty flag list",
            &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    when:",
                "      bot_flags_any: []",
                "    effect: deny",
            ],
            "7:7: empty condition",
        ),
        bad(
            "negative amount",
            &[
                "title: Review",
                "summary: A human looks",
                "rules:",
                "  - channels: [web]",
                "    actions: [payment.refund]",
                "    when:",
                "      amount_over: -1",
                "    effect: deny",
            ],
            "7:20: amount_over must be a number >= 0",
        ),
        bad(
            "bad bot flag",
            &[
                "title: Guard",
                "summary: Flagged sessions",
                "rules:",
                "  - channels: [agent-desk]",
                "    actions: [\"account.*\"]",
                "    when:",
                "      bot_flags_any: [suspected_takeover, Not Sure]",
                "    effect: deny",
            ],
            "7:43: bad bot flag 'Not Sure'",
        ),
        bad(
            "blank title",
            &[
                "title: \"  \"",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "1:8: title is empty; give the mode a title",
        ),
        Bad {
            case: "file name not a valid mode name",
            name: "Freeze_Changes",
            lines: &[
                "title: Freeze",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [chatbot]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            error: "1:1: the file name must be the mode's name: bad mode name 'Freeze_Changes'",
        },
    ]);
}

/// Every other effect refuses a parameter it does not know; `allow` must
/// too, or `{allow: {max: 3, window: 1h}}` (a throttle written under the
/// wrong key) would silently allow everything.
#[test]
fn allow_with_parameters_is_refused() {
    check_all_refused(&[bad(
        "allow takes no parameters",
        &[
            "title: Allow",
            "summary: Let it through",
            "rules:",
            "  - channels: [web]",
            "    actions: [\"account.*\"]",
            "    effect:",
            "      allow: {max: 3, window: 1h}",
        ],
        "7:7: allow takes no parameters; to limit an action, use throttle",
    )]);
}

/// The checker itself: a good file is not refused, so a case above cannot
/// pass by accident.
#[test]
fn a_good_file_is_not_refused() {
    let good = bad(
        "good",
        &[
            "title: Freeze",
            "summary: Refuse changes",
            "rules:",
            "  - channels: [chatbot]",
            "    actions: [\"account.*\"]",
            "    except: [account.recovery]",
            "    when: {handoff_from_bot: true, amount_over: 0, bot_flags_any: [b, a, b]}",
            "    effect:",
            "      throttle: {max: 3, window: 1w}",
        ],
        "1:1: anything",
    );
    assert_eq!(
        check_refused(&good),
        Err("parse_mode accepted it".to_string())
    );
    let text = good.lines.join("\n");
    let mode = parse_mode("good.yaml", "good", &text).unwrap();
    let rule = &mode.rules[0];
    assert_eq!(
        rule.effect,
        Effect::Throttle(safemode_policy::Throttle {
            max: 3,
            window_seconds: 7 * 86_400
        })
    );
    // Flags are sorted and without duplicates.
    let flags: Vec<&str> = rule
        .when
        .as_ref()
        .unwrap()
        .bot_flags_any
        .iter()
        .map(|f| &**f)
        .collect();
    assert_eq!(flags, ["a", "b"]);
}

// === Directories ===

#[test]
fn a_directory_with_two_bad_files_reports_both() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        std::fs::read_to_string(standard_dir().join("freeze-credential-changes.yaml")).unwrap();
    std::fs::write(dir.path().join("freeze-credential-changes.yaml"), good).unwrap();
    std::fs::write(
        dir.path().join("a-first.yaml"),
        "title: A\nsummary: B\nrules:\n  - channels: [fax]\n    actions: [\"*\"]\n    effect: deny\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("z-last.yml"),
        "title: A\nsummary: B\nrules:\n  - channels: [web]\n    actions: [\"*\"]\n    effect: ban\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "not a mode").unwrap();
    let Err(CatalogError::Invalid(errors)) = load_modes_dir(dir.path()) else {
        panic!("two bad files were accepted");
    };
    let got: Vec<(String, u32, u32)> = errors
        .iter()
        .map(|e| {
            let file = Path::new(&e.file)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            (file, e.line, e.column)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a-first.yaml".to_string(), 4, 16),
            ("z-last.yml".to_string(), 6, 13),
        ]
    );
    // Each on its own line, each with its position.
    let shown = CatalogError::Invalid(errors).to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(lines[0].ends_with("a-first.yaml:4:16: unknown channel 'fax'; known channels: chatbot, ivr, agent-desk, web, mobile, email"), "{shown}");
    assert!(
        lines[1].contains("z-last.yml:6:13: unknown effect 'ban'"),
        "{shown}"
    );
}

#[test]
fn a_directory_without_mode_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "no modes here").unwrap();
    assert!(matches!(
        load_modes_dir(dir.path()),
        Err(CatalogError::Empty(_))
    ));
    let missing = dir.path().join("missing");
    assert!(matches!(
        load_modes_dir(&missing),
        Err(CatalogError::Read { .. })
    ));
}

#[test]
fn the_same_mode_in_yaml_and_yml_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "title: A\nsummary: B\nrules:\n  - channels: [web]\n    actions: [\"*\"]\n    effect: deny\n";
    std::fs::write(dir.path().join("twice.yaml"), text).unwrap();
    std::fs::write(dir.path().join("twice.yml"), text).unwrap();
    let Err(CatalogError::Invalid(errors)) = load_modes_dir(dir.path()) else {
        panic!("a mode defined twice was accepted");
    };
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.contains("mode 'twice' is defined twice"),
        "{}",
        errors[0]
    );
}

/// Mistakes whose first wording came from the YAML library: the message is
/// ours, says what to do, and does not repeat the position.
#[test]
fn mistakes_are_explained_in_the_files_terms() {
    check_all_refused(&[
        bad(
            "empty file",
            &[""],
            "1:1: the file is empty; a mode needs a title, a summary and rules",
        ),
        bad(
            "only comments",
            &["# freeze everything", "# (to be written)"],
            "1:1: the file is empty; a mode needs a title, a summary and rules",
        ),
        bad(
            "a key given twice",
            &[
                "title: Freeze",
                "title: Freeze again",
                "summary: Refuse changes",
                "rules:",
                "  - channels: [web]",
                "    actions: [account.recovery]",
                "    effect: deny",
            ],
            "2:1: duplicate mapping key: title; each key may appear once",
        ),
        bad(
            "except cancels every action",
            &[
                "title: Nothing",
                "summary: Excludes all it names",
                "rules:",
                "  - channels: [web]",
                "    actions: [account.recovery, account.mfa_reset]",
                "    except: [\"account.*\"]",
                "    effect: deny",
            ],
            "5:14: except excludes every action this rule names, so the rule would do nothing",
        ),
    ]);
}
