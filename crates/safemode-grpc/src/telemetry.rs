//! A replica's metrics and the span of every call, with OpenTelemetry.
//!
//! [`ServerMetrics`] is one `SdkMeterProvider` per replica (several replicas
//! may share a process in tests, so nothing global): its instruments are
//! rendered in the Prometheus text format on `/metrics`
//! (`opentelemetry-prometheus`), and also exported over OTLP when the
//! standard `OTEL_EXPORTER_OTLP_*` variables ask for it ([`Otlp::from_env`]).
//! Gauges are read when metrics are collected, from the controller's followed
//! namespaces ([`Controller::gauges`]) and, for what needs the store (pending
//! requests, lag), from the last [`Controller::store_gauges`], which a
//! background task reads every few seconds (a scrape never waits on the
//! store). Counters of commits and refusals are the controller's
//! own atomics ([`safemode_controller::counters::Counters`]), reported as
//! observable counters; the stream's events are counted here, in atomics
//! per namespace kind and channel read the same way ([`StreamMetrics`]).
//!
//! Label cardinality is bounded: gauges are labelled by the namespaces
//! followed now (at most `--max-namespaces`), counters and the convergence
//! histogram by `namespace_kind` (`live` or `drill`: drill names are new
//! for every drill, and a counter keeps every label set it ever saw), and
//! by channel, state, kind or operation, all fixed sets. Never a subscriber
//! id or a principal.
//!
//! [`RpcTraceLayer`] makes every gRPC call a `tracing` span whose parent is
//! the caller's W3C `traceparent`, so that with the OpenTelemetry layer
//! installed (the binary does it when OTLP is configured) a commander's
//! `mode apply` and the commit it caused are one trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use jiff::Timestamp;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tracing::warn;

use safemode_controller::Controller;
use safemode_controller::counters::{NamespaceStoreGauges, operation_name};
use safemode_policy::names::CHANNELS;
use safemode_policy::{Channel, Namespace, Revision};

/// The instrumentation scope of a replica's metrics.
const SCOPE: &str = "safemode";

/// Bucket bounds of the convergence histogram, in seconds: from a
/// subscriber on the same host (milliseconds) to one behind a replica that
/// fell behind (a minute).
const CONVERGENCE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// How often the store-backed gauges (pending requests, lag) are read.
const STORE_GAUGES_EVERY: Duration = Duration::from_secs(5);

// === OTLP settings ===

/// Which OTLP exports the environment asks for: `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (both), `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`; `OTEL_SDK_DISABLED=true` and
/// `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn them off.
/// Only gRPC is spoken (`OTEL_EXPORTER_OTLP_PROTOCOL` unset or `grpc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Otlp {
    /// Export spans.
    pub traces: bool,
    /// Export metrics.
    pub metrics: bool,
}

impl Otlp {
    /// The settings the process environment gives.
    pub fn from_env() -> Result<Otlp, String> {
        Otlp::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings `var` gives (the environment, in tests a table).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Otlp, String> {
        let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
        let is = |name: &str, value: &str| {
            var(name).is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
        };
        if is("OTEL_SDK_DISABLED", "true") {
            return Ok(Otlp::default());
        }
        let otlp = Otlp {
            traces: (set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
                && !is("OTEL_TRACES_EXPORTER", "none"),
            metrics: (set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
                && !is("OTEL_METRICS_EXPORTER", "none"),
        };
        for (name, used) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", otlp.traces || otlp.metrics),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", otlp.traces),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", otlp.metrics),
        ] {
            if let Some(protocol) = var(name).filter(|p| !p.trim().is_empty())
                && used
                && protocol.trim() != "grpc"
            {
                return Err(format!(
                    "{name}={protocol} is not supported: safemode exports OTLP over gRPC; set {name}=grpc or unset it"
                ));
            }
        }
        Ok(otlp)
    }
}

/// The resource every signal of this process carries: service `safemode`,
/// and the replica's name (`service.instance.id`) when it serves.
pub fn resource(replica: Option<&str>) -> Resource {
    let builder = Resource::builder().with_service_name("safemode");
    match replica {
        Some(replica) => builder
            .with_attribute(KeyValue::new("service.instance.id", replica.to_string()))
            .build(),
        None => builder.build(),
    }
}

// === impl ServerMetrics ===

/// A replica's meter provider, its Prometheus registry, and the instruments
/// the subscription streams record into.
pub struct ServerMetrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    streams: StreamMetrics,
    controller: Weak<Controller>,
    /// The last read of the store-backed gauges.
    store: Arc<Mutex<Vec<NamespaceStoreGauges>>>,
    /// Serializes scrapes: one store read at a time.
    scrape: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics").finish_non_exhaustive()
    }
}

