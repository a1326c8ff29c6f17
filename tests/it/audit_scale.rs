//! The audit log at any size, and against whoever can write to etcd: a log
//! well past gRPC's 4 MiB message limit is listed and verified page by page
//! through the `safemode` binary; a change forged with one etcd transaction
//! (an activation softened to `allow`, with a correctly chained and hashed
//! entry) and an activation deleted in etcd are both named by `audit
//! --verify`, shown in status, and keep failing closed.

use prost::Message as _;
use safemode_controller::audit::{AuditAction, AuditEntry, AuditHead};
use safemode_policy::{Action, Context, EffectKind, Reason};
use safemode_wire::proto;

use crate::audit::verify;
use crate::etcd::EtcdCluster;
use crate::support::{TestServer, safemode, wait_until};

const HEAD: &str = "/safemode/audit/head";

fn entry_key(position: u64) -> String {
    format!("/safemode/audit/log/{position:020}")
}

fn activation_key(id: &str) -> String {
    format!("/safemode/ns/live/activations/{id}")
}

/// The audit log's entries and their total size, read from etcd in pages.
async fn log_size(client: &mut etcd_client::Client) -> (u64, usize) {
    let prefix = "/safemode/audit/log/";
    let end = "/safemode/audit/log0";
    let (mut count, mut bytes) = (0u64, 0usize);
    let mut start = prefix.to_string();
    loop {
        let page = client
            .get(
                start.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_range(end)
                        .with_limit(200),
                ),
            )
            .await
            .unwrap();
        for kv in page.kvs() {
            count += 1;
            bytes += kv.value().len();
        }
        let Some(last) = page.kvs().last() else {
            break;
        };
        start = format!("{}\0", last.key_str().unwrap());
        if !page.more() {
            break;
        }
    }
    (count, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_past_five_mib_is_listed_and_verified_page_by_page() {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let mut etcd_client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let mut control = server.control().await;
    // The longest reason the API takes, in bytes: four-byte characters.
    let reason = "𝄞".repeat(Reason::MAX_CHARS);
    let target = 5 * 1024 * 1024 + 512 * 1024;
    let mut changes = 0u32;
    loop {
        for _ in 0..100 {
            control
                .apply_modes(proto::ApplyModesRequest {
                    namespace: "live".into(),
                    modes: vec!["incident-notice".into()],
                    reason: reason.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            control
                .lift_activations(proto::LiftActivationsRequest {
                    namespace: "live".into(),
                    targets: vec!["incident-notice".into()],
                    reason: reason.clone(),
                    all: true,
                    incident_ok: false,
                    change_id: String::new(),
                    dry_run: false,
                })
                .await
                .unwrap();
            changes += 2;
        }
        if log_size(&mut etcd_client).await.1 > target {
            break;
        }
    }
    let (entries, bytes) = log_size(&mut etcd_client).await;
    assert!(bytes > target, "{bytes} bytes");
    assert!(entries >= u64::from(changes), "{entries} entries");

    // One page is bounded in bytes, whatever its count allows.
    let page = control
        .get_audit(proto::GetAuditRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (page.entries.len() as u64) < entries,
        "{} entries in one page",
        page.entries.len()
    );
    assert_ne!(page.next_after_seq, 0, "more pages follow");
    assert!(
        page.encoded_len() < 2 * 1024 * 1024,
        "{}",
        page.encoded_len()
    );

    // The CLI lists every entry, page by page.
    let listed = safemode(&["--server", &server.url, "audit"]).await;
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let seqs: Vec<u64> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(seqs, (1..=entries).collect::<Vec<_>>());

    // And verifies it.
    let verified = safemode(&["--server", &server.url, "audit", "--verify"]).await;
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success(),
        "{}\n{}",
        stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        stdout.contains("verified: the hash chain is intact"),
        "{}",
        stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(stdout.contains(&format!("head: entry {entries} with hash")));
}

/// A replica on a fresh etcd with the credential freeze active, and its
/// activation id.
async fn frozen() -> (EtcdCluster, TestServer, String) {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    server.apply(&["incident-notice"]).await;
    server.apply(&["freeze-credential-changes"]).await;
    let status = server.status("live").await;
    let id = status
        .activations
        .iter()
        .find(|a| a.mode == "freeze-credential-changes")
        .unwrap()
        .id
        .clone();
    assert_eq!(verify(&server).await, (Some(0), Vec::new()));
    (etcd, server, id)
}

/// Waits until status names `id` with `what`, and until a subscriber of
/// `web` denies everything for it (the stand-in that fails closed).
async fn fails_closed_and_shows(server: &TestServer, id: &str, what: &str) {
    wait_until("status names the activation", || async {
        server
            .status("live")
            .await
            .problems
            .iter()
            .any(|p| p.contains(id) && p.contains(what))
    })
    .await;
    let status = server.status("live").await;
    let stand_in = status.activations.iter().find(|a| a.id == id).unwrap();
    assert_eq!(stand_in.mode, "unreadable-activation");

    let client = server.subscriber("web", "checker").await;
    let reset = Action::parse("account.password_reset").unwrap();
    // The freeze did not cover viewing orders; the stand-in does.
    let view = Action::parse("order.view").unwrap();
    wait_until("the subscriber enforces the stand-in", || async {
        client.decide(&view, &Context::default()).effect() == EffectKind::Deny
    })
    .await;
    let decision = client.decide(&reset, &Context::default());
    assert_eq!(decision.effect(), EffectKind::Deny);
    assert!(
        decision.reasons().any(|r| r.as_str() == id),
        "{:?}",
        decision.reasons().map(|r| r.as_str()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_forged_in_one_etcd_transaction_is_named() {
    let (etcd, server, id) = frozen().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();

    // The freeze rewritten to allow everything it denied...
    let stored = client.get(activation_key(&id), None).await.unwrap();
    let mut activation: serde_json::Value =
        serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    for rule in activation["mode"]["rules"].as_array_mut().unwrap() {
        rule["effect"] = "allow".into();
    }
    // ...with an entry that follows the head, correctly chained and hashed.
    let head: AuditHead =
        serde_json::from_slice(client.get(HEAD, None).await.unwrap().kvs()[0].value()).unwrap();
    let mut forged = AuditEntry {
        seq: head.seq + 1,
        at: jiff::Timestamp::now(),
        action: AuditAction::Apply,
        principal: "cmd1".into(),
        roles: vec!["commander".into()],
        namespace: Some("live".into()),
        reason: Some("routine tuning".into()),
        incident_id: None,
        request_id: None,
        activation_ids: vec![id.clone()],
        detail: "applied freeze-credential-changes".into(),
        state_digest: None,
        change_id: None,
        prev_hash: head.hash.clone(),
        hash: String::new(),
        key_id: String::new(),
        signature: String::new(),
        revision: 0,
    };
    forged.hash = forged.computed_hash();
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(activation_key(&id), activation.to_string(), None),
        etcd_client::TxnOp::put(
            entry_key(forged.seq),
            serde_json::to_vec(&forged).unwrap(),
            None,
        ),
        etcd_client::TxnOp::put(HEAD, serde_json::to_vec(&forged.head()).unwrap(), None),
    ]);
    assert!(client.txn(txn).await.unwrap().succeeded());

    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");
    for want in [
        format!("entry {} is not signed", forged.seq),
        format!("activation {id} of namespace live was edited outside safemode"),
    ] {
        assert!(
            problems.iter().any(|p| p.contains(&want)),
            "expected {want:?} in {problems:?}"
        );
    }
    fails_closed_and_shows(&server, &id, "edited outside safemode").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_deleted_in_etcd_is_named_and_still_enforced() {
    let (etcd, server, id) = frozen().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let deleted = client.delete(activation_key(&id), None).await.unwrap();
    assert_eq!(deleted.deleted(), 1);

    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");
    let want = format!("activation {id} of namespace live was deleted outside safemode");
    assert!(
        problems.iter().any(|p| p.contains(&want)),
        "expected {want:?} in {problems:?}"
    );
    fails_closed_and_shows(&server, &id, "deleted outside safemode").await;

    // A later change through safemode does not bless the deletion.
    server.apply(&["throttle-high-risk"]).await;
    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains(&want)), "{problems:?}");
    assert!(
        server
            .status("live")
            .await
            .problems
            .iter()
            .any(|p| p.contains(&id)),
        "status still names it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_deleted_with_the_namespace_meta_record_is_named_and_still_enforced() {
    let (etcd, server, id) = frozen().await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    // One etcd transaction removes the freeze and the record that says
    // what the last change left.
    let txn = etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::delete(activation_key(&id), None),
        etcd_client::TxnOp::delete("/safemode/ns/live/meta", None),
    ]);
    assert!(client.txn(txn).await.unwrap().succeeded());

    fails_closed_and_shows(&server, &id, "deleted outside safemode").await;
    let status = server.status("live").await;
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("last-change record was deleted outside safemode")),
        "{:?}",
        status.problems
    );
    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");

    // A later change through safemode keeps the deleted freeze named and
    // enforced, in status and in the log.
    server.apply(&["throttle-high-risk"]).await;
    fails_closed_and_shows(&server, &id, "deleted outside safemode").await;
    let (code, problems) = verify(&server).await;
    assert_eq!(code, Some(1), "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&id) && p.contains("deleted outside safemode")),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_says_when_the_audit_log_went_back() {
    let (etcd, server, _) = frozen().await;
    server.apply(&["throttle-high-risk"]).await;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let head: AuditHead =
        serde_json::from_slice(client.get(HEAD, None).await.unwrap().kvs()[0].value()).unwrap();
    let before: AuditEntry = serde_json::from_slice(
        client
            .get(entry_key(head.seq - 1), None)
            .await
            .unwrap()
            .kvs()[0]
            .value(),
    )
    .unwrap();
    // The log's last entry removed and its head set back, in one
    // transaction: a chain that is whole again, but shorter.
    let txn = etcd_client::Txn::new().and_then(vec![
        etcd_client::TxnOp::delete(entry_key(head.seq), None),
        etcd_client::TxnOp::put(HEAD, serde_json::to_vec(&before.head()).unwrap(), None),
    ]);
    assert!(client.txn(txn).await.unwrap().succeeded());
    // The next change finds the head behind what this replica appended.
    server.apply(&["bots-faq-only"]).await;
    let problems = server.status("live").await.problems;
    let want = format!(
        "the audit log went back from entry {} to entry {}",
        head.seq,
        head.seq - 1
    );
    assert!(
        problems.iter().any(|p| p.contains(&want)),
        "expected {want:?} in {problems:?}"
    );
}
