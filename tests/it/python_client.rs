//! The Python subscriber in `clients/python/`, against a real server: built
//! from `proto/` alone (its gRPC code is generated at test time with
//! grpcio-tools), it must subscribe, ack what it applies, and reach the same
//! decision as the Rust client (`safemode decide`) for a table of channels,
//! actions and contexts, at two policy revisions. Its own tests of the
//! protocol edges (rejects, heartbeats, the token) run here too.
//!
//! Python 3 with grpcio and grpcio-tools is required: a missing one fails the
//! test with the command that installs it (`scripts/test` runs that command).
//! `SAFEMODE_PYTHON` names another interpreter, e.g. a virtualenv's.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use safemode_controller::ControllerConfig;
use safemode_grpc::server::{ServeConfig, StoreConfig};
use safemode_wire::proto;
use serde_json::{Value, json};

use crate::support::{DEADLINE, TestServer, safemode, wait_for};

const INSTALL: &str = "python3 -m pip install grpcio grpcio-tools";

fn python() -> String {
    std::env::var("SAFEMODE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

/// Fails the test, saying how to install them, unless Python 3, grpcio and
/// grpcio-tools are there.
fn require_python() {
    let python = python();
    let output = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "'{python}' cannot be run ({e}). The Python client test needs Python 3 with \
                 grpcio and grpcio-tools: install Python 3, then `{INSTALL}` \
                 (scripts/test does this), or set SAFEMODE_PYTHON to an interpreter that has them"
            )
        });
    assert!(
        output.status.success(),
        "'{python}' cannot import grpcio and grpcio-tools:\n{}\nInstall them with `{INSTALL}` \
         (scripts/test does this), or set SAFEMODE_PYTHON to an interpreter that has them",
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
}

// === The policy under test ===

/// Test-only modes beside the standard ones, for what no standard mode
/// reaches: two routes with no channel in common (decides as deny), a
/// narrowed route, a step-up whose methods merge to none (escalates to
/// review), and a condition on the hand-off flag being false.
const EXTRA_MODES: &[(&str, &str)] = &[
    (
        "payouts-on-web.yaml",
        r#"title: Payouts on the website only
summary: Payouts are not made on the chatbot, email or the agent desk; the customer is sent to the website.
customer_notice: Please request payouts on our website.
rules:
  - channels: [chatbot, email]
    actions: [payment.payout]
    effect:
      route:
        to: [web]
  - channels: [agent-desk]
    actions: [payment.payout]
    effect:
      route:
        to: [web, mobile]
"#,
    ),
    (
        "contact-codes.yaml",
        r#"title: Contact-point codes for email changes
summary: Email changes on web and mobile need a code sent to the phone or the old address; order views are capped outside bot hand-offs.
agent_script: Ask for the code sent to the phone or the current email address.
rules:
  - channels: [web, mobile]
    actions: [account.email_change]
    effect:
      step_up:
        min_confidence: 0.5
        methods: [sms_otp, email_otp]
        max_attempts: 5
        escalate_to: contact-review
    customer_message: Enter the code we sent to your phone or your current email address.
  - channels: ["*"]
    actions: [order.view]
    when:
      handoff_from_bot: false
    effect:
      throttle:
        max: 20
        window: 30m
"#,
    ),
];

/// A change to the `live` namespace.
enum Change {
    Apply {
        modes: &'static [&'static str],
        channels: &'static [&'static str],
        as_of: Option<&'static str>,
    },
    Lift(&'static str),
}

