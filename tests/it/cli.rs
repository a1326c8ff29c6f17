//! The `safemode` command line against a real controller: bad input gets one
//! clear line, a non-zero exit, and changes nothing; good input prints what a
//! commander needs.

use crate::support::{TestServer, safemode};

/// Runs a command that must be refused: exit 1, nothing on stdout, and
/// exactly one line on stderr containing `expected`.
async fn check_refused(args: &[&str], expected: &str) {
    check_fails(args, 1, expected).await;
}

/// Runs a command that must fail with `code` (1 refused, 2 bad usage),
/// nothing on stdout, and exactly one line on stderr containing `expected`.
async fn check_fails(args: &[&str], code: i32, expected: &str) {
    let output = safemode(args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "{args:?} should fail with exit {code}; stderr: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "{args:?} printed to stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?} should print one line, printed: {stderr}"
    );
    assert!(
        stderr.starts_with("error: ") && stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let server = TestServer::start().await;
    server.apply(&["freeze-credential-changes"]).await;
    let before = server.status("live").await;
    let url = server.url.as_str();

    let cases: &[(&[&str], &str)] = &[
        (
            &["mode", "apply", "no-such-mode", "--reason", "x"],
            "unknown mode 'no-such-mode'",
        ),
        (
            &["mode", "apply", "Bad_Name", "--reason", "x"],
            "bad mode name 'Bad_Name'",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "x",
                "--channels",
                "chat*",
            ],
            "unknown channel 'chat*'",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "x",
                "--channels",
                "*,ivr",
            ],
            "'*' already means every channel",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "x",
                "--channels",
                "",
            ],
            "--channels is empty",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "x",
                "--namespace",
                "Live!",
            ],
            "unknown namespace 'Live!'",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "x",
                "--namespace",
                "liev",
            ],
            "unknown namespace 'liev': use live (production) or drill-<id>",
        ),
        (
            &[
                "mode",
                "apply",
                "read-only-last-known-good",
                "--reason",
                "x",
                "--as-of",
                "yesterday",
            ],
            "--as-of 'yesterday'",
        ),
        (
            &[
                "mode",
                "apply",
                "read-only-last-known-good",
                "--reason",
                "x",
                "--as-of",
                "2999-01-01T00:00:00Z",
            ],
            "is in the future",
        ),
        (
            &["mode", "lift", "act_zzzzzzzzzzzz", "--reason", "x"],
            "nothing active in namespace live matches 'act_zzzzzzzzzzzz'",
        ),
        (
            &["mode", "lift", "act_short", "--reason", "x"],
            "bad activation id 'act_short'",
        ),
        (
            &["mode", "lift", "step-up-account-changes", "--reason", "x"],
            "nothing active in namespace live",
        ),
        (
            &["decide", "--channel", "chatbot", "--action", "acount.reset"],
            "unknown action 'acount.reset'",
        ),
        (
            &["decide", "--channel", "fax", "--action", "order.view"],
            "--channel: unknown channel 'fax'",
        ),
        (
            &[
                "decide",
                "--channel",
                "chatbot",
                "--action",
                "order.view",
                "--confidence",
                "1.5",
            ],
            "--confidence 1.5 is outside 0 to 1",
        ),
        (
            &[
                "decide",
                "--channel",
                "chatbot",
                "--action",
                "order.view",
                "--method",
                "carrier_pigeon",
            ],
            "unknown verification method 'carrier_pigeon'",
        ),
        (&["watch", "--channel", "fax"], "unknown channel 'fax'"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["--server", url];
        full.extend_from_slice(args);
        check_refused(&full, expected).await;
    }
    // Bad usage, as clap finds it: a missing or malformed argument exits 2,
    // also on one line.
    let usage: &[(&[&str], &str)] = &[
        (
            &["mode", "apply", "step-up-account-changes"],
            "required arguments were not provided: --reason <REASON>",
        ),
        (
            &["mode", "apply", "step-up-account-changes", "--reason", ""],
            "a reason is required",
        ),
        (
            &[
                "mode",
                "apply",
                "step-up-account-changes",
                "--reason",
                "   ",
            ],
            "a reason is required",
        ),
        (
            &[
                "incident",
                "declare",
                "credential-stuffing",
                "--reason",
                "x",
            ],
            "required arguments were not provided: --severity <SEVERITY>",
        ),
        (&["mode", "lift"], "required arguments were not provided"),
        (
            &["mode", "lift", "freeze-credential-changes"],
            "required arguments were not provided: --reason <REASON>",
        ),
        (
            &["status", "--change-id", "c1"],
            "--change-id is not used by `safemode status`",
        ),
        (&["serve"], "--server is not used by `safemode serve`"),
        (
            &["proposals", "--change-id", "c1"],
            "--change-id is not used by `safemode proposals`",
        ),
        (
            &["--change-id", "c1", "insights"],
            "--change-id is not used by `safemode insights`",
        ),
        (
            &["mode", "apply", "x", "--reasn", "y"],
            "unexpected argument '--reasn'",
        ),
    ];
    for (args, expected) in usage {
        let mut full = vec!["--server", url];
        full.extend_from_slice(args);
        check_fails(&full, 2, expected).await;
    }
    // A signal name of the client's own, refused before any connection.
    check_fails(
        &[
            "--server",
            url,
            "signal",
            "safemode.step_up_failed",
            "--channel",
            "web",
        ],
        1,
        "is under safemode., which the client counts itself",
    )
    .await;
    let after = server.status("live").await;
    assert_eq!(
        after.revision, before.revision,
        "a refused command changed the namespace"
    );
    assert_eq!(after.activations, before.activations);
}

