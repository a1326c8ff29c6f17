//! The web console, served on the plain-HTTP listener (`--http-listen`): its
//! page (HTML, CSS and JavaScript from `crates/safemode-grpc/console/`,
//! embedded in the binary) and its API.
//!
//! The API is the gRPC control service itself, transcoded: `POST
//! /api/v1/<Method>` takes the method's request message as protobuf JSON,
//! encodes it with the service's own descriptors (`prost-reflect` over
//! [`proto::FILE_DESCRIPTOR_SET`]), and calls the same in-process stack the
//! gRPC listener serves (the [`Authenticator`] around the control service),
//! with the browser's `Authorization` header (or, on a server without
//! tokens, `x-safemode-principal`) as the call's metadata. Authentication,
//! validation, the permission table and the audit of refusals are therefore
//! exactly the gRPC API's: the web has no permission check of its own. A
//! gRPC error becomes an HTTP status with `{code, message}`.
//!
//! `GET /api/v1/events?namespace=NS` is a server-sent-events stream that
//! says when the namespace's revision, incidents, requests or open
//! proposals changed (`what: namespace`), or the fleet's propagation summary did (`what:
//! fleet`), for the page to fetch again. Every 250 ms each stream checks
//! its caller's permission through the same stack (`WhoAmI`: a revoked
//! token or a lost role ends it), and the namespace's fingerprint (this
//! replica's status, incidents, requests: no other replica is asked, so a
//! silent one never holds a change back; open proposals among it, since
//! raising one moves no revision) is read through the stack, once
//! per interval for all the streams of a namespace. The fleet's
//! propagation is gathered apart, one gather per namespace at a time, on
//! its own cadence and deadline. Streams are bounded per replica, per
//! principal, in namespaces and in length.
//!
//! Nothing here changes state on GET. When `serve` has TLS the listener
//! speaks HTTPS with the same certificate (`crate::https`); over plain HTTP
//! the console is served only on a loopback address, or when
//! `--console-plain-http` says a TLS-terminating proxy fronts the listener
//! (see README, "The console").

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, SerializeOptions};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tower::ServiceExt as _;

use crate::fleet::Fleet;
use crate::{Authenticator, ControlApi, limits};
use safemode_controller::Controller;
use safemode_wire::proto;

/// The control service as the gRPC listener serves it.
pub(crate) type ControlStack = InterceptedService<
    proto::control_service_server::ControlServiceServer<ControlApi>,
    Authenticator,
>;

/// The request headers passed on to the control service: the bearer token,
/// and the name a caller gives on a server without tokens.
const CREDENTIAL_HEADERS: [&str; 2] = ["authorization", safemode_wire::PRINCIPAL_HEADER];

/// The control service's full name.
const SERVICE: &str = "safemode.v1.ControlService";

/// How often an event stream checks for changes.
const EVENT_INTERVAL: Duration = Duration::from_millis(250);
/// How long one event stream lasts; the page then opens another.
const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// A comment line this often keeps proxies from closing an idle stream.
const EVENT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Event streams one replica serves at once.
pub const MAX_EVENT_STREAMS: usize = 16;

/// The most console event streams one principal holds on a replica (a few
/// tabs): one token cannot take every stream from the others.
pub const MAX_EVENT_STREAMS_PER_PRINCIPAL: usize = 4;

/// The most namespaces a replica's event streams follow at once (`live`
/// and a drill or two): each one's check is a fleet status per interval, and
/// they must leave the commanders' own `status` room (`fleet::MAX_GATHERS`).
pub const MAX_EVENT_NAMESPACES: usize = 3;

/// The page's Content-Security-Policy: everything from this origin, no
/// inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_CSS: &str = include_str!("../console/console.css");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const FAVICON: &str = include_str!("../console/favicon.svg");

/// The page's assets, by path: what is served, and what the tests read.
pub const ASSETS: [(&str, &str, &str); 4] = [
    ("/", "text/html; charset=utf-8", INDEX_HTML),
    ("/console.css", "text/css; charset=utf-8", CONSOLE_CSS),
    ("/console.js", "text/javascript; charset=utf-8", CONSOLE_JS),
    ("/favicon.svg", "image/svg+xml", FAVICON),
];

