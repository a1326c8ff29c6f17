//! Writes that survive faults (issue 10, finding 8): three real etcd
//! members, two `safemode serve` replicas on them (processes sharing one
//! signing key), subscribers, and a commander whose every command must
//! succeed while members (the leader included) are killed and restarted one
//! at a time, a replica is killed (SIGKILL, perhaps mid-command) and
//! restarted on its address, and etcd is compacted.
//!
//! The soak runs a few cycles by default, so it fits in every CI run;
//! `SAFEMODE_SOAK_ITERATIONS=N` runs N apply-and-lift cycles instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use safemode_client::{Subscriber, SubscriberConfig};
use safemode_policy::{Channel, Namespace};
use safemode_signing::TrustedKeys;
use safemode_wire::proto;
use safemode_wire::proto::control_service_client::ControlServiceClient;

use crate::etcd::EtcdCluster;
use crate::support::{ServeProcess, TestServer, safemode, wait_until};

/// Apply-and-lift cycles of the default (short) run.
const DEFAULT_CYCLES: usize = 8;

/// A mode whose lift needs no second approver, so the commander alone
/// can apply and lift it.
const MODE: &str = "throttle-high-risk";

fn cycles() -> usize {
    match std::env::var("SAFEMODE_SOAK_ITERATIONS") {
        Err(_) => DEFAULT_CYCLES,
        Ok(text) => text.parse().unwrap_or_else(|_| {
            panic!("SAFEMODE_SOAK_ITERATIONS={text:?}: give a number of cycles, e.g. 200")
        }),
    }
}