#[tokio::test]
async fn an_unreachable_or_malformed_server_address_is_one_clear_line() {
    // Port 1 on loopback: nothing listens there.
    check_refused(
        &["--server", "http://127.0.0.1:1", "status"],
        "cannot reach the safemode controller at http://127.0.0.1:1",
    )
    .await;
    check_refused(
        &[
            "--server",
            "http://127.0.0.1:1",
            "mode",
            "apply",
            "incident-notice",
            "--reason",
            "x",
        ],
        "cannot reach the safemode controller",
    )
    .await;
    check_refused(
        &[
            "--server",
            "http://127.0.0.1:1",
            "decide",
            "--channel",
            "web",
            "--action",
            "order.view",
        ],
        "cannot reach the safemode controller",
    )
    .await;
    check_refused(
        &["--server", "not a url", "status"],
        "bad server address 'not a url'",
    )
    .await;
}

fn stdout_json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commander_session_from_the_command_line() {
    let server = TestServer::start().await;
    let url = server.url.as_str();

    let modes =
        stdout_json(&safemode(&["--server", url, "--output", "json", "mode", "list"]).await);
    assert_eq!(modes["modes"].as_array().unwrap().len(), 12);

    let applied = safemode(&[
        "--server",
        url,
        "mode",
        "apply",
        "step-up-account-changes",
        "throttle-high-risk",
        "--reason",
        "credential stuffing, INC-7",
        "--channels",
        "web,mobile",
    ])
    .await;
    let text = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(
        text.contains("applied step-up-account-changes as act_"),
        "{text}"
    );
    assert!(text.contains("on web,mobile channels"), "{text}");
    let revision: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("namespace live at revision "))
        .and_then(|rest| rest.split(' ').next())
        .expect("the new revision is printed")
        .parse()
        .unwrap();

    // Applying again changes nothing and says so.
    let again = stdout_json(
        &safemode(&[
            "--server",
            url,
            "--output",
            "json",
            "mode",
            "apply",
            "step-up-account-changes",
            "--reason",
            "again",
            "--channels",
            "mobile,web",
        ])
        .await,
    );
    assert_eq!(again["revision"], revision);
    assert_eq!(again["applied"].as_array().unwrap().len(), 0);
    assert_eq!(
        again["already_active"][0]["mode"],
        "step-up-account-changes"
    );

    let decision = stdout_json(
        &safemode(&[
            "--server",
            url,
            "--output",
            "json",
            "decide",
            "--channel",
            "web",
            "--action",
            "account.email_change",
            "--confidence",
            "0.95",
            "--method",
            "totp",
        ])
        .await,
    );
    // A satisfied step-up still leaves the throttle in force.
    assert_eq!(decision["effect"], "throttle");
    assert_eq!(decision["max"], 3);
    assert_eq!(decision["revision"], revision);
    assert_eq!(decision["stale"], false);
    assert_eq!(decision["reasons"].as_array().unwrap().len(), 2);

    let unscoped = stdout_json(
        &safemode(&[
            "--server",
            url,
            "--output",
            "json",
            "decide",
            "--channel",
            "ivr",
            "--action",
            "account.email_change",
        ])
        .await,
    );
    assert_eq!(
        unscoped["effect"], "allow",
        "the activations cover web and mobile only"
    );

    let status = stdout_json(&safemode(&["--server", url, "--output", "json", "status"]).await);
    assert_eq!(status["revision"], revision);
    assert_eq!(status["activations"].as_array().unwrap().len(), 2);

    let lifted = stdout_json(
        &safemode(&[
            "--server",
            url,
            "--output",
            "json",
            "mode",
            "lift",
            "throttle-high-risk",
            "--reason",
            "volume back to normal",
        ])
        .await,
    );
    assert_eq!(lifted["lifted"][0]["mode"], "throttle-high-risk");
    assert!(lifted["revision"].as_i64() > Some(revision));
}

