//! Who may do what, over real gRPC with a tokens file: every RPC against
//! every role, incidents with four-eyes approval by two principals, and a
//! server that refuses to run unguarded.

use safemode_wire::proto;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::{Control, Principals, TestServer, control_as, safemode};

const RUNBOOK: &str = "credential-stuffing";

/// Opens a subscription as `token` and returns how the server answered.
async fn subscribe_code(server: &TestServer, token: &str, namespace: &str) -> Code {
    let mut client = SubscriptionServiceClient::with_interceptor(
        server.channel().await,
        safemode_client::Bearer::new(Some(token)).unwrap(),
    );
    let hello = proto::SubscribeRequest {
        message: Some(Outbound::Hello(proto::Hello {
            namespace: namespace.into(),
            channel: "web".into(),
            subscriber_id: "table".into(),
            ..Default::default()
        })),
    };
    match client.subscribe(tokio_stream::iter(vec![hello])).await {
        Err(status) => status.code(),
        Ok(response) => match response.into_inner().next().await {
            Some(Err(status)) => status.code(),
            _ => Code::Ok,
        },
    }
}

/// Fixtures made by `commander2` (who is not in the table, so that nobody in
/// it approves their own request): an active incident and a pending request.
struct Fixtures {
    runbook: String,
    incident: String,
    request: String,
    /// Another pending request, for withdrawing.
    withdrawable: String,
}