impl ServerMetrics {
    /// The metrics of the replica `replica` over `controller`, also exported
    /// over OTLP when `otlp.metrics`. Must run inside the server's tokio
    /// runtime (the OTLP exporter's channel lives there).
    pub fn new(
        controller: &Arc<Controller>,
        replica: &str,
        otlp: Otlp,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // Labels stay what this module names; the resource is in
            // `target_info`.
            .scope_info_enabled(false)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up /metrics: {e}"))?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource(Some(replica)))
            .with_reader(exporter);
        if otlp.metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot set up the OTLP metric exporter: {e}"))?;
            builder = builder
                .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
        }
        let provider = builder.build();
        let meter = provider.meter(SCOPE);
        let metrics = Arc::new(ServerMetrics {
            streams: StreamMetrics::new(&meter),
            provider,
            registry,
            controller: Arc::downgrade(controller),
            store: Arc::default(),
            scrape: tokio::sync::Mutex::new(()),
        });
        metrics.observe(&meter);
        {
            // The store-backed gauges are read here, every
            // STORE_GAUGES_EVERY, never by a scrape: /metrics answers at
            // once even while the store does not, and scrapers cost the
            // store nothing.
            let weak = Arc::downgrade(&metrics);
            let stop = shutdown.clone();
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    loop {
                        let Some(metrics) = weak.upgrade() else {
                            return;
                        };
                        metrics.refresh_store_gauges().await;
                        drop(metrics);
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(STORE_GAUGES_EVERY) => {}
                        }
                    }
                },
                tracing::info_span!("store-gauges"),
            ));
        }
        Ok(metrics)
    }

    /// What the subscription streams record into.
    pub fn streams(&self) -> StreamMetrics {
        self.streams.clone()
    }

    /// Every metric in the Prometheus text format, the store-backed gauges
    /// read first.
    pub async fn render(&self) -> String {
        // The store-backed gauges are as the background refresh last read
        // them: a scrape never waits on the store.
        let _one_at_a_time = self.scrape.lock().await;
        let families = self.registry.gather();
        let mut text = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
            warn!(error = %e, "cannot encode /metrics");
        }
        text
    }

    /// Exports what is left over OTLP and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            warn!(error = %e, "the metrics did not flush on shutdown");
        }
    }

    async fn refresh_store_gauges(&self) {
        let Some(controller) = self.controller.upgrade() else {
            return;
        };
        let mut gauges = controller.store_gauges().await;
        let mut known = self.store.lock().unwrap_or_else(|e| e.into_inner());
        // A store that does not answer now leaves what it last said: the
        // requests still wait (the lag is unknown, and absent).
        for gauge in &mut gauges {
            if gauge.pending_requests.is_none() {
                gauge.pending_requests = known
                    .iter()
                    .find(|k| k.namespace == gauge.namespace)
                    .and_then(|k| k.pending_requests);
            }
            if gauge.open_proposals.is_none() {
                gauge.open_proposals = known
                    .iter()
                    .find(|k| k.namespace == gauge.namespace)
                    .and_then(|k| k.open_proposals);
            }
        }
        *known = gauges;
    }

    /// Registers the gauges and counters read at collection time.
    fn observe(&self, meter: &Meter) {
        let controller = self.controller.clone();
        let gauges = move || controller.upgrade().map(|c| c.gauges()).unwrap_or_default();
        let g = gauges.clone();
        meter
            .u64_observable_gauge("safemode.subscribers")
            .with_description(
                "Subscribers connected to this replica, by namespace, channel and state (SYNCED, NOT_ACKED, STALE, REJECTED)",
            )
            .with_callback(move |observer| {
                for namespace in g() {
                    for (channel, state, n) in namespace.subscribers {
                        observer.observe(
                            n as u64,
                            &[
                                KeyValue::new("namespace", namespace.namespace.to_string()),
                                KeyValue::new("channel", channel.as_str()),
                                KeyValue::new("state", state.as_str()),
                            ],
                        );
                    }
                }
            })
            .build();
        let g = gauges.clone();
        meter
            .i64_observable_gauge("safemode.namespace.revision")
            .with_description("The revision of the namespace's last change this replica applied")
            .with_callback(move |observer| {
                for namespace in g() {
                    observer.observe(
                        namespace.revision,
                        &[KeyValue::new("namespace", namespace.namespace.to_string())],
                    );
                }
            })
            .build();
        let g = gauges.clone();
        meter
            .u64_observable_gauge("safemode.activations")
            .with_description("Activations in force, by namespace")
            .with_callback(move |observer| {
                for namespace in g() {
                    observer.observe(
                        namespace.activations as u64,
                        &[KeyValue::new("namespace", namespace.namespace.to_string())],
                    );
                }
            })
            .build();
        let g = gauges;
        meter
            .u64_observable_gauge("safemode.store.follower.healthy")
            .with_description(
                "1 while this replica's watch of the namespace works, 0 while it fails",
            )
            .with_callback(move |observer| {
                for namespace in g() {
                    observer.observe(
                        u64::from(namespace.follower_healthy),
                        &[KeyValue::new("namespace", namespace.namespace.to_string())],
                    );
                }
            })
            .build();
        let store = self.store.clone();
        meter
            .i64_observable_gauge("safemode.store.lag_revisions")
            .with_description(
                "The namespace's last change in the store minus this replica's (absent while the store does not answer)",
            )
            .with_callback(move |observer| {
                for namespace in store.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    if let Some(lag) = namespace.lag_revisions {
                        observer.observe(
                            lag,
                            &[KeyValue::new("namespace", namespace.namespace.to_string())],
                        );
                    }
                }
            })
            .build();
        let store = self.store.clone();
        meter
            .u64_observable_gauge("safemode.requests.pending")
            .with_description("Change requests waiting for an approver, by namespace")
            .with_callback(move |observer| {
                for namespace in store.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    if let Some(pending) = namespace.pending_requests {
                        observer.observe(
                            pending as u64,
                            &[KeyValue::new("namespace", namespace.namespace.to_string())],
                        );
                    }
                }
            })
            .build();
        let store = self.store.clone();
        meter
            .u64_observable_gauge("safemode.proposals.open")
            .with_description(
                "Early-warning proposals waiting for a commander to accept or dismiss them, by namespace",
            )
            .with_callback(move |observer| {
                for namespace in store.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    if let Some(open) = namespace.open_proposals {
                        observer.observe(
                            open as u64,
                            &[KeyValue::new("namespace", namespace.namespace.to_string())],
                        );
                    }
                }
            })
            .build();
        let controller = self.controller.clone();
        meter
            .u64_observable_counter("safemode.commits")
            .with_description(
                "Changes committed with their audit entry, by kind (the audit log's action)",
            )
            .with_callback(move |observer| {
                if let Some(c) = controller.upgrade() {
                    for (kind, n) in c.counters().commits() {
                        observer.observe(n, &[KeyValue::new("kind", kind.as_str())]);
                    }
                }
            })
            .build();
        let controller = self.controller.clone();
        meter
            .u64_observable_counter("safemode.commits.failed")
            .with_description(
                "Changes prepared with their writes that did not commit (store unreachable, or concurrent changes kept winning), by kind",
            )
            .with_callback(move |observer| {
                if let Some(c) = controller.upgrade() {
                    for (kind, n) in c.counters().failed_commits() {
                        observer.observe(n, &[KeyValue::new("kind", kind.as_str())]);
                    }
                }
            })
            .build();
        let controller = self.controller.clone();
        meter
            .u64_observable_counter("safemode.calls.refused")
            .with_description("Calls refused for lack of permission, by operation")
            .with_callback(move |observer| {
                if let Some(c) = controller.upgrade() {
                    for (operation, n) in c.counters().refusals() {
                        observer
                            .observe(n, &[KeyValue::new("operation", operation_name(operation))]);
                    }
                }
            })
            .build();
        let controller = self.controller.clone();
        meter
            .u64_observable_counter("safemode.calls.unauthenticated")
            .with_description(
                "Calls refused for their token before any work, by reason: missing or unknown (a guess, or a revoked token still in use)",
            )
            .with_callback(move |observer| {
                if let Some(c) = controller.upgrade() {
                    for (reason, n) in c.counters().unauthenticated_calls() {
                        observer.observe(n, &[KeyValue::new("reason", reason.as_str())]);
                    }
                }
            })
            .build();
    }
}