/// Phase 1 covers step-up (merged across modes), throttles (standing and
/// conditional), the hand-off guard, bots limited on IVR only, read-only on
/// email, routes and the test-only modes; phase 2 adds freezes, review,
/// verified-channel routing, a second read-only with an earlier time (the
/// earliest wins) and lifts the incident notice.
const PHASES: &[&[Change]] = &[
    &[
        Change::Apply {
            modes: &[
                "step-up-account-changes",
                "throttle-high-risk",
                "handoff-guard",
                "recovery-verified-paths",
                "incident-notice",
                "payouts-on-web",
                "contact-codes",
            ],
            channels: &[],
            as_of: None,
        },
        Change::Apply {
            modes: &["bots-faq-only"],
            channels: &["ivr"],
            as_of: None,
        },
        Change::Apply {
            modes: &["read-only-last-known-good"],
            channels: &["email"],
            as_of: Some("2026-01-02T03:04:05.5Z"),
        },
    ],
    &[
        Change::Apply {
            modes: &[
                "freeze-phone-changes",
                "review-refunds-payouts",
                "verified-channels-only",
            ],
            channels: &[],
            as_of: None,
        },
        Change::Apply {
            modes: &["step-up-no-sms"],
            channels: &["web", "mobile"],
            as_of: None,
        },
        Change::Apply {
            modes: &["read-only-last-known-good"],
            channels: &["email", "mobile"],
            as_of: Some("2025-12-31T23:59:59.123456789Z"),
        },
        Change::Lift("incident-notice"),
    ],
];

const CHANNELS: &[&str] = &["chatbot", "ivr", "agent-desk", "web", "mobile", "email"];

const ACTIONS: &[&str] = &[
    "account.password_reset",
    "account.email_change",
    "account.phone_change",
    "account.mfa_reset",
    "account.recovery",
    "payment.refund",
    "payment.payout",
    "order.view",
    "balance.view",
    "bot.intent.faq",
    "bot.intent.order_status",
    "bot.intent.reset_password",
    "contact.intake",
    "handoff.ai_to_human",
];

/// Decision contexts, in the Python client's field names.
fn contexts() -> Vec<Value> {
    vec![
        json!({}),
        json!({"confidence": 0.95, "methods": ["push"]}),
        json!({"confidence": 0.95, "methods": ["totp"]}),
        json!({"confidence": 0.85, "methods": ["webauthn"]}),
        json!({"confidence": 0.99, "methods": ["sms_otp", "email_otp"]}),
        json!({"confidence": 0.5, "methods": ["push"], "failed_attempts": 1}),
        json!({"confidence": 0.95, "methods": ["push"], "failed_attempts": 2}),
        json!({"failed_attempts": 3}),
        json!({"confidence": 0.95, "methods": ["push"], "amount": 100.0}),
        json!({"amount": 900.0}),
        json!({"handoff_from_bot": true, "confidence": 0.95, "methods": ["push"], "amount": 100.0}),
        json!({"handoff_from_bot": true, "bot_flags": ["suspected_takeover"], "amount": 50.0}),
        json!({
            "handoff_from_bot": true,
            "bot_flags": ["loyal_customer"],
            "confidence": 0.95,
            "methods": ["webauthn"],
            "amount": 20.0
        }),
        json!({"handoff_from_bot": true, "confidence": 0.5, "methods": ["password"]}),
    ]
}

/// The cases of one channel: every action in every context.
fn cases() -> Vec<Value> {
    let contexts = contexts();
    ACTIONS
        .iter()
        .flat_map(|action| {
            contexts
                .iter()
                .map(move |context| json!({"action": action, "context": context}))
        })
        .collect()
}

/// `safemode decide` arguments for a case's context.
fn decide_args(context: &Value) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(c) = context.get("confidence") {
        args.extend(["--confidence".to_string(), c.to_string()]);
    }
    for method in context
        .get("methods")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        args.extend(["--method".to_string(), method.as_str().unwrap().to_string()]);
    }
    if let Some(n) = context.get("failed_attempts") {
        args.extend(["--attempts".to_string(), n.to_string()]);
    }
    if let Some(amount) = context.get("amount") {
        args.extend(["--amount".to_string(), amount.to_string()]);
    }
    if context.get("handoff_from_bot") == Some(&Value::Bool(true)) {
        args.push("--handoff".to_string());
    }
    for flag in context
        .get("bot_flags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        args.extend(["--bot-flag".to_string(), flag.as_str().unwrap().to_string()]);
    }
    args
}

/// The parameters each effect carries in a decision.
fn parameters(effect: &str) -> &'static [&'static str] {
    match effect {
        "allow" => &[],
        "throttle" => &["max", "window_seconds"],
        "step_up" => &[
            "min_confidence",
            "methods",
            "max_attempts",
            "escalate_queue",
            "attempts_left",
        ],
        "review" => &["queue", "escalated"],
        "read_only" => &["as_of"],
        "route" => &["to"],
        "deny" => &["alternative"],
        other => panic!("unknown effect '{other}'"),
    }
}