/// What the console needs from the replica.
pub(crate) struct ConsoleSettings {
    /// The control service stack, as the gRPC listener serves it.
    pub control: ControlStack,
    /// The replica's name, for the answer header.
    pub replica: String,
    /// Whether the server checks tokens; without, only loopback host names
    /// are answered (a page elsewhere cannot reach it through DNS
    /// rebinding).
    pub tokens: bool,
    /// Whether the console is served at all: the listener is loopback, or
    /// speaks HTTPS (`serve` has TLS), or `--console-plain-http` says a TLS
    /// proxy fronts it.
    pub served: bool,
    /// Ends the event streams.
    pub shutdown: CancellationToken,
}

impl ConsoleSettings {
    /// The console of a replica: its own instance of the control service
    /// behind the same authenticator, as the gRPC listener builds it.
    /// `off_loopback`: serve it on a listener that is not loopback too (it
    /// speaks HTTPS, or a TLS proxy fronts it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        controller: &Arc<Controller>,
        replica: &str,
        fleet: &Arc<Fleet>,
        authenticator: &Authenticator,
        tokens: bool,
        http_addr: Option<SocketAddr>,
        off_loopback: bool,
        shutdown: &CancellationToken,
    ) -> Self {
        let control = ControlStack::new(
            proto::control_service_server::ControlServiceServer::new(ControlApi::new(
                controller.clone(),
                replica.to_string(),
                fleet.clone(),
            ))
            .max_decoding_message_size(limits::MAX_CONTROL_REQUEST_BYTES),
            authenticator.clone(),
        );
        ConsoleSettings {
            control,
            replica: replica.to_string(),
            tokens,
            served: off_loopback || http_addr.is_some_and(|a| a.ip().is_loopback()),
            shutdown: shutdown.clone(),
        }
    }
}

struct Console {
    control: ControlStack,
    replica: HeaderValue,
    tokens: bool,
    streams: Arc<Semaphore>,
    /// What the streams of each namespace share: the namespace's newest
    /// fingerprint, and the fleet's (see [`Followed`]).
    followed: std::sync::Mutex<HashMap<String, Followed>>,
    /// Event streams open per principal.
    holders: Holders,
    /// Event streams open per namespace.
    namespaces: Holders,
    shutdown: CancellationToken,
}

/// Streams held per key (a principal, a namespace); a [`Held`] gives its
/// one back when dropped.
type Holders = Arc<std::sync::Mutex<HashMap<String, usize>>>;

/// One stream's hold under a key of [`Holders`].
struct Held {
    holders: Holders,
    key: String,
}

