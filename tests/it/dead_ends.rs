//! Issue 15, item 4: a runbook stage must not trap genuine customers in a
//! dead end (an action no customer can get done on any channel) unless it
//! says so, with the actions and a reason. `safemode runbook lint` reports
//! the stage by file, line and column, and a runbook with such a stage is
//! not served.

use std::path::Path;

use crate::support::{TestServer, safemode};

/// A mode that denies account recovery on every channel.
const DENY_RECOVERY: &str = "\
title: Deny recovery
summary: Refuse account recovery everywhere.
customer_notice: Account recovery is paused.
agent_script: Do not recover accounts.
rules:
  - channels: [\"*\"]
    actions: [account.recovery]
    effect:
      deny:
        alternative: Try again later.
";

/// A mode that sends account recovery to the app, and one that denies it
/// there: a route into a refusal.
const ROUTE_RECOVERY_TO_MOBILE: &str = "\
title: Recovery in the app
summary: Recover accounts in the app only.
rules:
  - channels: [chatbot, ivr, agent-desk, web, email]
    actions: [account.recovery]
    effect:
      route:
        to: [mobile]
";
const DENY_RECOVERY_ON_MOBILE: &str = "\
title: No recovery in the app
summary: The app cannot recover accounts.
rules:
  - channels: [mobile]
    actions: [account.recovery]
    effect:
      deny: {}
";

/// A runbook whose sev2 stage (at line 7, column 5) applies `modes`, with
/// `extra` lines added to the stage.
fn runbook(modes: &str, extra: &str) -> String {
    format!(
        "\
title: Lockout wave
summary: A shipped-runbook-like runbook.
owners: [security@example.com]
review_interval: 15m
exit_criteria: [Recovery works again]
stages:
  - severity: sev2
    modes: [{modes}]
{extra}    expect:
      - {{channel: ivr, action: balance.view, effect: allow}}
"
    )
}

async fn lint(dir: &Path) -> (Option<i32>, String, String) {
    let output = safemode(&[
        "runbook",
        "lint",
        "--modes",
        dir.join("modes").to_str().unwrap(),
        dir.join("lockout-wave.yaml").to_str().unwrap(),
    ])
    .await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_stage_that_leaves_a_dead_end_is_a_lint_error_unless_it_accepts_it() {
    let accepts = "    accepts_dead_ends:\n      actions: [account.recovery]\n      reason: Recovery is paused while the recovery desk is compromised; customers leave a contact.\n";
    // (case, modes, stage lines, exit code, what the output must hold)
    let cases: [(&str, &str, &str, i32, &[&str]); 7] = [
        (
            "recovery denied everywhere",
            "deny-recovery",
            "",
            1,
            &[
                "lockout-wave.yaml:7:5: stage sev2 leaves a dead end, an action no customer can get done on any channel: account.recovery (deny on every channel); change the stage's modes so that some channel offers a path, or say that it is meant: accepts_dead_ends: {actions: [account.recovery], reason: ...}",
            ],
        ),
        (
            "accepted, with a reason",
            "deny-recovery",
            accepts,
            0,
            &["1 file ok"],
        ),
        (
            "routed to a channel that refuses it",
            "route-recovery-to-mobile, deny-recovery-on-mobile",
            "",
            1,
            &[
                "lockout-wave.yaml:7:5: stage sev2 leaves a dead end",
                "account.recovery (chatbot route to mobile, which offers no path, ivr route to mobile, which offers no path, agent-desk route to mobile, which offers no path, web route to mobile, which offers no path, mobile deny, email route to mobile, which offers no path)",
            ],
        ),
        (
            "routed to a channel that serves it",
            "route-recovery-to-mobile",
            "",
            0,
            &["1 file ok"],
        ),
        (
            "accepting what has a path",
            "route-recovery-to-mobile",
            accepts,
            1,
            &[
                "lockout-wave.yaml:10:7: accepts_dead_ends names account.recovery, which stage sev2 leaves a path through; list only the actions it leaves with none",
            ],
        ),
        (
            "accepting without a reason",
            "deny-recovery",
            "    accepts_dead_ends:\n      actions: [account.recovery]\n",
            1,
            &[
                "lockout-wave.yaml:10:7: missing field `reason`; say why genuine customers are not trapped, or why it is worth it",
            ],
        ),
        (
            "accepting an unknown action",
            "deny-recovery",
            "    accepts_dead_ends:\n      actions: [account.teleport]\n      reason: because\n",
            1,
            &["lockout-wave.yaml:10:16: ", "account.teleport"],
        ),
    ];
    for (case, modes, extra, code, holds) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("modes")).unwrap();
        for (name, text) in [
            ("deny-recovery", DENY_RECOVERY),
            ("route-recovery-to-mobile", ROUTE_RECOVERY_TO_MOBILE),
            ("deny-recovery-on-mobile", DENY_RECOVERY_ON_MOBILE),
        ] {
            std::fs::write(dir.path().join("modes").join(format!("{name}.yaml")), text).unwrap();
        }
        std::fs::write(dir.path().join("lockout-wave.yaml"), runbook(modes, extra)).unwrap();
        let (got, stdout, stderr) = lint(dir.path()).await;
        assert_eq!(got, Some(code), "{case}: {stdout}{stderr}");
        // The file alone is checked against the modes/ beside it too.
        let alone = safemode(&[
            "runbook",
            "lint",
            dir.path().join("lockout-wave.yaml").to_str().unwrap(),
        ])
        .await;
        assert_eq!(
            alone.status.code(),
            Some(code),
            "{case}, the file alone: {alone:?}"
        );
        let output = format!("{stdout}{stderr}");
        for part in holds {
            assert!(output.contains(part), "{case}: {part:?} not in {output}");
        }
    }
}

