//! Runbooks: every shipped runbook in `runbooks/` loads, its drill
//! expectations hold against its own stages, and `lint` passes on the
//! directory; every kind of bad runbook is refused with every error it has,
//! each at its line and column; stages apply and lift what the format says.
//!
//! The bad files go through one helper, [`check`], which takes the file as
//! its lines and the errors expected as `line:column: message`, each message
//! matched as a prefix so that lists of known names at its end may grow. It
//! runs every file both through `parse_runbook` and `load_runbooks_dir` (from
//! its own temporary directory), and reports every case that fails, by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use safemode_policy::catalog::{
    CatalogError, lint, load_runbooks_dir, standard_modes, standard_runbooks,
};
use safemode_policy::{
    ChannelSet, EffectKind, ModeCatalog, ModeName, Outcome, RunbookFileError, Severity, StageMode,
    parse_mode, parse_runbook,
};

fn runbooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks")
}

// === The shipped runbooks ===

#[test]
fn shipped_runbooks_load_and_their_drills_hold() {
    let modes = standard_modes();
    let runbooks = standard_runbooks(&modes);
    let names: Vec<&str> = runbooks.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ai-handoff-abuse",
            "breach-containment",
            "credential-stuffing",
            "fraud-spike",
            "helpdesk-recovery-social-engineering",
            "sim-swap-wave",
        ]
    );
    let mut failures = Vec::new();
    for runbook in runbooks.iter() {
        assert!(
            (2..=3).contains(&runbook.stages.len()),
            "{}: {} stages",
            runbook.name,
            runbook.stages.len()
        );
        assert!(!runbook.owners.is_empty() && !runbook.exit_criteria.is_empty());
        for stage in &runbook.stages {
            let results = runbook.check_expectations(stage, &modes);
            assert_eq!(results.len(), stage.expectations.len());
            for r in results.iter().filter(|r| !r.holds) {
                let e = &r.expectation;
                failures.push(format!(
                    "{} {}: {} {} expected {}, got {:?}",
                    runbook.name,
                    stage.severity,
                    e.channel,
                    e.action,
                    e.effect.as_str(),
                    r.actual
                ));
            }
            // Every stage says what it stops and what must still work.
            let kinds: Vec<EffectKind> = results.iter().map(|r| r.actual.kind()).collect();
            assert!(
                kinds.contains(&EffectKind::Allow),
                "{} {}: no expectation says what is still allowed",
                runbook.name,
                stage.severity
            );
            assert!(
                kinds.iter().any(|k| *k != EffectKind::Allow),
                "{} {}: no expectation exercises a protection",
                runbook.name,
                stage.severity
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The files on disk are what the binary embeds.
    let loaded = load_runbooks_dir(&runbooks_dir(), &modes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.len(), runbooks.len());
    for runbook in runbooks.iter() {
        assert_eq!(loaded.get(runbook.name.as_str()), Some(runbook));
    }
}

#[test]
fn lint_passes_on_the_runbooks_directory() {
    // An empty catalogue: the directory's own modes/ must be the one used.
    let checked = lint(&[runbooks_dir()], &ModeCatalog::default());
    assert_eq!(checked, Ok(6 + 12), "six runbooks and twelve modes");
    // The modes directory alone, and a single runbook file against the
    // built-in modes.
    assert_eq!(
        lint(&[runbooks_dir().join("modes")], &ModeCatalog::default()),
        Ok(12)
    );
    assert_eq!(
        lint(
            &[runbooks_dir().join("sim-swap-wave.yaml")],
            &standard_modes()
        ),
        Ok(1)
    );
}

/// A reviewer's summary of each runbook: its stages and their modes, and
/// whether lifting needs a second person. An edit that changes a posture
/// shows here.
#[test]
fn shipped_runbooks_apply_what_their_comments_promise() {
    let modes = standard_modes();
    let runbooks = standard_runbooks(&modes);
    let summary = |name: &str| -> (bool, Vec<String>) {
        let runbook = runbooks.get(name).unwrap();
        let stages = runbook
            .stages
            .iter()
            .map(|s| {
                let modes: Vec<String> = s
                    .modes
                    .iter()
                    .map(|m| match m.channels {
                        ChannelSet::ALL => m.mode.to_string(),
                        channels => format!("{}@{}", m.mode, channels),
                    })
                    .collect();
                format!("{}: {}", s.severity, modes.join(" "))
            })
            .collect();
        (runbook.lift_requires_approval, stages)
    };
    assert_eq!(
        summary("credential-stuffing"),
        (
            true,
            vec![
                "sev3: throttle-high-risk step-up-account-changes".into(),
                "sev2: throttle-high-risk step-up-account-changes bots-faq-only".into(),
                "sev1: throttle-high-risk step-up-account-changes bots-faq-only freeze-credential-changes".into(),
            ]
        )
    );
    assert_eq!(
        summary("breach-containment"),
        (
            true,
            vec![
                "sev3: verified-channels-only incident-notice".into(),
                "sev2: verified-channels-only freeze-credential-changes incident-notice".into(),
                "sev1: read-only-last-known-good verified-channels-only freeze-credential-changes incident-notice".into(),
            ]
        )
    );
    assert_eq!(
        summary("fraud-spike"),
        (
            false,
            vec![
                "sev3: throttle-high-risk".into(),
                "sev2: throttle-high-risk review-refunds-payouts".into(),
                "sev1: throttle-high-risk review-refunds-payouts step-up-account-changes".into(),
            ]
        )
    );
    assert_eq!(
        summary("sim-swap-wave"),
        (
            true,
            vec![
                "sev3: step-up-no-sms freeze-phone-changes".into(),
                "sev2: step-up-no-sms freeze-phone-changes verified-channels-only".into(),
                "sev1: step-up-no-sms freeze-phone-changes freeze-credential-changes verified-channels-only".into(),
            ]
        )
    );
    assert_eq!(
        summary("ai-handoff-abuse"),
        (
            false,
            vec![
                "sev3: handoff-guard".into(),
                "sev2: handoff-guard bots-faq-only".into(),
                "sev1: handoff-guard bots-faq-only review-refunds-payouts@agent-desk".into(),
            ]
        )
    );
    assert_eq!(
        summary("helpdesk-recovery-social-engineering"),
        (
            true,
            vec![
                "sev3: recovery-verified-paths@ivr,agent-desk".into(),
                "sev2: recovery-verified-paths handoff-guard".into(),
                "sev1: recovery-verified-paths handoff-guard freeze-credential-changes".into(),
            ]
        )
    );

    // The drill limit: 5s by default, 3s for every sev1 stage.
    for runbook in runbooks.iter() {
        for stage in &runbook.stages {
            let want = match stage.severity {
                Severity::Sev1 => Duration::from_secs(3),
                _ => Duration::from_secs(5),
            };
            assert_eq!(
                stage.apply_within, want,
                "{} {}",
                runbook.name, stage.severity
            );
        }
    }

    // Lifting these modes needs a second person, whatever the runbook says.
    let guarded: Vec<&str> = modes
        .iter()
        .filter(|m| m.lift_requires_approval)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(
        guarded,
        [
            "freeze-credential-changes",
            "freeze-phone-changes",
            "handoff-guard",
            "review-refunds-payouts",
            "verified-channels-only",
        ]
    );
    let fraud = runbooks.get("fraud-spike").unwrap();
    assert!(fraud.lift_needs_approval(modes.get("review-refunds-payouts").unwrap()));
    assert!(!fraud.lift_needs_approval(modes.get("throttle-high-risk").unwrap()));
}

// === Stages ===

#[test]
fn a_stage_is_the_whole_posture_and_moving_between_stages_lifts_the_rest() {
    let modes = standard_modes();
    let runbooks = standard_runbooks(&modes);
    let names =
        |ms: &[StageMode]| -> Vec<String> { ms.iter().map(|m| m.mode.to_string()).collect() };

    // Declaring at sev3 applies sev3's modes.
    let sim = runbooks.get("sim-swap-wave").unwrap();
    let sev3 = sim.stage(Severity::Sev3).unwrap();
    let first = sev3.transition_from(None);
    assert_eq!(
        names(&first.apply),
        ["step-up-no-sms", "freeze-phone-changes"]
    );
    assert!(first.keep.is_empty() && first.lift.is_empty());

    // Escalating straight to sev1 adds the wide freeze and keeps the rest.
    let sev1 = sim.stage(Severity::Sev1).unwrap();
    let up = sev1.transition_from(Some(sev3));
    assert_eq!(
        names(&up.apply),
        ["freeze-credential-changes", "verified-channels-only"]
    );
    assert_eq!(names(&up.keep), ["step-up-no-sms", "freeze-phone-changes"]);
    assert!(up.lift.is_empty());

    // De-escalating lifts what the lower stage does not list.
    let down = sev3.transition_from(Some(sev1));
    assert!(down.apply.is_empty());
    assert_eq!(
        names(&down.lift),
        ["freeze-credential-changes", "verified-channels-only"]
    );

    // The same mode on other channels is lifted and applied again.
    let help = runbooks
        .get("helpdesk-recovery-social-engineering")
        .unwrap();
    let widen = help
        .stage(Severity::Sev2)
        .unwrap()
        .transition_from(help.stage(Severity::Sev3));
    assert_eq!(
        names(&widen.apply),
        ["recovery-verified-paths", "handoff-guard"]
    );
    assert_eq!(names(&widen.lift), ["recovery-verified-paths"]);
    assert_eq!(
        widen.lift[0].channels,
        ChannelSet::parse_selector(&["agent-desk", "ivr"]).unwrap()
    );

    assert_eq!(
        sim.severities().collect::<Vec<_>>(),
        [Severity::Sev3, Severity::Sev2, Severity::Sev1]
    );
    assert!(sim.stage(Severity::Sev4).is_none());
    assert_eq!(
        sim.stage_at_least(Severity::Sev4).map(|s| s.severity),
        Some(Severity::Sev3)
    );
}

#[test]
fn stage_activations_carry_the_stage_texts_scope_and_time() {
    let modes = standard_modes();
    let runbooks = standard_runbooks(&modes);
    let at: Timestamp = "2025-06-01T08:00:00Z".parse().unwrap();

    let breach = runbooks.get("breach-containment").unwrap();
    let sev1 = breach.stage(Severity::Sev1).unwrap();
    let activations = breach.stage_activations(sev1, &modes, at);
    let applied: Vec<&str> = activations.iter().map(|a| a.mode.name.as_str()).collect();
    assert_eq!(
        applied,
        [
            "read-only-last-known-good",
            "verified-channels-only",
            "freeze-credential-changes",
            "incident-notice",
        ]
    );
    for a in &activations {
        // The stage's texts replace every mode's notice and script.
        assert_eq!(a.mode.customer_notice, sev1.customer_message);
        assert_eq!(a.mode.agent_script, sev1.agent_script);
        assert_eq!(a.principal, "runbook");
        assert_eq!(a.reason.as_str(), "runbook breach-containment stage sev1");
        assert_eq!((a.applied_at, a.revision), (at, 0));
    }
    // Read-only serves data as of the time the stage is applied.
    let policy = safemode_policy::EffectivePolicy::compile(&activations);
    let web = safemode_policy::Channel::parse("web").unwrap();
    let decision = policy.decide(web, "balance.view", &Default::default());
    assert_eq!(
        decision.outcome,
        Outcome::ReadOnly(safemode_policy::ReadOnly { as_of: Some(at) })
    );
    assert_eq!(
        decision.customer_message(),
        sev1.customer_message.as_deref()
    );

    // A stage without texts keeps each mode's own, and its channel scope.
    let handoff = runbooks.get("ai-handoff-abuse").unwrap();
    let sev1 = handoff.stage(Severity::Sev1).unwrap();
    let activations = handoff.stage_activations(sev1, &modes, at);
    let review = &activations[2];
    assert_eq!(review.mode, **modes.get("review-refunds-payouts").unwrap());
    assert_eq!(
        review.channels,
        ChannelSet::parse_selector(&["agent-desk"]).unwrap()
    );
    let ids: std::collections::BTreeSet<_> = activations.iter().map(|a| &a.id).collect();
    assert_eq!(ids.len(), 3, "each activation has its own id");
}

#[test]
fn severities_order_from_least_to_most_severe() {
    assert!(Severity::Sev4 < Severity::Sev3);
    assert!(Severity::Sev2 < Severity::Sev1);
    for s in Severity::ALL {
        assert_eq!(Severity::parse(s.as_str()), Ok(s));
        assert_eq!(s.to_string(), s.as_str());
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{}\"", s.as_str())
        );
    }
    assert_eq!(
        serde_json::from_str::<Severity>("\"sev2\"").unwrap(),
        Severity::Sev2
    );
    assert!(Severity::parse("SEV1").is_err());
}