impl Held {
    /// A stream under `key`, unless `key` holds `per_key` already, or it is
    /// a new key and `keys` are held already.
    fn take(holders: &Holders, key: &str, per_key: usize, keys: usize) -> Option<Held> {
        let mut held = holders.lock().expect("poisoned");
        if !held.contains_key(key) && held.len() >= keys {
            return None;
        }
        let count = held.entry(key.to_string()).or_default();
        if *count >= per_key {
            return None;
        }
        *count += 1;
        Some(Held {
            holders: holders.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.holders.lock().expect("poisoned");
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// The console's routes, to merge into the HTTP listener's router.
pub(crate) fn router(settings: ConsoleSettings) -> axum::Router {
    if !settings.served {
        let refuse = || async {
            api_error(
                StatusCode::FORBIDDEN,
                "console_not_served",
                "the console is not served over plain HTTP on a non-loopback address: serve TLS (--tls-cert/--tls-key, then this listener speaks HTTPS), or put a TLS-terminating proxy in front of --http-listen and pass --console-plain-http, or reach a loopback listener through a tunnel",
            )
        };
        return axum::Router::new()
            .route("/", get(refuse))
            .route("/api/v1/{*rest}", get(refuse).post(refuse));
    }
    let console = Arc::new(Console {
        control: settings.control,
        replica: HeaderValue::from_str(&settings.replica)
            .unwrap_or_else(|_| HeaderValue::from_static("unnamed")),
        tokens: settings.tokens,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        followed: std::sync::Mutex::new(HashMap::new()),
        holders: Arc::new(std::sync::Mutex::new(HashMap::new())),
        namespaces: Arc::new(std::sync::Mutex::new(HashMap::new())),
        shutdown: settings.shutdown,
    });
    let mut router = axum::Router::new();
    for (path, content_type, body) in ASSETS {
        router = router.route(
            path,
            get(
                move |headers: HeaderMap, State(console): State<Arc<Console>>| async move {
                    if let Some(refused) = console.host_refusal(&headers) {
                        return refused;
                    }
                    asset(content_type, body)
                },
            ),
        );
    }
    router
        .route("/api/v1/events", get(events).fallback(method_not_allowed))
        .route("/api/v1/{method}", post(call).fallback(method_not_allowed))
        .layer(DefaultBodyLimit::max(limits::MAX_CONTROL_REQUEST_BYTES))
        .layer(tower::util::MapRequestLayer::new(authority_as_host))
        .with_state(console)
}

/// An HTTP/2 request names its host in the URI's authority, not in a
/// `Host` header: the host checks read it there.
fn authority_as_host(mut request: axum::extract::Request) -> axum::extract::Request {
    if !request.headers().contains_key(header::HOST)
        && let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    request
}

/// `router` with [`secure`]'s headers on every answer, its fallback's
/// bare 404s and 405s included.
pub(crate) fn secured(router: axum::Router) -> axum::Router {
    router.layer(tower::util::MapResponseLayer::new(secure))
}

/// The headers every answer of the HTTP listener carries: the page's
/// policy, no sniffing, no framing, no referrer, and `no-store` unless the
/// answer says how it may be cached.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secure(
        (
            [
                (header::CONTENT_TYPE, content_type),
                // Revalidated on every load: a new binary serves new assets.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

/// An API refusal: `{code, message}`.
fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "code": code, "message": message });
    secure(
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
    )
}

async fn method_not_allowed() -> Response {
    let mut response = api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "the console API takes POST with a JSON body (GET only for /api/v1/events); nothing changes state on GET",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// The descriptors of the API.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptors built with the API decode")
});

/// The control service's method called `name`, if it has one.
fn method(name: &str) -> Option<MethodDescriptor> {
    POOL.get_service_by_name(SERVICE)?
        .methods()
        .find(|m| m.name() == name && !m.is_client_streaming() && !m.is_server_streaming())
}

/// A gRPC status as an HTTP status and a code name.
fn http_status(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code::*;
    match code {
        Ok => (StatusCode::OK, "ok"),
        Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        OutOfRange => (StatusCode::BAD_REQUEST, "out_of_range"),
        NotFound => (StatusCode::NOT_FOUND, "not_found"),
        AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
        Aborted => (StatusCode::CONFLICT, "aborted"),
        ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
        Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        Unimplemented => (StatusCode::NOT_IMPLEMENTED, "unimplemented"),
        Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
        Unknown | Internal | DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

fn status_response(status: &tonic::Status) -> Response {
    let (http, code) = http_status(status.code());
    api_error(http, code, status.message())
}

impl Console {
    /// Without tokens, every caller may do everything: only a page loaded
    /// from a loopback name may call, so that a page on another site
    /// cannot reach the replica by making its own name resolve to
    /// 127.0.0.1.
    fn host_refusal(&self, headers: &HeaderMap) -> Option<Response> {
        if self.tokens {
            return None;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        if matches!(name, "localhost" | "127.0.0.1" | "[::1]") {
            None
        } else {
            Some(api_error(
                StatusCode::FORBIDDEN,
                "host_not_loopback",
                "this server has no tokens file: open the console at http://127.0.0.1:PORT/ or http://localhost:PORT/",
            ))
        }
    }

    /// [`Console::host_refusal`] for the API: without tokens, also a call a
    /// page of another site makes (`Sec-Fetch-Site`, which browsers set and
    /// pages cannot): a `no-cors` fetch from elsewhere could otherwise hold
    /// event streams open in the visitor's browser.
    fn api_refusal(&self, headers: &HeaderMap) -> Option<Response> {
        if let Some(refused) = self.host_refusal(headers) {
            return Some(refused);
        }
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.tokens && matches!(site, "cross-site" | "same-site") {
            return Some(api_error(
                StatusCode::FORBIDDEN,
                "cross_site",
                "this server has no tokens file: only its own page may call its API; open the console at http://127.0.0.1:PORT/",
            ));
        }
        None
    }

    /// Calls the control service's `method` with `request` (its encoded
    /// request message) as the browser's `headers` authenticate it.
    async fn call(
        &self,
        method: &str,
        request: Vec<u8>,
        headers: &HeaderMap,
    ) -> Result<Bytes, tonic::Status> {
        let mut frame = Vec::with_capacity(request.len() + 5);
        frame.push(0);
        frame.extend_from_slice(
            &u32::try_from(request.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        frame.extend_from_slice(&request);
        let mut grpc = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("/{SERVICE}/{method}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers");
        // Only the credentials are passed on: the call is the browser's in
        // nothing else.
        for name in CREDENTIAL_HEADERS {
            if let Some(value) = headers.get(name) {
                grpc = grpc.header(name, value.clone());
            }
        }
        let grpc = grpc
            .body(Body::from(frame))
            .map_err(|e| tonic::Status::internal(format!("cannot build the call: {e}")))?;
        let answer = self
            .control
            .clone()
            .oneshot(grpc)
            .await
            .map_err(|e| tonic::Status::internal(format!("the control service failed: {e}")))?;
        // A refusal comes in the headers (trailers-only); an answer in the
        // body and its status in the trailers.
        if let Some(status) = tonic::Status::from_header_map(answer.headers())
            && status.code() != tonic::Code::Ok
        {
            return Err(status);
        }
        let collected = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| tonic::Status::internal(format!("cannot read the answer: {e}")))?;
        if let Some(status) = collected
            .trailers()
            .and_then(tonic::Status::from_header_map)
            && status.code() != tonic::Code::Ok
        {
            return Err(status);
        }
        let body = collected.to_bytes();
        if body.len() < 5 || body[0] != 0 {
            return Err(tonic::Status::internal(
                "the control service answered no uncompressed message",
            ));
        }
        Ok(body.slice(5..))
    }

    /// `call` for a typed request and answer.
    async fn call_typed<Q: prost::Message, A: prost::Message + Default>(
        &self,
        method: &str,
        request: &Q,
        headers: &HeaderMap,
    ) -> Result<A, tonic::Status> {
        let bytes = self.call(method, request.encode_to_vec(), headers).await?;
        A::decode(bytes)
            .map_err(|e| tonic::Status::internal(format!("cannot decode {method}: {e}")))
    }
}

/// `POST /api/v1/<Method>`: the control service's method, in protobuf JSON.
async fn call(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Some(refused) = console.api_refusal(&headers) {
        return refused;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!(
                    "the request is over {} KiB; send less (fewer names, a shorter reason)",
                    limits::MAX_CONTROL_REQUEST_BYTES / 1024
                ),
            );
        }
        Err(rejection) => {
            return api_error(rejection.status(), "bad_request", &rejection.body_text());
        }
    };
    // A cross-site form cannot send JSON, and a cross-site fetch of JSON
    // needs a preflight this server never grants.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request message as JSON with Content-Type: application/json",
        );
    }
    let Some(method) = method(&name) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no method {}; the console API has the control service's methods (GetStatus, ApplyModes, ...)",
                printable(&name)
            ),
        );
    };
    // The caller first, then the body: without a good token nothing about
    // the request is read (WhoAmI through the same stack: no I/O).
    if console.tokens
        && let Err(status) = console
            .call_typed::<_, proto::WhoAmIResponse>(
                "WhoAmI",
                &proto::WhoAmIRequest::default(),
                &headers,
            )
            .await
    {
        return status_response(&status);
    }
    let request = match request_message(&method, &body) {
        Ok(request) => request,
        Err(why) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("the body is not a {}: {why}", method.input().name()),
            );
        }
    };
    let answer = match console
        .call(method.name(), request.encode_to_vec(), &headers)
        .await
    {
        Ok(answer) => answer,
        Err(status) => {
            let mut response = status_response(&status);
            response
                .headers_mut()
                .insert(safemode_wire::REPLICA_HEADER, console.replica.clone());
            return response;
        }
    };
    let answer = match DynamicMessage::decode(method.output(), answer) {
        Ok(answer) => answer,
        Err(e) => {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &format!("cannot decode the answer: {e}"),
            );
        }
    };
    // Every field, defaults included, so the page need not know them.
    let options = SerializeOptions::new().skip_default_fields(false);
    match answer.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(json) => {
            let mut response = secure(
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    json.to_string(),
                )
                    .into_response(),
            );
            response
                .headers_mut()
                .insert(safemode_wire::REPLICA_HEADER, console.replica.clone());
            response
        }
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot write the answer as JSON: {e}"),
        ),
    }
}

