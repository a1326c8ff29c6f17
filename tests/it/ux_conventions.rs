//! Issue 13, item 7 (part): command-line conventions. `-o` is `--output`,
//! `decide --exit-code` tells the effect by its exit code, and
//! `safemode completions` prints a shell's completion script. None of them
//! changes anything in the namespace or the audit log.

use crate::support::{TestServer, observed_state, safemode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_output_flag_exit_codes_and_completions() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let applied = safemode(&[
        "--server",
        url,
        "mode",
        "apply",
        "freeze-credential-changes",
        "--reason",
        "ATO wave, INC-1",
    ])
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let before = observed_state(&server).await;

    // (arguments, exit code, what stdout holds)
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["-o", "json", "mode", "list"],
            0,
            "\"freeze-credential-changes\"",
        ),
        (
            &[
                "decide",
                "--channel",
                "web",
                "--action",
                "account.password_reset",
            ],
            0,
            "deny",
        ),
        (
            &[
                "decide",
                "--channel",
                "web",
                "--action",
                "account.password_reset",
                "--exit-code",
            ],
            16,
            "deny",
        ),
        (
            &[
                "decide",
                "--channel",
                "web",
                "--action",
                "order.view",
                "--exit-code",
            ],
            0,
            "allow",
        ),
        (&["completions", "bash"], 0, "safemode"),
        (&["completions", "zsh"], 0, "#compdef safemode"),
        (&["completions", "fish"], 0, "complete -c safemode"),
    ];
    for (args, code, holds) in cases {
        // Only the commands that talk to a controller take --server.
        let mut full = if args[0] == "completions" {
            vec![]
        } else {
            vec!["--server", url]
        };
        full.extend_from_slice(args);
        let output = safemode(&full).await;
        assert_eq!(output.status.code(), Some(*code), "{args:?}: {output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(holds),
            "{args:?}: {holds:?} not in {stdout}"
        );
        // An effect is not an error: nothing on stderr says one. (A
        // subscriber's log line may race the process's exit.)
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.lines().any(|l| l.starts_with("error")),
            "{args:?}: {stderr}"
        );
    }

    // A shell it does not know is a usage error (2), with one line saying so.
    let output = safemode(&["completions", "tcsh"]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: invalid value 'tcsh'"),
        "{stderr}"
    );

    assert_eq!(observed_state(&server).await, before, "something changed");
}

#[tokio::test]
async fn every_list_flag_takes_commas_and_repeats() {
    let roles = |args: &'static [&'static str]| async move {
        let mut full = vec!["-o", "json", "token", "create", "--principal", "ann"];
        full.extend_from_slice(args);
        let output = safemode(&full).await;
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        let token: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        token["roles"].clone()
    };
    let commas = roles(&["--role", "commander,approver"]).await;
    let repeated = roles(&["--role", "commander", "--role", "approver"]).await;
    assert_eq!(commas, serde_json::json!(["commander", "approver"]));
    assert_eq!(commas, repeated);
}

