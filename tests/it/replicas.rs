//! Several stateless controller replicas over real etcd: changes made through
//! one reach subscribers of another, subscribers move between replicas
//! without going backwards, and nothing reported as done is lost when the
//! etcd leader is killed, history is compacted, or a replica restarts.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use safemode_client::{Subscriber, SubscriberConfig};
use safemode_controller::{ApplyRequest, Controller, ControllerConfig, LiftRequest, LiftTarget};
use safemode_policy::{Channel, ModeName, Namespace, Reason};
use safemode_store::embedded::EmbeddedStore;
use safemode_store::{self as store, Store};
use safemode_wire::proto;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::etcd::EtcdCluster;
use crate::support::{RawSubscriber, TestServer, safemode, wait_for, wait_until};

const CHANNELS: [&str; 6] = ["chatbot", "ivr", "agent-desk", "web", "mobile", "email"];

/// Waits for a subscriber's first snapshot and returns its revision.
async fn first_revision(subscriber: &RawSubscriber) -> i64 {
    wait_for("the first snapshot", || async {
        subscriber.revisions().first().copied()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_subscribers_of_another() {
    let etcd = EtcdCluster::start(1).await;
    let a = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let b = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;

    let on_b = RawSubscriber::connect(b.channel().await, "live", "chatbot", "on-b", 0)
        .await
        .unwrap();
    first_revision(&on_b).await;
    let revision = a.apply(&["freeze-credential-changes"]).await;
    wait_until(
        "the subscriber of replica B got the change made through A",
        || async {
            on_b.latest().is_some_and(|s| {
                s.revision == revision
                    && crate::support::modes_of(&s) == ["freeze-credential-changes"]
            })
        },
    )
    .await;
    wait_until("both replicas report the same revision", || async {
        a.status("live").await.revision == revision && b.status("live").await.revision == revision
    })
    .await;

    // A subscriber hops between the replicas after every change, each time
    // saying what it already applied: it never receives anything older, even
    // when the replica it lands on has not caught up yet.
    let replicas = [&a, &b];
    let mut applied = revision;
    for round in 0..20 {
        let commander = replicas[round % 2];
        let mut control = commander.control().await;
        let request = proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["incident-notice".into()],
            reason: format!("round {round}"),
            ..Default::default()
        };
        let changed = if round % 2 == 0 {
            control
                .apply_modes(request)
                .await
                .unwrap()
                .into_inner()
                .revision
        } else {
            control
                .lift_activations(proto::LiftActivationsRequest {
                    namespace: "live".into(),
                    targets: vec!["incident-notice".into()],
                    reason: format!("round {round}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .revision
        };
        assert!(changed > applied);
        applied = changed;
        // Land on the other replica than the one that made the change.
        let target = replicas[(round + 1) % 2];
        let mover = wait_for("the other replica admits the mover", || async {
            RawSubscriber::connect(target.channel().await, "live", "ivr", "mover", applied)
                .await
                .ok()
        })
        .await;
        let first = first_revision(&mover).await;
        assert!(
            first >= applied,
            "round {round}: got {first} after applying {applied}"
        );
    }
}

/// What the commander loop saw.
#[derive(Default)]
struct Outcomes {
    /// Applies the CLI reported as done: (activation id, mode, channel).
    applied: Vec<(String, String, String)>,
    /// Applies that failed: (mode, channel). They may or may not have
    /// committed before the failure.
    apply_failed: Vec<(String, String)>,
    /// Activation ids the CLI reported as lifted.
    lifted: Vec<String>,
    /// Activation ids whose lift failed (it may have committed).
    lift_failed: Vec<String>,
    /// Activation ids whose lift waits for a second approver.
    pending: Vec<String>,
}

/// A failed command must say so on one line, not crash.
fn assert_clear_failure(output: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    assert!(stderr.starts_with("error: "), "{what}: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reported_change_survives_killing_the_etcd_leader() {
    let mut etcd = EtcdCluster::start(3).await;
    let a = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let b = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let servers = format!("{},{}", a.url, b.url);

    let mut subscribers = Vec::new();
    for (i, channel) in CHANNELS.iter().enumerate() {
        for (r, replica) in [&a, &b].into_iter().enumerate() {
            let id = format!("{channel}-{r}");
            let subscriber =
                RawSubscriber::connect(replica.channel().await, "live", channel, &id, 0)
                    .await
                    .unwrap();
            subscribers.push((CHANNELS[i], subscriber));
        }
    }

    // The commander: one change per (mode, channel) pair, and every third
    // step also lifts the oldest activation still up, through the CLI with
    // both replicas given.
    let modes: Vec<String> = a
        .control()
        .await
        .list_modes(proto::ListModesRequest {})
        .await
        .unwrap()
        .into_inner()
        .modes
        .into_iter()
        .map(|m| m.name)
        .collect();
    let steps = 36;
    let progress = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let commander = tokio::spawn({
        let (progress, outcomes, servers) = (progress.clone(), outcomes.clone(), servers.clone());
        async move {
            for step in 0..steps {
                let mode = &modes[step % modes.len()];
                let channel = CHANNELS[step / modes.len() % CHANNELS.len()];
                let reason = format!("step {step}");
                let output = safemode(&[
                    "--server",
                    &servers,
                    "--output",
                    "json",
                    "mode",
                    "apply",
                    mode,
                    "--channels",
                    channel,
                    "--reason",
                    &reason,
                ])
                .await;
                if output.status.success() {
                    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                    let id = json["applied"][0]["id"]
                        .as_str()
                        .expect("a new activation")
                        .to_string();
                    outcomes
                        .lock()
                        .await
                        .applied
                        .push((id, mode.clone(), channel.to_string()));
                } else {
                    assert_clear_failure(&output, &format!("apply at step {step}"));
                    outcomes
                        .lock()
                        .await
                        .apply_failed
                        .push((mode.clone(), channel.to_string()));
                }
                if step % 3 == 2 {
                    let target = {
                        let o = outcomes.lock().await;
                        o.applied.iter().map(|(id, ..)| id.clone()).find(|id| {
                            !o.lifted.contains(id)
                                && !o.lift_failed.contains(id)
                                && !o.pending.contains(id)
                        })
                    };
                    if let Some(id) = target {
                        let output = safemode(&[
                            "--server", &servers, "--output", "json", "mode", "lift", &id,
                            "--reason", &reason,
                        ])
                        .await;
                        let mut o = outcomes.lock().await;
                        // A mode that needs a second approver is not lifted
                        // yet (exit 3, the request on stdout): its
                        // activation stays, and the commander does not try
                        // it again.
                        if output.status.code() == Some(3) {
                            let json: serde_json::Value =
                                serde_json::from_slice(&output.stdout).unwrap();
                            assert!(!json["pending"].is_null(), "{json}");
                            o.pending.push(id);
                        } else if output.status.success() {
                            o.lifted.push(id);
                        } else {
                            assert_clear_failure(&output, &format!("lift at step {step}"));
                            o.lift_failed.push(id);
                        }
                    }
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    // While the commander works: kill the etcd leader, then bring it back.
    wait_until("the commander made some changes", || async {
        progress.load(Ordering::SeqCst) >= 6
    })
    .await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    wait_until("the commander went on without the old leader", || async {
        progress.load(Ordering::SeqCst) >= 20
    })
    .await;
    etcd.restart(leader).await;
    commander.await.expect("the commander loop");

    let outcomes = outcomes.lock().await;
    eprintln!(
        "commander across the leader kill: {} applied, {} applies failed, {} lifted, {} lifts failed",
        outcomes.applied.len(),
        outcomes.apply_failed.len(),
        outcomes.lifted.len(),
        outcomes.lift_failed.len()
    );
    assert!(
        outcomes.applied.len() >= steps / 2,
        "most applies succeed: {} of {steps}",
        outcomes.applied.len()
    );
    let status = wait_for("both replicas agree on the final state", || async {
        let (sa, sb) = (a.status("live").await, b.status("live").await);
        (sa.revision == sb.revision && sa.activations == sb.activations).then_some(sa)
    })
    .await;
    let present: BTreeSet<String> = status.activations.iter().map(|x| x.id.clone()).collect();
    for (id, mode, channel) in &outcomes.applied {
        let lifted = outcomes.lifted.contains(id);
        let maybe_lifted = outcomes.lift_failed.contains(id);
        if lifted {
            assert!(
                !present.contains(id),
                "{mode} on {channel} ({id}) was lifted but is active"
            );
        } else if !maybe_lifted {
            assert!(
                present.contains(id),
                "{mode} on {channel} ({id}) was applied but is gone"
            );
        }
    }
    for activation in &status.activations {
        let reported = outcomes.applied.iter().any(|(id, ..)| *id == activation.id);
        let ambiguous = outcomes.apply_failed.iter().any(|(mode, channel)| {
            *mode == activation.mode && activation.channels == [channel.clone()]
        });
        assert!(
            reported || ambiguous,
            "{} ({}) came from nowhere",
            activation.id,
            activation.mode
        );
    }

    // Every subscriber converged on the final state and never went back.
    for (channel, subscriber) in &subscribers {
        wait_until("every subscriber reached the final revision", || async {
            subscriber.revisions().last() == Some(&status.revision)
        })
        .await;
        let revisions = subscriber.revisions();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "{channel}: revisions went backwards or repeated: {revisions:?}"
        );
        let expected: BTreeSet<&str> = status
            .activations
            .iter()
            .filter(|x| x.channels.is_empty() || x.channels.iter().any(|c| c == channel))
            .map(|x| x.id.as_str())
            .collect();
        let latest = subscriber.latest().unwrap();
        let got: BTreeSet<&str> = latest.activations.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(got, expected, "{channel}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_missed_compacted_history_gets_the_full_current_state() {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let away = RawSubscriber::connect(server.channel().await, "live", "web", "returning", 0)
        .await
        .unwrap();
    let last_applied = first_revision(&away).await;
    drop(away);

    // 500 changes while it is away: apply or lift, cycling through the modes.
    let mut control = server.control().await;
    // Seven modes that lift without a second approver, so 500 toggles leave
    // some on (500 = 7 * 71 + 3).
    let modes = [
        "bots-faq-only",
        "step-up-account-changes",
        "step-up-no-sms",
        "throttle-high-risk",
        "incident-notice",
        "read-only-last-known-good",
        "recovery-verified-paths",
    ];
    let mut active = BTreeSet::new();
    for i in 0..500 {
        let mode = modes[i % modes.len()];
        if active.remove(mode) {
            control
                .lift_activations(proto::LiftActivationsRequest {
                    namespace: "live".into(),
                    targets: vec![mode.into()],
                    reason: format!("change {i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
        } else {
            active.insert(mode);
            control
                .apply_modes(proto::ApplyModesRequest {
                    namespace: "live".into(),
                    modes: vec![mode.into()],
                    reason: format!("change {i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let status = server.status("live").await;
    assert!(!status.activations.is_empty());

    // Compact all history: the revisions the subscriber missed are gone.
    let store = etcd.store().await;
    let now = store.range("").await.unwrap().revision;
    store.compact(now).await.unwrap();
    let gone = store.watch("/safemode/", last_applied + 1).await;
    let compacted = match gone {
        Err(e) => Some(e),
        Ok(mut stream) => futures_util::StreamExt::next(&mut stream)
            .await
            .and_then(Result::err),
    };
    assert!(
        matches!(compacted, Some(safemode_store::Error::Compacted { .. })),
        "history after {last_applied} should be compacted: {compacted:?}"
    );

    let back = RawSubscriber::connect(
        server.channel().await,
        "live",
        "web",
        "returning",
        last_applied,
    )
    .await
    .unwrap();
    assert_eq!(first_revision(&back).await, status.revision);
    let snapshot = back.latest().unwrap();
    let got: BTreeSet<String> = snapshot
        .activations
        .iter()
        .map(|x| x.mode.clone())
        .collect();
    let expected: BTreeSet<String> = active.iter().map(|m| m.to_string()).collect();
    assert_eq!(got, expected);
    assert_eq!(snapshot.activations, status.activations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_gets_all_1000_subscribers_back() {
    // Each subscriber holds a connection on both ends.
    rlimit::increase_nofile_limit(8192).expect("raise the open-file limit");
    let etcd = EtcdCluster::start(1).await;
    let mut replica = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let addr = replica.addr().to_string();
    let url = replica.url.clone();

    let connects = (0..1000).map(|i| {
        let mut config = SubscriberConfig::new(
            [url.clone()],
            Namespace::live(),
            Channel::parse(CHANNELS[i % CHANNELS.len()]).unwrap(),
            format!("sub-{i:04}"),
        );
        config.trusted_keys = Some(replica.trusted_keys());
        Subscriber::connect(config)
    });
    let subscribers: Vec<Subscriber> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every subscriber connects");

    let before = replica.apply(&["incident-notice"]).await;
    wait_until("all 1000 applied the change", || async {
        subscribers
            .iter()
            .all(|s| s.current().is_some_and(|p| p.revision == before))
    })
    .await;

    // Restart the replica on the same address; the subscribers come back on
    // their own (with jittered backoff) and converge on the next change.
    replica.stop().await;
    let replica = TestServer::on_etcd(etcd.endpoints(), &addr).await;
    let after = replica.apply(&["freeze-credential-changes"]).await;
    assert!(after > before);
    wait_until(
        "all 1000 converged on the change after the restart",
        || async {
            subscribers
                .iter()
                .all(|s| s.current().is_some_and(|p| p.revision == after))
        },
    )
    .await;
    wait_until(
        "the restarted replica lists all 1000 at the latest revision",
        || async {
            let status = replica.status("live").await;
            status.subscribers.len() == 1000
                && status.subscribers.iter().all(|s| s.acked_revision == after)
        },
    )
    .await;
}

/// A real store whose watch events reach the caller late: a replica whose
/// view lags the store (fault injection over the real store, not a mock).
struct LaggingWatch {
    inner: Arc<dyn Store>,
    lag: std::time::Duration,
}

#[async_trait::async_trait]
impl Store for LaggingWatch {
    async fn range(&self, prefix: &str) -> store::Result<store::RangeResult> {
        self.inner.range(prefix).await
    }
    async fn range_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: i64,
    ) -> store::Result<store::RangePage> {
        self.inner
            .range_page(prefix, start_after, limit, revision)
            .await
    }
    async fn txn(&self, txn: store::Txn) -> store::Result<store::TxnOutcome> {
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: i64) -> store::Result<store::WatchStream> {
        let lag = self.lag;
        let stream = self.inner.watch(prefix, from).await?;
        Ok(stream
            .then(move |item| async move {
                tokio::time::sleep(lag).await;
                item
            })
            .boxed())
    }
    async fn compact(&self, revision: i64) -> store::Result<()> {
        self.inner.compact(revision).await
    }
    fn describe(&self) -> String {
        format!("lagging {}", self.inner.describe())
    }
}

#[tokio::test]
async fn already_active_is_never_answered_from_a_lagging_view() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store.redb"), Default::default()).unwrap());
    let start = |store: Arc<dyn Store>| {
        Controller::start(
            store,
            Arc::new(safemode_policy::catalog::Catalog::standard()),
            ControllerConfig::default(),
            CancellationToken::new(),
        )
    };
    let prompt = start(store.clone()).await.unwrap();
    let lagging = start(Arc::new(LaggingWatch {
        inner: store.clone(),
        lag: std::time::Duration::from_millis(500),
    }))
    .await
    .unwrap();
    let live = Namespace::live();
    let apply = || ApplyRequest {
        namespace: live.clone(),
        modes: vec![ModeName::parse("throttle-high-risk").unwrap()],
        channels: safemode_policy::ChannelSet::ALL,
        as_of: None,
        actor: safemode_controller::auth::Principal {
            name: "bob".into(),
            roles: vec![safemode_controller::auth::Role::Commander],
        },
        reason: Reason::parse("contain the wave").unwrap(),
        change_id: None,
        dry_run: false,
    };
    // Both replicas know the mode is active.
    lagging.apply(apply()).await.unwrap();
    wait_until("the prompt replica sees it", || async {
        prompt.status(&live).await.unwrap().view.activations.len() == 1
    })
    .await;
    // Carol lifts it through the prompt replica; at once Bob applies it
    // through the lagging one, whose view still shows it active.
    prompt
        .lift(LiftRequest {
            namespace: live.clone(),
            targets: vec![LiftTarget::parse("throttle-high-risk").unwrap()],
            actor: safemode_controller::auth::Principal {
                name: "carol".into(),
                roles: vec![safemode_controller::auth::Role::Commander],
            },
            reason: Reason::parse("contained").unwrap(),
            all: false,
            incident_ok: false,
            change_id: None,
            dry_run: false,
        })
        .await
        .unwrap();
    let seen = lagging.status(&live).await.unwrap();
    assert_eq!(seen.view.activations.len(), 1, "the view lags");
    // And status says so: the store has the lift, this replica does not.
    let store = &seen.store;
    assert!(store.reachable(), "{store:?}");
    assert_eq!(store.applied_revision, seen.view.meta_revision);
    assert!(
        store.namespace_revision > Some(store.applied_revision) && store.lag_revisions > 0,
        "{store:?}"
    );
    assert_eq!(
        store.lag_revisions,
        store.namespace_revision.unwrap() - store.applied_revision
    );
    let behind = format!(
        "this replica is behind the store in namespace live: it applied revision {}, the store has revision {}; what it shows is out of date",
        store.applied_revision,
        store.namespace_revision.unwrap()
    );
    assert!(seen.problems().contains(&behind), "{:?}", seen.problems());
    let answer = lagging.apply(apply()).await.unwrap();
    assert_eq!(
        answer.applied.len(),
        1,
        "the mode was lifted, so it is applied again"
    );
    wait_until("the prompt replica sees it active again", || async {
        prompt.status(&live).await.unwrap().view.activations.len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_activation_fails_closed() {
    let etcd = EtcdCluster::start(1).await;
    let server = TestServer::on_etcd(etcd.endpoints(), "127.0.0.1:0").await;
    let subscriber = RawSubscriber::connect(server.channel().await, "live", "web", "web-1", 0)
        .await
        .unwrap();
    first_revision(&subscriber).await;

    // A record this version cannot read: an effect kind it does not know, as
    // a newer controller might write.
    let id = "act_0000000000zz";
    let record = serde_json::json!({
        "id": id,
        "mode": {"name": "future-mode", "title": "Future", "summary": "From a newer version",
                 "rules": [{"channels": ["*"], "actions": ["*"], "effect": {"quarantine": {}}}]},
        "channels": ["*"], "reason": "newer controller", "principal": "someone",
        "applied_at": "2026-11-21T00:00:00Z"
    });
    let mut etcd_client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    etcd_client
        .put(
            format!("/safemode/ns/live/activations/{id}"),
            record.to_string(),
            None,
        )
        .await
        .unwrap();

    wait_until("the subscriber got the fail-closed policy", || async {
        subscriber
            .latest()
            .is_some_and(|s| s.activations.iter().any(|a| a.id == id))
    })
    .await;
    let client = server.subscriber("web", "checker").await;
    let order = safemode_policy::Action::parse("order.view").unwrap();
    let decision = client.decide(&order, &safemode_policy::Context::default());
    assert_eq!(decision.effect(), safemode_policy::EffectKind::Deny);
    assert_eq!(
        decision.reasons().map(|r| r.as_str()).collect::<Vec<_>>(),
        [id]
    );
    let status = server.status("live").await;
    assert_eq!(status.problems.len(), 1, "{:?}", status.problems);
    assert!(status.problems[0].contains(id), "{:?}", status.problems);
    assert_eq!(status.activations[0].mode, "unreadable-activation");

    // Lifting a protective record nobody can read takes two people: through
    // a guarded replica on the same store, a commander's lift waits for a
    // different approver.
    let principals = crate::support::Principals::new();
    let guarded = TestServer::on_etcd_guarded(etcd.endpoints(), &principals).await;
    let mut commander =
        crate::support::control_as(&guarded, Some(principals.token("commander"))).await;
    let lift = commander
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: vec![id.into()],
            reason: "written by a newer version by mistake".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let request = lift.pending.expect("a second approver is needed");
    assert!(lift.lifted.is_empty());
    assert_eq!(server.status("live").await.activations.len(), 1);
    crate::support::control_as(&guarded, Some(principals.token("approver")))
        .await
        .approve(proto::ApproveRequest {
            request_id: request.id,
            reason: "confirmed with the team that wrote it".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap();
    wait_until("the stand-in is gone", || async {
        let status = server.status("live").await;
        status.activations.is_empty() && status.problems.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_stop_while_the_store_is_unreachable_so_clients_go_stale() {
    let mut etcd = EtcdCluster::start(1).await;
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        signing_key: safemode_grpc::server::SigningKeySource::Key(
            crate::support::test_signing_key(),
        ),
        store: safemode_grpc::server::StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        heartbeat: std::time::Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let mut config = SubscriberConfig::new(
        [server.url.clone()],
        Namespace::live(),
        Channel::parse("ivr").unwrap(),
        "ivr-1",
    );
    config.trusted_keys = Some(server.trusted_keys());
    config.stale_after = std::time::Duration::from_millis(500);
    let client = Subscriber::connect(config).await.unwrap();
    wait_until("fresh while heartbeats arrive", || async {
        !client.is_stale()
    })
    .await;

    etcd.kill(0);
    wait_until(
        "stale once the controller cannot read its store",
        || async { client.is_stale() },
    )
    .await;
    etcd.restart(0).await;
    wait_until("fresh again once the store is back", || async {
        !client.is_stale()
    })
    .await;
}
