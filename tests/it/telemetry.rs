//! Issue 12, item 2: metrics and traces with OpenTelemetry.
//!
//! - `/metrics` after a flip, with subscribers of every kind connected
//!   (acking, silent, rejecting), parsed by Python's `prometheus_client`
//!   text parser (`tests/telemetry/parse_metrics.py`): the subscriber gauge
//!   is the connected subscribers in their states, the convergence
//!   histogram counted the acks of the flip, commits by kind, a refused
//!   call, a pending request.
//! - A trace: a controller exporting OTLP to a receiver built on the
//!   `opentelemetry-proto` and `grpcio` packages
//!   (`tests/telemetry/otlp_receiver.py`), and `safemode mode apply` with the
//!   same variables: the CLI's span and the controller's commit span are
//!   one trace, the commit a descendant of the CLI's span; an incoming
//!   `TRACEPARENT` puts the CLI's span in the caller's trace.
//! - The client crate's metrics, read with the SDK's in-memory
//!   `ManualReader`: decisions by action and effect, the applied revision.
//!
//! Python 3 with prometheus-client, opentelemetry-proto and grpcio is
//! required: a missing one fails the test with the command that installs it
//! (`scripts/test` runs that command). `SAFEMODE_PYTHON` names another
//! interpreter.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use safemode_grpc::server::ServeConfig;
use safemode_policy::{Action, Context};
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscribe_response::Message as Inbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use safemode_wire::proto::{self, SubscribeRequest};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{
    Principals, ServeProcess, TestServer, control_as, key_file_for, wait_for, wait_until,
};
use crate::ux_http::get;

const INSTALL: &str = "python3 -m pip install prometheus-client opentelemetry-proto grpcio";

fn python() -> String {
    std::env::var("SAFEMODE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/telemetry")
        .join(name)
}

/// Fails the test, saying how to install them, unless Python 3 and the
/// packages the scripts import are there.
fn require_python() {
    let python = python();
    let output = Command::new(&python)
        .args([
            "-c",
            "import prometheus_client, grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "'{python}' cannot be run ({e}). The telemetry tests need Python 3 with \
                 prometheus-client, opentelemetry-proto and grpcio: install Python 3, then \
                 `{INSTALL}` (scripts/test does this), or set SAFEMODE_PYTHON"
            )
        });
    assert!(
        output.status.success(),
        "'{python}' cannot import prometheus-client, opentelemetry-proto and grpcio:\n{}\n\
         Install them with `{INSTALL}` (scripts/test does this), or set SAFEMODE_PYTHON",
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
}

// === /metrics ===

