//! The whole path over real gRPC on 127.0.0.1:0: commander applies and
//! lifts, every subscriber receives the change atomically, acks it, and
//! status shows where each subscriber is.

use safemode_policy::{Action, Channel, Context, EffectKind};
use safemode_wire::proto;

use crate::support::{RawSubscriber, TestServer, modes_of, wait_until};

const CHANNELS: [&str; 4] = ["chatbot", "ivr", "agent-desk", "web"];
const SUBSCRIBERS: usize = 200;
/// Two modes that a single commander may lift (neither asks for a second
/// approver), sorted.
const TWO_MODES: [&str; 2] = ["bots-faq-only", "step-up-account-changes"];

/// Subscribers spread over one HTTP/2 connection per channel, as four channel
/// services would be.
async fn connect_all(server: &TestServer, last_applied: i64) -> Vec<RawSubscriber> {
    let mut connections = Vec::new();
    for _ in CHANNELS {
        connections.push(server.channel().await);
    }
    let mut subscribers = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let c = i % CHANNELS.len();
        let subscriber = RawSubscriber::connect(
            connections[c].clone(),
            "live",
            CHANNELS[c],
            &format!("{}-{i:03}", CHANNELS[c]),
            last_applied,
        )
        .await
        .expect("subscribe");
        subscribers.push(subscriber);
    }
    subscribers
}

/// Whether status lists exactly `count` subscribers, all acked at `revision`.
async fn all_acked(server: &TestServer, count: usize, revision: i64) -> bool {
    let status = server.status("live").await;
    status.subscribers.len() == count
        && status
            .subscribers
            .iter()
            .all(|s| s.acked_revision == revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_mode_change_reaches_every_subscriber_at_once_and_a_lift_restores_allow() {
    let server = TestServer::start().await;
    let subscribers = connect_all(&server, 0).await;

    // Everyone starts from the empty namespace, revision 0.
    wait_until("every subscriber acked the initial snapshot", || {
        all_acked(&server, SUBSCRIBERS, 0)
    })
    .await;
    for s in &subscribers {
        assert_eq!(s.revisions(), vec![0]);
        assert!(s.latest().unwrap().activations.is_empty());
    }

    let revision = server.apply(&TWO_MODES).await;
    assert!(revision > 0);

    wait_until("every subscriber received the change", || async {
        subscribers
            .iter()
            .all(|s| s.revisions().last() == Some(&revision))
    })
    .await;
    for s in &subscribers {
        let received = s.received.lock().unwrap().clone();
        // Exactly one snapshot after the initial one, and it holds both modes:
        // there is never a snapshot with one mode and not the other.
        assert_eq!(received.len(), 2, "revisions {:?}", s.revisions());
        assert_eq!(modes_of(&received[1]), TWO_MODES);
        assert_eq!(received[1].schema_version, safemode_wire::SCHEMA_VERSION);
        // Both modes are merged: the bots refuse account changes outright;
        // elsewhere they need a step-up.
        let rules = received[1].rules.as_ref().unwrap();
        // Neither mode names the reset itself: a client's lookup lands on
        // `account.*`.
        let reset = &rules.actions["account.*"];
        let effect = reset
            .base
            .as_ref()
            .unwrap()
            .effect
            .as_ref()
            .unwrap()
            .kind
            .as_ref();
        let bots = matches!(received[1].channel.as_str(), "chatbot" | "ivr");
        assert!(
            matches!(
                (bots, effect),
                (true, Some(proto::effect::Kind::Deny(_)))
                    | (false, Some(proto::effect::Kind::StepUp(_)))
            ),
            "password reset on {}: {effect:?}",
            received[1].channel
        );
    }
    wait_until(
        "status shows all 200 subscribers at the new revision",
        || all_acked(&server, SUBSCRIBERS, revision),
    )
    .await;
    let status = server.status("live").await;
    assert_eq!(status.revision, revision);
    assert_eq!(status.activations.len(), 2);

    // A real client evaluates the policy locally.
    let _chatbot = Channel::parse("chatbot").unwrap();
    let client = server.subscriber("chatbot", "client-check").await;
    let ctx = Context {
        confidence: 1.0,
        ..Context::default()
    };
    let reset = Action::parse("account.password_reset").unwrap();
    let decision = client.decide(&reset, &ctx);
    assert_eq!(decision.effect(), EffectKind::Deny);
    assert_eq!(decision.revision(), Some(revision));
    assert_eq!(
        decision.reasons().count(),
        2,
        "both activations cover it on the chatbot"
    );

    // Lift both modes in one change: everyone is back to allow.
    let lifted = server
        .control()
        .await
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: TWO_MODES.iter().map(|m| m.to_string()).collect(),
            reason: "incident over".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lifted.lifted.len(), 2);
    assert!(lifted.revision > revision);
    wait_until("every subscriber received the lift", || async {
        subscribers
            .iter()
            .all(|s| s.revisions().last() == Some(&lifted.revision))
    })
    .await;
    for s in &subscribers {
        let latest = s.latest().unwrap();
        assert!(latest.activations.is_empty());
        assert!(
            latest
                .rules
                .unwrap()
                .actions
                .values()
                .all(|p| p.base.is_none() && p.conditional.is_empty())
        );
        let revisions = s.revisions();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "revisions only go up: {revisions:?}"
        );
    }
    wait_until("the client saw the lift", || async {
        client
            .current()
            .is_some_and(|s| s.revision == lifted.revision)
    })
    .await;
    assert_eq!(client.decide(&reset, &ctx).effect(), EffectKind::Allow);
    // The 200, and the client that checked decisions.
    wait_until("status shows all 201 at the lift revision", || {
        all_acked(&server, SUBSCRIBERS + 1, lifted.revision)
    })
    .await;

    // A subscriber that reconnects with its last revision, or an older one,
    // gets nothing older than the current revision.
    drop(subscribers);
    let channel = server.channel().await;
    for last_applied in [lifted.revision, revision, 0] {
        let again = RawSubscriber::connect(
            channel.clone(),
            "live",
            "chatbot",
            "returning",
            last_applied,
        )
        .await
        .unwrap();
        wait_until(
            "the returning subscriber got its first snapshot",
            || async { !again.revisions().is_empty() },
        )
        .await;
        assert_eq!(again.revisions(), vec![lifted.revision]);
    }
}