/// The request message from its protobuf JSON (an empty body: `{}`); an
/// error names the field that is wrong.
fn request_message(method: &MethodDescriptor, body: &[u8]) -> Result<DynamicMessage, String> {
    let message = method.input();
    let value: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_slice(body).map_err(|e| format!("it is not JSON ({e})"))?
    };
    let serde_json::Value::Object(fields) = &value else {
        return Err("give a JSON object".to_string());
    };
    // Field by field first, so that the error names the field.
    for (name, field) in fields {
        if message
            .get_field_by_json_name(name)
            .or_else(|| message.get_field_by_name(name))
            .is_none()
        {
            let known: Vec<String> = message
                .fields()
                .map(|f| f.json_name().to_string())
                .collect();
            return Err(format!(
                "unknown field {}; its fields are {}",
                printable(name),
                known.join(", ")
            ));
        }
        let alone =
            serde_json::Value::Object([(name.clone(), field.clone())].into_iter().collect());
        DynamicMessage::deserialize(message.clone(), alone)
            .map_err(|e| format!("{}: {e}", printable(name)))?;
    }
    DynamicMessage::deserialize(message, value).map_err(|e| e.to_string())
}

/// A caller's text for a message: printable, at most 64 characters.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// The `namespace` of an events query (namespace names need no
/// percent-encoding; the control service checks the name); empty: live.
fn namespace_of(query: Option<&str>) -> String {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("namespace="))
        .unwrap_or("")
        .to_string()
}