/// Each command's help lists only the global flags it uses, and a global
/// flag it does not use is bad usage (exit 2, one line), before or after
/// the command's name; set in the environment, it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_commands_help_lists_only_the_flags_it_uses() {
    // (command, flags its help must list, flags it must not)
    let cases: &[(&[&str], &[&str], &[&str])] = &[
        (
            &["serve"],
            &["--listen", "--tokens"],
            &[
                "--server",
                "--token ",
                "--change-id",
                "--ca-cert",
                "--output",
            ],
        ),
        (
            &["token", "create"],
            &["--principal", "--role", "--output"],
            &["--server", "--token ", "--change-id", "--insecure"],
        ),
        (
            &["drill", "run"],
            &["--server", "--token ", "--output"],
            &["--change-id"],
        ),
        (&["status"], &["--server", "--output"], &["--change-id"]),
        (
            &["mode", "apply"],
            &["--server", "--change-id", "--reason"],
            &[],
        ),
        (
            &["completions"],
            &[],
            &["--server", "--output", "--principal"],
        ),
    ];
    for (command, listed, not_listed) in cases {
        let mut args = command.to_vec();
        args.push("--help");
        let output = safemode(&args).await;
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for flag in *listed {
            assert!(help.contains(flag), "{args:?}: {flag} not in {help}");
        }
        for flag in *not_listed {
            assert!(!help.contains(flag), "{args:?}: {flag} in {help}");
        }
    }

    for args in [
        &["serve", "--token", "t"][..],
        &["--token", "t", "serve"][..],
        &[
            "token",
            "create",
            "--principal",
            "a",
            "--role",
            "viewer",
            "--server",
            "http://x",
        ][..],
    ] {
        let output = safemode(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("is not used by `safemode "),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    // The environment is not the command line: SAFEMODE_SERVER set for
    // every command does not break one that ignores it.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
        .args(["token", "create", "--principal", "a", "--role", "viewer"])
        .env("SAFEMODE_SERVER", "http://127.0.0.1:1")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

/// `--channels` is a list flag too: `--channels chatbot --channels ivr` is
/// `--channels chatbot,ivr`, on `mode apply` and `incident declare` alike
/// (previewed with --dry-run, so nothing changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_take_commas_and_repeats() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let before = observed_state(&server).await;
    let preview = |args: Vec<&'static str>| {
        let url = url.to_string();
        async move {
            let mut full = vec!["--server", url.as_str(), "-o", "json"];
            full.extend(args);
            full.extend(["--reason", "list flags", "--dry-run"]);
            let output = safemode(&full).await;
            assert_eq!(output.status.code(), Some(0), "{full:?}: {output:?}");
            let preview: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            preview["preview"].clone()
        }
    };
    for command in [
        vec!["mode", "apply", "bots-faq-only"],
        vec![
            "incident",
            "declare",
            "ai-handoff-abuse",
            "--severity",
            "sev2",
        ],
    ] {
        let mut commas = command.clone();
        commas.extend(["--channels", "chatbot,ivr"]);
        let mut repeated = command.clone();
        repeated.extend(["--channels", "chatbot", "--channels", "ivr"]);
        let commas = preview(commas).await;
        assert!(
            commas["summary"]
                .as_str()
                .unwrap_or_default()
                .contains("chatbot"),
            "{commas}"
        );
        assert_eq!(commas, preview(repeated).await, "{command:?}");
    }
    assert_eq!(observed_state(&server).await, before, "something changed");
}

/// Too many lift targets is refused on one line that says what to do
/// instead; `--all` does not lift "everything" (it widens a mode name to
/// every activation of that mode), so the advice must not say it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_lift_targets_gives_advice_that_works() {
    let server = TestServer::start().await;
    let before = observed_state(&server).await;
    let mut args = vec!["--server", server.url.as_str(), "mode", "lift"];
    args.extend(std::iter::repeat_n("act_5mj2k0q8c1xv", 257));
    args.extend(["--reason", "too many"]);
    let output = safemode(&args).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("at most 256"), "{stderr}");
    assert!(stderr.contains("name modes instead"), "{stderr}");
    assert!(!stderr.contains("lift everything"), "{stderr}");
    assert_eq!(observed_state(&server).await, before, "something changed");
}

/// `incident show` says whether lifting needs a second approver as
/// `resolve` will have it: a mode in force whose lifting needs one
/// (handoff-guard) makes it "yes" even when the runbook itself says no, and
/// resolving then indeed only makes a request (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_show_says_a_guarded_mode_needs_a_second_approver() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let declared = safemode(&[
        "--server",
        url,
        "incident",
        "declare",
        "ai-handoff-abuse",
        "--severity",
        "sev3",
        "--reason",
        "hand-offs abused",
    ])
    .await;
    assert_eq!(declared.status.code(), Some(0), "{declared:?}");
    let shown = safemode(&[
        "--server",
        url,
        "-o",
        "json",
        "incident",
        "show",
        "ai-handoff-abuse",
    ])
    .await;
    assert_eq!(shown.status.code(), Some(0), "{shown:?}");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        shown["lift_requires_approval"],
        serde_json::json!(true),
        "{shown}"
    );
    let text = safemode(&["--server", url, "incident", "show", "ai-handoff-abuse"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("lifting needs a second approver: yes"),
        "{text}"
    );
    let resolved = safemode(&[
        "--server",
        url,
        "incident",
        "resolve",
        "ai-handoff-abuse",
        "--reason",
        "over",
    ])
    .await;
    assert_eq!(resolved.status.code(), Some(3), "{resolved:?}");
}