// === Bad files ===

/// One bad runbook: its lines, and every error expected, in order, each as
/// `line:column: message` (a prefix of the message).
struct Bad {
    case: &'static str,
    lines: &'static [&'static str],
    errors: &'static [&'static str],
}

const fn bad(
    case: &'static str,
    lines: &'static [&'static str],
    errors: &'static [&'static str],
) -> Bad {
    Bad {
        case,
        lines,
        errors,
    }
}

/// The file name the bad runbooks are written to.
const FILE: &str = "bad-runbook.yaml";

/// Checks that the runbook `lines` is refused with exactly `expected`, both
/// from text and from a directory; says what went wrong otherwise.
fn check(lines: &[&str], expected: &[&str]) -> Result<(), String> {
    let modes = standard_modes();
    let text = lines.join("\n") + "\n";
    let from_text = match parse_runbook(FILE, "bad-runbook", &text, &modes) {
        Ok(_) => return Err("parse_runbook accepted it".into()),
        Err(errors) => errors,
    };
    let shown: Vec<String> = from_text.iter().map(ToString::to_string).collect();
    let matches = shown.len() == expected.len()
        && shown
            .iter()
            .zip(expected)
            .all(|(got, want)| got.starts_with(&format!("{FILE}:{want}")));
    if !matches {
        return Err(format!(
            "  want: {}\n   got: {}",
            expected.join("\n         "),
            shown.join("\n         ")
        ));
    }
    for (e, want) in from_text.iter().zip(expected) {
        if !want.starts_with(&format!("{}:{}:", e.line, e.column)) {
            return Err(format!("line/column fields of {e} do not match {want}"));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    std::fs::write(&path, &text).unwrap();
    let want: Vec<RunbookFileError> = from_text
        .into_iter()
        .map(|e| RunbookFileError {
            file: path.display().to_string(),
            ..e
        })
        .collect();
    match load_runbooks_dir(dir.path(), &modes) {
        Err(CatalogError::InvalidRunbooks(errors)) if errors == want => Ok(()),
        Err(e) => Err(format!("load_runbooks_dir: {e}")),
        Ok(_) => Err("load_runbooks_dir accepted it".into()),
    }
}

fn check_all(cases: &[Bad]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|b| {
            check(b.lines, b.errors)
                .err()
                .map(|e| format!("case '{}':\n{e}", b.case))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The checker itself: a good runbook is accepted, so no case below can
/// pass by accident.
#[test]
fn a_good_runbook_is_not_refused() {
    let good = [
        "title: Test",
        "summary: A test runbook",
        "owners: [team@example.com]",
        "review_interval: 30m",
        "exit_criteria: [Quiet for a day]",
        "stages:",
        "  - severity: sev3",
        "    modes: [freeze-credential-changes]",
        "    expect:",
        "      - {channel: web, action: account.password_reset, effect: deny}",
    ];
    assert_eq!(
        check(&good, &["1:1: anything"]),
        Err("parse_runbook accepted it".to_string())
    );
    let runbook = parse_runbook(FILE, "bad-runbook", &good.join("\n"), &standard_modes()).unwrap();
    assert!(!runbook.lift_requires_approval);
    assert_eq!(runbook.review_interval, Duration::from_secs(30 * 60));
    assert_eq!(runbook.stages[0].apply_within, Duration::from_secs(5));
    assert_eq!(
        runbook.stages[0].modes,
        [StageMode {
            mode: ModeName::parse("freeze-credential-changes").unwrap(),
            channels: ChannelSet::ALL,
        }]
    );
}

#[test]
fn bad_runbooks_are_refused_where_they_go_wrong() {
    check_all(&[
        bad(
            "malformed YAML: a mapping inside a plain value",
            &["title: Test", "  summary: A test runbook"],
            &["2:10: mapping values are not allowed in this context"],
        ),
        bad(
            "unknown top-level field",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "severity: sev2",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "4:1: unknown field `severity`, expected one of title, summary, owners, lift_requires_approval, review_interval, exit_criteria, customer_message, agent_script, drill, stages, triggers",
            ],
        ),
        bad(
            "unknown stage field",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    escalate_after: 1h",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "9:5: unknown field `escalate_after`, expected one of severity, modes, customer_message, agent_script, apply_within, expect",
            ],
        ),
        bad(
            "unknown expectation field",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - channel: web",
                "        action: account.password_reset",
                "        verified: true",
                "        effect: deny",
            ],
            &[
                "12:9: unknown field `verified`, expected one of channel, action, effect, confidence, methods, attempts, amount, handoff, bot_flags",
            ],
        ),
        bad(
            "unknown drill field",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "drill: {apply_within: 5s, namespace: drill-1}",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &["6:27: unknown field `namespace`, expected one of apply_within"],
        ),
        bad(
            "unknown field in a stage's mode",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes:",
                "      - {mode: bots-faq-only, channels: [chatbot], until: 1h}",
                "    expect:",
                "      - {channel: chatbot, action: account.password_reset, effect: deny}",
            ],
            &["9:52: unknown field `until`, expected one of mode, channels"],
        ),
        bad(
            "missing required field, at the start of its map",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "1:1: missing field `review_interval`; say how often the commander reviews the incident",
            ],
        ),
        bad(
            "missing stage and expectation fields",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "  - severity: sev2",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset}",
            ],
            &[
                "7:5: missing field `expect`; say which decisions must hold",
                "12:9: missing field `effect`; say which effect the decision must have",
            ],
        ),
        bad(
            "a required field without a value",
            &[
                "title:",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &["1:1: title has no value; give the runbook a title"],
        ),
        bad(
            "unknown severity",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev0",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "7:15: unknown severity 'sev0'; severities are sev4, sev3, sev2, sev1 (sev1 is the most severe)",
            ],
        ),
        bad(
            "unknown mode",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes, freeze-everything]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "8:40: unknown mode 'freeze-everything'; `safemode mode list` shows the modes, here: bots-faq-only,",
            ],
        ),
        bad(
            "unknown channel, in a stage's mode and in an expectation",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes:",
                "      - {mode: bots-faq-only, channels: [chatbot, fax]}",
                "    expect:",
                "      - {channel: pager, action: account.password_reset, effect: deny}",
            ],
            &[
                "9:51: unknown channel 'fax'; known channels: chatbot, ivr, agent-desk, web, mobile, email",
                "11:19: unknown channel 'pager'; known channels:",
            ],
        ),
        bad(
            "'*' beside named channels",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes:",
                "      - {mode: bots-faq-only, channels: [chatbot, \"*\"]}",
                "    expect:",
                "      - {channel: chatbot, action: account.password_reset, effect: deny}",
            ],
            &["9:41: '*' already means every channel; do not list channels beside it"],
        ),
        bad(
            "unknown action",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.delete, effect: deny}",
            ],
            &["10:32: unknown action 'account.delete'; known actions: account.password_reset,"],
        ),
        bad(
            "unknown effect",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: block}",
            ],
            &[
                "10:64: unknown effect 'block'; effects are allow, throttle, step_up, review, read_only, route, deny",
            ],
        ),
        bad(
            "bad durations",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: soon",
                "exit_criteria: [Quiet for a day]",
                "drill: {apply_within: 0s}",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    apply_within: 30",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "4:18: bad duration 'soon' for review_interval: write a length of time such as 5s, 30m or 1h",
                "6:23: bad duration '0s' for apply_within",
                "10:19: bad duration '30' for apply_within",
            ],
        ),
        bad(
            "unreachable stage: its severity already has one",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
                "  - severity: sev3",
                "    modes: [bots-faq-only]",
                "    expect:",
                "      - {channel: chatbot, action: account.password_reset, effect: deny}",
            ],
            &["11:15: unreachable: severity sev3 already has a stage at line 7"],
        ),
        bad(
            "stages out of severity order",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev2",
                "    modes: [freeze-credential-changes]",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
                "  - severity: sev3",
                "    modes: [bots-faq-only]",
                "    expect:",
                "      - {channel: chatbot, action: account.password_reset, effect: deny}",
            ],
            &[
                "11:15: stages out of order: sev3 comes after sev2 (line 7); list stages from the least severe (sev4) to the most severe (sev1)",
            ],
        ),
        bad(
            "an expectation the stage's own modes contradict",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [step-up-account-changes, bots-faq-only]",
                "    expect:",
                "      - {channel: chatbot, action: account.password_reset, effect: step_up}",
                "      - {channel: web, action: account.password_reset, effect: step_up}",
                "      - {channel: web, action: account.password_reset, confidence: 0.9, methods: [sms_otp], effect: allow}",
            ],
            &[
                "10:68: expectation says step_up but the stage's modes give deny for chatbot account.password_reset",
                "12:101: expectation says allow but the stage's modes give step_up for web account.password_reset",
            ],
        ),
        bad(
            "bad context values",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: [handoff-guard]",
                "    expect:",
                "      - channel: agent-desk",
                "        action: payment.refund",
                "        confidence: 1.5",
                "        methods: [push, carrier_pigeon]",
                "        attempts: -1",
                "        amount: lots",
                "        handoff: yes",
                "        bot_flags: [Not Sure]",
                "        effect: review",
            ],
            &[
                "12:21: confidence 1.5 is outside 0..1",
                "13:25: unknown verification method 'carrier_pigeon'",
                "14:19: attempts must be a whole number of failed attempts, 0 or more; found -1",
                "15:17: amount must be a number; found lots",
                "16:18: handoff must be true or false; found text",
                "17:21: bad bot flag 'Not Sure'",
            ],
        ),
        bad(
            "empty lists",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: []",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes: []",
                "    expect: []",
            ],
            &[
                "3:9: owners is empty; give at least one",
                "8:12: modes is empty; a stage applies at least one mode",
                "9:13: expect is empty; say at least one decision",
            ],
        ),
        bad(
            "a mode on channels it has no rule for, and a mode twice",
            &[
                "title: Test",
                "summary: A test runbook",
                "owners: [team@example.com]",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  - severity: sev3",
                "    modes:",
                "      - {mode: handoff-guard, channels: [chatbot, ivr]}",
                "      - freeze-credential-changes",
                "      - {mode: freeze-credential-changes, channels: [web]}",
                "    expect:",
                "      - {channel: web, action: account.password_reset, effect: deny}",
            ],
            &[
                "9:9: mode 'handoff-guard' has no rule for chatbot,ivr, so applying it there does nothing; its rules cover agent-desk",
                "11:16: mode 'freeze-credential-changes' is already in this stage at line 10; list it once",
            ],
        ),
        bad(
            "wrong kinds of value",
            &[
                "title: [Test]",
                "summary: A test runbook",
                "owners: team@example.com",
                "lift_requires_approval: yes",
                "review_interval: 30m",
                "exit_criteria: [Quiet for a day]",
                "stages:",
                "  severity: sev3",
            ],
            &[
                "1:8: title must be text; found a list",
                "3:9: owners must be a list, e.g. [security-incident-response]; found text",
                "4:25: lift_requires_approval must be true or false; found text",
                "8:3: stages must be a list",
            ],
        ),
        bad(
            "a key given twice",
            &["title: Test", "title: Test again"],
            &["2:1: duplicate mapping key: title; each key may appear once"],
        ),
        bad(
            "empty file",
            &["# to be written"],
            &[
                "1:1: the file is empty; a runbook needs a title, a summary, owners, a review interval, exit criteria and stages",
            ],
        ),
    ]);
}