// === impl StreamMetrics ===

/// What subscription streams count: snapshots sent, acks, rejects, and how
/// long a change took from its commit to each subscriber's ack.
///
/// The three counts are plain atomics, one set per namespace kind and
/// channel, which the meter reads when it collects: a flip makes every
/// stream count a snapshot and an ack, and a counter's `add` with labels
/// hashes them and looks them up under the meter's lock each time. The
/// histogram, which a plain atomic cannot be, is recorded as before.
#[derive(Clone, Debug)]
pub struct StreamMetrics {
    counts: Arc<StreamCounts>,
    convergence: Histogram<f64>,
}

/// [`StreamMetrics`]' counts, a cell per namespace kind and channel.
#[derive(Debug, Default)]
struct StreamCounts {
    cells: [StreamCell; NAMESPACE_KINDS.len() * CHANNELS.len()],
}

/// Which of a cell's counts an instrument reads.
type CountOf = fn(&StreamCell) -> &AtomicU64;

#[derive(Debug, Default)]
struct StreamCell {
    snapshots: AtomicU64,
    acks: AtomicU64,
    rejects: AtomicU64,
}

/// The `namespace_kind` label's values, in cell order.
const NAMESPACE_KINDS: [&str; 2] = ["live", "drill"];

/// The labels of a stream's counts and convergence, as attributes.
fn stream_attributes(kind: &'static str, channel: &'static str) -> [KeyValue; 2] {
    [
        KeyValue::new("namespace_kind", kind),
        KeyValue::new("channel", channel),
    ]
}