// === The server ===

/// A server whose catalogue is the standard modes plus [`EXTRA_MODES`].
async fn server_with_extra_modes(dir: &Path) -> TestServer {
    let modes = dir.join("modes");
    std::fs::create_dir_all(&modes).unwrap();
    let standard = Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/modes");
    for entry in std::fs::read_dir(&standard).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, modes.join(path.file_name().unwrap())).unwrap();
        }
    }
    for (name, text) in EXTRA_MODES {
        std::fs::write(modes.join(name), text).unwrap();
    }
    TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreConfig::Embedded {
            data_dir: dir.join("data"),
        },
        modes_dir: Some(modes),
        controller: ControllerConfig {
            catch_up_timeout: Duration::from_millis(300),
            ..ControllerConfig::default()
        },
        ..ServeConfig::default()
    })
    .await
}

/// Makes `change`; returns its revision.
async fn change(server: &TestServer, change: &Change) -> i64 {
    match change {
        Change::Apply {
            modes,
            channels,
            as_of,
        } => {
            let as_of = as_of
                .map(|t| safemode_wire::timestamp_to_wire(t.parse::<jiff::Timestamp>().unwrap()));
            let response = server
                .control()
                .await
                .apply_modes(proto::ApplyModesRequest {
                    namespace: "live".into(),
                    modes: modes.iter().map(|m| m.to_string()).collect(),
                    channels: channels.iter().map(|c| c.to_string()).collect(),
                    reason: "python client test".into(),
                    as_of,
                    change_id: String::new(),
                    dry_run: false,
                })
                .await
                .expect("apply")
                .into_inner();
            assert_eq!(
                response.applied.len(),
                modes.len(),
                "every mode is newly applied: {response:?}"
            );
            response.revision
        }
        Change::Lift(mode) => {
            let response = server
                .control()
                .await
                .lift_activations(proto::LiftActivationsRequest {
                    namespace: "live".into(),
                    targets: vec![mode.to_string()],
                    reason: "python client test".into(),
                    all: false,
                    incident_ok: false,
                    change_id: String::new(),
                    dry_run: false,
                })
                .await
                .expect("lift")
                .into_inner();
            assert_eq!(response.lifted.len(), 1, "{mode} is lifted: {response:?}");
            response.revision
        }
    }
}

