//! `--dry-run` on `mode apply`, `mode lift`, `incident declare`, `escalate`,
//! `resolve` and `approve`: the change per channel as before -> after, whether it
//! needs a second approver, and nothing written: after every case `status`,
//! `audit` and `requests` read exactly as before. Every case runs the real
//! `safemode` binary against a real in-process controller.

use serde_json::Value;

use crate::support::{Principals, TestServer, safemode};

/// The namespaces the cases use, each set up differently.
const NAMESPACES: [&str; 4] = ["live", "drill-frozen", "drill-throttled", "drill-incident"];

/// Who runs every command (a server without tokens takes the name).
const PRINCIPAL: &str = "alice";

/// Runs `safemode` as [`PRINCIPAL`] against `server`.
async fn run(server: &TestServer, args: &[&str]) -> std::process::Output {
    run_as(server, None, args).await
}

/// Runs `safemode` against `server` with `token`, or as [`PRINCIPAL`] on a
/// server without tokens.
async fn run_as(server: &TestServer, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut full = vec!["--server", server.url.as_str()];
    match token {
        Some(token) => full.extend(["--token", token]),
        None => full.extend(["--principal", PRINCIPAL]),
    }
    full.extend_from_slice(args);
    safemode(&full).await
}

/// Runs a command that must succeed, for the set-up.
async fn must(server: &TestServer, args: &[&str]) {
    let output = run(server, args).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `status` of every namespace (without the server's clock), the whole
/// `audit` log and every request of every namespace, as the CLI prints them
/// in JSON.
async fn state(server: &TestServer) -> Vec<Value> {
    state_as(server, None).await
}

/// [`state`], read with `token`.
async fn state_as(server: &TestServer, token: Option<&str>) -> Vec<Value> {
    let json = |output: std::process::Output| -> Value {
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("JSON output")
    };
    let mut state = vec![json(run_as(server, token, &["-o", "json", "audit"]).await)];
    for namespace in NAMESPACES {
        let args = ["-o", "json", "status", "--namespace", namespace];
        let mut status = json(run_as(server, token, &args).await);
        status
            .as_object_mut()
            .expect("status is an object")
            .remove("server_time");
        state.push(status);
        let args = ["-o", "json", "requests", "--all", "--namespace", namespace];
        state.push(json(run_as(server, token, &args).await));
    }
    state
}

/// A line of text output with its columns' padding collapsed.
fn collapsed(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One dry run: its arguments, the exit code, and either lines its text
/// output must contain (columns collapsed to one space) or the one line it
/// must print on stderr, where `*` stands for an id (the change without
/// `--dry-run` is then refused in the same words).
struct Case {
    args: &'static [&'static str],
    code: i32,
    stdout: &'static [&'static str],
    stderr: Option<&'static str>,
}

/// Every channel's `account.password_reset` row of a change from
/// `before` to `after`.
fn on_every_channel(action: &str, before: &str, after: &str) -> Vec<String> {
    safemode_policy::names::CHANNELS
        .iter()
        .map(|channel| format!("{channel} {action} {before} -> {after}"))
        .collect()
}

async fn check(server: &TestServer, case: &Case, extra: &[String]) {
    let before = state(server).await;
    let output = run(server, case.args).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let args = case.args;
    assert_eq!(
        output.status.code(),
        Some(case.code),
        "{args:?}: {stdout}{stderr}"
    );
    match case.stderr {
        Some(expected) => {
            assert!(output.stdout.is_empty(), "{args:?} printed {stdout}");
            // One line; `*` stands for an id.
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
            let (start, end) = expected.split_once('*').unwrap_or((expected, ""));
            assert!(
                lines[0].starts_with(start)
                    && lines[0].ends_with(end)
                    && lines[0].len() >= expected.len() - 1,
                "{args:?}: {stderr:?} is not {expected:?}"
            );
            // The change itself is refused in the same words.
            let real: Vec<&str> = args.iter().copied().filter(|a| *a != "--dry-run").collect();
            let refused = run(server, &real).await;
            assert_eq!(refused.status.code(), Some(case.code), "{real:?}");
            assert_eq!(refused.stderr, output.stderr, "{real:?}");
        }
        None => {
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
            let lines: Vec<String> = stdout.lines().map(collapsed).collect();
            for expected in case
                .stdout
                .iter()
                .map(|s| s.to_string())
                .chain(extra.iter().cloned())
            {
                // "..." at the end: the line starts so (it goes on with ids).
                let found = match expected.strip_suffix("...") {
                    Some(start) => lines.iter().any(|l| l.starts_with(start)),
                    None => lines.contains(&expected),
                };
                assert!(found, "{args:?}: no line {expected:?} in\n{stdout}");
            }
            // The closing words, then the replica that answered.
            let n = lines.len();
            assert!(n >= 2, "{args:?}: {stdout}");
            assert_eq!(
                lines[n - 2],
                "dry run: nothing changed",
                "{args:?}: {stdout}"
            );
            assert!(
                lines[n - 1].starts_with("answered by replica "),
                "{args:?}: {stdout}"
            );
        }
    }
    assert_eq!(
        state(server).await,
        before,
        "{args:?} changed status, audit or requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_shows_the_change_per_channel_and_changes_nothing() {
    let server = TestServer::start().await;
    must(
        &server,
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--namespace",
            "drill-frozen",
            "--reason",
            "set-up",
        ],
    )
    .await;
    must(
        &server,
        &[
            "mode",
            "apply",
            "throttle-high-risk",
            "--namespace",
            "drill-throttled",
            "--reason",
            "set-up",
        ],
    )
    .await;
    must(
        &server,
        &[
            "incident",
            "declare",
            "credential-stuffing",
            "--severity",
            "sev2",
            "--namespace",
            "drill-incident",
            "--reason",
            "set-up",
        ],
    )
    .await;

    let approvers = "needs a second approver: someone with role approver or drill or admin other than alice; the request would move incident inc_...";
    let cases: &[(Case, Vec<String>)] = &[
        // Freezing denies password resets on every channel.
        (
            Case {
                args: &[
                    "mode",
                    "apply",
                    "freeze-credential-changes",
                    "--reason",
                    "takeover wave",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "dry run in live: apply freeze-credential-changes on all channels (at revision 0)",
                    "customer message for account.email_change, account.mfa_reset, account.password_reset, account.phone_change on every channel: (none) -> \"To protect your account, changes to sign-in details are paused for a short time. Nothing else about your account is affected.\"",
                    "CHANNEL ACTION BEFORE AFTER",
                    "web account.recovery allow -> review in account-recovery",
                ],
                stderr: None,
            },
            on_every_channel("account.password_reset", "allow", "deny"),
        ),
        // Validation is the change's own: a misspelt mode is refused alike.
        (
            Case {
                args: &[
                    "mode",
                    "apply",
                    "freez-credential-changes",
                    "--reason",
                    "x",
                    "--dry-run",
                ],
                code: 1,
                stdout: &[],
                stderr: Some(
                    "error: unknown mode 'freez-credential-changes'; did you mean 'freeze-credential-changes'? `safemode mode list` shows the catalogue",
                ),
            },
            Vec::new(),
        ),
        // Lifting the freeze needs a second approver, who is named.
        (
            Case {
                args: &[
                    "mode",
                    "lift",
                    "freeze-credential-changes",
                    "--namespace",
                    "drill-frozen",
                    "--reason",
                    "wave over",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "needs a second approver: someone with role approver or drill or admin other than alice; the request would lift freeze-credential-changes (act_...",
                ],
                stderr: None,
            },
            on_every_channel("account.password_reset", "deny", "allow"),
        ),
        // A throttle lifts without one.
        (
            Case {
                args: &[
                    "mode",
                    "lift",
                    "throttle-high-risk",
                    "--namespace",
                    "drill-throttled",
                    "--reason",
                    "quiet again",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "dry run in drill-throttled: lift throttle-high-risk on all channels (at revision ...",
                    "email payment.refund throttle 5 per 86400s; review in payments-review when amount over 500 -> allow",
                ],
                stderr: None,
            },
            on_every_channel("account.*", "throttle 3 per 3600s", "allow"),
        ),
        (
            Case {
                args: &[
                    "incident",
                    "declare",
                    "credential-stuffing",
                    "--severity",
                    "sev1",
                    "--reason",
                    "takeovers",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[],
                stderr: None,
            },
            on_every_channel(
                "account.password_reset",
                "allow",
                "deny + throttle 3 per 3600s",
            ),
        ),
        // Up a severity: the freeze comes on, no approval needed.
        (
            Case {
                args: &[
                    "incident",
                    "escalate",
                    "credential-stuffing",
                    "--namespace",
                    "drill-incident",
                    "--severity",
                    "sev1",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "web account.password_reset step_up to 0.8 + throttle 3 per 3600s -> deny + throttle 3 per 3600s",
                ],
                stderr: None,
            },
            Vec::new(),
        ),
        // Down a severity: the bots get accounts back, after approval.
        (
            Case {
                args: &[
                    "incident",
                    "escalate",
                    "credential-stuffing",
                    "--namespace",
                    "drill-incident",
                    "--severity",
                    "sev3",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "dry run in drill-incident: lift bots-faq-only on all channels (at revision ...",
                    "chatbot * deny -> allow",
                    "chatbot account.* deny + throttle 3 per 3600s -> step_up to 0.8 + throttle 3 per 3600s",
                ],
                stderr: None,
            },
            vec![approvers.to_string()],
        ),
        (
            Case {
                args: &[
                    "incident",
                    "resolve",
                    "credential-stuffing",
                    "--namespace",
                    "drill-incident",
                    "--reason",
                    "over",
                    "--dry-run",
                ],
                code: 0,
                stdout: &[
                    "web account.* step_up to 0.8 + throttle 3 per 3600s -> allow",
                    "chatbot * deny -> allow",
                    "needs a second approver: someone with role approver or drill or admin other than alice; the request would resolve incident inc_...",
                ],
                stderr: None,
            },
            Vec::new(),
        ),
        // The same severity is refused as the change is.
        (
            Case {
                args: &[
                    "incident",
                    "escalate",
                    "credential-stuffing",
                    "--namespace",
                    "drill-incident",
                    "--severity",
                    "sev2",
                    "--dry-run",
                ],
                code: 1,
                stdout: &[],
                stderr: Some("error: incident inc_* is already at sev2"),
            },
            Vec::new(),
        ),
    ];
    for (case, extra) in cases {
        check(&server, case, extra).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_in_json_gives_a_structured_preview() {
    let server = TestServer::start().await;
    must(
        &server,
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--reason",
            "set-up",
        ],
    )
    .await;
    let before = state(&server).await;
    let json = |output: std::process::Output| -> Value {
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        serde_json::from_slice(&output.stdout).expect("JSON output")
    };
    let lift = json(
        run(
            &server,
            &[
                "-o",
                "json",
                "mode",
                "lift",
                "freeze-credential-changes",
                "--reason",
                "over",
                "--dry-run",
            ],
        )
        .await,
    );
    assert_eq!(lift["dry_run"], true);
    assert_eq!(lift["namespace"], "live");
    let preview = &lift["preview"];
    assert_eq!(preview["needs_approval"], true, "{lift}");
    assert_eq!(
        preview["approval"]["roles"],
        serde_json::json!(["approver", "admin"])
    );
    assert_eq!(preview["approval"]["not_by"], PRINCIPAL);
    let channels = preview["channels"].as_array().expect("channels");
    assert_eq!(
        channels.len(),
        safemode_policy::names::CHANNELS.len(),
        "{lift}"
    );
    for channel in channels {
        let reset = channel["effects"]
            .as_array()
            .expect("effects")
            .iter()
            .find(|e| e["action"] == "account.password_reset")
            .unwrap_or_else(|| panic!("no password reset in {channel}"));
        assert_eq!(reset["before"], "deny", "{channel}");
        assert_eq!(reset["after"], "allow", "{channel}");
    }
    let apply = json(
        run(
            &server,
            &[
                "-o",
                "json",
                "mode",
                "apply",
                "freeze-credential-changes",
                "--reason",
                "again",
                "--dry-run",
            ],
        )
        .await,
    );
    // Already active: nothing would change.
    assert_eq!(apply["preview"]["needs_approval"], false, "{apply}");
    assert_eq!(apply["preview"]["summary"], Value::Null, "{apply}");
    assert_eq!(
        apply["preview"]["channels"],
        serde_json::json!([]),
        "{apply}"
    );
    assert_eq!(state(&server).await, before, "a dry run changed something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_is_allowed_and_refused_by_the_same_roles_and_audits_neither() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let admin = Some(principals.token("admin"));
    let commander = Some(principals.token("commander"));
    let output = run_as(
        &server,
        commander,
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--reason",
            "set-up",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let before = state_as(&server, admin).await;

    // A viewer may not change anything, so may not try it either.
    let refused = run_as(
        &server,
        Some(principals.token("viewer")),
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "over",
            "--dry-run",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(refused.stdout.is_empty());
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "error: viewer (roles: viewer) may not change modes or incidents in namespace live; that needs the commander role"
        ]
    );
    assert_eq!(
        state_as(&server, admin).await,
        before,
        "a refused dry run was audited"
    );
    // The change itself is refused in the same words (and, being a change,
    // audited, so the state is read again).
    let real = run_as(
        &server,
        Some(principals.token("viewer")),
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "over",
        ],
    )
    .await;
    assert_eq!(real.status.code(), Some(1));
    assert_eq!(real.stderr, refused.stderr);
    let before = state_as(&server, admin).await;

    // A commander's lift of the freeze waits for an approver, named by role.
    let lift = run_as(
        &server,
        commander,
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "over",
            "--dry-run",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&lift.stdout);
    assert_eq!(lift.status.code(), Some(0), "{lift:?}");
    let lines: Vec<String> = stdout.lines().map(collapsed).collect();
    assert!(
        lines.contains(&"web account.password_reset deny -> allow".to_string()),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(
            "needs a second approver: someone with role approver or admin other than commander; the request would lift freeze-credential-changes (act_"
        )),
        "{stdout}"
    );
    let n = lines.len();
    assert_eq!(lines[n - 2], "dry run: nothing changed", "{stdout}");
    assert!(lines[n - 1].starts_with("answered by replica "), "{stdout}");
    assert_eq!(
        state_as(&server, admin).await,
        before,
        "a dry run changed something"
    );
}

/// The first `req_...` id anywhere in a JSON answer.
fn request_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.starts_with("req_") => Some(s.clone()),
        Value::Array(items) => items.iter().find_map(request_id),
        Value::Object(fields) => fields.values().find_map(request_id),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_previewed_by_the_approver_and_refused_to_others() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let admin = Some(principals.token("admin"));
    let commander = Some(principals.token("commander"));
    let approver = Some(principals.token("approver"));
    // The lift waits for a second approver: exit 3, a request.
    let apply = [
        "mode",
        "apply",
        "freeze-credential-changes",
        "--reason",
        "set-up",
    ];
    let lift = [
        "mode",
        "lift",
        "freeze-credential-changes",
        "--reason",
        "over",
    ];
    for (args, code) in [(apply, 0), (lift, 3)] {
        let output = run_as(&server, commander, &args).await;
        assert_eq!(output.status.code(), Some(code), "{output:?}");
    }
    let requests = run_as(&server, admin, &["-o", "json", "requests"]).await;
    let id = request_id(&serde_json::from_slice(&requests.stdout).unwrap())
        .expect("the lift waits as a request");
    let before = state_as(&server, admin).await;

    // The requester may not approve, so may not preview approving either;
    // the refusal of a dry run is not audited.
    let refused = run_as(&server, commander, &["approve", &id, "--dry-run"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(refused.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: commander (roles: commander) may not approve requests"),
        "{stderr}"
    );
    assert_eq!(
        state_as(&server, admin).await,
        before,
        "a refused dry run was audited"
    );

    // The approver sees per channel what approving will do; nothing changes.
    let preview = run_as(&server, approver, &["approve", &id, "--dry-run"]).await;
    let stdout = String::from_utf8_lossy(&preview.stdout);
    assert_eq!(preview.status.code(), Some(0), "{preview:?}");
    let lines: Vec<String> = stdout.lines().map(collapsed).collect();
    assert!(
        lines[0].starts_with("dry run in live: lift freeze-credential-changes"),
        "{stdout}"
    );
    assert!(
        lines.contains(&"web account.password_reset deny -> allow".to_string()),
        "{stdout}"
    );
    assert_eq!(
        lines[lines.len() - 2],
        "dry run: nothing changed",
        "{stdout}"
    );
    assert_eq!(
        state_as(&server, admin).await,
        before,
        "a dry run changed something"
    );

    let approved = run_as(&server, approver, &["approve", &id]).await;
    assert_eq!(approved.status.code(), Some(0), "{approved:?}");
}
