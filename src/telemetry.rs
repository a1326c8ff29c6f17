//! The process's `tracing` subscriber: logs on stderr, and OpenTelemetry
//! spans through `tracing-opentelemetry`, so that the spans safemode already
//! makes (every call, every commit) become OTel spans.
//!
//! - `safemode serve` installs the OpenTelemetry layer only when the
//!   `OTEL_EXPORTER_OTLP_*` variables ask for traces
//!   ([`Otlp`](safemode_grpc::telemetry::Otlp)): otherwise nothing is
//!   exported and no span is built for OpenTelemetry.
//! - Every other command runs in one root span named after the command
//!   (`safemode mode apply`), in the trace an incoming `TRACEPARENT` names
//!   (as `otel-cli` and CI systems set it) or a new one, and sends its W3C
//!   `traceparent` on every control call ([`traced`]), so the commit a
//!   commander's `mode apply` caused is in the commander's trace. The span
//!   is exported only when the variables ask for traces.
//!
//! Exports go through a batch span processor on its own thread over the
//! OTLP tonic channel, which lives on the command's tokio runtime: the
//! provider is built inside it and flushed ([`Telemetry::shutdown`]) before
//! the runtime is dropped.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use safemode_grpc::telemetry::{Otlp, resource};

/// What the process traces with; flushed on [`Telemetry::shutdown`].
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// How long the last spans may take to leave: a replica's shutdown
    /// waits the exporter's own timeout, a command at most
    /// [`COMMAND_FLUSH`] (a dead collector must not hold a commander's
    /// prompt).
    flush: Option<std::time::Duration>,
}

/// The longest a command waits, after its answer, for its spans to leave.
const COMMAND_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Which process this is, for its spans.
pub(crate) enum Role<'a> {
    /// `safemode serve`, with the replica's name when given.
    Serve { replica: Option<&'a str> },
    /// Any other command.
    Command,
}

/// Installs the global `tracing` subscriber: logs filtered by `RUST_LOG`
/// (else `default_log`) on stderr, and the OpenTelemetry layer as [`Role`]
/// and `otlp` say. Must run inside the tokio runtime the exports use.
/// Returns why the OTLP exporter could not be built, if it could not (the
/// process then runs without exporting).
pub(crate) fn init(
    default_log: &str,
    ansi: bool,
    role: Role<'_>,
    otlp: Otlp,
) -> (Telemetry, Option<String>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_filter(filter);
    let (replica, wanted, flush) = match role {
        Role::Serve { replica } => (replica, otlp.traces, None),
        // A command always has a trace id to send, exported or not.
        Role::Command => (None, true, Some(COMMAND_FLUSH)),
    };
    let mut problem = None;
    let provider = wanted.then(|| {
        let mut builder = SdkTracerProvider::builder().with_resource(resource(replica));
        if otlp.traces {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => builder = builder.with_batch_exporter(exporter),
                Err(e) => problem = Some(format!("cannot export traces over OTLP: {e}")),
            }
        }
        builder.build()
    });
    let otel = provider.as_ref().map(|provider| {
        // Spans of safemode and of the libraries at info; never the
        // transport's own (the exporter's calls would trace themselves).
        let targets = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::INFO)
            .with_target("h2", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
            .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
            .with_target("tower", tracing::level_filters::LevelFilter::OFF)
            .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("safemode"))
            .with_filter(targets)
    });
    tracing_subscriber::registry().with(logs).with(otel).init();
    (Telemetry { provider, flush }, problem)
}

impl Telemetry {
    /// Exports the spans still held (bounded by the exporter's timeout) and
    /// stops the exporter. Call it with the runtime still alive, outside
    /// any of its tasks.
    pub(crate) fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done = match self.flush {
            Some(limit) => provider.shutdown_with_timeout(limit),
            None => provider.shutdown(),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "spans were not all exported");
        }
    }
}

/// The root span of a command: named after it (`safemode mode apply`), a
/// child of `TRACEPARENT` (and `TRACESTATE`) when the environment gives
/// one.
pub(crate) fn command_span(command: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "command",
        otel.name = %format_args!("safemode {command}"),
        otel.kind = "client",
    );
    if let Ok(traceparent) = std::env::var("TRACEPARENT") {
        let mut carrier = std::collections::HashMap::new();
        carrier.insert("traceparent".to_string(), traceparent);
        if let Ok(tracestate) = std::env::var("TRACESTATE") {
            carrier.insert("tracestate".to_string(), tracestate);
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
    }
    span
}

/// Adds the current span's W3C trace context (`traceparent`, `tracestate`)
/// to an outgoing call.
pub(crate) fn traced(
    mut request: tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body> {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new()
        .inject_context(&context, &mut HeaderInjector(request.headers_mut()));
    request
}

/// Writes W3C trace context into HTTP headers.
struct HeaderInjector<'a>(&'a mut tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            tonic::codegen::http::header::HeaderName::from_bytes(key.as_bytes()),
            tonic::codegen::http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