/// A stream's labels: its cell among the counts, and the same as
/// attributes for the histogram.
pub(crate) struct StreamLabels {
    cell: usize,
    attributes: [KeyValue; 2],
}

impl Default for StreamMetrics {
    /// Instruments that record nothing (a service built without metrics).
    fn default() -> Self {
        StreamMetrics::new(&opentelemetry::metrics::noop::NoopMeterProvider::new().meter(SCOPE))
    }
}

impl StreamMetrics {
    fn new(meter: &Meter) -> Self {
        let counts = Arc::new(StreamCounts::default());
        let observable: [(&str, &str, CountOf); 3] = [
            (
                "safemode.snapshots.sent",
                "Snapshots sent to subscribers, by namespace kind and channel",
                |cell| &cell.snapshots,
            ),
            (
                "safemode.acks",
                "Snapshots subscribers acknowledged, by namespace kind and channel",
                |cell| &cell.acks,
            ),
            (
                "safemode.rejects",
                "Snapshots subscribers rejected, by namespace kind and channel",
                |cell| &cell.rejects,
            ),
        ];
        for (name, description, count) in observable {
            let counts = counts.clone();
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| {
                    for (at, cell) in counts.cells.iter().enumerate() {
                        // A label set appears once something was counted
                        // in it, as with a counter's first `add`.
                        let n = count(cell).load(Ordering::Relaxed);
                        if n > 0 {
                            let kind = NAMESPACE_KINDS[at / CHANNELS.len()];
                            let channel = CHANNELS[at % CHANNELS.len()];
                            observer.observe(n, &stream_attributes(kind, channel));
                        }
                    }
                })
                .build();
        }
        StreamMetrics {
            counts,
            convergence: meter
                .f64_histogram("safemode.convergence")
                .with_unit("s")
                .with_description(
                    "From a change's commit to a subscriber's ack of it, for changes committed while the subscriber was connected (like Istio's pilot_proxy_convergence_time)",
                )
                .with_boundaries(CONVERGENCE_BUCKETS.to_vec())
                .build(),
        }
    }

    /// The labels of a stream's counts.
    pub(crate) fn labels(namespace: &Namespace, channel: Channel) -> StreamLabels {
        let kind = usize::from(namespace.is_drill());
        StreamLabels {
            cell: kind * CHANNELS.len() + channel.index(),
            attributes: stream_attributes(NAMESPACE_KINDS[kind], channel.as_str()),
        }
    }

    fn cell(&self, labels: &StreamLabels) -> &StreamCell {
        &self.counts.cells[labels.cell]
    }

    /// A snapshot was sent.
    pub(crate) fn sent(&self, labels: &StreamLabels) {
        self.cell(labels).snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// A revision was acknowledged; `converged` is how long after its
    /// commit, when it counts for the histogram.
    pub(crate) fn acked(&self, labels: &StreamLabels, converged: Option<Duration>) {
        self.cell(labels).acks.fetch_add(1, Ordering::Relaxed);
        if let Some(took) = converged {
            self.convergence
                .record(took.as_secs_f64(), &labels.attributes);
        }
    }

    /// A revision was rejected.
    pub(crate) fn rejected(&self, labels: &StreamLabels) {
        self.cell(labels).rejects.fetch_add(1, Ordering::Relaxed);
    }
}