/// Every `change_id` in the audit log, with how often it appears, read from
/// etcd itself.
async fn change_ids_in_audit(endpoints: &[String]) -> BTreeMap<String, usize> {
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("connect to etcd");
    let entries = client
        .get(
            "/safemode/audit/log/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("read the audit log");
    let mut counts = BTreeMap::new();
    for kv in entries.kvs() {
        let entry: serde_json::Value = serde_json::from_slice(kv.value()).expect("entry is JSON");
        if let Some(id) = entry.get("change_id").and_then(|v| v.as_str()) {
            *counts.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// The whole log verified by the replica at `url`: no problem found.
async fn assert_audit_verifies(url: &str) {
    let audit = ControlServiceClient::connect(url.to_string())
        .await
        .expect("connect to a replica")
        .get_audit(proto::GetAuditRequest {
            verify: true,
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("the audit log can be read")
        .into_inner();
    assert!(audit.verified, "the audit log was verified");
    assert!(
        audit.problems.is_empty(),
        "the audit log has problems: {:#?}",
        audit.problems
    );
}

/// A subscriber of `channel` on both replicas, and every revision it
/// applied, in order.
struct Watched {
    subscriber: Subscriber,
    applied: Arc<Mutex<Vec<i64>>>,
}

async fn watched(urls: &[String], trusted: &TrustedKeys, channel: &str, id: &str) -> Watched {
    let mut config = SubscriberConfig::new(
        urls.to_vec(),
        Namespace::live(),
        Channel::parse(channel).unwrap(),
        id,
    );
    config.trusted_keys = Some(trusted.clone());
    // A replica that is killed comes back within the soak: reconnect soon.
    config.max_backoff = Duration::from_millis(500);
    let subscriber = Subscriber::connect(config)
        .await
        .expect("the subscriber connects");
    let applied = Arc::new(Mutex::new(Vec::new()));
    let mut changes = subscriber.changes();
    let seen = applied.clone();
    tokio::spawn(async move {
        loop {
            if let Some(snapshot) = changes.borrow_and_update().clone() {
                seen.lock().unwrap().push(snapshot.revision);
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    Watched {
        subscriber,
        applied,
    }
}

/// One command of the commander, run through the real CLI against both
/// replicas, with its own change id. Returns the revision it reports.
async fn command(urls: &[String], change_id: &str, args: &[&str]) -> i64 {
    let servers = urls.join(",");
    let mut all = vec![
        "--server",
        &servers,
        "--principal",
        "soak-commander",
        "--output",
        "json",
        "--change-id",
        change_id,
    ];
    all.extend_from_slice(args);
    let output = safemode(&all).await;
    assert!(
        output.status.success(),
        "`safemode {}` failed: {}",
        all.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the CLI answers JSON");
    answer["revision"]
        .as_i64()
        .expect("the answer has a revision")
}

/// Waits until the commander has run `count` commands (or finished).
async fn progress<T>(
    done: &AtomicUsize,
    count: usize,
    commander: &tokio::task::JoinHandle<T>,
    what: &str,
) {
    wait_until(what, || {
        let reached = done.load(Ordering::SeqCst) >= count || commander.is_finished();
        async move { reached }
    })
    .await;
}

/// What the fault driver does next.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Kill an etcd member that is not the leader; restart it.
    KillFollower,
    /// Kill the etcd leader; restart it.
    KillLeader,
    /// Kill a replica (SIGKILL), the two in turn; start it again on the
    /// same address.
    KillReplica,
    /// Compact etcd at its current revision.
    Compact,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_command_succeeds_while_members_and_replicas_fail() {
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    // Replicas of one deployment share their signing key.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("signing.key");
    let (key, pem) = safemode_signing::SigningKey::generate();
    std::fs::write(&key_file, pem).unwrap();
    let trusted = TrustedKeys::new([key.public_key().clone()]).unwrap();
    let serve_args = [
        "--store".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        endpoints.join(","),
        "--signing-key".to_string(),
        key_file.display().to_string(),
    ];
    let serve = move |listen: String| {
        let args = serve_args.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ServeProcess::start_on(&listen, &args, &[])
            })
            .await
            .unwrap()
        }
    };
    let mut replicas = [
        Some(serve("127.0.0.1:0".into()).await),
        Some(serve("127.0.0.1:0".into()).await),
    ];
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().url.clone())
        .collect();
    let addrs: Vec<String> = urls
        .iter()
        .map(|u| u.trim_start_matches("http://").to_string())
        .collect();
    let subscribers = [
        watched(&urls, &trusted, "chatbot", "soak-chatbot").await,
        watched(
            &[urls[1].clone(), urls[0].clone()],
            &trusted,
            "ivr",
            "soak-ivr",
        )
        .await,
        watched(&urls, &trusted, "web", "soak-web").await,
    ];

    // The commander: apply and lift in a loop until told to stop, every
    // command through the CLI with both replicas, recording its change ids
    // and the revision of the last change.
    let cycles = cycles();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let commander = {
        let (urls, done, stop) = (urls.clone(), done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut last = 0;
            for cycle in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                for (verb, args) in [
                    ("apply", vec!["mode", "apply", MODE, "--reason", "soak"]),
                    ("lift", vec!["mode", "lift", MODE, "--reason", "soak over"]),
                ] {
                    let id = format!("soak-{cycle}-{verb}");
                    last = command(&urls, &id, &args).await;
                    ids.push(id);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
            (ids, last)
        })
    };

    // The faults, one at a time, each while commands run: inject, wait for
    // two more commands to succeed under it, recover. Every kind at least
    // once, and on until the commander ran its cycles.
    let faults = [
        Fault::KillFollower,
        Fault::KillLeader,
        Fault::KillReplica,
        Fault::Compact,
    ];
    let mut round = 0;
    while round < faults.len() || done.load(Ordering::SeqCst) < cycles * 2 {
        let fault = faults[round % faults.len()];
        round += 1;
        let before = done.load(Ordering::SeqCst);
        match fault {
            Fault::KillFollower | Fault::KillLeader => {
                let leader = cluster.leader().await;
                let victim = match fault {
                    Fault::KillLeader => leader,
                    _ => (leader + 1) % 3,
                };
                cluster.kill(victim);
                progress(
                    &done,
                    before + 2,
                    &commander,
                    "two commands succeed with an etcd member down",
                )
                .await;
                cluster.restart(victim).await;
            }
            Fault::KillReplica => {
                let victim = (round / faults.len()) % 2;
                replicas[victim].take().unwrap().kill();
                progress(
                    &done,
                    before + 2,
                    &commander,
                    "two commands succeed with a replica down",
                )
                .await;
                replicas[victim] = Some(serve(addrs[victim].clone()).await);
            }
            Fault::Compact => {
                let store = cluster.store().await;
                let revision = store.range("/safemode/epoch").await.unwrap().revision;
                store.compact(revision).await.expect("etcd compacts");
                progress(
                    &done,
                    before + 2,
                    &commander,
                    "two commands succeed after a compaction",
                )
                .await;
            }
        }
        if commander.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    // A panic in the commander (a failed command) fails the test here.
    let (ids, final_revision) = commander.await.expect("every command succeeded");
    assert!(round >= faults.len(), "every kind of fault was injected");
    eprintln!(
        "soak: {} commands, {round} faults, final revision {final_revision}",
        ids.len()
    );

    for watched in &subscribers {
        wait_until("every subscriber applies the final revision", || async {
            watched
                .subscriber
                .current()
                .is_some_and(|s| s.revision == final_revision)
        })
        .await;
        let applied = watched.applied.lock().unwrap().clone();
        assert!(
            applied.windows(2).all(|w| w[0] <= w[1]),
            "a subscriber went backwards: {applied:?}"
        );
    }

    assert_audit_verifies(&urls[0]).await;
    let counts = change_ids_in_audit(&endpoints).await;
    for id in &ids {
        assert_eq!(
            counts.get(id).copied().unwrap_or(0),
            1,
            "change {id} must be in the audit log exactly once"
        );
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "a change id appears more than once: {counts:?}"
    );
}

/// Finding 8 on its own: one replica, one etcd member down (a follower,
/// then the leader), and every command in a row succeeds without any retry
/// by the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_succeed_with_one_etcd_member_down() {
    const COMMANDS: usize = 10;
    let mut cluster = EtcdCluster::start(3).await;
    let replica = TestServer::on_etcd(cluster.endpoints(), "127.0.0.1:0").await;
    let mut control = replica.control().await;
    for kill_leader in [false, true] {
        let leader = cluster.leader().await;
        let victim = if kill_leader {
            leader
        } else {
            (leader + 1) % 3
        };
        cluster.kill(victim);
        for i in 0..COMMANDS {
            let who = if kill_leader { "leader" } else { "follower" };
            let result = if i % 2 == 0 {
                control
                    .apply_modes(proto::ApplyModesRequest {
                        namespace: "live".into(),
                        modes: vec![MODE.into()],
                        reason: "member down".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().applied.len())
            } else {
                control
                    .lift_activations(proto::LiftActivationsRequest {
                        namespace: "live".into(),
                        targets: vec![MODE.into()],
                        reason: "member down".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().lifted.len())
            };
            match result {
                Ok(changed) => {
                    assert_eq!(changed, 1, "command {i} with the {who} down did nothing")
                }
                Err(status) => panic!(
                    "command {i} with the {who} down failed: {:?} {}",
                    status.code(),
                    status.message()
                ),
            }
        }
        cluster.restart(victim).await;
    }
}