#[test]
fn every_shipped_stage_that_freezes_says_why() {
    // The shipped runbooks load (their dead ends are all accepted) and each
    // accepted dead end has a reason that names the way out or the cost.
    let modes = safemode_policy::catalog::standard_modes();
    let runbooks = safemode_policy::catalog::standard_runbooks(&modes);
    let mut accepted = 0;
    for runbook in runbooks.iter() {
        for stage in &runbook.stages {
            let dead = runbook.stage_dead_ends(stage, &modes);
            match &stage.accepts_dead_ends {
                None => assert!(dead.is_empty(), "{} {}", runbook.name, stage.severity),
                Some(accepts) => {
                    accepted += 1;
                    let names: Vec<&str> = dead.iter().map(|d| d.action).collect();
                    let listed: Vec<&str> = accepts.actions.iter().map(|a| a.as_str()).collect();
                    assert_eq!(names, listed, "{} {}", runbook.name, stage.severity);
                    assert!(
                        accepts.reason.len() > 40,
                        "{} {}",
                        runbook.name,
                        stage.severity
                    );
                }
            }
        }
    }
    assert_eq!(accepted, 7);
}

/// `safemode --server URL ARGS...`: (exit code, stdout, stderr).
async fn run(server: &TestServer, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full = vec!["--server", server.url.as_str()];
    full.extend_from_slice(args);
    let output = safemode(&full).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_and_escalating_say_which_dead_ends_the_stage_leaves() {
    let server = TestServer::start().await;
    let sim_swap = "account.phone_change (deny on every channel), account.mfa_reset (deny on every channel); accepted by the runbook: Phone-number and MFA-device changes are what a SIM swap is after";
    // (command, the dead-ends line it must print, or none)
    let cases: [(&[&str], Option<&str>); 4] = [
        (
            &[
                "incident",
                "declare",
                "fraud-spike",
                "--severity",
                "sev3",
                "--reason",
                "refund fraud",
            ],
            None,
        ),
        (
            &[
                "incident",
                "declare",
                "sim-swap-wave",
                "--severity",
                "sev3",
                "--reason",
                "port-outs",
            ],
            Some(sim_swap),
        ),
        (
            &[
                "incident",
                "escalate",
                "sim-swap-wave",
                "--severity",
                "sev2",
                "--reason",
                "more port-outs",
            ],
            Some(sim_swap),
        ),
        (
            &[
                "incident",
                "escalate",
                "sim-swap-wave",
                "--severity",
                "sev1",
                "--reason",
                "takeovers",
            ],
            Some(
                "account.password_reset (deny on every channel), account.email_change (deny on every channel), account.phone_change (deny on every channel), account.mfa_reset (deny on every channel); accepted by the runbook: Credential changes are frozen on purpose",
            ),
        ),
    ];
    for (args, want) in cases {
        let (code, stdout, stderr) = run(&server, args).await;
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        let lines: Vec<&str> = stdout
            .lines()
            .filter_map(|l| {
                l.strip_prefix("  DEAD ENDS (no customer can do these on any channel): ")
            })
            .collect();
        match want {
            None => assert!(lines.is_empty(), "{args:?}: {stdout}"),
            Some(want) => {
                assert_eq!(lines.len(), 1, "{args:?}: {stdout}");
                assert!(lines[0].starts_with(want), "{args:?}: {stdout}");
            }
        }
    }
    // JSON says the same, as `dead_ends`.
    let (code, stdout, _) = run(
        &server,
        &[
            "-o",
            "json",
            "incident",
            "declare",
            "credential-stuffing",
            "--severity",
            "sev1",
            "--reason",
            "takeover wave",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ends = json["dead_ends"].as_array().expect("dead_ends in JSON");
    assert_eq!(ends.len(), 1, "{json}");
    assert!(
        ends[0].as_str().unwrap().starts_with(
            "account.password_reset (deny on every channel), account.email_change (deny on every channel), account.phone_change (deny on every channel), account.mfa_reset (deny on every channel); accepted by the runbook: Credential changes are frozen on purpose"
        ),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_stage_with_an_unaccepted_dead_end_is_said_when_declared() {
    // Lint refuses it; a controller still serves it (refusing to start
    // would leave no protection at all), says so at start and in
    // `serve --check`, and declaring the stage says it traps customers.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("modes")).unwrap();
    std::fs::create_dir(dir.path().join("runbooks")).unwrap();
    std::fs::write(dir.path().join("modes/deny-recovery.yaml"), DENY_RECOVERY).unwrap();
    std::fs::write(
        dir.path().join("runbooks/lockout-wave.yaml"),
        runbook("deny-recovery", ""),
    )
    .unwrap();
    let (modes, runbooks) = (dir.path().join("modes"), dir.path().join("runbooks"));
    let check = safemode(&[
        "serve",
        "--check",
        "--modes",
        modes.to_str().unwrap(),
        "--runbooks",
        runbooks.to_str().unwrap(),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    assert!(
        stdout.lines().any(|l| l
            == "warning: runbook lockout-wave stage sev2 leaves a dead end it does not accept: account.recovery (deny on every channel); `safemode runbook lint` says how to fix it"),
        "{stdout}"
    );
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        modes_dir: Some(modes),
        runbooks_dir: Some(runbooks),
        ..TestServer::config_in(&dir.path().join("data"))
    })
    .await;
    let (code, stdout, stderr) = run(
        &server,
        &[
            "incident",
            "declare",
            "lockout-wave",
            "--severity",
            "sev2",
            "--reason",
            "recovery desk compromised",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.lines().any(|l| l
            == "  DEAD ENDS (no customer can do these on any channel): account.recovery (deny on every channel); the runbook's stage does not accept it: genuine customers have no way through"),
        "{stdout}"
    );
}