/// One file with three unrelated mistakes reports all three, in file order.
#[test]
fn every_error_in_a_file_is_reported() {
    check_all(&[bad(
        "three errors",
        &[
            "title: Test",
            "summary: A test runbook",
            "owners: [team@example.com]",
            "review_interval: 30m",
            "exit_criteria: [Quiet for a day]",
            "escalation_policy: page-everyone",
            "stages:",
            "  - severity: sev3",
            "    modes: [throttle-high-risk]",
            "    expect:",
            "      - {channel: web, action: payment.refund, amount: 900, effect: throttle}",
            "  - severity: sev2",
            "    modes: [throttle-high-risk, review-everything]",
            "    expect:",
            "      - {channel: web, action: payment.refund, effect: review}",
        ],
        &[
            "6:1: unknown field `escalation_policy`",
            "11:69: expectation says throttle but the stage's modes give review for web payment.refund",
            "13:33: unknown mode 'review-everything'",
        ],
    )]);
}

#[test]
fn the_file_name_must_be_the_incident_type() {
    let text = "title: T\nsummary: S\nowners: [a]\nreview_interval: 1h\nexit_criteria: [e]\nstages:\n  - severity: sev3\n    modes: [incident-notice]\n    expect:\n      - {channel: web, action: order.view, effect: allow}\n";
    let errors =
        parse_runbook("Fraud_Spike.yaml", "Fraud_Spike", text, &standard_modes()).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "Fraud_Spike.yaml:1:1: the file name must be the incident type: bad runbook name 'Fraud_Spike': use 1 to 63 lowercase letters, digits and inner dashes"
        ]
    );
}