/// When the change at a sent revision committed, to time its convergence.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Committed {
    /// The revision sent.
    pub revision: Revision,
    /// The commit time its meta record carries.
    pub at: Timestamp,
}

impl Committed {
    /// How long from this commit to an ack of `acked` arriving now, when the
    /// ack is of this revision and its subscriber was connected at the
    /// commit (a subscriber that connects later converges on connecting,
    /// not on the change: counting that would measure how long ago the last
    /// change was).
    pub(crate) fn convergence(
        &self,
        acked: Revision,
        connected_at: Timestamp,
        now: Timestamp,
    ) -> Option<Duration> {
        if acked != self.revision || self.at < connected_at {
            return None;
        }
        // Clocks of two replicas may disagree a little: never negative.
        let took = now.duration_since(self.at);
        Some(Duration::try_from(took).unwrap_or(Duration::ZERO))
    }
}

// === impl RpcTraceLayer ===

/// A tower layer that runs every call in a span named after its method,
/// whose parent is the W3C `traceparent` the caller sent (when it sent one).
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// The service [`RpcTraceLayer`] makes.
#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for RpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = rpc_span(&request);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        tracing::Instrument::instrument(future, span)
    }
}

/// The span of one call: `/safemode.v1.ControlService/ApplyModes` becomes
/// `safemode.v1.ControlService/ApplyModes`, a server span, child of the
/// caller's `traceparent`.
fn rpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let path = request.uri().path();
    let name = path.strip_prefix('/').unwrap_or(path);
    // A root unless the caller sent its trace: never a child of whatever
    // long-lived span the connection's task happens to be in.
    let span = tracing::info_span!(
        parent: None,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
    );
    if request.headers().contains_key("traceparent") {
        use opentelemetry::propagation::TextMapPropagator;
        let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&HeaderExtractor(request.headers()));
        // Fails only when no OpenTelemetry layer is installed: then there
        // is no trace to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// Reads W3C trace context from HTTP headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's W3C trace context into a call's metadata, so
/// that a call one replica makes to another (the fleet's status) is part of
/// the trace that asked for it. Without an OpenTelemetry layer there is no
/// context, and nothing is written.
pub(crate) fn send_trace(metadata: &mut tonic::metadata::MetadataMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&context, &mut MetadataInjector(metadata));
}

/// Writes W3C trace context into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_says_which_otlp_exports_run() {
        /// The variables set, and what they give.
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<Otlp, &'a str>);
        let cases: &[Case] = &[
            (&[], Ok(Otlp::default())),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")],
                Ok(Otlp {
                    traces: true,
                    metrics: true,
                }),
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://127.0.0.1:4317",
                )],
                Ok(Otlp {
                    traces: true,
                    metrics: false,
                }),
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                    "http://127.0.0.1:4317",
                )],
                Ok(Otlp {
                    traces: false,
                    metrics: true,
                }),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                    ("OTEL_METRICS_EXPORTER", "none"),
                ],
                Ok(Otlp {
                    traces: true,
                    metrics: false,
                }),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                    ("OTEL_SDK_DISABLED", "true"),
                ],
                Ok(Otlp::default()),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ],
                Ok(Otlp {
                    traces: true,
                    metrics: true,
                }),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ],
                Err(
                    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf is not supported: safemode exports OTLP over gRPC; set OTEL_EXPORTER_OTLP_PROTOCOL=grpc or unset it",
                ),
            ),
            // A protocol for nothing exported is nothing to refuse.
            (
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                Ok(Otlp::default()),
            ),
        ];
        for (vars, want) in cases {
            let got = Otlp::from_vars(|name| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            });
            assert_eq!(got, want.map_err(str::to_string), "{vars:?}");
        }
    }

    #[test]
    fn convergence_counts_only_changes_made_while_connected() {
        let at = Timestamp::from_second(1_000).unwrap();
        let committed = Committed { revision: 7, at };
        let second = |s: i64| Timestamp::from_second(s).unwrap();
        let cases = [
            // (acked, connected at, ack arrives, convergence)
            (7, second(900), second(1_002), Some(Duration::from_secs(2))),
            (6, second(900), second(1_002), None),
            (7, second(1_001), second(1_002), None),
            // Another replica's clock ahead of this one's.
            (7, second(900), second(999), Some(Duration::ZERO)),
        ];
        for (acked, connected, now, want) in cases {
            assert_eq!(committed.convergence(acked, connected, now), want);
        }
    }
}
