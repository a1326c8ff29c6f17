//! Issue 15, items 1-3: channels report what they decided (by action,
//! effect, revision and context class) and named signals over their
//! subscription stream; `safemode insights` shows the inconsistency map
//! (static and live), soft downtime and dead ends. Real controllers, real
//! client subscribers deciding, the real CLI.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Principals, RawSubscriber, TestServer, safemode, wait_for, wait_until};
use safemode_client::{ReportReceipt, Subscriber};
use safemode_policy::{Action, Context};
use safemode_wire::proto;

async fn insights(server: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    let mut all = vec!["--server", server.url.as_str()];
    if let Some(token) = token {
        all.extend(["--token", token]);
    }
    all.extend_from_slice(args);
    safemode(&all).await
}

async fn insights_json(server: &TestServer) -> Value {
    insights_json_as(server, None).await
}

/// `safemode insights --output json` with `token`, parsed.
async fn insights_json_as(server: &TestServer, token: Option<&str>) -> Value {
    let out = insights(server, token, &["insights", "--output", "json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("insights JSON")
}

fn stderr_line(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {text}");
    lines[0].to_string()
}

/// Decides `action` `n` times for an unverified customer, then reports.
async fn decide_and_report(subscriber: &Subscriber, action: &str, n: usize) {
    let action = Action::parse(action).unwrap();
    for _ in 0..n {
        subscriber.decide(&action, &Context::default());
    }
    let receipt = subscriber
        .report_now(Duration::from_secs(10))
        .await
        .expect("the report is answered");
    assert_eq!(receipt, ReportReceipt::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_names_the_easiest_path_and_the_channel_left_behind() {
    let server = TestServer::start().await;
    let web = server.subscriber("web", "web-1").await;
    let desk = server.subscriber("agent-desk", "desk-1").await;
    // An IVR that cannot enforce any mode: it rejects every policy with an
    // activation and keeps deciding on the revision it had.
    let mut config = server.subscriber_config("ivr", "ivr-1");
    config.check = Some(std::sync::Arc::new(|snapshot| {
        if snapshot.activations.is_empty() {
            Ok(())
        } else {
            Err("this IVR cannot ask for a step-up".into())
        }
    }));
    let ivr = Subscriber::connect(config).await.expect("the IVR connects");
    let held = ivr.current().expect("a first snapshot").revision;

    // Step-up for account changes everywhere but the agent desk.
    let applied = server
        .control()
        .await
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec!["step-up-account-changes".into()],
            channels: ["chatbot", "ivr", "web", "mobile", "email"]
                .map(String::from)
                .to_vec(),
            reason: "account takeover wave".into(),
            ..Default::default()
        })
        .await
        .expect("apply")
        .into_inner()
        .revision;
    wait_until("web applies the step-up", || async {
        web.current().is_some_and(|s| s.revision == applied)
    })
    .await;
    wait_until("the IVR's rejection is in status", || async {
        server
            .status("live")
            .await
            .subscribers
            .iter()
            .any(|s| s.subscriber_id == "ivr-1" && s.state == "REJECTED")
    })
    .await;
    assert_eq!(ivr.current().unwrap().revision, held);

    decide_and_report(&web, "account.email_change", 40).await;
    decide_and_report(&desk, "account.email_change", 25).await;
    decide_and_report(&ivr, "account.email_change", 5).await;

    let shown = insights_json(&server).await;
    // Static: the agent desk allows what every other channel steps up.
    let map = shown["static_map"].as_array().unwrap();
    let email = map
        .iter()
        .find(|m| m["action"] == "account.email_change")
        .expect("account.email_change in the map");
    assert_eq!(email["differs"], true);
    assert_eq!(email["easiest_channel"], "agent-desk");
    let first = &email["channels"][0];
    assert_eq!(
        (first["channel"].as_str(), first["effect"].as_str()),
        (Some("agent-desk"), Some("allow"))
    );
    let effects: Vec<(&str, &str)> = email["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap(),
                c["effect"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(effects.contains(&("web", "step_up")), "{effects:?}");
    assert!(effects.contains(&("ivr", "step_up")), "{effects:?}");
    // Reading is not in the map.
    assert!(!map.iter().any(|m| m["action"] == "order.view"));

    // Live: the same action and context, different outcomes; the IVR on
    // its old revision, named.
    assert_eq!(shown["decisions"], 70);
    let live = shown["live"].as_array().unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let d = &live[0];
    assert_eq!(d["action"], "account.email_change");
    assert_eq!(d["total"], 70);
    assert_eq!(d["across_channels"], true);
    let outcomes: Vec<(String, String, u64, bool, Vec<String>)> = d["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["channel"].as_str().unwrap().to_string(),
                o["effect"].as_str().unwrap().to_string(),
                o["count"].as_u64().unwrap(),
                o["old_revision"].as_bool().unwrap(),
                o["subscribers"]
                    .as_array()
                    .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("agent-desk".into(), "allow".into(), 25, false, vec![]),
            (
                "ivr".into(),
                "allow".into(),
                5,
                true,
                vec!["ivr-1".to_string()]
            ),
            ("web".into(), "step_up".into(), 40, false, vec![]),
        ]
    );
    // Soft downtime: the IVR rejects the policy in force.
    let soft: Vec<(&str, &str)> = shown["soft_downtime"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["channel"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(soft, vec![("ivr", "rejecting")]);

    // The text names the easiest path first.
    let text = insights(&server, None, &["insights"]).await;
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.lines().any(|l| l
            .trim_start()
            .starts_with("account.email_change: agent-desk ALLOW ← easiest path, ")),
        "{text}"
    );
    assert!(text.contains("ivr REJECTING: 1 of 1 subscribers"), "{text}");
    assert!(text.contains("OLD revision"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_end_shows_in_insights() {
    let server = TestServer::start().await;
    // Credential changes frozen on every channel: recovery has no path.
    server.apply(&["freeze-credential-changes"]).await;
    let shown = insights_json(&server).await;
    let dead: Vec<&str> = shown["dead_ends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert!(dead.contains(&"account.password_reset"), "{shown}");
    let none = TestServer::start().await;
    assert_eq!(
        insights_json(&none).await["dead_ends"],
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_subscriber_is_limited_and_keeps_its_policy() {
    let server = TestServer::start().await;
    let raw = RawSubscriber::connect(server.channel().await, "live", "web", "flood-1", 0)
        .await
        .expect("the stream opens");
    wait_until("the first snapshot", || async {
        !raw.received.lock().unwrap().is_empty()
    })
    .await;
    let signal = |sequence: u64, count: u64| proto::Report {
        sequence,
        decisions: vec![],
        signals: vec![proto::SignalCount {
            name: "login.failed".into(),
            count,
        }],
    };
    // Twenty reports at once, then one far too large.
    for sequence in 1..=20 {
        raw.report(signal(sequence, 10)).await;
    }
    let mut huge = signal(21, 1);
    huge.signals = (0..70)
        .map(|i| proto::SignalCount {
            name: format!("s.n{i}"),
            count: 1,
        })
        .collect();
    raw.report(huge).await;
    let answers = wait_for("every report answered", || async {
        let answers = raw.answers.lock().unwrap().clone();
        (answers.len() == 21).then_some(answers)
    })
    .await;
    assert!(answers[0].accepted, "{:?}", answers[0]);
    for answer in &answers[1..20] {
        assert!(!answer.accepted);
        assert!(
            answer
                .reason
                .starts_with("too soon: a subscriber reports at most every 10s"),
            "{}",
            answer.reason
        );
        assert!(answer.retry_after_seconds > 0);
    }
    assert!(!answers[20].accepted);
    assert!(
        answers[20].reason.starts_with("too many rows"),
        "{}",
        answers[20].reason
    );
    assert_eq!(
        answers.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        (1..=21).collect::<Vec<_>>()
    );
    // Only the first counted.
    let shown = insights_json(&server).await;
    assert_eq!(
        shown["signals"],
        serde_json::json!([{"channel": "web", "name": "login.failed", "count": 10}])
    );
    // Every refusal is counted while the stream is still open (at most a
    // gap after it came): 19 too soon, 1 too large.
    wait_until("the stream's 20 refusals counted", || async {
        insights_json(&server).await["refused_reports"] == 20
    })
    .await;
    let shown = insights_json(&server).await;
    let whys: Vec<(&str, u64)> = shown["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["why"].as_str().unwrap(), r["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(whys, vec![("too_soon", 19), ("too_large", 1)]);
    // Its policy stream goes on: a change reaches it.
    let revision = server.apply(&["bots-faq-only"]).await;
    wait_until("the flooding subscriber gets the change", || async {
        raw.received
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.revision == revision)
    })
    .await;
    assert!(raw.ended.lock().unwrap().is_none());
}

fn hello(channel: &str, id: &str) -> proto::Hello {
    proto::Hello {
        namespace: "live".into(),
        channel: channel.into(),
        subscriber_id: id.into(),
        last_applied_revision: 0,
        epoch: String::new(),
    }
}

/// Waits for `raw`'s first snapshot, sends `report`, and waits for its
/// answer.
async fn report_once(raw: &RawSubscriber, report: proto::Report) -> proto::ReportAnswer {
    wait_until("the first snapshot", || async {
        !raw.received.lock().unwrap().is_empty()
    })
    .await;
    let before = raw.answers.lock().unwrap().len();
    raw.report(report).await;
    wait_for("the report's answer", || async {
        raw.answers.lock().unwrap().get(before).cloned()
    })
    .await
}

fn one_signal(name: &str, count: u64) -> proto::Report {
    proto::Report {
        sequence: 1,
        decisions: vec![],
        signals: vec![proto::SignalCount {
            name: name.into(),
            count,
        }],
    }
}

/// Rows a flooding report holds: about 56 KB, under the 64 KiB bound.
const FLOOD_ROWS: usize = 800;

/// A report of [`FLOOD_ROWS`] decision rows, all distinct, and distinct
/// from those of every other `seed`, over revisions 0 to `newest`.
fn distinct_rows(seed: usize, newest: i64) -> proto::Report {
    let effects = [
        "allow",
        "throttle",
        "step_up",
        "review",
        "read_only",
        "route",
        "deny",
    ];
    let confidences = ["low", "medium", "high"];
    let methods = ["none", "knowledge", "possession", "strong"];
    let mut all = Vec::new();
    for revision in 0..=newest {
        for action in safemode_policy::names::ACTIONS {
            for effect in effects {
                for confidence in confidences {
                    for method in methods {
                        for (handoff, attempts_exhausted) in
                            [(false, false), (false, true), (true, false), (true, true)]
                        {
                            all.push(proto::DecisionCount {
                                action: action.to_string(),
                                effect: effect.into(),
                                revision,
                                context: Some(proto::ReportedClass {
                                    confidence: confidence.into(),
                                    method: method.into(),
                                    handoff,
                                    attempts_exhausted,
                                }),
                                stale: false,
                                failed_closed: false,
                                count: 1,
                            });
                        }
                    }
                }
            }
        }
    }
    let decisions: Vec<_> = all
        .into_iter()
        .skip(seed * FLOOD_ROWS)
        .take(FLOOD_ROWS)
        .collect();
    assert_eq!(
        decisions.len(),
        FLOOD_ROWS,
        "enough distinct rows for seed {seed}"
    );
    proto::Report {
        sequence: 1,
        decisions,
        signals: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_reset_the_pace() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let token = principals.token("subscriber");
    let first = RawSubscriber::connect_as(server.channel().await, hello("web", "loop-1"), token)
        .await
        .expect("the stream opens");
    let taken = report_once(&first, one_signal("login.failed", 7)).await;
    assert!(taken.accepted, "{taken:?}");
    drop(first);
    // The same subscriber on a new stream: still too soon.
    let again = RawSubscriber::connect_as(server.channel().await, hello("web", "loop-1"), token)
        .await
        .expect("the stream opens");
    let answer = report_once(&again, one_signal("login.failed", 7)).await;
    assert!(!answer.accepted);
    assert!(
        answer.reason.starts_with(
            "too soon: a subscriber reports at most every 10s on a channel, over all its streams"
        ),
        "{}",
        answer.reason
    );
    assert!(answer.retry_after_seconds > 0);
    // Only the first counted, and the refusals are shown with who sent them.
    let shown = insights_json_as(&server, Some(principals.token("viewer"))).await;
    assert_eq!(
        shown["signals"],
        serde_json::json!([{"channel": "web", "name": "login.failed", "count": 7}])
    );
    assert_eq!(shown["refused_reports"], 1);
    assert_eq!(
        shown["refused"],
        serde_json::json!([
            {"principal": "subscriber", "channel": "web", "subscriber": "loop-1", "why": "too_soon", "count": 1},
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_in_a_loop_does_not_starve_a_steady_stream() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let token = principals.token("subscriber").to_string();
    // A pod reports, and its stream breaks; its new stream's first report
    // comes too soon for the pod.
    let first = RawSubscriber::connect_as(server.channel().await, hello("web", "pod-1"), &token)
        .await
        .expect("the stream opens");
    assert!(
        report_once(&first, one_signal("login.failed", 1))
            .await
            .accepted
    );
    drop(first);
    let pod = RawSubscriber::connect_as(server.channel().await, hello("web", "pod-1"), &token)
        .await
        .expect("the stream opens");
    let soon = report_once(&pod, one_signal("login.failed", 1)).await;
    assert!(
        soon.reason.starts_with("too soon: a subscriber"),
        "{}",
        soon.reason
    );
    // A client of the same token reconnects in a loop with new ids, until
    // the token's first reports are used up, and goes on; refused, it asks
    // again at once on the same stream.
    let looping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = {
        let (looping, full, url) = (looping.clone(), full.clone(), server.url.clone());
        let token = token.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while looping.load(std::sync::atomic::Ordering::Relaxed) {
                let channel = tonic::transport::Channel::from_shared(url.clone())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let id = format!("loop-{i}");
                let raw = RawSubscriber::connect_as(channel, hello("web", &id), &token)
                    .await
                    .expect("the stream opens");
                let answer = report_once(&raw, one_signal("login.failed", 1)).await;
                if answer.reason.contains("first reports") {
                    full.store(true, std::sync::atomic::Ordering::Relaxed);
                    // Asking again does not skip the token's first reports:
                    // the stream waits its own gap from when it asked.
                    let again = report_once(&raw, one_signal("login.failed", 1)).await;
                    assert!(
                        !again.accepted && again.reason.starts_with("too soon: a subscriber"),
                        "a stream refused its first report was taken at once: {again:?}"
                    );
                }
                i += 1;
            }
        })
    };
    wait_until(
        "the looping client used up the token's first reports",
        || async { full.load(std::sync::atomic::Ordering::Relaxed) },
    )
    .await;
    // The pod's stream asked before: its next report is its own turn, once
    // the pod's gap has passed, however busy the loop keeps the token.
    let taken = wait_for("the pod's report taken", || async {
        let answer = report_once(&pod, one_signal("login.failed", 1)).await;
        assert!(
            !answer.reason.contains("first reports"),
            "a steady stream drew on the token's first reports: {}",
            answer.reason
        );
        answer.accepted.then_some(answer)
    })
    .await;
    assert_eq!(taken.left_out, 0);
    looping.store(false, std::sync::atomic::Ordering::Relaxed);
    looper.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_signalling_in_a_loop_loses_no_count() {
    // More calls within a gap than a token's new streams may first report:
    // each call waits for its turn, and every count arrives.
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let keys = server.trusted_keys_file().display().to_string();
    let calls = reports_token_burst() + 4;
    for i in 0..calls {
        let out = safemode(&[
            "--server",
            &server.url,
            "--token",
            principals.token("subscriber"),
            "signal",
            "password_reset.requested",
            "--channel",
            "ivr",
            "--trusted-keys",
            &keys,
        ])
        .await;
        assert!(
            out.status.success(),
            "call {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shown = insights_json_as(&server, Some(principals.token("viewer"))).await;
    assert_eq!(
        shown["signals"],
        serde_json::json!([{"channel": "ivr", "name": "password_reset.requested", "count": calls}])
    );
}

/// First reports a token's new streams may make in a gap beyond one per
/// stream it holds.
fn reports_token_burst() -> usize {
    safemode_grpc::REPORT_TOKEN_BURST
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_token_fills_only_its_share_and_is_told() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let flooder = principals.token("subscriber");
    let commander = crate::support::control_as(&server, Some(principals.token("commander"))).await;
    let apply = |mode: &'static str| {
        let request = proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: vec![mode.into()],
            reason: "flood test".into(),
            ..Default::default()
        };
        let mut commander = commander.clone();
        async move {
            commander
                .apply_modes(request)
                .await
                .expect("apply")
                .into_inner()
                .revision
        }
    };
    // Revisions to report on: enough distinct rows to fill a share.
    let mut newest = 0;
    for mode in [
        "bots-faq-only",
        "step-up-account-changes",
        "freeze-credential-changes",
        "review-refunds-payouts",
        "verified-channels-only",
        "throttle-high-risk",
    ] {
        newest = apply(mode).await;
    }
    assert!(newest >= 6);
    // One report of 800 distinct rows on each of 32 streams, within a
    // second or two: the token's share of each 10-second bucket (2,500 new
    // rows) is full within the first few.
    let mut streams = Vec::new();
    for i in 0..32 {
        let id = format!("flood-{i}");
        let raw = RawSubscriber::connect_as(server.channel().await, hello("ivr", &id), flooder)
            .await
            .expect("the stream opens");
        streams.push(raw);
    }
    let (mut counted, mut left_out) = (0, 0);
    for (i, raw) in streams.iter().enumerate() {
        let answer = report_once(raw, distinct_rows(i, newest)).await;
        assert!(answer.accepted, "{answer:?}");
        if answer.left_out > 0 {
            assert!(
                answer.reason.contains(
                    "this token added 2500 new rows to the report book in these 10 seconds"
                ),
                "{}",
                answer.reason
            );
            assert!(
                answer.reason.starts_with(&format!(
                    "{} of its 800 rows were left out",
                    answer.left_out
                )),
                "{}",
                answer.reason
            );
        }
        counted += FLOOD_ROWS - answer.left_out as usize;
        left_out += answer.left_out as usize;
    }
    // Each row makes a book row (and an old revision's a subscriber row, in
    // the same share): at most three buckets' shares were taken.
    assert!(left_out > 0);
    assert!((2_000..=7_500).contains(&counted), "{counted} rows counted");
    // Another channel's token still reports, and its count is whole.
    let keys = server.trusted_keys_file().display().to_string();
    let out = safemode(&[
        "--server",
        &server.url,
        "--token",
        principals.token("subscriber2"),
        "signal",
        "login.failed",
        "--count",
        "500",
        "--channel",
        "web",
        "--trusted-keys",
        &keys,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = insights_json_as(&server, Some(principals.token("viewer"))).await;
    assert_eq!(
        shown["signals"],
        serde_json::json!([{"channel": "web", "name": "login.failed", "count": 500}])
    );
    assert_eq!(shown["partial"], true, "rows were left out: counts are low");
    let named: Vec<&str> = shown["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["why"], "left_out");
            r["subscriber"].as_str().unwrap()
        })
        .collect();
    assert!(named.iter().any(|n| n.starts_with("flood-")), "{named:?}");
    assert!(!named.contains(&"flood-0"), "{named:?}");
    // Its policy streams go on.
    let revision = apply("handoff-guard").await;
    for raw in &streams {
        wait_until("a flooding stream gets the change", || async {
            raw.received
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.revision == revision)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_demoted_to_viewer_stops_reporting_at_once() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.tokens_reload = Duration::from_millis(50);
    })
    .await;
    let token = principals.token("subscriber");
    let raw = RawSubscriber::connect_as(server.channel().await, hello("web", "demoted"), token)
        .await
        .expect("the stream opens");
    let taken = report_once(&raw, one_signal("login.failed", 3)).await;
    assert!(taken.accepted, "{taken:?}");
    // The same token, now a viewer: it may still watch the policy.
    let viewer_line = format!(
        "- {{principal: subscriber, roles: [viewer], sha256: {}}}\n",
        safemode_controller::auth::hash_token(token)
    );
    std::fs::write(principals.file.path(), viewer_line).unwrap();
    // Its next report is refused for its role, whenever the file is read;
    // the stream stays open.
    let answer = wait_for("a report refused for the role", || async {
        let answer = report_once(&raw, one_signal("login.failed", 3)).await;
        answer.reason.contains("may not").then_some(answer)
    })
    .await;
    assert!(!answer.accepted);
    assert!(answer.reason.contains("report"), "{}", answer.reason);
    assert!(raw.ended.lock().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_offers_no_path_is_never_the_easiest_path() {
    // Credential changes frozen on four channels; the other two route
    // customers to a frozen channel, or serve everything read-only: no
    // channel offers a password reset, and the map says the channels differ.
    for other in ["verified-channels-only", "read-only-last-known-good"] {
        let server = TestServer::start().await;
        let mut control = server.control().await;
        for (mode, channels) in [
            (
                "freeze-credential-changes",
                &["chatbot", "mobile", "email", "web"][..],
            ),
            (other, &["agent-desk", "ivr"][..]),
        ] {
            control
                .apply_modes(proto::ApplyModesRequest {
                    namespace: "live".into(),
                    modes: vec![mode.into()],
                    channels: channels.iter().map(|c| c.to_string()).collect(),
                    reason: "takeover wave".into(),
                    ..Default::default()
                })
                .await
                .expect("apply");
        }
        let shown = insights_json(&server).await;
        let dead: Vec<&str> = shown["dead_ends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["action"].as_str().unwrap())
            .collect();
        assert!(
            dead.contains(&"account.password_reset"),
            "{other}: {dead:?}"
        );
        for map in shown["static_map"].as_array().unwrap() {
            let effects: std::collections::BTreeSet<&str> = map["channels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["effect"].as_str().unwrap())
                .collect();
            assert_eq!(map["differs"], effects.len() > 1, "{other}: {map}");
            let Some(easiest) = map.get("easiest_channel").and_then(Value::as_str) else {
                continue;
            };
            let action = map["action"].as_str().unwrap();
            assert!(
                !dead.contains(&action),
                "{other}: a dead end named easiest: {map}"
            );
            let outcome = map["channels"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["channel"] == easiest)
                .unwrap();
            assert!(
                !["route", "deny"].contains(&outcome["effect"].as_str().unwrap()),
                "{other}: {map}"
            );
        }
        let reset = shown["static_map"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["action"] == "account.password_reset")
            .unwrap();
        assert!(reset.get("easiest_channel").is_none(), "{other}: {reset}");
        assert_eq!(reset["differs"], true, "{other}: {reset}");
        let text = insights(&server, None, &["insights"]).await;
        let text = String::from_utf8_lossy(&text.stdout);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("account.password_reset:"))
            .unwrap();
        assert!(!line.contains("easiest"), "{other}: {line}");
        assert!(!line.contains("on every channel"), "{other}: {line}");
        assert!(line.contains("chatbot deny"), "{other}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_needs_the_subscriber_role_and_insights_the_viewer_role() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let keys = server.trusted_keys_file().display().to_string();
    let signal = |role: &'static str| {
        let token = principals.token(role).to_string();
        let keys = keys.clone();
        let url = server.url.clone();
        async move {
            safemode(&[
                "--server",
                &url,
                "--token",
                &token,
                "signal",
                "login.failed",
                "--count",
                "3",
                "--channel",
                "web",
                "--trusted-keys",
                &keys,
            ])
            .await
        }
    };
    let ok = signal("subscriber").await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).lines().next(),
        Some("reported login.failed 3 on web in live")
    );
    // Who may not subscribe may not report.
    let refused = signal("viewer").await;
    assert_eq!(refused.status.code(), Some(1));
    let line = stderr_line(&refused);
    assert!(
        line.contains("viewer") && line.contains("subscribe"),
        "{line}"
    );

    let cases: [(&str, Option<i32>); 4] = [
        ("viewer", Some(0)),
        ("commander", Some(0)),
        ("subscriber", Some(1)),
        ("drill", Some(1)),
    ];
    for (role, code) in cases {
        let out = insights(
            &server,
            Some(principals.token(role)),
            &["insights", "--output", "json"],
        )
        .await;
        assert_eq!(
            out.status.code(),
            code,
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if code == Some(0) {
            let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                shown["signals"],
                serde_json::json!([{"channel": "web", "name": "login.failed", "count": 3}]),
                "{role}"
            );
        } else {
            let line = stderr_line(&out);
            assert!(
                line.contains(&format!("{role} (roles: {role}) may not read"))
                    && line.contains("viewer"),
                "{role}: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_line_and_changes_nothing() {
    let server = TestServer::start().await;
    let keys = server.trusted_keys_file().display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &["signal", "Login Failed", "--channel", "web"],
            "bad signal name",
        ),
        (
            &["signal", "login.failed", "--count", "0", "--channel", "web"],
            "0 is not in 1..=1000000",
        ),
        (
            &["signal", "login.failed", "--channel", "fax"],
            "unknown channel",
        ),
        (&["insights", "--window", "5m"], "give 1m or 15m"),
        (&["insights", "--namespace", "prod"], "namespace"),
    ];
    for (args, expected) in cases {
        let mut all: Vec<&str> = args.to_vec();
        if args[0] == "signal" {
            all.extend(["--trusted-keys", &keys]);
        }
        let out = insights(&server, None, &all).await;
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let line = stderr_line(&out);
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    let shown = insights_json(&server).await;
    assert_eq!(shown["signals"], serde_json::json!([]));
    assert_eq!(shown["decisions"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_sum_the_reports_of_every_replica() {
    let etcd = crate::etcd::EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let a = crate::fleet::replica("r-a", &endpoints);
    let b = crate::fleet::replica("r-b", &endpoints);
    let keys = crate::support::key_file_of(&a.url).expect("the fleet's key");
    let keys = keys.display().to_string();
    for (url, channel, count) in [
        (&a.url, "web", "120"),
        (&b.url, "web", "90"),
        (&b.url, "ivr", "5"),
    ] {
        let out = safemode(&[
            "--server",
            url,
            "signal",
            "login.failed",
            "--count",
            count,
            "--channel",
            channel,
            "--trusted-keys",
            &keys,
        ])
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for url in [&a.url, &b.url] {
        let out = safemode(&[
            "--server", url, "insights", "--output", "json", "--window", "1m",
        ])
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            shown["signals"],
            serde_json::json!([
                {"channel": "web", "name": "login.failed", "count": 210},
                {"channel": "ivr", "name": "login.failed", "count": 5},
            ]),
            "from {url}: {shown}"
        );
        assert_eq!(shown["partial"], false, "{shown}");
        let answered: Vec<(&str, bool)> = shown["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["replica"].as_str().unwrap(),
                    r["answered"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(answered, vec![("r-a", true), ("r-b", true)], "{shown}");
    }
    // A replica that dies is named, and the sum says it is partial.
    b.kill();
    let out = safemode(&["--server", &a.url, "insights", "--output", "json"]).await;
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["partial"], true, "{shown}");
    assert_eq!(
        shown["signals"],
        serde_json::json!([{"channel": "web", "name": "login.failed", "count": 120}]),
        "{shown}"
    );
    assert!(
        shown["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("replica r-b (")),
        "{shown}"
    );
}
