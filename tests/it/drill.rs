//! Runbook drills end to end through `safemode drill run`: every shipped
//! runbook passes a local drill (with a fault injected), a runbook with a
//! wrong expectation fails and the report names it, a drill never touches
//! `live`, and the reports are what CI systems and people read.

use std::path::Path;

use std::sync::{Arc, Mutex};

use safemode_client::{Subscriber, SubscriberConfig};
use safemode_policy::{Channel, Namespace};
use safemode_signing::SigningKey;
use safemode_wire::proto;

use crate::support::{Control, Principals, TestServer, control_as, safemode, wait_until};

fn runbooks_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks"))
}

fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_runbook_passes_a_local_drill_and_the_reports_say_so() {
    let reports = tempfile::tempdir().unwrap();
    let dir = reports.path().join("drill");
    let output = safemode(&[
        "--output",
        "json",
        "drill",
        "run",
        "--local",
        "--all",
        runbooks_dir().to_str().unwrap(),
        "--channels",
        "chatbot=3,ivr=3,agent-desk=3,web=3,mobile=3,email=3",
        "--fault",
        "kill-subscribers=20%",
        "--report",
        dir.to_str().unwrap(),
    ])
    .await;
    let result = json(&output);
    assert_eq!(output.status.code(), Some(0), "{result:#}");
    let drills = result["drills"].as_array().unwrap();
    let names: Vec<&str> = drills
        .iter()
        .map(|d| d["runbook"].as_str().unwrap())
        .collect();
    let shipped = std::fs::read_dir(runbooks_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "yaml")
        })
        .count();
    assert_eq!(names.len(), shipped, "{names:?}");
    for drill in drills {
        let name = drill["runbook"].as_str().unwrap();
        assert_eq!(drill["passed"], true, "{name}: {:#}", drill["failures"]);
        assert!(drill["namespace"].as_str().unwrap().starts_with("drill-"));
        let stages = drill["stages"].as_array().unwrap();
        assert!(stages.len() >= 2, "{name}: every stage is walked");
        for stage in stages {
            // Escalating is one commander's call in every shipped runbook.
            if stage["step"] == "escalate" {
                assert!(stage["approval"].is_null(), "{name}: {stage:#}");
            }
            assert!(!stage["expectations"].as_array().unwrap().is_empty());
            for channel in stage["channels"].as_array().unwrap() {
                assert_eq!(
                    channel["applied"], channel["subscribers"],
                    "{name}: {channel}"
                );
            }
        }
        assert_eq!(
            drill["fault"]["recovered"], true,
            "{name}: {:#}",
            drill["fault"]
        );
        assert!(drill["fault"]["affected"].as_u64().unwrap() >= 1);
        assert_eq!(
            drill["restoration"]["not_restored"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        assert_eq!(drill["restoration"]["left_active"], 0);
    }

    // junit.xml: one testsuite per runbook, with exactly a test case per
    // expectation, per channel apply limit, per stage's rejects, for the
    // fault, the restoration and the verdict; none failing.
    let xml = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("junit.xml is XML");
    let suites: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), drills.len());
    for (suite, drill) in suites.iter().zip(drills) {
        let name = drill["runbook"].as_str().unwrap();
        assert_eq!(
            suite.attribute("name"),
            Some(format!("drill: {name}").as_str())
        );
        let cases: Vec<_> = suite
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        let mut got: Vec<String> = cases
            .iter()
            .map(|c| c.attribute("name").unwrap().to_string())
            .collect();
        let mut expected = Vec::new();
        for stage in drill["stages"].as_array().unwrap() {
            let sev = stage["severity"].as_str().unwrap();
            for e in stage["expectations"].as_array().unwrap() {
                expected.push(format!(
                    "{sev}: {} {} ({}) -> {}",
                    e["channel"].as_str().unwrap(),
                    e["action"].as_str().unwrap(),
                    e["context"].as_str().unwrap(),
                    e["expected"].as_str().unwrap()
                ));
            }
            for c in stage["channels"].as_array().unwrap() {
                expected.push(format!(
                    "{sev}: {} applies within {} ms",
                    c["channel"].as_str().unwrap(),
                    stage["apply_within_ms"]
                ));
            }
            expected.push(format!("{sev}: no snapshot rejected"));
        }
        expected.push(format!(
            "{}: fault {} recovers",
            drill["fault"]["severity"].as_str().unwrap(),
            drill["fault"]["kind"].as_str().unwrap()
        ));
        expected.push("restoration: every channel back to allow".into());
        expected.push("verdict".into());
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "{name}");
        assert!(
            cases
                .iter()
                .all(|c| !c.children().any(|f| f.has_tag_name("failure"))),
            "{name}: a case failed"
        );
    }

    // report.md: the timings table and the verdict; journal.json: events.
    let markdown = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        markdown.contains("| channel | subscribers | applied | p50 | p99 | max |"),
        "{markdown}"
    );
    assert!(markdown.contains("PASS"));
    let journal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("journal.json")).unwrap()).unwrap();
    let events: Vec<&str> = journal["runbooks"][0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for expected in [
        "drill_started",
        "declared",
        "stage_applied",
        "expectation",
        "fault",
        "recovered",
        "resolved",
        "drill_finished",
    ] {
        assert!(events.contains(&expected), "{expected} not in {events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_is_a_fault_the_drill_recovers_from() {
    let output = safemode(&[
        "--output",
        "json",
        "drill",
        "run",
        "--local",
        "sim-swap-wave",
        "--channels",
        "web=4,mobile=4",
        "--severity-path",
        "sev3,sev1,sev2",
        "--fault",
        "restart-controller",
    ])
    .await;
    let result = json(&output);
    assert_eq!(output.status.code(), Some(0), "{result:#}");
    let drill = &result["drills"][0];
    assert_eq!(drill["fault"]["kind"], "restart-controller");
    assert_eq!(drill["fault"]["recovered"], true);
    let simulated: u64 = drill["subscribers"]
        .as_array()
        .map(|s| s.iter().map(|c| c["simulated"].as_u64().unwrap()).sum())
        .unwrap_or_else(|| panic!("{drill:#}"));
    assert!(simulated >= 8);
    assert_eq!(
        drill["fault"]["affected"], simulated,
        "every subscriber had to reconnect"
    );
    // Going down from sev1 lifts protections: a second principal approved.
    let down = &drill["stages"][2];
    assert_eq!(down["step"], "deescalate");
    assert_eq!(down["approval"]["requested_by"], "drill-commander");
    assert_eq!(down["approval"]["approved_by"], "drill-approver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_expectation_fails_the_drill_and_the_report_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(runbooks_dir().join("fraud-spike.yaml")).unwrap();
    // The first stage throttles refunds; claim they are allowed.
    let (before, after) = text.split_once("stages:").unwrap();
    let wrong = format!(
        "{before}stages:{}",
        after.replacen("effect: throttle}", "effect: allow}", 1)
    );
    assert_ne!(
        wrong, text,
        "the runbook has a throttle expectation to break"
    );
    let file = dir.path().join("fraud-spike.yaml");
    std::fs::write(&file, wrong).unwrap();
    let reports = dir.path().join("out");
    let output = safemode(&[
        "drill",
        "run",
        "--local",
        file.to_str().unwrap(),
        "--channels",
        "web=2,chatbot=2",
        "--report",
        reports.to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("FAIL fraud-spike"), "{stdout}");
    assert!(
        stdout.contains("should be allow but is throttle"),
        "the failure names the expectation: {stdout}"
    );
    assert!(
        stderr.contains("1 of 1 drills failed: fraud-spike"),
        "{stderr}"
    );
    let markdown = std::fs::read_to_string(reports.join("report.md")).unwrap();
    assert!(markdown.contains("FAIL"), "{markdown}");
    assert!(
        markdown.contains("should be allow but is throttle"),
        "{markdown}"
    );
    let xml = std::fs::read_to_string(reports.join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let failed: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase") && n.children().any(|c| c.has_tag_name("failure")))
        .filter_map(|n| n.attribute("name"))
        .collect();
    // The expectation, and the drill's overall verdict.
    let expectations: Vec<&&str> = failed.iter().filter(|n| n.contains(" -> ")).collect();
    assert_eq!(expectations.len(), 1, "{failed:?}");
    assert!(expectations[0].contains("web payment.refund"), "{failed:?}");
    assert!(expectations[0].ends_with("-> allow"), "{failed:?}");
    assert!(
        failed.iter().all(|n| n.contains(" -> ") || *n == "verdict"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_never_touches_live() {
    // A guarded controller: the drill runs with a drill token (which the
    // server would refuse anywhere but drill-*), an approver approves.
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let before = admin
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["incident-notice".into()],
            reason: "live before the drill".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let mut config = SubscriberConfig::new(
        [server.url.clone()],
        Namespace::live(),
        Channel::parse("web").unwrap(),
        "live-web",
    );
    config.trusted_keys = Some(server.trusted_keys());
    config.token = Some(principals.token("subscriber").to_string());
    let live = Subscriber::connect(config).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let seen = seen.clone();
        let mut changes = live.changes();
        tokio::spawn(async move {
            loop {
                if let Some(s) = changes.borrow_and_update().clone() {
                    seen.lock().unwrap().push(s.revision);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    wait_until("the live subscriber has its snapshot", || async {
        seen.lock().unwrap().contains(&before)
    })
    .await;
    let status_before = live_status(&mut admin).await;

    // Without a second principal at hand, a drill that must resolve with
    // approval is refused before it declares anything.
    let refused = safemode(&[
        "--server",
        &server.url,
        "--token",
        principals.token("drill"),
        "drill",
        "run",
        "credential-stuffing",
    ])
    .await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--approver-token"), "{stderr}");

    let output = safemode(&[
        "--server",
        &server.url,
        "--token",
        principals.token("drill"),
        "--output",
        "json",
        "drill",
        "run",
        "credential-stuffing",
        "--channels",
        "web=2,chatbot=2",
        "--approver-token",
        principals.token("approver"),
    ])
    .await;
    let result = json(&output);
    assert_eq!(output.status.code(), Some(0), "{result:#}");
    let namespace = result["drills"][0]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(namespace.starts_with("drill-"));
    assert_eq!(
        result["drills"][0]["restoration"]["approval"]["approved_by"],
        "approver"
    );

    // Live: same revision, same activations, and its subscriber saw nothing.
    let status_after = live_status(&mut admin).await;
    assert_eq!(status_after.revision, before);
    assert_eq!(status_after.activations, status_before.activations);
    assert_eq!(
        *seen.lock().unwrap(),
        [before],
        "a live subscriber saw a drill change"
    );
    // ...and it is still listening: a live change reaches it.
    let after = admin
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["throttle-high-risk".into()],
            reason: "live after the drill".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_until("the live change arrives", || async {
        seen.lock().unwrap().contains(&after)
    })
    .await;
    watcher.abort();
    // The drill happened, in its own namespace, and left nothing active.
    let drilled = admin
        .get_status(proto::GetStatusRequest {
            namespace: namespace.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drilled.revision > 0);
    assert!(drilled.activations.is_empty());
    let incidents = admin
        .list_incidents(proto::ListIncidentsRequest {
            namespace: "live".into(),
            include_resolved: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(incidents.incidents.is_empty(), "no incident in live");
}

async fn live_status(admin: &mut Control) -> proto::GetStatusResponse {
    admin
        .get_status(proto::GetStatusRequest {
            namespace: "live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// How a real subscriber attached to a drill namespace answers snapshots.
#[derive(Clone, Copy)]
enum Answer {
    Ack,
    Nothing,
    Reject,
}

/// A real subscriber of `namespace` on `channel`, answering as `answer`
/// says, registered with the controller when this returns.
async fn attach(
    server: &TestServer,
    namespace: &str,
    id: &str,
    answer: Answer,
) -> tokio::task::JoinHandle<()> {
    use safemode_wire::proto::subscribe_request::Message as Out;
    use safemode_wire::proto::subscribe_response::Message as In;
    let (out, rx) = tokio::sync::mpsc::channel(16);
    out.send(proto::SubscribeRequest {
        message: Some(Out::Hello(proto::Hello {
            namespace: namespace.into(),
            channel: "web".into(),
            subscriber_id: id.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound =
        proto::subscription_service_client::SubscriptionServiceClient::new(server.channel().await)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let task = tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            let Some(In::Snapshot(snapshot)) = message.message else {
                continue;
            };
            let revision = snapshot.revision;
            let reply = match answer {
                Answer::Ack => Out::Ack(proto::Ack { revision }),
                Answer::Reject => Out::Reject(proto::Reject {
                    revision,
                    reason: "this desk cannot enforce it".into(),
                }),
                Answer::Nothing => continue,
            };
            if out
                .send(proto::SubscribeRequest {
                    message: Some(reply),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let id = id.to_string();
    wait_until("the real subscriber is registered", || async {
        server
            .status(namespace)
            .await
            .subscribers
            .iter()
            .any(|s| s.subscriber_id == id)
    })
    .await;
    task
}

/// Drills fraud-spike (sev3 then sev1) in `namespace` of `server`.
async fn drill_in(server: &TestServer, namespace: &str) -> (Option<i32>, serde_json::Value) {
    let output = safemode(&[
        "--server",
        &server.url,
        "--output",
        "json",
        "drill",
        "run",
        "fraud-spike",
        "--namespace",
        namespace,
        "--channels",
        "web=2",
        "--severity-path",
        "sev3,sev1",
        "--converge-within",
        "2s",
    ])
    .await;
    (output.status.code(), json(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_subscribers_attached_to_the_namespace_take_part() {
    let server = TestServer::start().await;

    // One that acks: counted and timed with the simulated ones.
    let acking = attach(&server, "drill-real", "desk-7", Answer::Ack).await;
    let (code, result) = drill_in(&server, "drill-real").await;
    assert_eq!(code, Some(0), "{result:#}");
    let drill = &result["drills"][0];
    let web = drill["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "web")
        .unwrap();
    assert_eq!(
        (web["simulated"].as_u64(), web["attached"].as_u64()),
        (Some(2), Some(1))
    );
    for stage in drill["stages"].as_array().unwrap() {
        let timing = stage["channels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["channel"] == "web")
            .unwrap();
        assert_eq!(
            (timing["subscribers"].as_u64(), timing["applied"].as_u64()),
            (Some(3), Some(3))
        );
    }
    acking.abort();

    // One that never applies anything: the drill fails and says so.
    let silent = attach(&server, "drill-silent", "desk-8", Answer::Nothing).await;
    let (code, result) = drill_in(&server, "drill-silent").await;
    assert_eq!(code, Some(1), "{result:#}");
    let failures = result["drills"][0]["failures"].to_string();
    assert!(
        failures.contains("1 of 3 web subscribers never applied it"),
        "{failures}"
    );
    assert!(
        failures.contains("desk-8 never acked the resolution"),
        "{failures}"
    );
    silent.abort();

    // One that rejects: the drill fails with the reason.
    let rejecting = attach(&server, "drill-reject", "desk-9", Answer::Reject).await;
    let (code, result) = drill_in(&server, "drill-reject").await;
    assert_eq!(code, Some(1), "{result:#}");
    let failures = result["drills"][0]["failures"].to_string();
    assert!(
        failures.contains("subscriber desk-9 rejected revision"),
        "{failures}"
    );
    assert!(
        failures.contains("this desk cannot enforce it"),
        "{failures}"
    );
    rejecting.abort();

    // A failed drill leaves nothing active behind, and the namespace can be
    // drilled again.
    assert!(server.status("drill-reject").await.activations.is_empty());
}

#[tokio::test]
async fn bad_drill_input_is_one_clear_line() {
    for (args, expected) in [
        (&["drill", "run", "--local"][..], "no runbook given"),
        (
            &["drill", "run", "--local", "nonsense"][..],
            "no built-in runbook 'nonsense'",
        ),
        (
            &[
                "drill",
                "run",
                "--local",
                "fraud-spike",
                "--fault",
                "kill-subscribers=0%",
            ][..],
            "--fault: ",
        ),
        (
            &[
                "drill",
                "run",
                "fraud-spike",
                "--fault",
                "restart-controller",
            ][..],
            "needs --local",
        ),
        (
            &[
                "drill",
                "run",
                "--local",
                "fraud-spike",
                "--severity-path",
                "sev4",
            ][..],
            "has no stage for sev4",
        ),
        (
            &[
                "drill",
                "run",
                "--local",
                "fraud-spike",
                "--namespace",
                "live",
            ][..],
            "drill-* namespaces",
        ),
        (
            &[
                "drill",
                "run",
                "--local",
                "fraud-spike",
                "--severity-path",
                "sev3,sev3",
            ][..],
            "sev3 follows itself",
        ),
    ] {
        let output = safemode(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A drill's failure is read by the person who ran `safemode drill run`:
/// when its subscribers cannot trust the controller, the report says which
/// flag fixes it, not which field of the client crate's configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_whose_subscribers_cannot_trust_the_controller_names_the_flag() {
    let server = TestServer::start().await;
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), SigningKey::generate().0.public_key().to_pem()).unwrap();
    let output = safemode(&[
        "--server",
        &server.url,
        "--output",
        "json",
        "drill",
        "run",
        "fraud-spike",
        "--namespace",
        "drill-untrusted",
        "--channels",
        "web=1",
        "--trusted-keys",
        other.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report = json(&output);
    let failures = report["drills"][0]["failures"].to_string();
    assert!(failures.contains("--trusted-keys FILE"), "{failures}");
    assert!(!failures.contains("SubscriberConfig"), "{failures}");
}
