//! Runbook drills end to end through `safemode drill run`: every shipped
//! runbook passes a local drill (with a fault injected), a runbook with a
//! wrong expectation fails and the report names it, a drill never touches
//! `live`, and the reports are what CI systems and people read.

use std::path::Path;

use safemode::wire::proto;

use crate::support::{RawSubscriber, TestServer, safemode, wait_until};

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
    assert_eq!(names.len(), 6, "{names:?}");
    for drill in drills {
        let name = drill["runbook"].as_str().unwrap();
        assert_eq!(drill["passed"], true, "{name}: {:#}", drill["failures"]);
        assert!(drill["namespace"].as_str().unwrap().starts_with("drill-"));
        let stages = drill["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 3, "{name}: every stage is walked");
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
                assert_eq!(channel["within_limit"], true);
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

    // junit.xml: one testsuite per runbook, a test case per expectation and
    // per channel apply limit (plus restoration, the fault and rejects), none
    // failing.
    let xml = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("junit.xml is XML");
    let suites: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), 6);
    for (suite, drill) in suites.iter().zip(drills) {
        let cases: Vec<_> = suite
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        let stages = drill["stages"].as_array().unwrap();
        let expectations: usize = stages
            .iter()
            .map(|s| s["expectations"].as_array().unwrap().len())
            .sum();
        let limits: usize = stages
            .iter()
            .map(|s| s["channels"].as_array().unwrap().len())
            .sum();
        let names: Vec<&str> = cases.iter().filter_map(|c| c.attribute("name")).collect();
        assert!(
            cases.len() >= expectations + limits,
            "{}: {} cases for {expectations} expectations and {limits} limits",
            drill["runbook"],
            cases.len()
        );
        assert!(
            names.iter().any(|n| n.contains("applies within")),
            "{names:?}"
        );
        assert!(
            cases
                .iter()
                .all(|c| !c.children().any(|f| f.has_tag_name("failure"))),
            "{names:?}"
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
    assert!(drill["fault"]["recovery_ms"].as_f64().unwrap() > 0.0);
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
    let server = TestServer::start().await;
    let before = server.apply(&["incident-notice"]).await;
    let live = RawSubscriber::connect(server.channel().await, "live", "web", "live-web", 0)
        .await
        .unwrap();
    wait_until("the live subscriber has its snapshot", || async {
        !live.revisions().is_empty()
    })
    .await;
    let status_before = server.status("live").await;

    let output = safemode(&[
        "--server",
        &server.url,
        "--output",
        "json",
        "drill",
        "run",
        "credential-stuffing",
        "--channels",
        "web=2,chatbot=2",
    ])
    .await;
    let result = json(&output);
    assert_eq!(output.status.code(), Some(0), "{result:#}");
    let namespace = result["drills"][0]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(namespace.starts_with("drill-"));

    // Live: same revision, same activations, and its subscriber saw nothing.
    let status_after = server.status("live").await;
    assert_eq!(status_after.revision, before);
    assert_eq!(status_after.activations, status_before.activations);
    assert_eq!(
        live.revisions(),
        [before],
        "a live subscriber saw a drill change"
    );
    // The drill happened, in its own namespace, and left nothing active.
    let drilled = server.status(&namespace).await;
    assert!(drilled.revision > 0);
    assert!(drilled.activations.is_empty());
    let incidents = server
        .control()
        .await
        .list_incidents(proto::ListIncidentsRequest {
            namespace: "live".into(),
            include_resolved: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(incidents.incidents.is_empty(), "no incident in live");
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
    ] {
        let output = safemode(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
