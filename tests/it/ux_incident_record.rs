//! Issue 13, item 1: an incident's record follows what is in force. Lifting
//! a mode of an active incident is refused, naming the incident, unless
//! `--incident-ok` says it is meant; then (and when a requested lift is
//! approved) the incident's timeline records the lift, by whom and why, and
//! `incident show` lists only what is still in force. Escalating keeps the
//! activation of a mode that stays on. Every case runs the real `safemode`
//! binary against a real in-process controller.

use serde_json::Value;

use crate::support::{TestServer, observed_state, safemode};

/// Runs `safemode --server URL args` and returns its exit code, stdout and
/// stderr.
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

/// Runs `args` with `-o json`; it must succeed.
async fn json(server: &TestServer, args: &[&str]) -> Value {
    json_exiting(server, args, 0).await
}

/// Runs `args` with `-o json`; it must exit with `expected`.
async fn json_exiting(server: &TestServer, args: &[&str], expected: i32) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = run(server, &full).await;
    assert_eq!(code, Some(expected), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// The incident's modes in force, by name, as `incident show` lists them.
fn modes_in_force(incident: &Value) -> Vec<String> {
    let mut modes: Vec<String> = incident["activations"]
        .as_array()
        .unwrap_or_else(|| panic!("no activations in {incident}"))
        .iter()
        .map(|a| a["mode"].as_str().unwrap().to_string())
        .collect();
    modes.sort();
    modes
}

/// The activation id of `mode` among an incident's activations.
fn id_of(incident: &Value, mode: &str) -> String {
    incident["activations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["mode"] == mode)
        .unwrap_or_else(|| panic!("{mode} not in force in {incident}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_of_an_incidents_mode_is_refused_or_goes_on_its_timeline() {
    let server = TestServer::start().await;
    let declared = json(
        &server,
        &[
            "incident",
            "declare",
            "ai-handoff-abuse",
            "--severity",
            "sev2",
            "--reason",
            "bot sessions laundered into hand-offs",
        ],
    )
    .await;
    let incident = &declared["incident"];
    assert_eq!(
        modes_in_force(incident),
        ["bots-faq-only", "handoff-guard"],
        "{declared}"
    );
    let id = incident["id"].as_str().unwrap().to_string();
    let guard = id_of(incident, "handoff-guard");

    // Refused: each names the incident and the way out, and changes nothing.
    let refusals: &[&[&str]] = &[
        &["mode", "lift", "bots-faq-only", "--reason", "bot fixed"],
        &["mode", "lift", &guard, "--reason", "bot fixed"],
        &[
            "mode",
            "lift",
            "handoff-guard",
            "bots-faq-only",
            "--reason",
            "bot fixed",
        ],
        &[
            "mode",
            "lift",
            "bots-faq-only",
            "--all",
            "--reason",
            "bot fixed",
        ],
    ];
    for args in refusals {
        let before = observed_state(&server).await;
        let (code, stdout, stderr) = run(&server, args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        for part in [
            "error: ",
            id.as_str(),
            "ai-handoff-abuse",
            "--incident-ok",
            "safemode incident escalate|resolve ai-handoff-abuse",
        ] {
            assert!(stderr.contains(part), "{args:?}: {part:?} not in {stderr}");
        }
        assert_eq!(
            observed_state(&server).await,
            before,
            "{args:?} changed something"
        );
    }

    // Meant: lifted, and the incident says so.
    let (code, stdout, stderr) = run(
        &server,
        &[
            "mode",
            "lift",
            "bots-faq-only",
            "--incident-ok",
            "--reason",
            "the bot flow is fixed",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("bots-faq-only"), "{stdout}");
    let shown = json(&server, &["incident", "show", "ai-handoff-abuse"]).await;
    assert_eq!(modes_in_force(&shown), ["handoff-guard"], "{shown}");
    assert_eq!(
        shown["activation_ids"],
        serde_json::json!([guard]),
        "{shown}"
    );
    assert_eq!(shown["status"], "active", "{shown}");
    let lifted = shown["timeline"].as_array().unwrap().last().unwrap();
    assert_eq!(lifted["event"], "lifted", "{shown}");
    assert_eq!(lifted["reason"], "the bot flow is fixed", "{shown}");
    assert!(
        lifted["detail"]
            .as_str()
            .is_some_and(|d| d.contains("bots-faq-only on")),
        "{shown}"
    );
    assert!(
        lifted["principal"].as_str().is_some_and(|p| !p.is_empty()),
        "{shown}"
    );
    let status = json(&server, &["status"]).await;
    let active: Vec<&str> = status["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["mode"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["handoff-guard"], "{status}");

    // A lift that needs a second approver: the approval goes on the
    // timeline, by the approver, with the request.
    let requested = json_exiting(
        &server,
        &[
            "--principal",
            "alice",
            "mode",
            "lift",
            "handoff-guard",
            "--incident-ok",
            "--reason",
            "hand-offs verified again",
        ],
        3,
    )
    .await;
    let request = requested["pending"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pending request in {requested}"))
        .to_string();
    let (code, _, stderr) = run(&server, &["--principal", "bob", "approve", &request]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let shown = json(&server, &["incident", "show", &id]).await;
    assert!(modes_in_force(&shown).is_empty(), "{shown}");
    let approved = shown["timeline"].as_array().unwrap().last().unwrap();
    assert_eq!(approved["event"], "lifted", "{shown}");
    assert_eq!(approved["principal"], "bob", "{shown}");
    assert_eq!(approved["request_id"], request.as_str(), "{shown}");
    assert!(
        approved["detail"]
            .as_str()
            .is_some_and(|d| d.contains("handoff-guard on")),
        "{shown}"
    );

    // The text answer says the same in words.
    let (code, text, _) = run(&server, &["incident", "show", &id]).await;
    assert_eq!(code, Some(0));
    assert!(text.contains("  modes in force: none"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" lifted ") && l.contains("lifted handoff-guard on"))
            .count(),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalating_keeps_the_activation_of_a_mode_that_stays_on() {
    let server = TestServer::start().await;
    let declared = json(
        &server,
        &[
            "incident",
            "declare",
            "breach-containment",
            "--severity",
            "sev3",
            "--reason",
            "breach suspected",
        ],
    )
    .await;
    let sev3 = &declared["incident"];
    let verified = id_of(sev3, "verified-channels-only");
    let notice = id_of(sev3, "incident-notice");

    let escalated = json(
        &server,
        &[
            "incident",
            "escalate",
            "breach-containment",
            "--severity",
            "sev2",
            "--reason",
            "exfiltration confirmed",
        ],
    )
    .await;
    let sev2 = &escalated["incident"];
    assert_eq!(
        modes_in_force(sev2),
        [
            "freeze-credential-changes",
            "incident-notice",
            "verified-channels-only"
        ],
        "{escalated}"
    );
    assert_eq!(
        id_of(sev2, "verified-channels-only"),
        verified,
        "{escalated}"
    );
    assert_eq!(id_of(sev2, "incident-notice"), notice, "{escalated}");
    let status = json(&server, &["status"]).await;
    let ids: Vec<&str> = status["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{status}");
    assert!(ids.contains(&verified.as_str()) && ids.contains(&notice.as_str()));

    // The kept activations carry the new stage's customer message.
    let (code, decided, stderr) = run(
        &server,
        &["decide", "--channel", "ivr", "--action", "payment.refund"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        decided.contains("changes to sign-in details are paused"),
        "{decided}"
    );

    // The text answer names the modes, each with its id.
    let (code, text, stderr) = run(
        &server,
        &[
            "incident",
            "escalate",
            "breach-containment",
            "--severity",
            "sev1",
            "--reason",
            "attackers still inside",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let modes = text
        .lines()
        .find(|l| l.starts_with("  modes in force: "))
        .unwrap_or_else(|| panic!("no modes line in {text}"));
    assert!(
        modes.contains(&format!("verified-channels-only on all ({verified})")),
        "{modes}"
    );
}

/// A resolved incident lists nothing in force, whatever its record held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_incident_lists_nothing_in_force() {
    let server = TestServer::start().await;
    json(
        &server,
        &[
            "incident",
            "declare",
            "ai-handoff-abuse",
            "--severity",
            "sev2",
            "--reason",
            "hand-off abuse",
        ],
    )
    .await;
    let listed = json(&server, &["incident", "list"]).await;
    let id = listed["incidents"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        modes_in_force(&listed["incidents"][0]),
        ["bots-faq-only", "handoff-guard"]
    );
    let resolved = json_exiting(
        &server,
        &[
            "--principal",
            "alice",
            "incident",
            "resolve",
            &id,
            "--reason",
            "contained",
        ],
        3,
    )
    .await;
    // handoff-guard needs a second approver to lift.
    let request = resolved["pending"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no pending request in {resolved}"));
    let (code, _, stderr) = run(&server, &["--principal", "bob", "approve", request]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let shown = json(&server, &["incident", "show", &id]).await;
    assert_eq!(shown["status"], "resolved", "{shown}");
    assert!(modes_in_force(&shown).is_empty(), "{shown}");
    assert_eq!(shown["activation_ids"], serde_json::json!([]), "{shown}");
}
