//! Issue 13, item 7 (part): command-line conventions. `-o` is `--output`,
//! `decide --exit-code` tells the effect by its exit code, and
//! `safemode completions` prints a shell's completion script. None of them
//! changes anything in the namespace or the audit log.

use crate::support::{TestServer, safemode};

/// The namespace's revision and the audit log's length, as the CLI reads
/// them: what "nothing changed" is checked against.
async fn state(server: &TestServer) -> (i64, usize) {
    let status = safemode(&["--server", &server.url, "-o", "json", "status"]).await;
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let audit = safemode(&["--server", &server.url, "--output", "json", "audit"]).await;
    assert_eq!(audit.status.code(), Some(0), "{audit:?}");
    let audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    (
        status["revision"].as_i64().expect("revision"),
        audit["entries"].as_array().expect("entries").len(),
    )
}

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
    let before = state(&server).await;

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
        let mut full = vec!["--server", url];
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

    assert_eq!(state(&server).await, before, "something changed");
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
