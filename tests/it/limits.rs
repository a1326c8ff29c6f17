//! Bounds a hostile caller meets (issue 10, findings 1, 2, 6 and 9), over a
//! real server: oversized and over-long requests are refused after the role
//! check and cost others nothing, a refused write is audited with a bounded
//! summary, streams are limited per token, connection and replica, status
//! answers in bounded pages, readers cannot make a replica follow
//! namespaces, and principals are one person whatever their case.

use std::time::Duration;

use safemode_grpc::limits::StreamLimits;
use safemode_wire::proto;
use safemode_wire::proto::control_service_client::ControlServiceClient;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::{Control, Principals, RawSubscriber, TestServer, control_as, wait_until};

/// How long a call that should answer at once may take before the test
/// fails: a deadline, not a measurement.
const PROMPTLY: Duration = Duration::from_secs(20);

fn apply(namespace: &str, modes: Vec<String>) -> proto::ApplyModesRequest {
    proto::ApplyModesRequest {
        namespace: namespace.into(),
        modes,
        channels: Vec::new(),
        reason: "limits test".into(),
        as_of: None,
        change_id: String::new(),
        dry_run: false,
    }
}

async fn audit_entries(c: &mut Control) -> Vec<proto::AuditEntry> {
    c.get_audit(proto::GetAuditRequest {
        limit: 5000,
        ..Default::default()
    })
    .await
    .expect("the audit log is readable")
    .into_inner()
    .entries
}

async fn revision(c: &mut Control) -> i64 {
    c.get_status(proto::GetStatusRequest::default())
        .await
        .expect("status")
        .into_inner()
        .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_is_refused_by_role_first_and_stalls_nobody() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let before = revision(&mut admin).await;

    // 16,000 distinct made-up names (about 240 KB) from a subscriber token,
    // sent over and over, while a viewer asks for the modes.
    let names: Vec<String> = (0..16_000).map(|i| format!("made-up-{i:05}")).collect();
    let flood = {
        let mut attacker = control_as(&server, Some(principals.token("subscriber"))).await;
        let names = names.clone();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..20 {
                let refused = attacker
                    .apply_modes(apply("live", names.clone()))
                    .await
                    .expect_err("a subscriber may not apply");
                codes.push(refused.code());
            }
            codes
        })
    };
    let mut viewer = control_as(&server, Some(principals.token("viewer"))).await;
    for _ in 0..5 {
        let modes = tokio::time::timeout(PROMPTLY, viewer.list_modes(proto::ListModesRequest {}))
            .await
            .expect("a viewer is answered while the flood goes on")
            .expect("list modes");
        assert!(!modes.into_inner().modes.is_empty());
    }
    let codes = flood.await.unwrap();
    assert!(
        codes.iter().all(|c| *c == Code::PermissionDenied),
        "{codes:?}"
    );

    // The refusals are audited with a count and the first few names only.
    let entries = audit_entries(&mut admin).await;
    let refusals: Vec<&proto::AuditEntry> =
        entries.iter().filter(|e| e.action == "refused").collect();
    assert!(!refusals.is_empty(), "refused writes are audited");
    for entry in &refusals {
        assert!(
            entry.detail.len() < 600,
            "a refusal's audit entry is bounded: {} bytes",
            entry.detail.len()
        );
        assert!(
            entry
                .detail
                .contains("16000 names, the first 3: made-up-00000, made-up-00001, made-up-00002"),
            "{}",
            entry.detail
        );
        assert!(!entry.detail.contains("made-up-15999"), "{}", entry.detail);
        // A refusal takes no place among the kept change records, so
        // refusals cannot push a commander's change ids out.
        assert!(entry.change_id.is_empty(), "{entry:?}");
    }
    assert_eq!(revision(&mut admin).await, before, "nothing changed");

    // A commander may apply, but not 16,000 modes at once: refused before
    // any of them is looked up, naming the bound.
    let mut commander = control_as(&server, Some(principals.token("commander"))).await;
    let refused = commander
        .apply_modes(apply("live", names.clone()))
        .await
        .expect_err("too many modes");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("at most 32"),
        "{}",
        refused.message()
    );
    let lift = commander
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: names.clone(),
            reason: "limits test".into(),
            all: false,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .expect_err("too many targets");
    assert_eq!(lift.code(), Code::InvalidArgument);
    assert!(lift.message().contains("at most 256"), "{}", lift.message());
    assert_eq!(revision(&mut admin).await, before, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_before_it_is_decoded() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let audited = audit_entries(&mut admin).await.len();
    // 160,000 names, about 1.9 MB: the request of finding 1.
    let names: Vec<String> = (0..160_000).map(|i| format!("made-up-{i:06}")).collect();
    let mut attacker = control_as(&server, Some(principals.token("subscriber"))).await;
    let refused = tokio::time::timeout(PROMPTLY, attacker.apply_modes(apply("live", names)))
        .await
        .expect("answered at once")
        .expect_err("too large");
    assert!(
        matches!(refused.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("too large"),
        "{}",
        refused.message()
    );
    // Refused before authorisation could even read it: nothing recorded.
    assert_eq!(audit_entries(&mut admin).await.len(), audited);

    // A name as long as a request may be is refused with a message of
    // bounded size (it travels in a header).
    let long = format!("drill-{}", "x".repeat(200_000));
    let refused = admin
        .get_status(proto::GetStatusRequest {
            namespace: long,
            ..Default::default()
        })
        .await
        .expect_err("no such namespace");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().len() < 1100,
        "{}",
        refused.message().len()
    );
    assert!(
        refused.message().starts_with("namespace: "),
        "{}",
        refused.message()
    );
}

