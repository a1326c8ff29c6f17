//! How changes behave at the edges a commander meets: a mode name that
//! matches several activations, applying a mode again, an as-of time that
//! would do nothing, a subscriber that remembers another store's history,
//! and a change sent again under its change id (by the CLI, to the next
//! server).

use safemode_policy::{Action, Context, Outcome};
use safemode_wire::proto;

use crate::support::{RawSubscriber, TestServer, safemode, wait_until};

async fn apply(
    server: &TestServer,
    modes: &[&str],
    channels: &[&str],
    as_of: Option<&str>,
) -> Result<proto::ApplyModesResponse, tonic::Status> {
    server
        .control()
        .await
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: modes.iter().map(|m| m.to_string()).collect(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            reason: "test".into(),
            as_of: as_of.map(|t| safemode_wire::timestamp_to_wire(t.parse().unwrap())),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn lift(
    server: &TestServer,
    targets: &[&str],
    all: bool,
) -> Result<proto::LiftActivationsResponse, tonic::Status> {
    server
        .control()
        .await
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            reason: "test".into(),
            all,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn lifting_a_mode_with_several_activations_needs_all() {
    let server = TestServer::start().await;
    let on_chatbot = apply(&server, &["step-up-account-changes"], &["chatbot"], None)
        .await
        .unwrap();
    let on_ivr = apply(&server, &["step-up-account-changes"], &["ivr"], None)
        .await
        .unwrap();
    let refused = lift(&server, &["step-up-account-changes"], false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    for id in [&on_chatbot.applied[0].id, &on_ivr.applied[0].id] {
        assert!(
            refused.message().contains(id.as_str()),
            "{}",
            refused.message()
        );
    }
    assert!(refused.message().contains("--all"), "{}", refused.message());
    assert_eq!(
        server.status("live").await.activations.len(),
        2,
        "a refusal changes nothing"
    );

    // By id; a name with one activation left needs no --all; --all lifts
    // every one.
    lift(&server, &[&on_chatbot.applied[0].id], false)
        .await
        .unwrap();
    lift(&server, &["step-up-account-changes"], false)
        .await
        .unwrap();
    apply(&server, &["step-up-account-changes"], &["web"], None)
        .await
        .unwrap();
    apply(&server, &["step-up-account-changes"], &["email"], None)
        .await
        .unwrap();
    let both = lift(&server, &["step-up-account-changes"], true)
        .await
        .unwrap();
    assert_eq!(both.lifted.len(), 2);
    assert!(server.status("live").await.activations.is_empty());
}

#[tokio::test]
async fn reapplying_read_only_with_an_earlier_as_of_adds_an_activation_and_the_earliest_wins() {
    let server = TestServer::start().await;
    let mode = ["read-only-last-known-good"];
    let first = apply(&server, &mode, &[], Some("2026-11-20T08:00:00Z"))
        .await
        .unwrap();
    assert_eq!(first.applied.len(), 1);
    // Again without an as-of, or with the same one: already active.
    for as_of in [None, Some("2026-11-20T08:00:00Z")] {
        let again = apply(&server, &mode, &[], as_of).await.unwrap();
        assert!(again.applied.is_empty(), "{as_of:?}");
        assert_eq!(again.already_active[0].id, first.applied[0].id);
    }
    // An earlier last-known-good time is a new activation, not swallowed.
    let earlier = apply(&server, &mode, &[], Some("2026-11-19T08:00:00Z"))
        .await
        .unwrap();
    assert_eq!(earlier.applied.len(), 1);
    let client = server.subscriber("web", "reader").await;
    let balance = Action::parse("balance.view").unwrap();
    let view = client.decide(&balance, &Context::default());
    match view.outcome() {
        Outcome::ReadOnly(r) => assert_eq!(r.as_of, Some("2026-11-19T08:00:00Z".parse().unwrap())),
        other => panic!("expected read_only, got {other:?}"),
    }
}

#[tokio::test]
async fn an_as_of_for_modes_that_serve_nothing_read_only_is_refused() {
    let server = TestServer::start().await;
    let refused = apply(
        &server,
        &["freeze-credential-changes"],
        &[],
        Some("2026-11-19T08:00:00Z"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("as_of"), "{}", refused.message());
    assert!(server.status("live").await.activations.is_empty());
}

#[tokio::test]
async fn a_subscriber_from_another_store_history_starts_over() {
    let server = TestServer::start().await;
    let revision = server.apply(&["incident-notice"]).await;
    // It remembers a revision far ahead, from a store that no longer exists.
    let gone = "0123456789abcdef0123456789abcdef";
    let hello = proto::Hello {
        namespace: "live".into(),
        channel: "web".into(),
        subscriber_id: "from-before-the-wipe".into(),
        last_applied_revision: revision + 1000,
        epoch: gone.into(),
    };
    let subscriber = RawSubscriber::connect_with(server.channel().await, hello)
        .await
        .expect("admitted despite the higher revision");
    wait_until("the current snapshot arrived", || async {
        subscriber.revisions() == [revision]
    })
    .await;
    let epoch = subscriber.latest().unwrap().epoch;
    assert!(!epoch.is_empty() && epoch != gone);
}

async fn apply_as(
    server: &TestServer,
    change_id: &str,
) -> Result<proto::ApplyModesResponse, tonic::Status> {
    server
        .control()
        .await
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["throttle-high-risk".into()],
            reason: "test".into(),
            change_id: change_id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_change_id_that_committed_is_answered_with_its_result_not_applied_again() {
    let server = TestServer::start().await;
    let first = apply_as(&server, "deploy-42.apply").await.unwrap();
    assert_eq!(first.change_id, "deploy-42.apply");
    assert_eq!(first.applied.len(), 1);
    // A retry (say, after a timeout) gets the same answer.
    let again = apply_as(&server, "deploy-42.apply").await.unwrap();
    assert_eq!(
        again, first,
        "the retry is answered with the original result"
    );
    assert_eq!(server.status("live").await.activations.len(), 1);

    // Without a change id the server makes one, different each time.
    let made = apply_as(&server, "").await.unwrap();
    assert!(!made.change_id.is_empty());
    assert!(made.applied.is_empty(), "already active: {made:?}");

    // The same id for another kind of change is refused, and lifts nothing.
    let reused = server
        .control()
        .await
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: vec!["throttle-high-risk".into()],
            reason: "test".into(),
            change_id: "deploy-42.apply".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);
    assert!(
        reused.message().contains("new change id"),
        "{}",
        reused.message()
    );
    assert_eq!(server.status("live").await.activations.len(), 1);
}

#[tokio::test]
async fn a_malformed_change_id_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    for bad in ["has space", "semi;colon", &"x".repeat(65)] {
        let refused = apply_as(&server, bad).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(
            refused.message().starts_with("change_id:"),
            "{}",
            refused.message()
        );
    }
    assert!(server.status("live").await.activations.is_empty());
}

#[tokio::test]
async fn the_cli_sends_a_write_to_the_next_server_with_the_same_change_id() {
    let server = TestServer::start().await;
    // Nothing listens here.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let servers = format!("{dead},{}", server.url);
    let args = [
        "--server",
        &servers,
        "--principal",
        "alice",
        "--output",
        "json",
        "--change-id",
        "cli-retry-1",
        "mode",
        "apply",
        "throttle-high-risk",
        "--reason",
        "test",
    ];
    let first = safemode(&args).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Run again (a commander unsure whether it worked): the same answer,
    // nothing applied twice.
    let second = safemode(&args).await;
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let parse = |out: &[u8]| serde_json::from_slice::<serde_json::Value>(out).unwrap();
    assert_eq!(parse(&first.stdout), parse(&second.stdout));
    assert_eq!(parse(&first.stdout)["applied"].as_array().unwrap().len(), 1);
    assert_eq!(server.status("live").await.activations.len(), 1);

    // Every server unreachable: the error names them and the change id to
    // retry with.
    let failed = safemode(&[
        "--server",
        &dead,
        "--principal",
        "alice",
        "--change-id",
        "cli-retry-2",
        "mode",
        "apply",
        "throttle-high-risk",
        "--reason",
        "test",
    ])
    .await;
    assert!(!failed.status.success());
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(message.contains(&dead), "{message}");
    assert!(message.contains("--change-id cli-retry-2"), "{message}");
}

#[tokio::test]
async fn a_retried_lift_that_waits_for_approval_is_one_request_with_the_same_answer() {
    let server = TestServer::start().await;
    apply(&server, &["freeze-credential-changes"], &[], None)
        .await
        .unwrap();
    let lift = || async {
        server
            .control()
            .await
            .lift_activations(proto::LiftActivationsRequest {
                namespace: "live".into(),
                targets: vec!["freeze-credential-changes".into()],
                reason: "test".into(),
                change_id: "lift-needs-approval".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let first = lift().await;
    assert!(first.pending.is_some(), "{first:?}");
    let again = lift().await;
    assert_eq!(again, first, "the same request, the same revision");
    let requests = server
        .control()
        .await
        .list_requests(proto::ListRequestsRequest {
            namespace: "live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requests.requests.len(), 1, "{requests:?}");
}

#[tokio::test]
async fn a_change_id_sent_again_with_other_contents_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let request = |modes: &[&str]| proto::ApplyModesRequest {
        namespace: "live".into(),
        modes: modes.iter().map(|m| m.to_string()).collect(),
        channels: Vec::new(),
        reason: "INC-4211".into(),
        as_of: None,
        change_id: "inc-4211-freeze".into(),
        dry_run: false,
    };
    let mut control = server.control().await;
    let first = control
        .apply_modes(request(&["freeze-phone-changes"]))
        .await
        .unwrap()
        .into_inner();
    // The same request again (a retry) is answered as the first was.
    let again = control
        .apply_modes(request(&["freeze-phone-changes"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revision, first.revision);
    assert_eq!(again.applied[0].id, first.applied[0].id);
    // Another request under the same id (say, a change id left exported in
    // the shell) is refused, never answered "applied".
    let other = control
        .apply_modes(request(&["bots-faq-only"]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition, "{other:?}");
    assert!(
        other.message().contains("inc-4211-freeze")
            && other.message().contains("nothing was changed"),
        "{}",
        other.message()
    );
    let status = server.status("live").await;
    let modes: Vec<&str> = status.activations.iter().map(|a| a.mode.as_str()).collect();
    assert_eq!(
        modes,
        ["freeze-phone-changes"],
        "bots-faq-only was not applied"
    );
}
