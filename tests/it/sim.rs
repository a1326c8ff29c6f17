//! `safemode sim`: simulated channel services report how long each took to
//! apply a revision, and answer decisions, against a real controller.

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{DEADLINE, TestServer, safemode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_reports_every_subscribers_apply_and_answers_decisions() {
    let server = TestServer::start().await;
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
        .args([
            "--server",
            &server.url,
            "--output",
            "json",
            "sim",
            "--channels",
            "web=3,chatbot=2",
            "--decide",
            "account.password_reset,order.view",
            "--revisions",
            "1",
        ])
        .env_remove("RUST_LOG")
        .arg("--trusted-keys")
        .arg(server.trusted_keys_file())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stdout.take().unwrap()).lines();
    let next = |line: Result<std::io::Result<Option<String>>, _>| -> serde_json::Value {
        let line = line
            .unwrap_or_else(|_| panic!("no line from the sim within {DEADLINE:?}"))
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).expect("one JSON object per line")
    };

    // Every subscriber is connected once the sim says it started.
    let started = next(tokio::time::timeout(DEADLINE, lines.next_line()).await);
    assert_eq!(started["subscribers"], 5);
    let status = server.status("live").await;
    assert_eq!(status.subscribers.len(), 5);

    let revision = server.apply(&["freeze-credential-changes"]).await;
    let report = next(tokio::time::timeout(DEADLINE, lines.next_line()).await);
    assert_eq!(report["revision"], revision);
    assert_eq!(report["complete"], true);
    let channels = report["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 2);
    for (channel, n) in [("web", 3), ("chatbot", 2)] {
        let times = channels.iter().find(|c| c["channel"] == channel).unwrap();
        assert_eq!(
            (times["applied"].as_u64(), times["subscribers"].as_u64()),
            (Some(n), Some(n))
        );
        let (p50, p99, max) = (
            times["p50_ms"].as_f64().unwrap(),
            times["p99_ms"].as_f64().unwrap(),
            times["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{times}");
    }
    let decisions = report["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 4, "two actions on two channels");
    for d in decisions {
        let expected = if d["action"] == "account.password_reset" {
            "deny"
        } else {
            "allow"
        };
        assert_eq!(d["effect"], expected, "{d}");
        assert_eq!(d["revision"], revision);
    }
    let exited = tokio::time::timeout(DEADLINE, sim.wait()).await;
    assert!(
        exited
            .expect("it stops after --revisions")
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn bad_sim_input_is_one_clear_line() {
    for (args, expected) in [
        (
            &["sim", "--channels", "fax=1"][..],
            "--channels: unknown channel 'fax'",
        ),
        (&["sim", "--channels", "web=0"][..], "whole number from 1"),
        (
            &["sim", "--channels", "web=1", "--decide", "account.teleport"][..],
            "--decide: unknown action",
        ),
    ] {
        let output = safemode(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