async fn fixtures(
    server: &TestServer,
    principals: &Principals,
    namespace: &str,
    runbook: &str,
) -> Fixtures {
    let mut c = control_as(server, Some(principals.token("commander2"))).await;
    let declared = c
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: namespace.into(),
            r#type: runbook.into(),
            severity: "sev3".into(),
            reason: "fixture".into(),
            channels: Vec::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    c.apply_modes(proto::ApplyModesRequest {
        namespace: namespace.into(),
        modes: vec!["freeze-credential-changes".into()],
        channels: vec!["email".into()],
        reason: "fixture".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let lift = c
        .lift_activations(proto::LiftActivationsRequest {
            namespace: namespace.into(),
            targets: vec!["freeze-credential-changes".into()],
            reason: "fixture".into(),
            all: true,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let on_web = c
        .apply_modes(proto::ApplyModesRequest {
            namespace: namespace.into(),
            modes: vec!["freeze-credential-changes".into()],
            channels: vec!["web".into()],
            reason: "fixture".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // An earlier role's fixture may have applied it already.
    let on_web = on_web
        .applied
        .into_iter()
        .chain(on_web.already_active)
        .next()
        .expect("the freeze on web is active")
        .id;
    let second = c
        .lift_activations(proto::LiftActivationsRequest {
            namespace: namespace.into(),
            targets: vec![on_web],
            reason: "fixture".into(),
            all: false,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    Fixtures {
        runbook: runbook.to_string(),
        incident: declared.incident.unwrap().id,
        request: lift
            .pending
            .expect("freeze needs a second approver to lift")
            .id,
        withdrawable: second
            .pending
            .expect("freeze needs a second approver to lift")
            .id,
    }
}

async fn live_status(admin: &mut Control) -> proto::GetStatusResponse {
    admin
        .get_status(proto::GetStatusRequest {
            namespace: "live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The code an RPC answered with.
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    ListModes,
    ListRunbooks,
    GetAudit,
    GetStatus,
    ListIncidents,
    GetIncident,
    ListRequests,
    ApplyModes,
    LiftActivations,
    DeclareIncident,
    EscalateIncident,
    ResolveIncident,
    Approve,
    Withdraw,
    Decide,
    WhoAmI,
    Subscribe,
}

const RPCS: [Rpc; 17] = [
    Rpc::ListModes,
    Rpc::ListRunbooks,
    Rpc::GetAudit,
    Rpc::GetStatus,
    Rpc::ListIncidents,
    Rpc::GetIncident,
    Rpc::ListRequests,
    Rpc::ApplyModes,
    Rpc::LiftActivations,
    Rpc::DeclareIncident,
    Rpc::EscalateIncident,
    Rpc::ResolveIncident,
    Rpc::Approve,
    Rpc::Withdraw,
    Rpc::Decide,
    Rpc::WhoAmI,
    Rpc::Subscribe,
];

/// What an allowed call answers with the fixtures: declaring the incident
/// type that is already active is refused after the permission check;
/// everything else succeeds.
fn answer_when_allowed(rpc: Rpc) -> Code {
    match rpc {
        Rpc::DeclareIncident => Code::FailedPrecondition,
        _ => Code::Ok,
    }
}

/// The table the issue states: which role may make which call, in `live`
/// and in a drill namespace.
fn allowed(role: &str, rpc: Rpc, drill: bool) -> bool {
    use Rpc::*;
    let read_catalog = matches!(rpc, ListModes | ListRunbooks);
    let read = matches!(
        rpc,
        GetStatus | ListIncidents | GetIncident | ListRequests | Decide
    );
    // Tells callers only about themselves: any token may ask.
    if matches!(rpc, WhoAmI) {
        return true;
    }
    let change = matches!(
        rpc,
        ApplyModes
            | LiftActivations
            | DeclareIncident
            | EscalateIncident
            | ResolveIncident
            | Withdraw
    );
    match role {
        "admin" => true,
        "viewer" => read_catalog || read || matches!(rpc, GetAudit | Subscribe),
        "subscriber" => matches!(rpc, Subscribe),
        "commander" => read_catalog || read || change || matches!(rpc, GetAudit | Subscribe),
        "approver" => read_catalog || read || matches!(rpc, GetAudit | Approve | Subscribe),
        "drill" => {
            read_catalog || (drill && (read || change || matches!(rpc, Approve | Subscribe)))
        }
        other => panic!("no such role {other}"),
    }
}

async fn call(
    server: &TestServer,
    principals: &Principals,
    role: &str,
    rpc: Rpc,
    namespace: &str,
    fixtures: &Fixtures,
) -> Code {
    let token = principals.token(role);
    let mut c = control_as(server, Some(token)).await;
    let ns = namespace.to_string();
    match rpc {
        Rpc::ListModes => code(c.list_modes(proto::ListModesRequest {}).await),
        Rpc::ListRunbooks => code(c.list_runbooks(proto::ListRunbooksRequest {}).await),
        Rpc::GetAudit => code(c.get_audit(proto::GetAuditRequest::default()).await),
        Rpc::GetStatus => code(
            c.get_status(proto::GetStatusRequest {
                namespace: ns,
                ..Default::default()
            })
            .await,
        ),
        Rpc::ListIncidents => code(
            c.list_incidents(proto::ListIncidentsRequest {
                namespace: ns,
                include_resolved: true,
            })
            .await,
        ),
        Rpc::GetIncident => code(
            c.get_incident(proto::GetIncidentRequest {
                incident_id: fixtures.incident.clone(),
            })
            .await,
        ),
        Rpc::ListRequests => code(
            c.list_requests(proto::ListRequestsRequest {
                namespace: ns,
                include_decided: true,
            })
            .await,
        ),
        Rpc::ApplyModes => code(
            c.apply_modes(proto::ApplyModesRequest {
                namespace: ns,
                modes: vec!["incident-notice".into()],
                reason: format!("{role} applies"),
                ..Default::default()
            })
            .await,
        ),
        Rpc::LiftActivations => code(
            c.lift_activations(proto::LiftActivationsRequest {
                namespace: ns,
                targets: vec!["incident-notice".into()],
                reason: format!("{role} lifts"),
                all: true,
                // The fixtures' incident has an incident-notice too: this
                // table is about who may lift, not about the incident.
                incident_ok: true,
                change_id: String::new(),
                dry_run: false,
            })
            .await,
        ),
        Rpc::DeclareIncident => code(
            c.declare_incident(proto::DeclareIncidentRequest {
                // Already active, so an allowed call is answered "already
                // active" (after the permission check), and nothing changes.
                namespace: ns,
                r#type: fixtures.runbook.clone(),
                severity: "sev3".into(),
                reason: format!("{role} declares"),
                channels: Vec::new(),
                change_id: String::new(),
                dry_run: false,
            })
            .await,
        ),
        Rpc::EscalateIncident => code(
            c.escalate_incident(proto::EscalateIncidentRequest {
                incident_id: fixtures.incident.clone(),
                severity: "sev2".into(),
                reason: format!("{role} escalates"),
                change_id: String::new(),
                dry_run: false,
            })
            .await,
        ),
        Rpc::ResolveIncident => code(
            c.resolve_incident(proto::ResolveIncidentRequest {
                incident_id: fixtures.incident.clone(),
                reason: format!("{role} resolves"),
                change_id: String::new(),
                dry_run: false,
            })
            .await,
        ),
        Rpc::Approve => code(
            c.approve(proto::ApproveRequest {
                request_id: fixtures.request.clone(),
                reason: format!("{role} approves"),
                change_id: String::new(),
                dry_run: false,
            })
            .await,
        ),
        Rpc::Withdraw => code(
            c.withdraw(proto::WithdrawRequest {
                request_id: fixtures.withdrawable.clone(),
                reason: format!("{role} withdraws"),
                change_id: String::new(),
            })
            .await,
        ),
        Rpc::Decide => code(
            c.decide(proto::DecideRequest {
                namespace: ns,
                channel: "web".into(),
                action: "account.password_reset".into(),
                ..Default::default()
            })
            .await,
        ),
        Rpc::WhoAmI => code(
            c.who_am_i(proto::WhoAmIRequest {
                namespaces: vec![ns],
            })
            .await,
        ),
        Rpc::Subscribe => subscribe_code(server, token, namespace).await,
    }
}

/// What a refusal must leave unchanged, read by the admin: both namespaces'
/// revisions, incidents and requests, and the audit log.
#[derive(Debug, PartialEq)]
struct Observed {
    revisions: Vec<i64>,
    incidents: Vec<proto::Incident>,
    requests: Vec<proto::ChangeRequest>,
    audit: Vec<proto::AuditEntry>,
}

async fn observed(server: &TestServer, principals: &Principals) -> Observed {
    let mut admin = control_as(server, Some(principals.token("admin"))).await;
    let mut seen = Observed {
        revisions: Vec::new(),
        incidents: Vec::new(),
        requests: Vec::new(),
        audit: Vec::new(),
    };
    for namespace in ["live", "drill-table"] {
        let status = admin
            .get_status(proto::GetStatusRequest {
                namespace: namespace.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.revisions.push(status.revision);
        let incidents = admin
            .list_incidents(proto::ListIncidentsRequest {
                namespace: namespace.into(),
                include_resolved: true,
            })
            .await
            .unwrap()
            .into_inner();
        seen.incidents.extend(incidents.incidents);
        let requests = admin
            .list_requests(proto::ListRequestsRequest {
                namespace: namespace.into(),
                include_decided: true,
            })
            .await
            .unwrap()
            .into_inner();
        seen.requests.extend(requests.requests);
    }
    seen.audit = admin
        .get_audit(proto::GetAuditRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_every_role() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let roles = [
        "viewer",
        "subscriber",
        "commander",
        "approver",
        "drill",
        "admin",
    ];
    // One incident type per role: each role meets its own active incident.
    let runbooks = [
        "ai-handoff-abuse",
        "breach-containment",
        "credential-stuffing",
        "sim-swap-wave",
        "helpdesk-recovery-social-engineering",
        "fraud-spike",
    ];
    let mut failures = Vec::new();
    for namespace in ["live", "drill-table"] {
        let drill = namespace != "live";
        for (role, runbook) in roles.into_iter().zip(runbooks) {
            // Fresh fixtures for every role, so an allowed call by one role
            // (resolving, approving) does not change what the next one meets.
            let fixtures = fixtures(&server, &principals, namespace, runbook).await;
            for rpc in RPCS {
                let before = observed(&server, &principals).await;
                let got = call(&server, &principals, role, rpc, namespace, &fixtures).await;
                let allowed = allowed(role, rpc, drill);
                let expected = if allowed {
                    answer_when_allowed(rpc)
                } else {
                    Code::PermissionDenied
                };
                if got != expected {
                    failures.push(format!(
                        "{role} {rpc:?} in {namespace}: expected {expected:?}, got {got:?}"
                    ));
                    continue;
                }
                if !allowed {
                    // A refusal changes nothing; a refused write is audited.
                    let mut after = observed(&server, &principals).await;
                    let writes = matches!(
                        rpc,
                        Rpc::ApplyModes
                            | Rpc::LiftActivations
                            | Rpc::DeclareIncident
                            | Rpc::EscalateIncident
                            | Rpc::ResolveIncident
                            | Rpc::Approve
                            | Rpc::Withdraw
                    );
                    if writes {
                        match after.audit.pop() {
                            Some(last) if last.action == "refused" && last.principal == role => {}
                            last => failures.push(format!(
                                "{role} {rpc:?} in {namespace}: the refusal was not audited: {last:?}"
                            )),
                        }
                    }
                    if after != before {
                        failures.push(format!(
                            "{role} {rpc:?} in {namespace}: a refusal changed {before:?} to {after:?}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn without_a_valid_token_only_health_answers() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    for token in [None, Some("smt_not_a_real_token")] {
        let mut c = control_as(&server, token).await;
        let status = c
            .get_status(proto::GetStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        let status = c
            .apply_modes(proto::ApplyModesRequest {
                modes: vec!["incident-notice".into()],
                reason: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_escalate_and_resolve_with_a_second_approver() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    let mut bob = control_as(&server, Some(principals.token("approver"))).await;

    let declared = alice
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: "live".into(),
            r#type: RUNBOOK.into(),
            severity: "sev3".into(),
            reason: "login failures up 40x from residential proxies".into(),
            channels: Vec::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let incident = declared.incident.unwrap();
    assert_eq!(incident.severity, "sev3");
    assert!(!incident.activation_ids.is_empty());
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let after_declare = live_status(&mut admin).await;
    assert_eq!(after_declare.revision, declared.revision);
    assert!(
        after_declare
            .activations
            .iter()
            .all(|a| a.incident_id == incident.id)
    );

    let escalated = alice
        .escalate_incident(proto::EscalateIncidentRequest {
            incident_id: incident.id.clone(),
            severity: "sev1".into(),
            reason: "takeovers confirmed".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(escalated.pending.is_none(), "escalation needs no approval");
    assert_eq!(escalated.incident.as_ref().unwrap().severity, "sev1");

    // Resolving lifts protections: the runbook asks for a second approver.
    let resolving = alice
        .resolve_incident(proto::ResolveIncidentRequest {
            incident_id: incident.id.clone(),
            reason: "attack over for 2h".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let request = resolving.pending.expect("resolution waits for an approver");
    assert_eq!(request.kind, "resolve");
    assert_eq!(request.requested_by, "commander");
    let still = live_status(&mut admin).await;
    assert_eq!(still.revision, escalated.revision, "nothing lifted yet");

    // Asking the same again, whoever asks, returns the first request.
    let mut admin_requester = control_as(&server, Some(principals.token("admin"))).await;
    let resolve = |reason: &str| proto::ResolveIncidentRequest {
        incident_id: incident.id.clone(),
        reason: reason.into(),
        change_id: String::new(),
        dry_run: false,
    };
    let same = admin_requester
        .resolve_incident(resolve("admin resolves too"))
        .await
        .unwrap()
        .into_inner()
        .pending
        .unwrap();
    assert_eq!(same.id, request.id, "a second identical request");
    assert_eq!(same.requested_by, "commander");

    // Alice takes hers back; nobody can approve it any more.
    alice
        .withdraw(proto::WithdrawRequest {
            request_id: request.id.clone(),
            reason: "the admin will handle it".into(),
            change_id: String::new(),
        })
        .await
        .unwrap();
    let withdrawn = bob
        .approve(proto::ApproveRequest {
            request_id: request.id.clone(),
            reason: "ok".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(withdrawn.code(), Code::FailedPrecondition);
    assert!(
        withdrawn.message().contains("is withdrawn by commander"),
        "{}",
        withdrawn.message()
    );

    // The requester cannot approve their own request, even holding the role.
    let own = admin_requester
        .resolve_incident(resolve("admin tries to resolve alone"))
        .await
        .unwrap()
        .into_inner()
        .pending
        .unwrap();
    assert_ne!(own.id, request.id);
    let refused = admin_requester
        .approve(proto::ApproveRequest {
            request_id: own.id.clone(),
            reason: "I am sure".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("cannot approve it too"),
        "{}",
        refused.message()
    );
    let audit = bob
        .get_audit(proto::GetAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let last = audit.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.principal.as_str()),
        ("refused", "admin")
    );

    // A newer request on the incident supersedes the admin's: approving it
    // now would carry out a change nobody was shown, and the approver is
    // told what overtook it.
    let moving = alice
        .escalate_incident(proto::EscalateIncidentRequest {
            incident_id: incident.id.clone(),
            severity: "sev2".into(),
            reason: "calmer now".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .pending
        .expect("going down waits for an approver");
    let outdated = bob
        .approve(proto::ApproveRequest {
            request_id: own.id.clone(),
            reason: "confirmed with fraud ops".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(outdated.code(), Code::FailedPrecondition);
    let message = outdated.message();
    for part in ["superseded", &moving.id, "by commander", "asks again"] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    let listed = bob
        .list_requests(proto::ListRequestsRequest {
            namespace: "live".into(),
            include_decided: true,
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    let state = |id: &str| {
        let r = listed.iter().find(|r| r.id == id).unwrap();
        (
            r.status.clone(),
            r.superseded_by.clone(),
            r.withdrawn_by.clone(),
        )
    };
    assert_eq!(state(&request.id).0, "withdrawn");
    assert_eq!(state(&request.id).2, "commander");
    assert_eq!(state(&own.id).0, "superseded");
    assert!(
        state(&own.id).1.contains(&moving.id),
        "{:?}",
        state(&own.id)
    );
    assert_eq!(state(&moving.id).0, "pending");

    // Alice asks again, and a different approver carries it out.
    let request = alice
        .resolve_incident(resolve("attack over for 2h"))
        .await
        .unwrap()
        .into_inner()
        .pending
        .expect("resolution waits for an approver");
    let approved = bob
        .approve(proto::ApproveRequest {
            request_id: request.id.clone(),
            reason: "confirmed with fraud ops".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let approved_request = approved.request.unwrap();
    assert_eq!(approved_request.approved_by, "approver");
    assert_eq!(approved_request.requested_by, "commander");
    let lifted = live_status(&mut admin).await;
    assert!(
        lifted.activations.is_empty(),
        "the incident's modes are lifted"
    );
    let shown = bob
        .get_incident(proto::GetIncidentRequest {
            incident_id: incident.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.status, "resolved");
    let timeline: Vec<(&str, &str)> = shown
        .timeline
        .iter()
        .map(|e| (e.event.as_str(), e.principal.as_str()))
        .collect();
    assert_eq!(
        timeline,
        [
            ("declared", "commander"),
            ("escalated", "commander"),
            ("requested", "commander"),
            ("requested", "admin"),
            ("requested", "commander"),
            ("requested", "commander"),
            ("approved", "approver"),
            ("resolved", "commander"),
        ]
    );
    // Every event says the revision of the change that made it.
    assert!(shown.timeline.iter().all(|e| e.revision > 0), "{shown:?}");
    assert!(
        shown
            .timeline
            .windows(2)
            .all(|w| w[0].revision < w[1].revision || w[1].event == "resolved"),
        "{shown:?}"
    );
    // The other pending request cannot be approved once the incident is
    // resolved.
    let stale = bob
        .approve(proto::ApproveRequest {
            request_id: own.id,
            reason: String::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        Code::FailedPrecondition,
        "{}",
        stale.message()
    );

    let verified = bob
        .get_audit(proto::GetAuditRequest {
            incident_id: incident.id.clone(),
            verify: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        verified.verified && verified.problems.is_empty(),
        "{:?}",
        verified.problems
    );
    let actions: Vec<&str> = verified.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "declare", "escalate", "request", "withdraw", "request", "request", "request",
            "approve"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_down_a_severity_waits_for_an_approver() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    let mut bob = control_as(&server, Some(principals.token("approver"))).await;
    let declared = alice
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: "live".into(),
            r#type: RUNBOOK.into(),
            severity: "sev1".into(),
            reason: "takeover wave".into(),
            channels: Vec::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let id = declared.incident.unwrap().id;
    let down = alice
        .escalate_incident(proto::EscalateIncidentRequest {
            incident_id: id.clone(),
            severity: "sev3".into(),
            reason: "volume falling".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let request = down.pending.expect("de-escalation lifts protections");
    assert_eq!(
        (request.kind.as_str(), request.severity.as_str()),
        ("move", "sev3")
    );
    assert_eq!(down.incident.unwrap().severity, "sev1", "not moved yet");
    bob.approve(proto::ApproveRequest {
        request_id: request.id,
        reason: String::new(),
        change_id: String::new(),
        dry_run: false,
    })
    .await
    .unwrap();
    let shown = bob
        .get_incident(proto::GetIncidentRequest { incident_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.severity, "sev3");
    assert_eq!(shown.timeline.last().unwrap().event, "deescalated");
}

#[tokio::test]
async fn without_a_tokens_file_the_server_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let refused = safemode_grpc::server::start(safemode_grpc::server::ServeConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: dir.path().to_path_buf(),
        },
        ..Default::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(
        refused.to_string().contains("without a tokens file"),
        "{refused}"
    );
    assert!(refused.to_string().contains("--tokens"), "{refused}");

    let principals = Principals::new();
    let guarded = safemode_grpc::server::start(safemode_grpc::server::ServeConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        store: safemode_grpc::server::StoreConfig::Embedded {
            data_dir: dir.path().to_path_buf(),
        },
        tokens: Some(principals.file.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .expect("with tokens it may listen anywhere");
    guarded.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_with_tokens() {
    // An admin makes a token for a new commander and adds the line.
    let made = safemode(&[
        "--output",
        "json",
        "token",
        "create",
        "--principal",
        "carol",
        "--role",
        "commander",
    ])
    .await;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    let principals = Principals::new();
    let mut file = std::fs::read_to_string(principals.file.path()).unwrap();
    file.push_str(made["line"].as_str().unwrap());
    file.push('\n');
    std::fs::write(principals.file.path(), file).unwrap();
    let server = TestServer::with_tokens(&principals).await;
    let url = server.url.as_str();
    let carol = made["token"].as_str().unwrap();

    let missing = safemode(&["--server", url, "status"]).await;
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("a bearer token is required"), "{stderr}");

    let declared = safemode(&[
        "--server",
        url,
        "--token",
        carol,
        "--principal",
        "mallory",
        "--output",
        "json",
        "incident",
        "declare",
        "fraud-spike",
        "--severity",
        "sev3",
        "--reason",
        "refund abuse from new accounts",
    ])
    .await;
    assert!(
        declared.status.success(),
        "{}",
        String::from_utf8_lossy(&declared.stderr)
    );
    let declared: serde_json::Value = serde_json::from_slice(&declared.stdout).unwrap();
    // The token says who is calling; a claimed name is ignored.
    assert_eq!(declared["incident"]["declared_by"], "carol");

    // A token from a file works too, and a viewer may not declare.
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        token_file.path(),
        format!("{}\n", principals.token("viewer")),
    )
    .unwrap();
    let path = token_file.path().to_str().unwrap();
    let listed = safemode(&["--server", url, "--token-file", path, "incident", "list"]).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("fraud-spike"));
    let refused = safemode(&[
        "--server",
        url,
        "--token-file",
        path,
        "incident",
        "declare",
        "sim-swap-wave",
        "--severity",
        "sev3",
        "--reason",
        "x",
    ])
    .await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr
            .contains("viewer (roles: viewer) may not change modes or incidents in namespace live"),
        "{stderr}"
    );
}

/// The scenario a reviewer found: a resolution requested at sev3, then an
/// escalation to sev1 (no approval needed), then the old request approved.
/// Approving must not lift the sev1 modes nobody asked to lift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_never_carries_out_more_than_was_requested() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    let mut bob = control_as(&server, Some(principals.token("approver"))).await;
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;

    let declared = alice
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: "live".into(),
            r#type: RUNBOOK.into(),
            severity: "sev3".into(),
            reason: "login failures up 40x".into(),
            channels: Vec::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let incident = declared.incident.unwrap();
    let resolving = alice
        .resolve_incident(proto::ResolveIncidentRequest {
            incident_id: incident.id.clone(),
            reason: "looks quiet".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .pending
        .expect("resolution waits for an approver");
    let mut shown = resolving.activation_ids.clone();
    let mut sev3 = incident.activation_ids.clone();
    shown.sort();
    sev3.sort();
    assert_eq!(shown, sev3, "the request shows what it lifts");

    let escalated = alice
        .escalate_incident(proto::EscalateIncidentRequest {
            incident_id: incident.id.clone(),
            severity: "sev1".into(),
            reason: "takeovers confirmed".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(escalated.pending.is_none());
    let before = live_status(&mut admin).await;
    assert!(before.activations.len() > sev3.len());

    let refused = bob
        .approve(proto::ApproveRequest {
            request_id: resolving.id.clone(),
            reason: "ok".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // The approver is told what overtook it: the escalation, by whom.
    for part in [
        "is superseded",
        "was escalated (now sev1) by commander",
        "asks again",
    ] {
        assert!(
            refused.message().contains(part),
            "{part:?} not in {}",
            refused.message()
        );
    }
    let after = live_status(&mut admin).await;
    assert_eq!(after.revision, before.revision, "nothing was lifted");
    assert_eq!(after.activations, before.activations);
}

/// A runbook whose more severe stage drops a mode that needs a second
/// approver to lift: escalating would lift it, so it waits for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_severe_stage_that_drops_a_guarded_mode_waits_for_an_approver() {
    let runbooks = tempfile::tempdir().unwrap();
    std::fs::write(
        runbooks.path().join("guarded-drop.yaml"),
        "\
title: Guarded drop
summary: A more severe stage that drops the phone freeze of the milder one.
owners: [security@example.com]
review_interval: 30m
exit_criteria: [The test is over.]
stages:
  - severity: sev3
    modes: [freeze-phone-changes]
    expect:
      - {channel: web, action: account.phone_change, effect: deny}
  - severity: sev1
    modes: [bots-faq-only]
    expect:
      - {channel: chatbot, action: bot.intent.faq, effect: allow}
",
    )
    .unwrap();
    let principals = Principals::new();
    let dir = runbooks.path().to_path_buf();
    let server =
        TestServer::with_tokens_and(&principals, |c| c.runbooks_dir = Some(dir.clone())).await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    let mut bob = control_as(&server, Some(principals.token("approver"))).await;
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;

    let incident = alice
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: "live".into(),
            r#type: "guarded-drop".into(),
            severity: "sev3".into(),
            reason: "SIM swaps".into(),
            channels: Vec::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    let escalating = alice
        .escalate_incident(proto::EscalateIncidentRequest {
            incident_id: incident.id.clone(),
            severity: "sev1".into(),
            reason: "worse".into(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let request = escalating
        .pending
        .expect("dropping the phone freeze waits for an approver");
    assert_eq!(
        (request.kind.as_str(), request.severity.as_str()),
        ("move", "sev1")
    );
    let frozen = live_status(&mut admin).await;
    assert_eq!(
        frozen
            .activations
            .iter()
            .map(|a| a.mode.as_str())
            .collect::<Vec<_>>(),
        ["freeze-phone-changes"],
        "the freeze holds until approved"
    );

    bob.approve(proto::ApproveRequest {
        request_id: request.id.clone(),
        reason: "phones are safe now".into(),
        change_id: String::new(),
        dry_run: false,
    })
    .await
    .unwrap();
    let moved = live_status(&mut admin).await;
    assert_eq!(
        moved
            .activations
            .iter()
            .map(|a| a.mode.as_str())
            .collect::<Vec<_>>(),
        ["bots-faq-only"]
    );
    let shown = bob
        .get_incident(proto::GetIncidentRequest {
            incident_id: incident.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.severity, "sev1");
    assert_eq!(shown.timeline.last().unwrap().event, "escalated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_request_cannot_be_approved() {
    let principals = Principals::new();
    // Requests expire the moment they are made.
    let server = TestServer::with_tokens_and(&principals, |c| {
        c.controller.request_ttl = std::time::Duration::ZERO;
    })
    .await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    let mut bob = control_as(&server, Some(principals.token("approver"))).await;
    alice
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["freeze-credential-changes".into()],
            reason: "ATO wave".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let request = alice
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: vec!["freeze-credential-changes".into()],
            reason: "contained".into(),
            all: false,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .pending
        .unwrap();
    let refused = bob
        .approve(proto::ApproveRequest {
            request_id: request.id,
            reason: String::new(),
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let status = live_status(&mut admin).await;
    assert_eq!(status.activations.len(), 1, "the freeze holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_approvers_at_once_carry_a_request_out_once() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut alice = control_as(&server, Some(principals.token("commander"))).await;
    alice
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["freeze-credential-changes".into()],
            reason: "ATO wave".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let request = alice
        .lift_activations(proto::LiftActivationsRequest {
            namespace: "live".into(),
            targets: vec!["freeze-credential-changes".into()],
            reason: "contained".into(),
            all: false,
            incident_ok: false,
            change_id: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .pending
        .unwrap();
    let approve = |who: &'static str| {
        let server = &server;
        let principals = &principals;
        let id = request.id.clone();
        async move {
            let mut c = control_as(server, Some(principals.token(who))).await;
            c.approve(proto::ApproveRequest {
                request_id: id,
                reason: format!("{who} approves"),
                change_id: String::new(),
                dry_run: false,
            })
            .await
        }
    };
    let (first, second) = tokio::join!(approve("approver"), approve("approver2"));
    let codes = [code(first), code(second)];
    assert!(
        codes.contains(&Code::Ok) && codes.contains(&Code::FailedPrecondition),
        "{codes:?}"
    );
    let mut admin = control_as(&server, Some(principals.token("admin"))).await;
    let approvals = admin
        .get_audit(proto::GetAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter(|e| e.action == "approve")
        .count();
    assert_eq!(approvals, 1);
    assert!(live_status(&mut admin).await.activations.is_empty());
}

/// WhoAmI, which the console offers actions from, says what the table
/// allows: the same answers the calls themselves get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_am_i_says_what_the_table_allows() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    for role in [
        "viewer",
        "subscriber",
        "commander",
        "approver",
        "drill",
        "admin",
    ] {
        let mut c = control_as(&server, Some(principals.token(role))).await;
        let who = c
            .who_am_i(proto::WhoAmIRequest {
                namespaces: vec!["live".into(), "drill-table".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(who.principal, role);
        assert!(who.tokens);
        for (said, drill) in who.permissions.iter().zip([false, true]) {
            let expected = proto::NamespacePermissions {
                namespace: said.namespace.clone(),
                read: allowed(role, Rpc::GetStatus, drill),
                read_audit: allowed(role, Rpc::GetAudit, drill),
                change: allowed(role, Rpc::ApplyModes, drill),
                approve: allowed(role, Rpc::Approve, drill),
            };
            assert_eq!(said, &expected, "{role} in {}", said.namespace);
        }
    }
}