/// The server's status, as `safemode status --output json` prints it.
async fn status(server: &TestServer) -> Value {
    let out = safemode(&["--server", &server.url, "--output", "json", "status"]).await;
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

/// Waits until status shows `subscriber_id` having acked `revision`.
async fn wait_for_ack(server: &TestServer, subscriber_id: &str, revision: i64) {
    wait_for(
        &format!("status to show {subscriber_id} acked revision {revision}"),
        || async {
            let status = status(server).await;
            status["subscribers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["subscriber_id"] == subscriber_id && s["acked_revision"] == revision)
                .then_some(())
        },
    )
    .await;
}

// === The Rust client ===

/// Runs `safemode decide --output json` for a case.
async fn decide(server: &TestServer, channel: &str, action: &str, context: &Value) -> String {
    let mut args: Vec<String> = vec!["--server".into(), server.url.clone()];
    args.extend(["--output".into(), "json".into()]);
    args.extend(["decide", "--channel", channel, "--action", action].map(String::from));
    args.extend(decide_args(context));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = safemode(&args).await;
    assert!(
        out.status.success(),
        "safemode {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("decide prints UTF-8")
}

/// The Rust client's decision: `safemode decide --output json`.
async fn rust_decision(server: &TestServer, channel: &str, action: &str, context: &Value) -> Value {
    let out = decide(server, channel, action, context).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("decide printed {out:?}: {e}"))
}

// === The Python client ===

/// `clients/python/safemode_client.py --stay`: one subscriber, answering a
/// JSON line of cases per request. Killed on drop.
struct PythonSubscriber {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: PathBuf,
}

impl PythonSubscriber {
    fn start(
        server: &TestServer,
        channel: &str,
        id: &str,
        cases: &Path,
        min_revision: i64,
    ) -> Self {
        Self::start_at(
            &server.addr().to_string(),
            channel,
            id,
            cases,
            min_revision,
            &[],
        )
    }

    /// Like [`PythonSubscriber::start`], on `address`, with `extra` flags.
    fn start_at(
        address: &str,
        channel: &str,
        id: &str,
        cases: &Path,
        min_revision: i64,
        extra: &[&str],
    ) -> Self {
        let stderr = cases.with_file_name(format!("{id}.stderr"));
        let mut child = Command::new(python())
            .arg(client_dir().join("safemode_client.py"))
            .args(["--server", address, "--channel", channel])
            .args(extra)
            .args(["--namespace", "live", "--subscriber-id", id])
            .arg("--cases")
            .arg(cases)
            .args(["--min-revision", &min_revision.to_string(), "--stay"])
            .args(["--timeout", &DEADLINE.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{} cannot be run: {e}; {INSTALL}", python()));
        PythonSubscriber {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            stderr,
        }
    }

    /// The next answer; fails with the client's error output if there is none.
    /// The client gives up by itself at `--timeout`, so this cannot hang.
    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the client");
        if line.is_empty() {
            let status = self.child.wait().expect("wait for the client");
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            panic!("the Python client ended ({status}) without an answer:\n{err}");
        }
        serde_json::from_str(&line).expect("the client prints JSON")
    }

    fn ask(&mut self, cases: &[Value], min_revision: i64) -> Value {
        let request = json!({"min_revision": min_revision, "cases": cases});
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{request}").expect("write to the client");
        stdin.flush().unwrap();
        self.answer()
    }

    /// Closes its input and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the Python client exited with {status}:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the Python client did not exit at end of input"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PythonSubscriber {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// === The comparison ===

/// What the two clients decided differently, if anything.
fn difference(python: &Value, rust: &Value) -> Option<String> {
    let Some(effect) = python["effect"].as_str() else {
        return Some(format!("the Python decision has no effect: {python}"));
    };
    let mut keys: Vec<&str> = vec!["effect", "reasons", "customer_message", "agent_script"];
    keys.extend(parameters(effect));
    let extra: Vec<&String> = python
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .filter(|k| !keys.contains(&k.as_str()))
        .collect();
    if !extra.is_empty() {
        return Some(format!(
            "the Python decision has unexpected fields {extra:?}"
        ));
    }
    let differing: Vec<String> = keys
        .iter()
        .filter_map(|&key| {
            let theirs = &rust[key];
            (python.get(key) != Some(theirs)).then(|| {
                format!(
                    "{key}: python {} rust {theirs}",
                    python.get(key).unwrap_or(&Value::Null)
                )
            })
        })
        .collect();
    (!differing.is_empty()).then(|| differing.join("; "))
}

#[tokio::test(flavor = "multi_thread")]
async fn python_subscriber_decides_like_the_rust_client() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_extra_modes(dir.path()).await;
    let cases = cases();
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&cases).unwrap()).unwrap();

    let mut subscribers: Vec<(&str, String, Option<PythonSubscriber>)> = CHANNELS
        .iter()
        .map(|c| (*c, format!("py-{c}"), None))
        .collect();
    let mut compared = 0;
    let mut mismatches = Vec::new();
    // Effects seen, with the resolutions that matter: an escalated step-up,
    // a step-up passed into its standing throttle, a route left with no
    // channel (deny without an alternative).
    let mut seen = BTreeSet::new();
    for (phase, changes) in PHASES.iter().enumerate() {
        let mut revision = 0;
        for c in *changes {
            revision = change(&server, c).await;
        }
        for (channel, id, python) in &mut subscribers {
            // Phase 1 starts each subscriber; later phases ask the same one,
            // which must have followed the newer revisions on its stream.
            let answer = match python {
                None => {
                    let mut started =
                        PythonSubscriber::start(&server, channel, id, &cases_file, revision);
                    let answer = tokio::task::block_in_place(|| started.answer());
                    *python = Some(started);
                    answer
                }
                Some(p) => tokio::task::block_in_place(|| p.ask(&cases, revision)),
            };
            assert_eq!(answer["revision"], revision, "{channel}: {answer}");
            assert_eq!(answer["channel"], *channel);
            wait_for_ack(&server, id, revision).await;

            let decisions = answer["decisions"].as_array().expect("decisions");
            assert_eq!(decisions.len(), cases.len());
            for (case, ours) in cases.iter().zip(decisions) {
                let (action, context) = (case["action"].as_str().unwrap(), &case["context"]);
                let theirs = rust_decision(&server, channel, action, context).await;
                assert_eq!(theirs["revision"], revision, "{channel} {action}: {theirs}");
                compared += 1;
                let effect = ours["effect"].as_str().unwrap_or("?").to_string();
                seen.insert(match effect.as_str() {
                    "review" if ours["escalated"] == true => "review (escalated step-up)".into(),
                    "throttle"
                        if action.starts_with("account.") && context["methods"].is_array() =>
                    {
                        "throttle (step-up passed)".into()
                    }
                    "deny" if ours["alternative"].is_null() => "deny (no alternative)".into(),
                    _ => effect,
                });
                if let Some(diff) = difference(ours, &theirs) {
                    mismatches.push(format!(
                        "phase {} {channel} {action} {context}: {diff}",
                        phase + 1
                    ));
                }
            }
        }
    }
    for (_, _, python) in subscribers {
        python.expect("started").finish();
    }
    eprintln!(
        "compared {compared} decisions of the Python and Rust clients; effects seen: {seen:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} of {compared} decisions differ:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for effect in [
        "allow",
        "throttle",
        "throttle (step-up passed)",
        "step_up",
        "review",
        "review (escalated step-up)",
        "read_only",
        "route",
        "deny",
        "deny (no alternative)",
    ] {
        assert!(
            seen.contains(effect),
            "the table never decided {effect}; seen {seen:?}"
        );
    }
}

#[test]
fn python_client_protocol_tests() {
    require_python();
    let out = Command::new(python())
        .args(["-m", "unittest", "-v", "test_safemode_client"])
        .current_dir(client_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run the Python tests");
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python client reports its decisions (insights count them) and, when
/// its controller goes away, reconnects to the one restarted on the same
/// address, naming the revision it holds.
#[tokio::test(flavor = "multi_thread")]
async fn python_subscriber_reports_and_reconnects() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.display().to_string();
    let address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let server = crate::support::ServeProcess::start_on(&address, &["--data-dir", &data_arg], &[]);
    let cases = dir.path().join("cases.json");
    let case = json!({"action": "account.email_change", "context": {"confidence": 0.3}});
    std::fs::write(&cases, json!([case, case, case]).to_string()).unwrap();
    let mut python =
        PythonSubscriber::start_at(&address, "web", "py-report", &cases, 0, &["--report"]);
    let first = python.answer();
    assert_eq!(first["report"], "accepted", "{first}");
    let insights = safemode(&["--server", &server.url, "--output", "json", "insights"]).await;
    assert!(
        insights.status.success(),
        "{}",
        String::from_utf8_lossy(&insights.stderr)
    );
    let insights: Value = serde_json::from_slice(&insights.stdout).unwrap();
    assert_eq!(insights["decisions"], 3, "{insights}");

    // The controller dies and comes back on the same address.
    server.kill();
    let server = crate::support::ServeProcess::start_on(&address, &["--data-dir", &data_arg], &[]);
    let applied = safemode(&[
        "--server",
        &server.url,
        "--output",
        "json",
        "mode",
        "apply",
        "bots-faq-only",
        "--reason",
        "python reconnect test",
    ])
    .await;
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let revision = serde_json::from_slice::<Value>(&applied.stdout).unwrap()["revision"]
        .as_i64()
        .expect("the change's revision");
    let after = python.ask(&[case], revision);
    assert_eq!(after["revision"], revision, "{after}");
    assert!(after["reconnects"].as_u64().unwrap() >= 1, "{after}");
    assert_eq!(after["report"], "accepted", "{after}");
    python.finish();
}
