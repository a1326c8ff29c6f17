//! Durability: what was applied is there after a restart, whether the
//! controller stopped gracefully or was killed with SIGKILL.

use crate::support::{ServeProcess, TestServer, safemode};

#[tokio::test]
async fn a_restarted_controller_serves_the_same_revision_and_activations() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path()).await;
    let revision = server
        .apply(&["step-up-account-changes", "review-refunds-payouts"])
        .await;
    let before = server.status("live").await;
    server.stop().await;

    let server = TestServer::start_in(dir.path()).await;
    let subscriber = server.subscriber("web", "after-restart").await;
    let snapshot = subscriber.current().unwrap();
    assert_eq!(snapshot.revision, revision);
    let mut ids: Vec<&str> = snapshot.activations.iter().map(|a| a.id.as_str()).collect();
    ids.sort();
    let mut expected: Vec<&str> = before.activations.iter().map(|a| a.id.as_str()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(server.status("live").await.revision, revision);
}

fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json output")
}

#[tokio::test]
async fn state_and_revision_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let first = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || ServeProcess::start_in(&dir)
    })
    .await
    .unwrap();
    let applied = json(
        &safemode(&[
            "--server",
            &first.url,
            "--output",
            "json",
            "mode",
            "apply",
            "freeze-credential-changes",
            "bots-faq-only",
            "--channels",
            "ivr,chatbot",
            "--reason",
            "SIM-swap wave",
        ])
        .await,
    );
    let lifted = json(
        &safemode(&[
            "--server",
            &first.url,
            "--output",
            "json",
            "mode",
            "lift",
            "bots-faq-only",
            "--reason",
            "bots back to normal",
        ])
        .await,
    );
    let before = json(&safemode(&["--server", &first.url, "--output", "json", "status"]).await);
    assert_eq!(before["revision"], lifted["revision"]);
    assert!(lifted["revision"].as_i64() > applied["revision"].as_i64());
    first.kill();

    let second = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || ServeProcess::start_in(&dir)
    })
    .await
    .unwrap();
    let after = json(&safemode(&["--server", &second.url, "--output", "json", "status"]).await);
    assert_eq!(after["revision"], before["revision"]);
    assert_eq!(after["activations"], before["activations"]);
    assert_eq!(after["activations"].as_array().unwrap().len(), 1);
    assert_eq!(after["activations"][0]["mode"], "freeze-credential-changes");

    // The next change gets a higher revision than any before the kill.
    let next = json(
        &safemode(&[
            "--server",
            &second.url,
            "--output",
            "json",
            "mode",
            "apply",
            "incident-notice",
            "--reason",
            "tell customers",
        ])
        .await,
    );
    assert!(next["revision"].as_i64() > after["revision"].as_i64());
}

#[tokio::test]
async fn a_reconnect_to_the_same_revision_is_acked_but_is_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path()).await;
    let revision = server.apply(&["incident-notice"]).await;
    let subscriber = server.subscriber("email", "steady").await;
    let mut changes = subscriber.changes();
    changes.borrow_and_update();

    // The controller restarts on the same address; the client comes back
    // and is sent the revision it already has.
    let addr = server.addr();
    server.stop().await;
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: addr,
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: dir.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await;
    crate::support::wait_until("the client is back and acked the same revision", || async {
        let status = server.status("live").await;
        status
            .subscribers
            .iter()
            .any(|s| s.subscriber_id == "steady" && s.acked_revision == revision)
    })
    .await;
    assert!(
        !changes.has_changed().unwrap(),
        "the same revision was reported as a change"
    );
    assert_eq!(subscriber.current().unwrap().revision, revision);
}

#[tokio::test]
async fn a_client_follows_a_replaced_store_into_its_new_history() {
    let old = tempfile::tempdir().unwrap();
    // The deployment keeps its signing key when its store is replaced.
    let key = safemode_grpc::server::SigningKeySource::Key(crate::support::test_signing_key());
    let mut server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        signing_key: key.clone(),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: old.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await;
    for mode in [
        "incident-notice",
        "review-refunds-payouts",
        "throttle-high-risk",
    ] {
        server.apply(&[mode]).await;
    }
    let subscriber = server.subscriber("web", "survivor").await;
    let before = subscriber.current().unwrap();
    assert_eq!(before.activations.len(), 3);

    // The controller comes back on the same address over a new, empty store:
    // its revisions start again below the client's.
    let addr = server.addr();
    server.stop().await;
    let fresh = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: addr,
        signing_key: key,
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: fresh.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await;
    let revision = server.apply(&["freeze-credential-changes"]).await;
    assert!(revision < before.revision);
    crate::support::wait_until("the client took the new history", || async {
        subscriber
            .current()
            .is_some_and(|s| s.revision == revision && s.epoch != before.epoch)
    })
    .await;
    let modes: Vec<String> = subscriber
        .current()
        .unwrap()
        .activations
        .iter()
        .map(|a| a.mode.clone())
        .collect();
    assert_eq!(modes, ["freeze-credential-changes"]);
}