// === Triggers ===

/// A runbook with two stages (sev3, sev2) and `triggers`, as lines.
const TRIGGER_HEAD: &[&str] = &[
    "title: Test",
    "summary: A test runbook",
    "owners: [team@example.com]",
    "review_interval: 30m",
    "exit_criteria: [Quiet for a day]",
    "stages:",
    "  - severity: sev3",
    "    modes: [freeze-credential-changes]",
    "    expect:",
    "      - {channel: web, action: account.password_reset, effect: deny}",
    "triggers:",
];

fn with_triggers(lines: &[&'static str]) -> &'static [&'static str] {
    let all: Vec<&'static str> = TRIGGER_HEAD.iter().chain(lines).copied().collect();
    Box::leak(all.into_boxed_slice())
}

#[test]
fn a_trigger_is_read_with_its_window_and_stage() {
    let text = with_triggers(&[
        "  - {signal: login.failed, above: 200, within: 5m, severity: sev3}",
        "  - {signal: password_reset.requested, above: 1, within: 10s, severity: sev3}",
    ])
    .join("\n");
    let runbook = parse_runbook(FILE, "bad-runbook", &text, &standard_modes()).unwrap();
    let shown: Vec<String> = runbook.triggers.iter().map(|t| t.describe()).collect();
    assert_eq!(
        shown,
        [
            "login.failed above 200 within 5m -> sev3",
            "password_reset.requested above 1 within 10s -> sev3"
        ]
    );
    assert!(!runbook.triggers[0].fires(200));
    assert!(runbook.triggers[0].fires(201));
}

#[test]
fn bad_triggers_are_refused_where_they_go_wrong() {
    let cases = [
        (
            "not a list",
            with_triggers(&["  signal: login.failed"]),
            vec!["12:3: triggers must be a list"],
        ),
        (
            "bad signal name",
            with_triggers(&["  - {signal: Login-Failed, above: 200, within: 5m, severity: sev3}"]),
            vec!["12:14: bad signal name 'Login-Failed'"],
        ),
        (
            "above zero",
            with_triggers(&["  - {signal: login.failed, above: 0, within: 5m, severity: sev3}"]),
            vec!["12:35: above must be a whole number from 1"],
        ),
        (
            "above not a number",
            with_triggers(&["  - {signal: login.failed, above: many, within: 5m, severity: sev3}"]),
            vec![
                "12:35: above must be a whole number from 1 to 4294967295, the count summed across the fleet that fires the trigger; found many",
            ],
        ),
        (
            "window too long",
            with_triggers(&["  - {signal: login.failed, above: 2, within: 1h, severity: sev3}"]),
            vec!["12:46: within must be from 10s to 15m in whole steps of 10s"],
        ),
        (
            "window not a step",
            with_triggers(&["  - {signal: login.failed, above: 2, within: 15s, severity: sev3}"]),
            vec!["12:46: within must be from 10s to 15m in whole steps of 10s"],
        ),
        (
            "window not a duration",
            with_triggers(&["  - {signal: login.failed, above: 2, within: soon, severity: sev3}"]),
            vec!["12:46: bad duration 'soon' for within"],
        ),
        (
            "a stage the runbook lacks",
            with_triggers(&["  - {signal: login.failed, above: 2, within: 5m, severity: sev1}"]),
            vec!["12:60: the runbook has no sev1 stage to propose; its stages are sev3"],
        ),
        (
            "missing fields",
            with_triggers(&["  - {signal: login.failed}"]),
            vec![
                "12:5: missing field `above`",
                "12:5: missing field `within`",
                "12:5: missing field `severity`",
            ],
        ),
        (
            "unknown field",
            with_triggers(&[
                "  - {signal: login.failed, above: 2, within: 5m, severity: sev3, below: 3}",
            ]),
            vec!["12:66: unknown field `below`, expected one of signal, above, within, severity"],
        ),
        (
            "the same signal twice for one stage",
            with_triggers(&[
                "  - {signal: login.failed, above: 2, within: 5m, severity: sev3}",
                "  - {signal: login.failed, above: 9, within: 1m, severity: sev3}",
            ]),
            vec!["13:5: a trigger on login.failed for sev3 is already at line 12"],
        ),
        (
            "too many",
            with_triggers(&[
                "  - {signal: a1, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a2, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a3, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a4, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a5, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a6, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a7, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a8, above: 2, within: 5m, severity: sev3}",
                "  - {signal: a9, above: 2, within: 5m, severity: sev3}",
            ]),
            vec!["12:3: 9 triggers, more than the 8 a runbook may carry"],
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(case, lines, errors)| {
            check(lines, errors)
                .err()
                .map(|e| format!("case '{case}':\n{e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// === Directories and lint ===

const GOOD_RUNBOOK: &str = "title: T\nsummary: S\nowners: [a]\nreview_interval: 1h\nexit_criteria: [e]\nstages:\n  - severity: sev3\n    modes: [incident-notice]\n    expect:\n      - {channel: web, action: order.view, effect: allow}\n";

#[test]
fn a_runbooks_directory_reports_every_error_of_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let modes = standard_modes();
    std::fs::write(dir.path().join("good.yaml"), GOOD_RUNBOOK).unwrap();
    std::fs::write(
        dir.path().join("a-first.yaml"),
        GOOD_RUNBOOK.replace("sev3", "sev9").replace("1h", "never"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("z-last.yml"),
        GOOD_RUNBOOK.replace("effect: allow", "effect: deny"),
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "not a runbook").unwrap();
    std::fs::create_dir(dir.path().join("modes")).unwrap();
    let Err(e) = load_runbooks_dir(dir.path(), &modes) else {
        panic!("bad runbooks were accepted");
    };
    let lines = e.lines();
    let file = |l: &String| {
        Path::new(l.split(':').next().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(
        lines.iter().map(file).collect::<Vec<_>>(),
        ["a-first.yaml", "a-first.yaml", "z-last.yml"],
        "{e}"
    );
    assert!(lines[0].ends_with(":4:18: bad duration 'never' for review_interval: write a length of time such as 5s, 30m or 1h"), "{e}");
    assert!(lines[1].contains(":7:15: unknown severity 'sev9'"), "{e}");
    assert!(
        lines[2].ends_with(
            ":10:52: expectation says deny but the stage's modes give allow for web order.view"
        ),
        "{e}"
    );

    // No runbook at all, and a directory that is not there.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_runbooks_dir(empty.path(), &modes),
        Err(CatalogError::NoRunbooks(_))
    ));
    assert!(matches!(
        load_runbooks_dir(&empty.path().join("missing"), &modes),
        Err(CatalogError::Read { .. })
    ));
}

/// `safemode runbook lint` over a directory with its own `modes/`: the modes
/// are linted too, and they are the catalogue its runbooks are checked
/// against, so a runbook can use a mode the binary does not ship.
#[test]
fn lint_checks_a_directory_against_its_own_modes() {
    let dir = tempfile::tempdir().unwrap();
    let modes_dir = dir.path().join("modes");
    std::fs::create_dir(&modes_dir).unwrap();
    std::fs::write(
        modes_dir.join("pause-payouts.yaml"),
        "title: Pause payouts\nsummary: No payouts for now.\nrules:\n  - channels: [\"*\"]\n    actions: [payment.payout]\n    effect: deny\n",
    )
    .unwrap();
    std::fs::write(
        modes_dir.join("broken.yaml"),
        "title: Broken\nsummary: An unknown effect.\nlift_requires_approval: maybe\nrules: []\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("payout-fraud.yaml"),
        "title: Payout fraud\nsummary: Mules.\nowners: [fraud@example.com]\nreview_interval: 1h\nexit_criteria: [Mules blocked]\nstages:\n  - severity: sev2\n    modes: [pause-payouts]\n    accepts_dead_ends: {actions: [payment.payout], reason: Payouts wait until the mules are blocked.}\n    expect:\n      - {channel: web, action: payment.payout, effect: deny}\n      - {channel: web, action: payment.refund, effect: allow}\n",
    )
    .unwrap();
    // A standard mode is not in this directory's catalogue.
    std::fs::write(dir.path().join("uses-standard.yaml"), GOOD_RUNBOOK).unwrap();

    let errors = lint(&[dir.path().to_path_buf()], &standard_modes()).unwrap_err();
    let file_and_rest = |l: &String| -> String {
        let path = Path::new(l.split(':').next().unwrap());
        let name = path.file_name().unwrap().to_string_lossy();
        format!("{name}{}", &l[path.as_os_str().len()..])
    };
    let shown: Vec<String> = errors.iter().map(file_and_rest).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].starts_with("broken.yaml:3:25: "), "{shown:#?}");
    assert!(shown[1].starts_with("uses-standard.yaml:8:13: unknown mode 'incident-notice'; `safemode mode list` shows the modes, here: pause-payouts"), "{shown:#?}");

    // Fixed, the directory lints clean: one mode and one runbook checked.
    std::fs::remove_file(modes_dir.join("broken.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("uses-standard.yaml")).unwrap();
    assert_eq!(lint(&[dir.path().to_path_buf()], &standard_modes()), Ok(2));

    // Files and directories that cannot be read are one line each.
    let missing = dir.path().join("missing.yaml");
    let errors = lint(
        &[missing.clone(), dir.path().join("nowhere")],
        &standard_modes(),
    )
    .unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with(&format!("cannot read {}", missing.display())));
}

/// The mode-level flag is read and checked like every other mode field.
#[test]
fn a_mode_may_ask_for_a_second_approver_to_lift_it() {
    let mode = |flag: &str| {
        format!(
            "title: T\nsummary: S\n{flag}rules:\n  - channels: [web]\n    actions: [payment.payout]\n    effect: deny\n"
        )
    };
    assert!(
        !parse_mode("m.yaml", "m", &mode(""))
            .unwrap()
            .lift_requires_approval
    );
    assert!(
        parse_mode("m.yaml", "m", &mode("lift_requires_approval: true\n"))
            .unwrap()
            .lift_requires_approval
    );
    let e = parse_mode("m.yaml", "m", &mode("lift_requires_approval: maybe\n")).unwrap_err();
    assert_eq!((e.line, e.column), (3, 25), "{e}");
}

/// The examples in `runbooks/README.md` are a valid runbook and a valid
/// mode, so the format documentation cannot drift from the parser.
#[test]
fn the_readme_examples_parse() {
    let readme = std::fs::read_to_string(runbooks_dir().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2, "a runbook example and a mode example");
    let modes = standard_modes();
    let runbook = parse_runbook("README.md", "credential-stuffing", blocks[0], &modes)
        .unwrap_or_else(|e| panic!("{e:#?}"));
    for stage in &runbook.stages {
        assert!(
            runbook
                .check_expectations(stage, &modes)
                .iter()
                .all(|r| r.holds)
        );
    }
    let mode =
        parse_mode("README.md", "handoff-guard", blocks[1]).unwrap_or_else(|e| panic!("{e}"));
    assert!(mode.lift_requires_approval);
}

/// Escalating is one commander's call, so a more severe stage must keep, on
/// at least the same channels, every mode of a milder stage whose lifting
/// needs a second approver: dropping it would lift it, and the escalation
/// would wait for an approver.
#[test]
fn no_shipped_runbook_escalates_by_dropping_a_guarded_mode() {
    let modes = standard_modes();
    let runbooks = standard_runbooks(&modes);
    let mut drops = Vec::new();
    for runbook in runbooks.iter() {
        for pair in runbook.stages.windows(2) {
            let (milder, severe) = (&pair[0], &pair[1]);
            for staged in &milder.modes {
                let guarded = modes
                    .get(staged.mode.as_str())
                    .is_some_and(|m| m.lift_requires_approval);
                let kept = severe
                    .modes
                    .iter()
                    .any(|s| s.mode == staged.mode && staged.channels.is_subset(s.channels));
                if guarded && !kept {
                    drops.push(format!(
                        "{}: {} drops {} of {}",
                        runbook.name, severe.severity, staged.mode, milder.severity
                    ));
                }
            }
        }
    }
    assert!(drops.is_empty(), "{drops:#?}");
}