/// A scrape of `/metrics`, parsed by `prometheus_client`: family name to
/// its type and samples.
async fn scrape(http: std::net::SocketAddr) -> BTreeMap<String, Value> {
    let (code, text) = get(http, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(python())
            .arg(script("parse_metrics.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "prometheus_client refused /metrics:\n{}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("parse_metrics.py prints JSON")
    })
    .await
    .unwrap()
}

/// The samples named `sample` in `family`, as (labels without `namespace`
/// when it is `live`, value), sorted.
fn samples(families: &BTreeMap<String, Value>, family: &str, sample: &str) -> Vec<(String, f64)> {
    let Some(found) = families.get(family) else {
        return Vec::new();
    };
    let mut out: Vec<(String, f64)> = found["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == sample)
        .map(|s| {
            let labels: Vec<String> = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            (labels.join(","), s["value"].as_f64().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The value of the one sample named `sample` with exactly `labels`.
fn value(families: &BTreeMap<String, Value>, family: &str, sample: &str, labels: &str) -> f64 {
    samples(families, family, sample)
        .into_iter()
        .find(|(l, _)| l == labels)
        .map_or(0.0, |(_, v)| v)
}

/// How a test stream answers each snapshot.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Ack,
    Reject,
    Nothing,
}

/// A subscription stream with a token, answering every snapshot as told;
/// it records the revisions it received.
struct Stream {
    revisions: Arc<Mutex<Vec<i64>>>,
    _out: mpsc::Sender<SubscribeRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    async fn open(
        server: &TestServer,
        token: &str,
        channel: &str,
        id: &str,
        answer: Answer,
    ) -> Self {
        let (out, rx) = mpsc::channel(16);
        out.send(SubscribeRequest {
            message: Some(Outbound::Hello(proto::Hello {
                namespace: "live".into(),
                channel: channel.into(),
                subscriber_id: id.into(),
                last_applied_revision: 0,
                epoch: String::new(),
            })),
        })
        .await
        .unwrap();
        let mut client = SubscriptionServiceClient::with_interceptor(
            server.channel().await,
            safemode_client::Bearer::new(Some(token)).unwrap(),
        );
        let mut inbound = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .expect("the stream opens")
            .into_inner();
        let revisions = Arc::new(Mutex::new(Vec::new()));
        let (seen, answers) = (revisions.clone(), out.clone());
        let task = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let Some(Inbound::Snapshot(snapshot)) = message.message else {
                    continue;
                };
                let revision = snapshot.revision;
                let reply = match answer {
                    Answer::Ack => Some(Outbound::Ack(proto::Ack { revision })),
                    Answer::Reject => Some(Outbound::Reject(proto::Reject {
                        revision,
                        reason: "cannot apply it".into(),
                    })),
                    Answer::Nothing => None,
                };
                if let Some(reply) = reply
                    && answers
                        .send(SubscribeRequest {
                            message: Some(reply),
                        })
                        .await
                        .is_err()
                {
                    return;
                }
                seen.lock().unwrap().push(revision);
            }
        });
        Stream {
            revisions,
            _out: out,
            task,
        }
    }

    fn got(&self, revision: i64) -> bool {
        self.revisions.lock().unwrap().contains(&revision)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The revision of `live`, read as `token`.
async fn revision(server: &TestServer, token: &str) -> i64 {
    safemode_wire::full_status(&mut control_as(server, Some(token)).await, "live")
        .await
        .expect("status")
        .revision
}

/// Runs the `safemode` binary against `server` as `token`: exit code and
/// stdout.
async fn cli(server: &TestServer, token: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["--server", server.url.as_str(), "--token", token];
    all.extend_from_slice(args);
    let output = crate::support::safemode(&all).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_flip_counts_the_fleet_the_convergence_and_the_commits() {
    require_python();
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config: &mut ServeConfig| {
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
        config.replica = Some("metrics-1".into());
    })
    .await;
    let http = server.http_addr().expect("an HTTP listener");
    let token = principals.token("subscriber");
    let streams = [
        ("web", "web-1", Answer::Ack),
        ("web", "web-2", Answer::Ack),
        ("chatbot", "bot-1", Answer::Ack),
        ("ivr", "ivr-1", Answer::Nothing),
        ("email", "email-1", Answer::Reject),
    ];
    let mut open = Vec::new();
    for (channel, id, answer) in streams {
        open.push(Stream::open(&server, token, channel, id, answer).await);
    }
    let viewer = principals.token("viewer");
    let first = revision(&server, viewer).await;
    wait_until("every stream has its first snapshot", || {
        let all = open.iter().all(|s| s.got(first));
        async move { all }
    })
    .await;

    // The flip, by a commander; a viewer's try is refused.
    let (code, out) = cli(
        &server,
        principals.token("commander"),
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--reason",
            "flip",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let flipped = revision(&server, viewer).await;
    assert!(flipped > first);
    let (code, out) = cli(
        &server,
        principals.token("viewer"),
        &["mode", "apply", "incident-notice", "--reason", "not mine"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    // A guessed token and none at all: refused before any work, counted.
    for token in [Some("smt_guessed0000000000000000000000000000"), None] {
        let refused = control_as(&server, token)
            .await
            .get_status(safemode_wire::proto::GetStatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    let families = wait_for(
        "the three acks of the flip in the convergence histogram",
        || async {
            let families = scrape(http).await;
            let counted: f64 = samples(
                &families,
                "safemode_convergence_seconds",
                "safemode_convergence_seconds_count",
            )
            .iter()
            .map(|(_, v)| v)
            .sum();
            // The store-backed gauges are read in the background (a scrape
            // never waits on the store): there once it has read them.
            let store_read = families.contains_key("safemode_requests_pending")
                && families.contains_key("safemode_store_lag_revisions");
            (counted == 3.0 && store_read).then_some(families)
        },
    )
    .await;

    // The subscriber gauge is who is connected, in their states.
    assert_eq!(
        samples(&families, "safemode_subscribers", "safemode_subscribers"),
        vec![
            (
                "channel=chatbot,namespace=live,state=SYNCED".to_string(),
                1.0
            ),
            (
                "channel=email,namespace=live,state=REJECTED".to_string(),
                1.0
            ),
            (
                "channel=ivr,namespace=live,state=NOT_ACKED".to_string(),
                1.0
            ),
            ("channel=web,namespace=live,state=SYNCED".to_string(), 2.0),
        ]
    );
    assert_eq!(families["safemode_subscribers"]["type"], "gauge");
    // The convergence histogram counted the flip's acks, per channel, and
    // nothing of the snapshots sent on connecting.
    let histogram = "safemode_convergence_seconds";
    assert_eq!(families[histogram]["type"], "histogram");
    for (channel, count) in [("chatbot", 1.0), ("web", 2.0)] {
        let labels = format!("channel={channel},namespace_kind=live");
        assert_eq!(
            value(&families, histogram, &format!("{histogram}_count"), &labels),
            count,
            "{labels}"
        );
        // Labels sort by name: `le` between the two.
        let top = format!("channel={channel},le=+Inf,namespace_kind=live");
        assert_eq!(
            value(&families, histogram, &format!("{histogram}_bucket"), &top),
            count,
            "{top}"
        );
    }
    // Each table row: family, sample, labels, value.
    let rows: &[(&str, &str, &str, f64)] = &[
        (
            "safemode_snapshots_sent",
            "safemode_snapshots_sent_total",
            "channel=web,namespace_kind=live",
            4.0,
        ),
        (
            "safemode_snapshots_sent",
            "safemode_snapshots_sent_total",
            "channel=ivr,namespace_kind=live",
            2.0,
        ),
        (
            "safemode_snapshots_sent",
            "safemode_snapshots_sent_total",
            "channel=email,namespace_kind=live",
            2.0,
        ),
        (
            "safemode_acks",
            "safemode_acks_total",
            "channel=web,namespace_kind=live",
            4.0,
        ),
        (
            "safemode_acks",
            "safemode_acks_total",
            "channel=chatbot,namespace_kind=live",
            2.0,
        ),
        (
            "safemode_acks",
            "safemode_acks_total",
            "channel=ivr,namespace_kind=live",
            0.0,
        ),
        (
            "safemode_rejects",
            "safemode_rejects_total",
            "channel=email,namespace_kind=live",
            2.0,
        ),
        (
            "safemode_commits",
            "safemode_commits_total",
            "kind=apply",
            1.0,
        ),
        // The viewer's refusal is audited: an entry, committed.
        (
            "safemode_commits",
            "safemode_commits_total",
            "kind=refused",
            1.0,
        ),
        (
            "safemode_commits",
            "safemode_commits_total",
            "kind=lift",
            0.0,
        ),
        (
            "safemode_commits_failed",
            "safemode_commits_failed_total",
            "kind=apply",
            0.0,
        ),
        (
            "safemode_calls_refused",
            "safemode_calls_refused_total",
            "operation=change",
            1.0,
        ),
        (
            "safemode_calls_refused",
            "safemode_calls_refused_total",
            "operation=read",
            0.0,
        ),
        (
            "safemode_calls_unauthenticated",
            "safemode_calls_unauthenticated_total",
            "reason=unknown",
            1.0,
        ),
        (
            "safemode_calls_unauthenticated",
            "safemode_calls_unauthenticated_total",
            "reason=missing",
            1.0,
        ),
        (
            "safemode_namespace_revision",
            "safemode_namespace_revision",
            "namespace=live",
            flipped as f64,
        ),
        (
            "safemode_activations",
            "safemode_activations",
            "namespace=live",
            1.0,
        ),
        (
            "safemode_requests_pending",
            "safemode_requests_pending",
            "namespace=live",
            0.0,
        ),
        (
            "safemode_store_follower_healthy",
            "safemode_store_follower_healthy",
            "namespace=live",
            1.0,
        ),
        (
            "safemode_store_lag_revisions",
            "safemode_store_lag_revisions",
            "namespace=live",
            0.0,
        ),
    ];
    for (family, sample, labels, want) in rows {
        assert!(families.contains_key(*family), "no family {family}");
        assert_eq!(
            value(&families, family, sample, labels),
            *want,
            "{sample}{{{labels}}}"
        );
    }
    let target = samples(&families, "target_info", "target_info");
    assert!(
        target.iter().any(
            |(labels, _)| labels.contains("service_instance_id=metrics-1")
                && labels.contains("service_name=safemode")
        ),
        "{target:?}"
    );

    // A lift that needs a second approver: a pending request, committed as
    // a request.
    let (code, out) = cli(
        &server,
        principals.token("commander"),
        &[
            "mode",
            "lift",
            "freeze-credential-changes",
            "--reason",
            "contained",
        ],
    )
    .await;
    assert_eq!(code, Some(3), "{out}");
    let families = wait_for("the pending request in the gauge", || async {
        let families = scrape(http).await;
        (value(
            &families,
            "safemode_requests_pending",
            "safemode_requests_pending",
            "namespace=live",
        ) == 1.0)
            .then_some(families)
    })
    .await;
    for (family, sample, labels, want) in [
        (
            "safemode_requests_pending",
            "safemode_requests_pending",
            "namespace=live",
            1.0,
        ),
        (
            "safemode_commits",
            "safemode_commits_total",
            "kind=request",
            1.0,
        ),
    ] {
        assert_eq!(
            value(&families, family, sample, labels),
            want,
            "{sample}{{{labels}}}"
        );
    }
    drop(open);
}

// === Traces ===

/// The OTLP receiver: its port, and the file it writes spans to.
struct Receiver {
    child: Child,
    port: u16,
    spans: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spans = dir.path().join("spans.jsonl");
        let mut child = Command::new(python())
            .arg(script("otlp_receiver.py"))
            .arg(&spans)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("otlp_receiver.py printed {line:?}, not its port"));
        Receiver {
            child,
            port,
            spans,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `span` descends from the span `ancestor` among `spans`.
fn descends(spans: &[Value], span: &Value, ancestor: &str) -> bool {
    let mut at = span.clone();
    for _ in 0..16 {
        let parent = at["parent_span_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if parent == ancestor {
            return true;
        }
        match spans.iter().find(|s| s["span_id"] == parent.as_str()) {
            Some(next) => at = next.clone(),
            None => return false,
        }
    }
    false
}

/// Runs the CLI with `args` and the OTLP settings `otel` (and `traceparent`
/// as `TRACEPARENT`, when given), as a commander's shell would; it must
/// succeed.
async fn traced_cli(args: &[&str], otel: &[(&str, &str)], traceparent: Option<&str>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_safemode"));
    command
        .args(args)
        .env_remove("SAFEMODE_SERVER")
        .env_remove("RUST_LOG")
        .env_remove("TRACEPARENT")
        .env("SAFEMODE_TRUSTED_KEYS", key_file_for(args))
        .envs(otel.iter().copied());
    if let Some(traceparent) = traceparent {
        command.env("TRACEPARENT", traceparent);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_apply_and_the_commit_it_caused_are_one_trace() {
    require_python();
    let receiver = Receiver::start();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    let endpoint = receiver.endpoint();
    let otel: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        // Spans leave within a tenth of a second, not the default five.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let serve = ServeProcess::start(&["--data-dir", &dir, "--replica", "traced-1"], otel);

    // (TRACEPARENT given to the CLI, the trace the CLI's span must be in,
    // its parent span, the mode applied)
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let cases: &[(Option<&str>, Option<&str>, &str)] = &[
        (None, None, "incident-notice"),
        (
            Some(&traceparent),
            Some(caller_trace),
            "freeze-phone-changes",
        ),
    ];
    for (given, want_trace, mode) in cases {
        let args = [
            "--server",
            serve.url.as_str(),
            "mode",
            "apply",
            mode,
            "--reason",
            "traced",
        ];
        traced_cli(&args, otel, *given).await;

        let (cli_span, commit) = wait_for("the CLI's span and the commit's, in one trace", || {
            let spans = receiver.spans();
            async move {
                let cli_span = spans.iter().find(|s| {
                    s["name"] == "safemode mode apply"
                        && want_trace.is_none_or(|t| s["trace_id"] == t)
                        && (want_trace.is_some() || s["parent_span_id"] == "")
                })?;
                let commit = spans.iter().find(|s| {
                    s["name"] == "commit apply"
                        && s["trace_id"] == cli_span["trace_id"]
                        && descends(&spans, s, cli_span["span_id"].as_str().unwrap())
                })?;
                Some((cli_span.clone(), commit.clone()))
            }
        })
        .await;
        assert_eq!(cli_span["service"], "safemode");
        assert_eq!(commit["service"], "safemode");
        assert_eq!(
            commit["instance"], "traced-1",
            "the replica names its spans"
        );
        if let Some(trace) = want_trace {
            assert_eq!(cli_span["trace_id"], *trace);
            assert_eq!(cli_span["parent_span_id"], caller_span);
        }
        // The call itself is a server span between them.
        let spans = receiver.spans();
        let rpc = spans
            .iter()
            .find(|s| s["span_id"] == commit["parent_span_id"])
            .expect("the commit's parent was exported");
        assert_eq!(rpc["name"], "safemode.v1.ControlService/ApplyModes");
        assert_eq!(rpc["parent_span_id"], cli_span["span_id"]);
    }
    drop(serve);
}

// === The client crate ===

/// A `ManualReader` the test keeps a handle on after the provider took it.
#[derive(Clone, Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Every u64 sum and i64 gauge point collected: (metric, sorted labels) to
/// value.
fn collected(reader: &SharedReader) -> BTreeMap<(String, String), i64> {
    let mut rm = ResourceMetrics::default();
    reader.collect(&mut rm).unwrap();
    let mut points = BTreeMap::new();
    let labels = |attrs: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
        let mut l: Vec<String> = attrs.map(|kv| format!("{}={}", kv.key, kv.value)).collect();
        l.sort();
        l.join(",")
    };
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    for p in sum.data_points() {
                        points.insert(
                            (metric.name().to_string(), labels(&mut p.attributes())),
                            p.value() as i64,
                        );
                    }
                }
                AggregatedMetrics::I64(MetricData::Gauge(gauge)) => {
                    for p in gauge.data_points() {
                        points.insert(
                            (metric.name().to_string(), labels(&mut p.attributes())),
                            p.value(),
                        );
                    }
                }
                _ => {}
            }
        }
    }
    points
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_service_counts_its_decisions_and_its_applied_revision() {
    let server = TestServer::start().await;
    let revision = server.apply(&["freeze-credential-changes"]).await;
    let subscriber = server.subscriber("web", "web-metrics").await;
    wait_until("the subscriber applied the flip", || {
        let applied = subscriber.current().map(|s| s.revision);
        async move { applied == Some(revision) }
    })
    .await;
    let reader = SharedReader(Arc::new(ManualReader::builder().build()));
    let provider = SdkMeterProvider::builder()
        .with_reader(reader.clone())
        .build();
    subscriber.register_metrics(&provider.meter("channel-service"));

    // (action, times decided)
    let cases = [
        ("account.password_reset", 3),
        ("order.view", 2),
        ("bot.intent.refund_status", 1),
        ("bot.intent.greeting", 1),
    ];
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (action, times) in cases {
        let action = Action::parse(action).unwrap();
        for _ in 0..times {
            let effect = subscriber.decide(&action, &Context::default()).effect();
            let name = if action.as_str().starts_with("bot.intent.") {
                "bot.intent"
            } else {
                action.as_str()
            };
            *want
                .entry((
                    "safemode.client.decisions".to_string(),
                    format!(
                        "action={name},channel=web,effect={},namespace=live",
                        effect.as_str()
                    ),
                ))
                .or_default() += 1;
        }
    }
    let got = collected(&reader);
    let decisions: BTreeMap<(String, String), i64> = got
        .iter()
        .filter(|((name, _), _)| name == "safemode.client.decisions")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(decisions, want);
    // The freeze changes what a password reset decides on the web.
    assert!(
        !decisions
            .keys()
            .any(|(_, l)| l.starts_with("action=account.password_reset")
                && l.contains("effect=allow")),
        "{decisions:?}"
    );
    let plain = |name: &str| {
        got.get(&(name.to_string(), "channel=web,namespace=live".to_string()))
            .copied()
    };
    assert_eq!(plain("safemode.client.applied_revision"), Some(revision));
    assert_eq!(plain("safemode.client.applies"), Some(1));
    assert_eq!(plain("safemode.client.rejects"), Some(0));
    assert_eq!(plain("safemode.client.decisions.stale"), Some(0));
    assert_eq!(plain("safemode.client.decisions.failed_closed"), Some(0));
}

// === Settings refused at the edge ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_settings_that_cannot_work_are_named_in_one_line() {
    let server = TestServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("data").display().to_string();
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
    let protocol = |p: &'static str| ("OTEL_EXPORTER_OTLP_PROTOCOL", p);
    // (args, environment, exit code, stderr's only line, or its start)
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.as_str(),
    ];
    let list = ["--server", server.url.as_str(), "mode", "list"];
    type Case<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (
            &serve,
            vec![endpoint, protocol("http/protobuf")],
            1,
            "error: OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf is not supported: safemode exports OTLP over gRPC; set OTEL_EXPORTER_OTLP_PROTOCOL=grpc or unset it",
        ),
        (
            &serve,
            vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")],
            1,
            "error: cannot export traces over OTLP: invalid exporter configuration: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: invalid endpoint",
        ),
        // A command still runs, and says it exports nothing.
        (
            &list,
            vec![endpoint, protocol("http/json")],
            0,
            "warning: OTEL_EXPORTER_OTLP_PROTOCOL=http/json is not supported: safemode exports OTLP over gRPC; set OTEL_EXPORTER_OTLP_PROTOCOL=grpc or unset it; this command exports no spans",
        ),
    ];
    for (args, env, code, line) in cases {
        let mut command = Command::new(env!("CARGO_BIN_EXE_safemode"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("SAFEMODE_SERVER")
            .env("SAFEMODE_TRUSTED_KEYS", server.trusted_keys_file());
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().copied());
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?} {env:?}: {stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?} {env:?}: {stderr}");
        assert!(lines[0].starts_with(line), "{args:?} {env:?}: {stderr}");
    }
    // A refused replica opened nothing.
    assert!(!Path::new(&dir).exists(), "{dir} was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_status_is_one_trace_across_replicas() {
    require_python();
    let receiver = Receiver::start();
    let etcd = crate::etcd::EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints().join(",");
    let key = crate::support::test_signing_key_file()
        .display()
        .to_string();
    let endpoint = receiver.endpoint();
    let otel: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let replica = |name: &str| {
        let process = ServeProcess::start(
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                &endpoints,
                "--signing-key",
                &key,
                "--replica",
                name,
            ],
            otel,
        );
        crate::support::register_key(
            &process.url,
            &crate::support::test_signing_key().public_key().to_pem(),
        );
        process
    };
    let (asked, _other) = (replica("traced-a"), replica("traced-b"));
    let args = ["--server", asked.url.as_str(), "-o", "json", "status"];
    // Until both replicas' records are in the store, status asks one.
    wait_until("both replicas in the status", || async move {
        let output = crate::support::safemode(&args).await;
        let status: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        status["replicas"].as_array().is_some_and(|r| r.len() == 2)
    })
    .await;
    traced_cli(&args, otel, None).await;
    // The CLI's span, the asked replica's GetStatus under it, and the other
    // replica's ReplicaStatus under that: one trace.
    wait_until("the other replica's part in the CLI's trace", || {
        let spans = receiver.spans();
        async move {
            let Some(cli_span) = spans
                .iter()
                .find(|s| s["name"] == "safemode status" && s["parent_span_id"] == "")
            else {
                return false;
            };
            spans.iter().any(|s| {
                s["name"] == "safemode.v1.FleetService/ReplicaStatus"
                    && s["instance"] == "traced-b"
                    && s["trace_id"] == cli_span["trace_id"]
                    && descends(&spans, s, cli_span["span_id"].as_str().unwrap())
            })
        }
    })
    .await;
}