/// Opens a subscription as `token` with `id`; the stream stays open while
/// the returned sender lives. Err: how the server refused it.
async fn open_stream(
    server: &TestServer,
    token: &str,
    id: &str,
) -> Result<mpsc::Sender<proto::SubscribeRequest>, tonic::Status> {
    open_stream_in(server, token, id, "live").await
}

/// [`open_stream`] in `namespace`.
async fn open_stream_in(
    server: &TestServer,
    token: &str,
    id: &str,
    namespace: &str,
) -> Result<mpsc::Sender<proto::SubscribeRequest>, tonic::Status> {
    let mut client = SubscriptionServiceClient::with_interceptor(
        server.channel().await,
        safemode_client::Bearer::new(Some(token)).unwrap(),
    );
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::SubscribeRequest {
        message: Some(Outbound::Hello(proto::Hello {
            namespace: namespace.into(),
            channel: "web".into(),
            subscriber_id: id.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The first snapshot, or the refusal.
    match inbound.message().await {
        Ok(Some(_)) => {
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            Ok(tx)
        }
        Ok(None) => Err(tonic::Status::cancelled("the stream ended")),
        Err(status) => Err(status),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_per_token_connection_and_replica() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.stream_limits = StreamLimits {
            per_token: 5,
            per_connection: 1000,
            per_replica: 8,
        };
    })
    .await;
    let subscriber = principals.token("subscriber");
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(
            open_stream(&server, subscriber, &format!("s-{i}"))
                .await
                .unwrap(),
        );
    }
    let refused = open_stream(&server, subscriber, "s-5").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("this token"),
        "{}",
        refused.message()
    );
    // Others are not locked out by one token's streams.
    let viewer = principals.token("viewer");
    for i in 0..3 {
        held.push(
            open_stream(&server, viewer, &format!("v-{i}"))
                .await
                .unwrap(),
        );
    }
    let full = open_stream(&server, principals.token("admin"), "a-0")
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(
        full.message().contains("this replica"),
        "{}",
        full.message()
    );
    // A closed stream gives its place back.
    held.remove(0);
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    wait_until("the closed stream is gone", || {
        let mut admin = admin.clone();
        async move {
            admin
                .get_status(proto::GetStatusRequest::default())
                .await
                .unwrap()
                .into_inner()
                .subscriber_count
                == 7
        }
    })
    .await;
    let _again = open_stream(&server, subscriber, "s-again").await.unwrap();
    let status = admin
        .get_status(proto::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.subscriber_count, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_per_connection() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        stream_limits: StreamLimits {
            per_token: 100,
            per_connection: 3,
            per_replica: 100,
        },
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: data.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await;
    let connection = server.channel().await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            RawSubscriber::connect(connection.clone(), "live", "web", &format!("c-{i}"), 0)
                .await
                .unwrap(),
        );
    }
    let refused = RawSubscriber::connect(connection.clone(), "live", "web", "c-3", 0)
        .await
        .err()
        .expect("a fourth stream on one connection is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("this connection"),
        "{}",
        refused.message()
    );
    // Another connection is another budget.
    RawSubscriber::connect(server.channel().await, "live", "web", "c-4", 0)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stays_readable_with_two_thousand_rejecting_streams() {
    let server = TestServer::start().await;
    let revision = server.apply(&["freeze-credential-changes"]).await;
    // Four bytes a character: the bound is on bytes, not characters.
    let long_reason = "😀".repeat(1000);
    // Fifty streams per connection, as a pooled fleet would.
    let mut connections = Vec::new();
    for _ in 0..40 {
        connections.push(server.channel().await);
    }
    let mut streams = Vec::new();
    for i in 0..2000 {
        let connection = connections[i % connections.len()].clone();
        let stream =
            RawSubscriber::connect(connection, "live", "web", &format!("rejecting-{i:04}"), 0)
                .await
                .unwrap();
        streams.push(stream);
    }
    for stream in &streams {
        wait_until("the snapshot arrives", || async {
            !stream.revisions().is_empty()
        })
        .await;
        stream.reject(revision, &long_reason).await;
    }
    let mut control = server.control().await;
    let status = wait_for_rejections(&mut control, 2000).await;
    assert_eq!(status.subscriber_count, 2000);
    assert!(
        !status.next_page_token.is_empty(),
        "2,000 subscribers come in more than one page"
    );
    let everyone = safemode_wire::full_status(&mut control, "live")
        .await
        .expect("every page is readable");
    assert_eq!(everyone.subscribers.len(), 2000);
    let mut ids: Vec<&str> = everyone
        .subscribers
        .iter()
        .map(|s| s.subscriber_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2000, "no subscriber repeated or skipped");
    assert!(
        everyone
            .subscribers
            .iter()
            .all(|s| s.reject_reason.len() <= 256),
        "reject reasons are kept short"
    );
    // A page asked for beyond the bound, and a forged token, are refused.
    let too_big = control
        .get_status(proto::GetStatusRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    let forged = control
        .get_status(proto::GetStatusRequest {
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
}

async fn wait_for_rejections(
    control: &mut safemode_wire::proto::control_service_client::ControlServiceClient<
        tonic::transport::Channel,
    >,
    count: usize,
) -> proto::GetStatusResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let all = safemode_wire::full_status(control, "live").await.unwrap();
        if all
            .subscribers
            .iter()
            .filter(|s| s.rejected_revision > 0)
            .count()
            >= count
        {
            return control
                .get_status(proto::GetStatusRequest::default())
                .await
                .unwrap()
                .into_inner();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} rejections recorded",
            all.subscribers
                .iter()
                .filter(|s| s.rejected_revision > 0)
                .count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_cannot_make_a_replica_follow_namespaces() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.controller.max_namespaces = 3;
    })
    .await;
    let mut viewer = control_as(&server, Some(principals.token("viewer"))).await;
    // A viewer reads a hundred drill namespaces: each is answered from one
    // read, none is followed.
    for i in 0..100 {
        let status = viewer
            .get_status(proto::GetStatusRequest {
                namespace: format!("drill-probe-{i}"),
                ..Default::default()
            })
            .await
            .expect("status of a namespace nobody used");
        assert_eq!(status.into_inner().revision, 0);
    }
    // So the drills still have room: two besides live, which is always
    // followed.
    let mut drill = control_as(&server, Some(principals.token("drill"))).await;
    for namespace in ["drill-a", "drill-b"] {
        drill
            .apply_modes(apply(namespace, vec!["freeze-credential-changes".into()]))
            .await
            .expect("a drill applies in its namespace");
    }
    let full = drill
        .apply_modes(apply("drill-c", vec!["freeze-credential-changes".into()]))
        .await
        .expect_err("a fourth namespace is past the bound");
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(
        full.message().contains("--max-namespaces"),
        "{}",
        full.message()
    );
    // A followed drill namespace is read as before, and one that is not
    // is still answered.
    let a = viewer
        .get_status(proto::GetStatusRequest {
            namespace: "drill-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.activations.len(), 1);
    viewer
        .get_status(proto::GetStatusRequest {
            namespace: "drill-c".into(),
            ..Default::default()
        })
        .await
        .expect("an unfollowed namespace is still readable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_is_one_person_whatever_the_case() {
    use safemode_controller::auth::{Role, create_token};
    let lower = create_token("cmd1", &[Role::Commander, Role::Approver]).unwrap();
    let upper = create_token("Cmd1", &[Role::Approver]).unwrap();
    assert_eq!(upper.principal, "cmd1", "names are kept lower-cased");
    let file = tempfile::NamedTempFile::new().unwrap();
    // The tokens file as an admin might write it by hand.
    let by_hand = upper.line.replace("principal: cmd1", "principal: Cmd1");
    std::fs::write(file.path(), format!("{}\n{by_hand}\n", lower.line)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(safemode_grpc::server::ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tokens: Some(file.path().to_path_buf()),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: data.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await;
    let mut cmd1 = control_as(&server, Some(&lower.token)).await;
    cmd1.apply_modes(apply("live", vec!["freeze-credential-changes".into()]))
        .await
        .unwrap();
    let lifted = cmd1
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: vec!["freeze-credential-changes".into()],
            reason: "over".into(),
            all: false,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let request = lifted
        .pending
        .expect("lifting a freeze needs a second approver");
    assert_eq!(request.requested_by, "cmd1");
    let mut upper_case = control_as(&server, Some(&upper.token)).await;
    let refused = upper_case
        .approve(proto::ApproveRequest {
            request_id: request.id.clone(),
            reason: "looks fine".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .expect_err("Cmd1 is cmd1: nobody approves their own request");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let status = cmd1
        .get_status(proto::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.activations.len(), 1, "the freeze is still on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_lists_are_cut_to_the_newest_and_say_how_many_matched() {
    let server = TestServer::start().await;
    let mut control = server.control().await;
    let mut approver = ControlServiceClient::with_interceptor(
        server.channel().await,
        |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("x-safemode-principal", "bob".parse().unwrap());
            Ok(request)
        },
    );
    let count = safemode_grpc::limits::MAX_LISTED + 5;
    let mut last = String::new();
    for i in 0..count {
        let declared = control
            .declare_incident(proto::DeclareIncidentRequest {
                namespace: "live".into(),
                r#type: "ai-handoff-abuse".into(),
                severity: "sev3".into(),
                reason: format!("wave {i}"),
                ..Default::default()
            })
            .await
            .expect("declare")
            .into_inner();
        let id = declared.incident.expect("an incident").id;
        let resolved = control
            .resolve_incident(proto::ResolveIncidentRequest {
                incident_id: id.clone(),
                reason: "contained".into(),
                ..Default::default()
            })
            .await
            .expect("resolve")
            .into_inner();
        // Resolving lifts protections: a second person approves.
        if let Some(request) = resolved.pending {
            approver
                .approve(proto::ApproveRequest {
                    request_id: request.id,
                    reason: "contained".into(),
                    ..Default::default()
                })
                .await
                .expect("bob approves");
        }
        last = id;
    }
    let listed = control
        .list_incidents(proto::ListIncidentsRequest {
            namespace: "live".into(),
            include_resolved: true,
        })
        .await
        .expect("the list is answered")
        .into_inner();
    assert_eq!(listed.total as usize, count);
    assert_eq!(listed.incidents.len(), safemode_grpc::limits::MAX_LISTED);
    assert_eq!(listed.incidents[0].id, last, "newest first");
    let text =
        crate::support::safemode(&["--server", &server.url, "incident", "list", "--all"]).await;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains(&format!("(the newest 200 of {count} incidents)")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_tokens_cannot_lock_the_drills_out() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.controller.max_namespaces = 6;
    })
    .await;
    let subscriber = principals.token("subscriber");
    // Drill namespaces nothing is active in are not followed for a
    // subscriber-only token, however many it asks for.
    for i in 0..20 {
        let refused = open_stream_in(&server, subscriber, "squatter", &format!("drill-squat-{i}"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains("nothing is active"),
            "{}",
            refused.message()
        );
    }
    // A drill in use may be followed for subscribers, within half the bound.
    let mut drill = control_as(&server, Some(principals.token("drill"))).await;
    for namespace in ["drill-a", "drill-b", "drill-c"] {
        drill
            .apply_modes(apply(namespace, vec!["incident-notice".into()]))
            .await
            .expect("the drill applies");
    }
    let _a = open_stream_in(&server, subscriber, "s-a", "drill-a")
        .await
        .unwrap();
    let _b = open_stream_in(&server, subscriber, "s-b", "drill-b")
        .await
        .unwrap();
    // drill-a, drill-b and drill-c are followed (the drill's own changes);
    // the drill can still start another, a subscriber cannot.
    drill
        .apply_modes(apply("drill-d", vec!["incident-notice".into()]))
        .await
        .expect("the drill still has room");
    let full = open_stream_in(&server, principals.token("viewer"), "v", "drill-e")
        .await
        .unwrap_err();
    assert!(
        matches!(
            full.code(),
            Code::FailedPrecondition | Code::ResourceExhausted
        ),
        "{full:?}"
    );
}
