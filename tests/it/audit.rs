//! The audit log is tamper-evident: an entry edited in the store, removed,
//! or swapped with another, is reported by `safemode audit --verify`, which
//! then fails. And replicas must serve the same modes and runbooks.

use crate::etcd::EtcdCluster;
use crate::support::{TestServer, safemode};

/// A replica on a fresh etcd with a log of several entries.
async fn logged() -> (EtcdCluster, TestServer) {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    for mode in [
        "incident-notice",
        "throttle-high-risk",
        "step-up-account-changes",
    ] {
        server.apply(&[mode]).await;
    }
    (etcd, server)
}

fn entry_key(position: u64) -> String {
    format!("/safemode/audit/log/{position:020}")
}

/// Runs `safemode audit --verify` and returns (exit code, problems).
pub(crate) async fn verify(server: &TestServer) -> (Option<i32>, Vec<String>) {
    let output = safemode(&[
        "--server",
        &server.url,
        "--output",
        "json",
        "audit",
        "--verify",
    ])
    .await;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("json: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(report["verified"], true);
    let problems = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (output.status.code(), problems)
}

fn check(case: &str, (code, problems): (Option<i32>, Vec<String>), expected: &[&str]) {
    assert_eq!(
        code,
        Some(1),
        "{case}: --verify must fail; problems: {problems:?}"
    );
    for want in expected {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{case}: expected a problem containing {want:?}, got {problems:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_log_verifies() {
    let (_etcd, server) = logged().await;
    let (code, problems) = verify(&server).await;
    assert_eq!((code, problems), (Some(0), Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_an_edited_a_removed_and_a_swapped_entry() {
    // One field of one entry edited.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let key = entry_key(2);
    let stored = client.get(key.clone(), None).await.unwrap();
    let mut entry: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    entry["principal"] = "mallory".into();
    client.put(key, entry.to_string(), None).await.unwrap();
    check(
        "edited",
        verify(&server).await,
        &["entry 2 was edited: its contents no longer match its hash"],
    );
    drop((server, etcd));

    // An entry removed.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    client.delete(entry_key(3), None).await.unwrap();
    check(
        "removed",
        verify(&server).await,
        &[
            "entry 3 is missing: it was removed",
            "entry 4 does not follow",
        ],
    );
    drop((server, etcd));

    // Two entries swapped.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let a = client.get(entry_key(2), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    let b = client.get(entry_key(3), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    client.put(entry_key(2), b, None).await.unwrap();
    client.put(entry_key(3), a, None).await.unwrap();
    check(
        "swapped",
        verify(&server).await,
        &[
            "the entry at position 2 is entry 3: entries were reordered",
            "the entry at position 3 is entry 2: entries were reordered",
        ],
    );
    drop((server, etcd));

    // The newest entries removed: the head still names them.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    client.delete(entry_key(4), None).await.unwrap();
    check(
        "truncated",
        verify(&server).await,
        &["the log ends at entry 3 but its head names entry 4"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_must_serve_the_same_runbooks() {
    let etcd = EtcdCluster::start(1).await;
    let first = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;

    // A replica deployed with a changed runbook refuses to start...
    let changed = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, changed.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let runbook = changed.path().join("fraud-spike.yaml");
    let text = std::fs::read_to_string(&runbook).unwrap();
    std::fs::write(
        &runbook,
        text.replacen("review_interval: ", "review_interval: 1", 1),
    )
    .unwrap();
    let config = |adopt: bool| safemode_grpc::server::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        signing_key: safemode_grpc::server::SigningKeySource::Key(
            crate::support::test_signing_key(),
        ),
        store: safemode_grpc::server::StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        runbooks_dir: Some(changed.path().to_path_buf()),
        controller: safemode_controller::ControllerConfig {
            adopt_catalog: adopt,
            ..Default::default()
        },
        ..Default::default()
    };
    let refused = safemode_grpc::server::start(config(false))
        .await
        .err()
        .expect("refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("differ from the ones every replica serves"),
        "{message}"
    );
    assert!(message.contains("--adopt-catalog"), "{message}");

    // ...unless told to adopt its files: then the first replica, still on
    // the old runbooks, refuses changes that read them until restarted.
    let second = TestServer::start_with(config(true)).await;
    second.apply(&["incident-notice"]).await;
    let stale = first
        .control()
        .await
        .apply_modes(safemode_wire::proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["throttle-high-risk".into()],
            reason: "from the old replica".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Unavailable);
    assert!(
        stale.message().contains("restart this replica"),
        "{}",
        stale.message()
    );
    let status = second.status("live").await;
    assert_eq!(
        status.activations.len(),
        1,
        "nothing was written by the old replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_rewritten_tail_is_found_and_never_written_over() {
    // The newest entry and the head removed: the chain alone looks whole,
    // but the change entry 4 recorded is still in the store.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let first = client.get(entry_key(1), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    client.delete(entry_key(4), None).await.unwrap();
    client.delete("/safemode/audit/head", None).await.unwrap();
    check(
        "head and tail removed",
        verify(&server).await,
        &[
            "the log has entries up to 3 but no head: the head was deleted",
            "which has no audit entry",
        ],
    );

    // The next change goes on (an incident cannot wait for a repair), after
    // an entry that says the head was missing; nothing is written over.
    server.apply(&["bots-faq-only"]).await;
    let kept = client.get(entry_key(1), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    assert_eq!(kept, first, "entry 1 is never written over");
    check(
        "after the head was restored",
        verify(&server).await,
        &[
            "entry 4 records that the log's head had been deleted",
            "which has no audit entry",
        ],
    );
    drop((server, etcd));

    // The tail rewritten with a consistent chain and head: the records of
    // the change the original entry described still give it away.
    let (etcd, server) = logged().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let third: safemode_controller::audit::AuditEntry =
        serde_json::from_slice(client.get(entry_key(3), None).await.unwrap().kvs()[0].value())
            .unwrap();
    let forged = safemode_controller::audit::AuditEntry::seal(
        safemode_controller::audit::AuditDraft {
            action: safemode_controller::audit::AuditAction::Apply,
            principal: "nobody".into(),
            roles: Vec::new(),
            namespace: Some("live".into()),
            reason: Some("nothing happened".into()),
            incident_id: None,
            request_id: None,
            activation_ids: Vec::new(),
            detail: "nothing happened".into(),
            change_id: None,
        },
        None,
        &third.head(),
        third.at,
        // Whoever rewrites the store does not have the controller's key.
        &safemode_signing::SigningKey::generate().0,
    );
    client.delete(entry_key(4), None).await.unwrap();
    client
        .put(entry_key(4), serde_json::to_vec(&forged).unwrap(), None)
        .await
        .unwrap();
    client
        .put(
            "/safemode/audit/head",
            serde_json::to_vec(&forged.head()).unwrap(),
            None,
        )
        .await
        .unwrap();
    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("/safemode/ns/live/") && p.contains("which has no audit entry")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("entry 4 is signed by key") && p.contains("not trusted")),
        "{problems:?}"
    );
}

/// Verification reads the log, its head and the records at one revision,
/// so a log that grows while it is verified is never reported as tampered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_log_is_never_mistaken_for_a_tampered_one() {
    let (_etcd, server) = logged().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        let mut control = server.control().await;
        tokio::spawn(async move {
            let mut changes = 0u32;
            // At least one change, however quickly the verifications end.
            while changes == 0 || !stop.is_cancelled() {
                control
                    .apply_modes(safemode_wire::proto::ApplyModesRequest {
                        namespace: "live".into(),
                        modes: vec!["bots-faq-only".into()],
                        reason: format!("change {changes}"),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                control
                    .lift_activations(safemode_wire::proto::LiftActivationsRequest {
                        namespace: "live".into(),
                        targets: vec!["bots-faq-only".into()],
                        reason: format!("change {changes}"),
                        all: true,
                        incident_ok: false,
                        change_id: String::new(),
                        dry_run: false,
                    })
                    .await
                    .unwrap();
                changes += 1;
            }
            changes
        })
    };
    for _ in 0..10 {
        let (code, problems) = verify(&server).await;
        assert_eq!((code, problems), (Some(0), Vec::new()));
    }
    stop.cancel();
    writer.await.unwrap();
    let (code, problems) = verify(&server).await;
    assert_eq!((code, problems), (Some(0), Vec::new()));
}