/// What the page shows of a namespace as this replica has it (revision,
/// activations, incidents, requests, open proposals), hashed, and the namespace's revision:
/// a change of any of it is an event at once.
type Fingerprint = (u64, i64);

/// How often the fleet's propagation is gathered for a namespace streams
/// follow (after the last gather ended), apart from the namespace itself.
const FLEET_INTERVAL: Duration = Duration::from_millis(500);
/// How long one such gather may take (the peers each have
/// `fleet::PEER_DEADLINE` within it; one that does not answer is named,
/// and the answer is partial).
const FLEET_DEADLINE: Duration = Duration::from_secs(5);

/// What the streams of one namespace share.
#[derive(Default)]
struct Followed {
    /// The namespace's newest fingerprint, and when it was taken: streams
    /// share it within an interval, so that their cost is one read per
    /// namespace, not one per stream.
    namespace: Option<(tokio::time::Instant, Fingerprint)>,
    /// The fleet's propagation, hashed, as last gathered; gathered apart,
    /// one at a time per namespace, every [`FLEET_INTERVAL`].
    fleet: Option<u64>,
    /// When the last gather ended, and whether one is under way.
    gathered_at: Option<tokio::time::Instant>,
    gathering: bool,
    /// When a stream last asked for the fleet's propagation.
    asked_at: Option<tokio::time::Instant>,
}