#[tokio::test]
async fn a_subscriber_ahead_of_the_controller_is_told_to_retry() {
    let server = TestServer::start().await;
    let revision = server.apply(&["incident-notice"]).await;
    // The store moves on in another namespace: a revision the store has
    // reached, which this replica's `live` has not (as a replica that is
    // behind its peers): the subscriber is told to try another replica.
    let elsewhere = server
        .control()
        .await
        .apply_modes(proto::ApplyModesRequest {
            namespace: "drill-ahead".into(),
            modes: vec!["incident-notice".into()],
            reason: "move the store on".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(elsewhere > revision);
    let refused = RawSubscriber::connect(
        server.channel().await,
        "live",
        "web",
        "from-the-future",
        elsewhere,
    )
    .await
    .err()
    .expect("a subscriber ahead of the controller is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("behind the revision"),
        "{}",
        refused.message()
    );
    assert!(server.status("live").await.subscribers.is_empty());

    // A revision the store never reached was never issued: no replica will
    // ever catch up to it, so the subscriber is told to start over.
    let never = elsewhere + 1_000;
    let restarted = RawSubscriber::connect(
        server.channel().await,
        "live",
        "web",
        "from-the-future",
        never,
    )
    .await
    .expect("admitted, to start over");
    let first =
        crate::support::wait_for("its first snapshot", || async { restarted.latest() }).await;
    assert_eq!(first.revision, revision);
    assert_eq!(first.start_over_from, never);
    let status = server.status("live").await;
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("from-the-future") && p.contains(&never.to_string())),
        "{:?}",
        status.problems
    );
}

#[tokio::test]
async fn acks_rejects_and_disconnects_show_in_status() {
    let server = TestServer::start().await;
    let subscriber = RawSubscriber::connect(server.channel().await, "live", "ivr", "ivr-1", 0)
        .await
        .unwrap();
    wait_until("the subscriber is listed with its ack", || async {
        let status = server.status("live").await;
        status.subscribers.len() == 1
            && status.subscribers[0].subscriber_id == "ivr-1"
            && status.subscribers[0].channel == "ivr"
            && status.subscribers[0].acked_at.is_some()
    })
    .await;
    // The reason is shown on a terminal: control characters are blanked.
    subscriber
        .reject(0, "rules failed validation:\x1b[31m unknown effect")
        .await;
    wait_until("the reject and its reason are listed", || async {
        let status = server.status("live").await;
        status.subscribers[0].reject_reason == "rules failed validation: [31m unknown effect"
            && status.subscribers[0].rejected_at.is_some()
    })
    .await;
    drop(subscriber);
    wait_until("a closed stream leaves status", || async {
        server.status("live").await.subscribers.is_empty()
    })
    .await;
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let server = TestServer::start().await;
    let live = RawSubscriber::connect(server.channel().await, "live", "chatbot", "live-1", 0)
        .await
        .unwrap();
    let drill = RawSubscriber::connect(server.channel().await, "drill-1", "chatbot", "drill-1", 0)
        .await
        .unwrap();
    let revision = server
        .control()
        .await
        .apply_modes(proto::ApplyModesRequest {
            namespace: "drill-1".into(),
            modes: vec!["freeze-credential-changes".into()],
            reason: "rehearsal".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_until("the drill subscriber got the change", || async {
        drill.revisions().last() == Some(&revision)
    })
    .await;
    assert_eq!(live.revisions(), vec![0]);
    let status = server.status("live").await;
    assert_eq!(status.revision, 0);
    assert!(status.activations.is_empty());
}