/// The quickstart server has no tokens file; two people are still two
/// principals, named by `--principal`, and lifting a freeze takes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_a_freeze_without_tokens_takes_a_second_named_principal() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let as_ = |who: &'static str, args: &[&str]| {
        let mut all = vec!["--server", url, "--output", "json", "--principal", who];
        all.extend_from_slice(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        safemode(&args).await
    };

    let applied = stdout_json(
        &run(as_(
            "alice",
            &[
                "mode",
                "apply",
                "freeze-credential-changes",
                "--reason",
                "ATO wave",
            ],
        ))
        .await,
    );
    let frozen_at = applied["revision"].as_i64().unwrap();

    // Only a request was made: exit 3, and the output says who approves.
    let requested = run(as_(
        "alice",
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "contained",
        ],
    ))
    .await;
    assert_eq!(requested.status.code(), Some(3), "{requested:?}");
    let lift: serde_json::Value = serde_json::from_slice(&requested.stdout).unwrap();
    assert_eq!(lift["lifted"].as_array().unwrap().len(), 0, "{lift}");
    let request = lift["pending"]["id"]
        .as_str()
        .expect("a pending request")
        .to_owned();
    assert_eq!(lift["pending"]["requested_by"], "alice");

    // The requester cannot approve their own request, and nothing moves.
    let own = run(as_("alice", &["approve", &request])).await;
    assert_eq!(own.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&own.stderr);
    assert!(stderr.contains("cannot approve it too"), "{stderr}");
    let status = stdout_json(&run(as_("alice", &["status"])).await);
    assert_eq!(status["revision"], frozen_at);
    assert_eq!(status["activations"].as_array().unwrap().len(), 1);

    let approved = stdout_json(&run(as_("bob", &["approve", &request])).await);
    assert_eq!(approved["request"]["approved_by"], "bob");
    let status = stdout_json(&run(as_("bob", &["status"])).await);
    assert_eq!(status["activations"].as_array().unwrap().len(), 0);
    assert!(status["revision"].as_i64().unwrap() > frozen_at);

    // A name that could not be one is refused at the edge.
    let bad = run(as_("bob smith", &["status"])).await;
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("principal"), "{stderr}");
}

#[tokio::test]
async fn a_closed_output_pipe_ends_the_command_quietly() {
    let server = TestServer::start().await;
    server.apply(&["incident-notice"]).await;
    let url = server.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        // The reading end is gone before the command starts, as with
        // `safemode status | head -0`: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        std::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
            .args(["--server", &url, "status"])
            .stdout(writer)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