/// The namespace's fingerprint for a stream's next check: the caller's own
/// permission is checked every time, through the same stack (`WhoAmI`, no
/// I/O); the fingerprint is taken through it too (this replica's part
/// only: no other replica is asked), or shared with another stream of the
/// namespace that took it within the interval.
async fn recheck(
    console: &Console,
    namespace: &str,
    headers: &HeaderMap,
) -> Result<Fingerprint, tonic::Status> {
    let who: proto::WhoAmIResponse = console
        .call_typed(
            "WhoAmI",
            &proto::WhoAmIRequest {
                namespaces: vec![namespace.to_string()],
            },
            headers,
        )
        .await?;
    if !who.permissions.first().is_some_and(|p| p.read) {
        return Err(tonic::Status::permission_denied(format!(
            "{} may no longer read status in namespace {namespace}",
            who.principal
        )));
    }
    let now = tokio::time::Instant::now();
    let shared = console
        .followed
        .lock()
        .expect("poisoned")
        .get(namespace)
        .and_then(|f| f.namespace)
        .filter(|(at, _)| now.duration_since(*at) < EVENT_INTERVAL)
        .map(|(_, fingerprint)| fingerprint);
    if let Some(fingerprint) = shared {
        return Ok(fingerprint);
    }
    let taken = fingerprint(console, namespace, headers).await?;
    let mut followed = console.followed.lock().expect("poisoned");
    // Bounded: namespaces no stream asked about lately are dropped.
    let lately = |at: tokio::time::Instant| now.duration_since(at) < EVENT_STREAM_LIFETIME;
    followed.retain(|_, f| {
        f.gathering
            || f.namespace.is_some_and(|(at, _)| lately(at))
            || f.asked_at.is_some_and(lately)
    });
    followed.entry(namespace.to_string()).or_default().namespace = Some((now, taken));
    Ok(taken)
}

/// [`Fingerprint`] of a namespace, through the control service as the
/// caller: this replica's status (no other replica is asked), incidents,
/// requests and open proposals (a trigger raising one changes nothing
/// else the page would see).
async fn fingerprint(
    console: &Console,
    namespace: &str,
    headers: &HeaderMap,
) -> Result<Fingerprint, tonic::Status> {
    let mut status: proto::GetStatusResponse = console
        .call_typed(
            "GetStatus",
            &proto::GetStatusRequest {
                namespace: namespace.to_string(),
                page_size: 1,
                this_replica_only: true,
                ..Default::default()
            },
            headers,
        )
        .await?;
    // The store away: the page says so (and shows what was read last).
    if let Some(store) = &status.store
        && !store.reachable
    {
        return Err(tonic::Status::unavailable(format!(
            "the store ({}) is unreachable: {}",
            store.kind,
            if store.error.is_empty() {
                "no answer"
            } else {
                &store.error
            }
        )));
    }
    // What changes without anything happening (the clock, the store's
    // probe), and the subscribers: the fleet's part, followed apart.
    status.server_time = None;
    status.store = None;
    status.subscribers.clear();
    status.next_page_token.clear();
    status.channels.clear();
    status.replicas.clear();
    status.subscriber_count = 0;
    status.partial = false;
    let incidents: proto::ListIncidentsResponse = console
        .call_typed(
            "ListIncidents",
            &proto::ListIncidentsRequest {
                namespace: namespace.to_string(),
                include_resolved: false,
            },
            headers,
        )
        .await?;
    let requests: proto::ListRequestsResponse = console
        .call_typed(
            "ListRequests",
            &proto::ListRequestsRequest {
                namespace: namespace.to_string(),
                include_decided: false,
            },
            headers,
        )
        .await?;
    let proposals: proto::ListProposalsResponse = console
        .call_typed(
            "ListProposals",
            &proto::ListProposalsRequest {
                namespace: namespace.to_string(),
                include_closed: false,
            },
            headers,
        )
        .await?;
    let mut hasher = DefaultHasher::new();
    status.encode_to_vec().hash(&mut hasher);
    incidents.encode_to_vec().hash(&mut hasher);
    requests.encode_to_vec().hash(&mut hasher);
    proposals.encode_to_vec().hash(&mut hasher);
    Ok((hasher.finish(), status.revision))
}

