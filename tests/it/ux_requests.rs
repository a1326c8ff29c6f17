//! Issue 13, item 2: requests have states (pending, approved, superseded,
//! expired, withdrawn); `safemode requests` shows the pending ones; asking
//! twice returns the first request; an approver is told a request is
//! superseded and by what; a change that only made a request exits 3 and
//! says who must approve. Every case runs the real `safemode` binary against
//! a real in-process controller (no tokens file: `--principal` names who
//! asks).

use serde_json::Value;

use crate::support::{TestServer, observed_state, safemode};

/// Runs `safemode --server URL --principal WHO args`: exit code, stdout,
/// stderr.
async fn run(server: &TestServer, who: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full = vec!["--server", server.url.as_str(), "--principal", who];
    full.extend_from_slice(args);
    let output = safemode(&full).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `args` with `-o json`; it must exit with `expected`.
async fn json(server: &TestServer, who: &str, args: &[&str], expected: i32) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = run(server, who, &full).await;
    assert_eq!(code, Some(expected), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// The pending request's id in a change's JSON answer.
fn pending_id(answer: &Value) -> String {
    answer["pending"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pending request in {answer}"))
        .to_string()
}

/// Each `(who, args, words)` must exit 1 with one line on stderr holding
/// every one of `words`, print nothing on stdout, and change nothing.
async fn check_refused(server: &TestServer, cases: &[(&str, Vec<&str>, Vec<&str>)]) {
    for (who, args, words) in cases {
        let before = observed_state(server).await;
        let (code, stdout, stderr) = run(server, who, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        for word in words {
            assert!(stderr.contains(word), "{args:?}: {word:?} not in {stderr}");
        }
        assert!(
            !stderr.contains("declare a new one"),
            "{args:?}: advice for a commander given to an approver: {stderr}"
        );
        assert_eq!(
            observed_state(server).await,
            before,
            "{args:?} changed something"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_have_states_and_asking_twice_returns_the_first() {
    let server = TestServer::start().await;
    json(
        &server,
        "alice",
        &[
            "incident",
            "declare",
            "credential-stuffing",
            "--severity",
            "sev3",
            "--reason",
            "login failures x40",
        ],
        0,
    )
    .await;

    // Only a request is made: exit 3, and the answer says who must approve.
    let resolve = [
        "incident",
        "resolve",
        "credential-stuffing",
        "--reason",
        "attack over",
    ];
    let (code, text, stderr) = run(&server, "alice", &resolve).await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        text.starts_with("needs a second approver: request req_"),
        "{text}"
    );
    assert!(text.contains("nothing changed yet"), "{text}");
    assert!(
        text.contains("another principal with the approver role runs: safemode approve req_"),
        "{text}"
    );
    let first = text
        .split_whitespace()
        .find(|w| w.starts_with("req_"))
        .unwrap()
        .trim_end_matches(',')
        .to_string();

    // Asking again, whoever asks, returns the first request.
    let mut as_json = vec!["-o", "json"];
    as_json.extend_from_slice(&resolve);
    for who in ["alice", "carol"] {
        let (code, stdout, stderr) = run(&server, who, &as_json).await;
        assert_eq!(code, Some(3), "{stderr}");
        let again: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(pending_id(&again), first, "{again}");
        assert_eq!(again["pending"]["requested_by"], "alice", "{again}");
    }
    let listed = json(&server, "bob", &["requests"], 0).await;
    assert_eq!(listed["requests"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["requests"][0]["status"], "pending", "{listed}");

    // An escalation supersedes it: it leaves the pending list, and the
    // approver is told what overtook it.
    json(
        &server,
        "alice",
        &[
            "incident",
            "escalate",
            "credential-stuffing",
            "--severity",
            "sev2",
            "--reason",
            "takeovers confirmed",
        ],
        0,
    )
    .await;
    let (code, text, _) = run(&server, "bob", &["requests"]).await;
    assert_eq!(code, Some(0));
    assert!(text.contains("no requests waiting"), "{text}");
    let all = json(&server, "bob", &["requests", "--all"], 0).await;
    let superseded = &all["requests"][0];
    assert_eq!(superseded["id"], first.as_str(), "{all}");
    assert_eq!(superseded["status"], "superseded", "{all}");
    assert!(
        superseded["superseded_by"]
            .as_str()
            .is_some_and(|by| by.contains("was escalated (now sev2) by alice")),
        "{all}"
    );

    // A fresh request, then withdrawn by its requester.
    let fresh = json(&server, "alice", &resolve, 3).await;
    let withdrawn = pending_id(&fresh);
    assert_ne!(withdrawn, first);
    let (code, text, stderr) = run(
        &server,
        "alice",
        &["withdraw", &withdrawn, "--reason", "not yet"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.starts_with(&format!("withdrew {withdrawn}")), "{text}");
    let all = json(&server, "bob", &["requests", "--all"], 0).await;
    let states: Vec<(&str, &str)> = all["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(withdrawn.as_str(), "withdrawn")), "{all}");
    assert!(states.contains(&(first.as_str(), "superseded")), "{all}");

    // Refusals, each with one line and nothing changed.
    check_refused(
        &server,
        &[
            (
                "bob",
                vec!["approve", &first],
                vec![
                    first.as_str(),
                    "is superseded",
                    "was escalated (now sev2) by alice",
                    "asks again",
                ],
            ),
            (
                "bob",
                vec!["approve", &withdrawn],
                vec![withdrawn.as_str(), "is withdrawn by alice"],
            ),
            (
                "alice",
                vec!["withdraw", &withdrawn],
                vec![withdrawn.as_str(), "is withdrawn by alice"],
            ),
            (
                "bob",
                vec!["approve", "req_zzzzzzzzzzzz"],
                vec!["no request req_zzzzzzzzzzzz"],
            ),
        ],
    )
    .await;

    // A request that is approved is approved, and says by whom.
    let last = json(&server, "alice", &resolve, 3).await;
    let last = pending_id(&last);
    let (code, _, stderr) = run(&server, "bob", &["approve", &last]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, text, _) = run(&server, "bob", &["requests", "--all"]).await;
    assert_eq!(code, Some(0));
    let row = text
        .lines()
        .find(|l| l.starts_with(&last))
        .unwrap_or_else(|| panic!("{last} not in {text}"));
    assert!(row.contains("approved by bob"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_that_only_made_a_request_exits_3() {
    let server = TestServer::start().await;
    json(
        &server,
        "alice",
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--reason",
            "ATO wave",
        ],
        0,
    )
    .await;
    let before = observed_state(&server).await;
    let (code, text, stderr) = run(
        &server,
        "alice",
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "contained",
        ],
    )
    .await;
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(
        text.contains("another principal with the approver role runs"),
        "{text}"
    );
    let after = observed_state(&server).await;
    assert_eq!(after.0, before.0, "nothing was lifted");
    assert_eq!(after.2.len(), 1, "one request");
    // A lift that takes effect exits 0.
    json(
        &server,
        "alice",
        &["mode", "apply", "incident-notice", "--reason", "tell them"],
        0,
    )
    .await;
    json(
        &server,
        "alice",
        &["mode", "lift", "incident-notice", "--reason", "told"],
        0,
    )
    .await;
}

/// A lift request is superseded once what it showed changed: its incident
/// moved (the lift of an incident's mode is the incident's request), or one
/// of the activations it would lift is gone. Approving it then does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_request_is_superseded_when_what_it_showed_changed() {
    let server = TestServer::start().await;
    let declared = json(
        &server,
        "alice",
        &[
            "incident",
            "declare",
            "ai-handoff-abuse",
            "--severity",
            "sev3",
            "--reason",
            "hand-off abuse",
        ],
        0,
    )
    .await;
    let incident = declared["incident"]["id"].as_str().unwrap().to_string();
    let lift = json(
        &server,
        "alice",
        &[
            "mode",
            "lift",
            "handoff-guard",
            "--incident-ok",
            "--reason",
            "guard no longer needed",
        ],
        3,
    )
    .await;
    let guarded = pending_id(&lift);
    assert_eq!(lift["pending"]["incident_id"], incident.as_str(), "{lift}");
    let shown = json(&server, "bob", &["incident", "show", &incident], 0).await;
    let last = shown["timeline"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (last["event"].as_str(), last["request_id"].as_str()),
        (Some("requested"), Some(guarded.as_str())),
        "{shown}"
    );
    json(
        &server,
        "alice",
        &[
            "incident",
            "escalate",
            "ai-handoff-abuse",
            "--severity",
            "sev1",
            "--reason",
            "worse",
        ],
        0,
    )
    .await;

    // Two lifts of freezes by hand; the narrower one is approved first.
    let mut ids = Vec::new();
    for channel in ["web", "ivr"] {
        let applied = json(
            &server,
            "alice",
            &[
                "mode",
                "apply",
                "freeze-credential-changes",
                "--channels",
                channel,
                "--reason",
                "ATO wave",
            ],
            0,
        )
        .await;
        ids.push(applied["applied"][0]["id"].as_str().unwrap().to_string());
    }
    let both = json(
        &server,
        "alice",
        &["mode", "lift", &ids[0], &ids[1], "--reason", "contained"],
        3,
    )
    .await;
    let both = pending_id(&both);
    let web = json(
        &server,
        "alice",
        &["mode", "lift", &ids[0], "--reason", "web contained"],
        3,
    )
    .await;
    let web = pending_id(&web);
    let (code, _, stderr) = run(&server, "bob", &["approve", &web]).await;
    assert_eq!(code, Some(0), "{stderr}");

    check_refused(
        &server,
        &[
            (
                "bob",
                vec!["approve", &guarded],
                vec![
                    guarded.as_str(),
                    "is superseded",
                    "was escalated (now sev1)",
                ],
            ),
            (
                "bob",
                vec!["approve", &both],
                vec![
                    both.as_str(),
                    "is superseded",
                    &format!("{} was lifted since", ids[0]),
                ],
            ),
        ],
    )
    .await;
    // The guard of the sev1 stage is still in force.
    let shown = json(&server, "bob", &["incident", "show", &incident], 0).await;
    assert!(
        shown["activations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["mode"] == "handoff-guard"),
        "{shown}"
    );
}
