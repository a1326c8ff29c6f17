//! Issue 15, item 5: early-warning proposals. Two replicas on one real etcd;
//! signals reported with `safemode signal` to each cross the
//! credential-stuffing runbook's trigger (`login.failed` above 200 within
//! 5m) and raise exactly one proposal, which `safemode proposals` shows from
//! either replica, `status` shows, and the audit log records; accepting it
//! declares the incident, whose timeline cites the evidence; dismissing
//! needs a reason and is audited. Roles (viewer lists, commander decides,
//! detector only raises) and bad inputs are tables: each refusal has its
//! exit code and one line on stderr, and changes nothing.

use std::process::Output;

use serde_json::Value;

use crate::etcd::EtcdCluster;
use crate::support::{
    Principals, ServeProcess, TestServer, register_key, safemode, test_signing_key,
    test_signing_key_file, wait_for, wait_until,
};

/// A replica named `name` on `endpoints` that requires `principals`' tokens.
fn replica(name: &str, endpoints: &str, principals: &Principals) -> ServeProcess {
    let key = test_signing_key_file().display().to_string();
    let tokens = principals.file.path().display().to_string();
    let process = ServeProcess::start(
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            endpoints,
            "--signing-key",
            &key,
            "--replica",
            name,
            "--replica-ttl",
            "5m",
            "--tokens",
            &tokens,
        ],
        &[],
    );
    register_key(&process.url, &test_signing_key().public_key().to_pem());
    process
}

/// `safemode --server URL --token TOKEN ARGS...`.
async fn on(url: &str, token: &str, args: &[&str]) -> Output {
    let mut all = vec!["--server", url, "--token", token];
    all.extend_from_slice(args);
    safemode(&all).await
}

