//! Issue 13, item 8 (part): `status` says which incident each activation
//! belongs to, in its text (an INCIDENT column) and its JSON.

use crate::support::{TestServer, safemode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_incident_of_each_activation() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let declared = safemode(&[
        "--server",
        url,
        "-o",
        "json",
        "incident",
        "declare",
        "credential-stuffing",
        "--severity",
        "sev3",
        "--reason",
        "login failures x40",
    ])
    .await;
    assert_eq!(declared.status.code(), Some(0), "{declared:?}");
    let declared: serde_json::Value = serde_json::from_slice(&declared.stdout).unwrap();
    let incident = declared["incident"]["id"]
        .as_str()
        .or_else(|| declared["id"].as_str())
        .unwrap_or_else(|| panic!("no incident id in {declared}"))
        .to_string();
    let by_hand = safemode(&[
        "--server",
        url,
        "mode",
        "apply",
        "incident-notice",
        "--reason",
        "by hand",
    ])
    .await;
    assert_eq!(by_hand.status.code(), Some(0), "{by_hand:?}");

    let json = safemode(&["--server", url, "-o", "json", "status"]).await;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let activations = json["activations"].as_array().expect("activations");
    let of_incident = activations
        .iter()
        .filter(|a| a["incident_id"].as_str() == Some(incident.as_str()))
        .count();
    let manual = activations
        .iter()
        .filter(|a| a["mode"] == "incident-notice" && a["incident_id"].is_null())
        .count();
    assert!(of_incident >= 1, "no activation of {incident}: {json}");
    assert_eq!(manual, 1, "{json}");

    let text = safemode(&["--server", url, "status"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    let header = text
        .lines()
        .find(|l| l.starts_with("ACTIVATION"))
        .unwrap_or_else(|| panic!("no table in {text}"));
    assert!(header.contains("INCIDENT"), "{header}");
    assert_eq!(
        text.lines().filter(|l| l.contains(&incident)).count(),
        of_incident,
        "{text}"
    );
}

/// A decision names the modes behind it (with their ids), in people's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_names_the_modes_behind_it() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let applied = safemode(&[
        "--server",
        url,
        "-o",
        "json",
        "mode",
        "apply",
        "freeze-credential-changes",
        "--reason",
        "ATO wave",
    ])
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let args = [
        "--server",
        url,
        "decide",
        "--channel",
        "chatbot",
        "--action",
        "account.password_reset",
    ];
    let text = safemode(&args).await;
    assert_eq!(text.status.code(), Some(0), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("  because: freeze-credential-changes (act_")),
        "{text}"
    );
    // The JSON is the client's report as it was: reasons are ids.
    let mut json_args = vec!["-o", "json"];
    json_args.extend_from_slice(&args);
    let json = safemode(&json_args).await;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let reasons = json["reasons"].as_array().expect("reasons");
    assert!(
        reasons
            .iter()
            .all(|r| r.as_str().is_some_and(|r| r.starts_with("act_"))),
        "{json}"
    );
}

/// A step-up the customer passed is an allow with nothing to tell them: the
/// step-up's customer message and agent script are for those who did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_decision_carries_no_step_up_texts() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    let applied = safemode(&[
        "--server",
        url,
        "mode",
        "apply",
        "handoff-guard",
        "--channels",
        "agent-desk",
        "--reason",
        "hand-offs laundered",
    ])
    .await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let base = [
        "--server",
        url,
        "decide",
        "--channel",
        "agent-desk",
        "--action",
        "payment.refund",
        "--handoff",
        "--confidence",
        "0.95",
    ];
    // (extra arguments, first line, whether the texts are shown)
    let cases: &[(&[&str], &str, bool)] = &[
        (&[], "step_up", true),
        (&["--method", "push"], "allow", false),
    ];
    for (extra, first, texts) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let output = safemode(&args).await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.starts_with(first), "{extra:?}: {text}");
        assert_eq!(text.contains("  customer: "), *texts, "{extra:?}: {text}");
        assert_eq!(text.contains("  agent: "), *texts, "{extra:?}: {text}");
        // The mode behind the decision is still named.
        assert!(text.contains("because: handoff-guard"), "{extra:?}: {text}");
    }
}