/// The fleet's propagation of `namespace` as last gathered (`None`: not
/// yet); starts the next gather, as the caller, when one is due and none
/// is under way. Never waits for one: the namespace's own changes go out
/// whatever the other replicas do.
fn fleet_now(console: &Arc<Console>, namespace: &str, headers: &HeaderMap) -> Option<u64> {
    let mut followed = console.followed.lock().expect("poisoned");
    let entry = followed.entry(namespace.to_string()).or_default();
    entry.asked_at = Some(tokio::time::Instant::now());
    let due = entry
        .gathered_at
        .is_none_or(|at| at.elapsed() >= FLEET_INTERVAL);
    if due && !entry.gathering {
        entry.gathering = true;
        let console = console.clone();
        let namespace = namespace.to_string();
        let headers = headers.clone();
        tokio::spawn(async move {
            let gathered = tokio::time::timeout(
                FLEET_DEADLINE,
                fleet_fingerprint(&console, &namespace, &headers),
            )
            .await;
            let mut followed = console.followed.lock().expect("poisoned");
            let entry = followed.entry(namespace).or_default();
            entry.gathering = false;
            entry.gathered_at = Some(tokio::time::Instant::now());
            if let Ok(Ok(hash)) = gathered {
                entry.fleet = Some(hash);
            }
        });
    }
    entry.fleet
}

/// The fleet's propagation of a namespace, hashed: the summary per channel,
/// who answered (a replica that does not is named, the answer partial),
/// through the control service as the caller.
async fn fleet_fingerprint(
    console: &Console,
    namespace: &str,
    headers: &HeaderMap,
) -> Result<u64, tonic::Status> {
    let mut status: proto::GetStatusResponse = console
        .call_typed(
            "GetStatus",
            &proto::GetStatusRequest {
                namespace: namespace.to_string(),
                page_size: 1,
                ..Default::default()
            },
            headers,
        )
        .await?;
    for replica in &mut status.replicas {
        replica.error.clear();
    }
    let mut hasher = DefaultHasher::new();
    (proto::GetStatusResponse {
        channels: status.channels,
        replicas: status.replicas,
        subscriber_count: status.subscriber_count,
        partial: status.partial,
        revision: status.revision,
        ..Default::default()
    }
    .encode_to_vec())
    .hash(&mut hasher);
    Ok(hasher.finish())
}

fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// `GET /api/v1/events?namespace=NS`: a `change` event whenever what the
/// page shows of the namespace changed (and when the namespace can be read
/// again), `trouble` once when it cannot be read (the store is away), `end`
/// when the stream ends (the page reconnects).
async fn events(
    State(console): State<Arc<Console>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = console.api_refusal(&headers) {
        return refused;
    }
    let namespace = namespace_of(query.as_deref());
    // Who asks, through the same stack (no I/O), and whether there is room
    // for them, before anything that reads the store or the fleet.
    let who: proto::WhoAmIResponse = match console
        .call_typed("WhoAmI", &proto::WhoAmIRequest::default(), &headers)
        .await
    {
        Ok(who) => who,
        Err(status) => return status_response(&status),
    };
    let Ok(permit) = console.streams.clone().try_acquire_owned() else {
        return api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "resource_exhausted",
            &format!(
                "this replica already serves {MAX_EVENT_STREAMS} console event streams; close a console or try another replica"
            ),
        );
    };
    let Some(held) = Held::take(
        &console.holders,
        &who.principal,
        MAX_EVENT_STREAMS_PER_PRINCIPAL,
        MAX_EVENT_STREAMS,
    ) else {
        return api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "resource_exhausted",
            &format!(
                "{} holds {MAX_EVENT_STREAMS_PER_PRINCIPAL} console event streams on this replica already; close a console tab",
                who.principal
            ),
        );
    };
    let Some(followed) = Held::take(
        &console.namespaces,
        &namespace,
        MAX_EVENT_STREAMS,
        MAX_EVENT_NAMESPACES,
    ) else {
        return api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "resource_exhausted",
            &format!(
                "this replica's console event streams follow {MAX_EVENT_NAMESPACES} namespaces already; close a console on another namespace, or reload later"
            ),
        );
    };
    // Authorised as a GetStatus of the namespace through the same stack
    // (this replica's part: no other replica is waited for).
    let first = match fingerprint(&console, &namespace, &headers).await {
        Ok(first) => first,
        Err(status) => return status_response(&status),
    };
    // Only the credentials are kept for the stream's checks.
    let mut credentials = HeaderMap::new();
    for name in CREDENTIAL_HEADERS {
        if let Some(value) = headers.get(name) {
            credentials.insert(header::HeaderName::from_static(name), value.clone());
        }
    }
    struct Stream {
        console: Arc<Console>,
        namespace: String,
        headers: HeaderMap,
        last: u64,
        /// The fleet's propagation as last said (`None`: not yet gathered).
        fleet: Option<u64>,
        opened: tokio::time::Instant,
        said: tokio::time::Instant,
        hello: Option<i64>,
        /// The last check failed (and the page was told).
        troubled: bool,
        done: bool,
        _permit: tokio::sync::OwnedSemaphorePermit,
        _held: Held,
        _followed: Held,
    }
    // What the streams of the namespace gathered last, if any.
    let fleet = console
        .followed
        .lock()
        .expect("poisoned")
        .get(&namespace)
        .and_then(|f| f.fleet);
    let now = tokio::time::Instant::now();
    let state = Stream {
        console: console.clone(),
        namespace,
        headers: credentials,
        last: first.0,
        fleet,
        opened: now,
        said: now,
        hello: Some(first.1),
        troubled: false,
        done: false,
        _permit: permit,
        _held: held,
        _followed: followed,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(revision) = s.hello.take() {
            let data = serde_json::json!({ "revision": revision.to_string() });
            return Some((Ok::<_, std::convert::Infallible>(event("hello", &data)), s));
        }
        loop {
            tokio::select! {
                () = s.console.shutdown.cancelled() => {
                    s.done = true;
                    let data = serde_json::json!({ "reason": "the replica is shutting down" });
                    return Some((Ok(event("end", &data)), s));
                }
                () = tokio::time::sleep(EVENT_INTERVAL) => {}
            }
            if s.opened.elapsed() >= EVENT_STREAM_LIFETIME {
                s.done = true;
                let data = serde_json::json!({ "reason": "the stream's time is up; open another" });
                return Some((Ok(event("end", &data)), s));
            }
            // A gather newer than the last said (the first one too: the
            // page's own read may have come before a change) is a change.
            let fleet = fleet_now(&s.console, &s.namespace, &s.headers);
            match recheck(&s.console, &s.namespace, &s.headers).await {
                Ok((hash, revision)) if hash != s.last || s.troubled => {
                    s.last = hash;
                    s.troubled = false;
                    s.said = tokio::time::Instant::now();
                    let data = serde_json::json!({ "revision": revision.to_string(), "what": "namespace" });
                    return Some((Ok(event("change", &data)), s));
                }
                Ok((_, revision)) if fleet.is_some() && fleet != s.fleet => {
                    s.fleet = fleet;
                    s.said = tokio::time::Instant::now();
                    let data =
                        serde_json::json!({ "revision": revision.to_string(), "what": "fleet" });
                    return Some((Ok(event("change", &data)), s));
                }
                Ok(_) => {}
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) =>
                {
                    s.done = true;
                    let (_, code) = http_status(status.code());
                    let data = serde_json::json!({ "code": code, "message": status.message() });
                    return Some((Ok(event("end", &data)), s));
                }
                // A replica that cannot read now may later: say so once,
                // and keep checking.
                Err(status) if !s.troubled => {
                    s.troubled = true;
                    s.said = tokio::time::Instant::now();
                    let data = serde_json::json!({ "message": status.message() });
                    return Some((Ok(event("trouble", &data)), s));
                }
                Err(_) => {}
            }
            if s.said.elapsed() >= EVENT_KEEPALIVE {
                s.said = tokio::time::Instant::now();
                return Some((Ok(Bytes::from_static(b": keepalive\n\n")), s));
            }
        }
    });
    secure(
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            Body::from_stream(stream),
        )
            .into_response(),
    )
}