/// `ARGS --output json` as `token`, which must exit 0.
async fn json(url: &str, token: &str, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let output = on(url, token, &all).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// The proposals `safemode proposals` lists (`--all`: closed ones too).
async fn proposals(url: &str, token: &str, all: bool) -> Vec<Value> {
    let mut args = vec!["proposals"];
    if all {
        args.push("--all");
    }
    json(url, token, &args).await["proposals"]
        .as_array()
        .expect("proposals")
        .clone()
}

/// The audit entries of `action`.
async fn audited(url: &str, token: &str, action: &str) -> Vec<Value> {
    json(url, token, &["audit"]).await["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_crossing_a_trigger_raise_one_proposal_across_two_replicas_and_accepting_declares()
{
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let principals = Principals::new();
    let (a, b) = (
        replica("r-a", &endpoints, &principals),
        replica("r-b", &endpoints, &principals),
    );
    let (viewer, commander) = (principals.token("viewer"), principals.token("commander"));
    let subscriber = principals.token("subscriber");

    // 150 on web through r-a and 100 on chatbot through r-b: neither replica
    // alone is above 200, the fleet is.
    for (url, channel, count) in [(&a.url, "web", "150"), (&b.url, "chatbot", "100")] {
        let output = on(
            url,
            subscriber,
            &[
                "signal",
                "login.failed",
                "--count",
                count,
                "--channel",
                channel,
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
    }
    let raised = wait_for("a proposal raised by the trigger", || async {
        let listed = proposals(&a.url, viewer, false).await;
        (!listed.is_empty()).then_some(listed)
    })
    .await;
    assert_eq!(raised.len(), 1, "{raised:#?}");
    let proposal = &raised[0];
    let id = proposal["id"].as_str().unwrap().to_string();
    assert_eq!(proposal["question"], "declare credential-stuffing sev3?");
    assert_eq!(proposal["state"], "open");
    assert_eq!(proposal["source"], "trigger");
    assert_eq!(proposal["raised_by"], "trigger");
    assert_eq!(proposal["signal"], "login.failed");
    assert_eq!(proposal["count"], 250);
    assert_eq!(proposal["above"], 200);
    assert_eq!(proposal["within_seconds"], 300);
    assert_eq!(
        proposal["evidence"],
        "login.failed counted 250 in 5m across the fleet, above 200 (web 150, chatbot 100)"
    );
    // The same one from the other replica, in status, and in the log: one.
    let from_b = proposals(&b.url, viewer, false).await;
    assert_eq!(from_b.len(), 1, "{from_b:#?}");
    assert_eq!(from_b[0]["id"], id.as_str());
    let status = json(&b.url, viewer, &["status"]).await;
    assert_eq!(status["open_proposals"][0]["id"], id.as_str(), "{status}");
    let status_text = on(&a.url, viewer, &["status"]).await;
    let text = String::from_utf8_lossy(&status_text.stdout);
    assert!(
        text.contains(&format!("{id} declare credential-stuffing sev3?")),
        "{text}"
    );
    let propose = audited(&a.url, viewer, "propose").await;
    assert_eq!(propose.len(), 1, "{propose:#?}");
    // Raising declared nothing.
    let incidents = json(&a.url, viewer, &["incident", "list"]).await;
    assert_eq!(
        incidents["incidents"],
        Value::Array(Vec::new()),
        "{incidents}"
    );

    // A viewer may not accept: refused, audited, nothing changed.
    let refused = on(
        &b.url,
        viewer,
        &["proposals", "accept", &id, "--reason", "looks real"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("viewer (roles: viewer) may not change modes or incidents in namespace live; that needs the commander"),
        "{stderr}"
    );
    assert_eq!(proposals(&a.url, viewer, false).await.len(), 1);

    // A commander accepts on r-b: the incident is declared at sev3 and its
    // timeline cites the evidence.
    let accepted = json(
        &b.url,
        commander,
        &["proposals", "accept", &id, "--reason", "the wave is real"],
    )
    .await;
    assert_eq!(accepted["proposal_id"], id.as_str());
    assert_eq!(accepted["incident"]["severity"], "sev3", "{accepted}");
    let shown = json(&a.url, viewer, &["incident", "show", "credential-stuffing"]).await;
    let declared = &shown["timeline"][0];
    assert_eq!(declared["event"], "declared", "{shown}");
    assert_eq!(declared["reason"], "the wave is real");
    let detail = declared["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!(
            "accepted proposal {id}: login.failed counted 250 in 5m across the fleet, above 200 (web 150, chatbot 100); "
        )),
        "{detail}"
    );
    let all = proposals(&a.url, viewer, true).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["state"], "accepted");
    assert_eq!(all[0]["closed_by"], "commander");
    assert_eq!(all[0]["incident_id"], shown["id"]);
    assert!(proposals(&b.url, viewer, false).await.is_empty());
    let accept = audited(&a.url, viewer, "accept").await;
    assert_eq!(accept.len(), 1, "{accept:#?}");
    assert_eq!(accept[0]["incident_id"], shown["id"]);

    // Closed: accepting again says so, and changes nothing.
    let again = on(
        &a.url,
        commander,
        &["proposals", "accept", &id, "--reason", "again"],
    )
    .await;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("proposal {id} was accepted by commander at ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("only an open proposal can be accepted or dismissed"),
        "{stderr}"
    );
    // Still one proposal from the one condition: the incident is active.
    assert_eq!(audited(&b.url, viewer, "propose").await.len(), 1);
    let verify = on(&a.url, principals.token("admin"), &["audit", "--verify"]).await;
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
}

// === One replica: roles, dismissing, bad inputs ===

/// `safemode --server URL --token TOKEN ARGS...` against `server`.
async fn run(server: &TestServer, token: &str, args: &[&str]) -> Output {
    on(&server.url, token, args).await
}

/// Raises a proposal for fraud-spike sev3 as the detector; its id.
async fn raise(server: &TestServer, principals: &Principals) -> String {
    let raised = json(
        &server.url,
        principals.token("detector"),
        &[
            "proposals",
            "raise",
            "--type",
            "fraud-spike",
            "--severity",
            "sev3",
            "--summary",
            "refunds 4x baseline for 15m",
            "--reason",
            "alert RefundSpike",
        ],
    )
    .await;
    assert_eq!(raised["created"], true, "{raised}");
    raised["proposal"]["id"].as_str().unwrap().to_string()
}

/// What a refusal must leave as it was: the proposals (with their states),
/// the incidents, and the audit log but for refusal entries.
async fn observed(server: &TestServer, principals: &Principals) -> (Vec<Value>, Value, Vec<Value>) {
    let admin = principals.token("admin");
    let proposals = proposals(&server.url, admin, true).await;
    let incidents =
        json(&server.url, admin, &["incident", "list", "--all"]).await["incidents"].clone();
    let entries: Vec<Value> = json(&server.url, admin, &["audit"]).await["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] != "refused")
        .cloned()
        .collect();
    (proposals, incidents, entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_lists_raises_accepts_and_dismisses() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let http = server.http_addr().expect("an HTTP listener");
    let id = raise(&server, &principals).await;
    wait_until("one open proposal on /metrics", || async {
        open_on_metrics(http).await == Some(1.0)
    })
    .await;
    // (who, args, exit code, words on the one stderr line; none: it works).
    let list: &[&str] = &["proposals"];
    let accept: &[&str] = &["proposals", "accept", &id, "--reason", "real"];
    let dismiss: &[&str] = &["proposals", "dismiss", &id, "--reason", "a sale"];
    let raise_again: &[&str] = &[
        "proposals",
        "raise",
        "--type",
        "fraud-spike",
        "--severity",
        "sev3",
        "--summary",
        "again",
        "--reason",
        "alert RefundSpike",
    ];
    let denied = |who: &str, roles: &str, what: &str, needs: &str| {
        format!("{who} (roles: {roles}) may not {what} in namespace live; that needs the {needs}")
    };
    let cases: Vec<(&str, &[&str], Option<String>)> = vec![
        ("viewer", list, None),
        (
            "subscriber",
            list,
            Some(denied(
                "subscriber",
                "subscriber",
                "read status, insights or proposals",
                "viewer",
            )),
        ),
        (
            "detector",
            list,
            Some(denied(
                "detector",
                "detector",
                "read status, insights or proposals",
                "viewer",
            )),
        ),
        (
            "viewer",
            accept,
            Some(denied(
                "viewer",
                "viewer",
                "change modes or incidents",
                "commander",
            )),
        ),
        (
            "viewer",
            dismiss,
            Some(denied(
                "viewer",
                "viewer",
                "change modes or incidents",
                "commander",
            )),
        ),
        (
            "approver",
            accept,
            Some(denied(
                "approver",
                "approver",
                "change modes or incidents",
                "commander",
            )),
        ),
        (
            "detector",
            accept,
            Some(denied(
                "detector",
                "detector",
                "change modes or incidents",
                "commander",
            )),
        ),
        (
            "detector",
            dismiss,
            Some(denied(
                "detector",
                "detector",
                "change modes or incidents",
                "commander",
            )),
        ),
        (
            "viewer",
            raise_again,
            Some(denied("viewer", "viewer", "raise proposals", "commander")),
        ),
        (
            "subscriber",
            raise_again,
            Some(denied(
                "subscriber",
                "subscriber",
                "raise proposals",
                "commander",
            )),
        ),
        // Raising while the detector's proposal is open answers with it.
        ("detector", raise_again, None),
        ("commander", raise_again, None),
    ];
    for (who, args, refusal) in &cases {
        let before = observed(&server, &principals).await;
        let refused_before = audited(&server.url, principals.token("admin"), "refused")
            .await
            .len();
        let output = run(&server, principals.token(who), args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        match refusal {
            None => assert_eq!(output.status.code(), Some(0), "{who} {args:?}: {stderr}"),
            Some(words) => {
                assert_eq!(output.status.code(), Some(1), "{who} {args:?}: {stderr}");
                assert_eq!(stderr.lines().count(), 1, "{who} {args:?}: {stderr}");
                assert!(
                    stderr.contains(words.as_str()),
                    "{who} {args:?}: {words:?} not in {stderr}"
                );
                assert!(output.stdout.is_empty(), "{who} {args:?}");
                // A refused change is audited; a refused read is not.
                let refused_after = audited(&server.url, principals.token("admin"), "refused")
                    .await
                    .len();
                let writes = args.len() > 1;
                assert_eq!(
                    refused_after,
                    refused_before + usize::from(writes),
                    "{who} {args:?}"
                );
            }
        }
        assert_eq!(
            observed(&server, &principals).await,
            before,
            "{who} {args:?} changed something"
        );
    }
    // One proposal still, open.
    let open = proposals(&server.url, principals.token("viewer"), false).await;
    assert_eq!(open.len(), 1, "{open:#?}");

    // A commander dismisses it, with a reason: audited, nothing declared.
    let dismissed = json(&server.url, principals.token("commander"), dismiss).await;
    assert_eq!(dismissed["proposal"]["state"], "dismissed");
    assert_eq!(dismissed["proposal"]["closed_reason"], "a sale");
    let entries = audited(&server.url, principals.token("admin"), "dismiss").await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["principal"], "commander");
    assert_eq!(entries[0]["reason"], "a sale");
    assert!(
        entries[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("dismissed {id} (declare fraud-spike sev3?) raised by detector: external detector: refunds 4x baseline for 15m")),
        "{entries:#?}"
    );
    let incidents = json(
        &server.url,
        principals.token("viewer"),
        &["incident", "list", "--all"],
    )
    .await;
    assert_eq!(incidents["incidents"], Value::Array(Vec::new()));
    // Dismissed: not again, and not accepted.
    for args in [dismiss, accept] {
        let output = run(&server, principals.token("commander"), args).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("proposal {id} was dismissed by commander at ")),
            "{stderr}"
        );
    }
    wait_until("no open proposal on /metrics", || async {
        open_on_metrics(http).await == Some(0.0)
    })
    .await;
    // The detector may raise again once its proposal is closed.
    assert_ne!(raise(&server, &principals).await, id);
}

/// `safemode_proposals_open{namespace="live"}` on `/metrics`, once the
/// background read of the store has set it.
async fn open_on_metrics(http: std::net::SocketAddr) -> Option<f64> {
    let (code, text) = crate::ux_http::get(http, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find(|l| l.starts_with("safemode_proposals_open{") && l.contains("namespace=\"live\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proposal_inputs_are_one_clear_line_and_change_nothing() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let id = raise(&server, &principals).await;
    let long = "x".repeat(501);
    let unknown = "prp_0000000000zz";
    // (args, exit code, words on the one stderr line).
    let cases: Vec<(Vec<&str>, i32, String)> = vec![
        (
            vec!["proposals", "dismiss", &id],
            2,
            "required arguments were not provided: --reason <REASON>".into(),
        ),
        (
            vec!["proposals", "dismiss", &id, "--reason", "  "],
            2,
            "a reason is required".into(),
        ),
        (
            vec!["proposals", "accept", &id],
            2,
            "required arguments were not provided: --reason <REASON>".into(),
        ),
        (
            vec!["proposals", "accept", "inc_5mj2k0q8c1xv", "--reason", "r"],
            1,
            "bad proposal id 'inc_5mj2k0q8c1xv': ids look like prp_5mj2k0q8c1xv".into(),
        ),
        (
            vec!["proposals", "accept", unknown, "--reason", "r"],
            1,
            format!("no proposal {unknown}; `safemode proposals` lists the open ones"),
        ),
        (
            vec![
                "proposals",
                "dismiss",
                &id,
                "--reason",
                "r",
                "--namespace",
                "drill-x",
            ],
            1,
            format!("no proposal {id}"),
        ),
        (
            vec!["proposals", "--namespace", "Live"],
            1,
            "--namespace: ".into(),
        ),
        (
            vec![
                "proposals",
                "raise",
                "--type",
                "fraud-spike",
                "--severity",
                "sev9",
                "--summary",
                "s",
                "--reason",
                "r",
            ],
            1,
            "--severity: unknown severity 'sev9'".into(),
        ),
        (
            vec![
                "proposals",
                "raise",
                "--type",
                "fraud-spike",
                "--severity",
                "sev4",
                "--summary",
                "s",
                "--reason",
                "r",
            ],
            1,
            "runbook fraud-spike has no sev4 stage".into(),
        ),
        (
            vec![
                "proposals",
                "raise",
                "--type",
                "no-such-thing",
                "--severity",
                "sev3",
                "--summary",
                "s",
                "--reason",
                "r",
            ],
            1,
            "unknown incident type 'no-such-thing'".into(),
        ),
        (
            vec![
                "proposals",
                "raise",
                "--type",
                "fraud-spike",
                "--severity",
                "sev3",
                "--summary",
                &long,
                "--reason",
                "r",
            ],
            1,
            "--summary: say what the detector saw in one line of 1 to 500 characters".into(),
        ),
        (
            vec![
                "proposals",
                "raise",
                "--type",
                "fraud-spike",
                "--severity",
                "sev3",
                "--summary",
                " ",
                "--reason",
                "r",
            ],
            1,
            "--summary: say what the detector saw in one line of 1 to 500 characters".into(),
        ),
    ];
    for (args, code, words) in &cases {
        let before = observed(&server, &principals).await;
        let output = run(&server, principals.token("commander"), args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(words.as_str()),
            "{args:?}: {words:?} not in {stderr}"
        );
        assert_eq!(
            observed(&server, &principals).await,
            before,
            "{args:?} changed something"
        );
    }
}

/// The edge checks what a detector sends, whatever client it uses: one
/// clear message per bad field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_a_bad_raise_with_one_message() {
    use safemode_wire::proto;
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let mut control = crate::support::control_as(&server, Some(principals.token("detector"))).await;
    let good = proto::RaiseProposalRequest {
        namespace: "live".into(),
        r#type: "fraud-spike".into(),
        severity: "sev3".into(),
        summary: "refunds 4x baseline".into(),
        reason: "alert RefundSpike".into(),
        change_id: String::new(),
    };
    let cases: Vec<(proto::RaiseProposalRequest, tonic::Code, &str)> = vec![
        (
            proto::RaiseProposalRequest {
                summary: "line one\nline two".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "summary: has control characters or line breaks; send one line of text",
        ),
        (
            proto::RaiseProposalRequest {
                summary: String::new(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "summary: say what the detector saw",
        ),
        (
            proto::RaiseProposalRequest {
                summary: "y".repeat(501),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "summary: 501 characters; keep it to one line of at most 500",
        ),
        (
            proto::RaiseProposalRequest {
                reason: String::new(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "reason: ",
        ),
        (
            proto::RaiseProposalRequest {
                namespace: "prod".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "namespace: ",
        ),
        (
            proto::RaiseProposalRequest {
                r#type: "Fraud".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "type: bad runbook name 'Fraud'",
        ),
    ];
    for (request, code, words) in cases {
        let status = control.raise_proposal(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(words),
            "{request:?}: {words:?} not in {}",
            status.message()
        );
    }
    let listed = control_as_viewer_list(&server, &principals).await;
    assert!(listed.is_empty(), "{listed:?}");
    let raised = control.raise_proposal(good).await.unwrap().into_inner();
    assert!(raised.created);
}

async fn control_as_viewer_list(server: &TestServer, principals: &Principals) -> Vec<String> {
    let mut viewer = crate::support::control_as(server, Some(principals.token("viewer"))).await;
    viewer
        .list_proposals(safemode_wire::proto::ListProposalsRequest {
            namespace: "live".into(),
            include_closed: true,
        })
        .await
        .unwrap()
        .into_inner()
        .proposals
        .into_iter()
        .map(|p| p.id)
        .collect()
}
