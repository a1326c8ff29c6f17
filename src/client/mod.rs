//! The subscriber client: what a channel service (chatbot, IVR, agent desk,
//! web or mobile back end) links to receive its channel's policy and decide
//! locally.
//!
//! [`Subscriber::connect`] opens the subscription stream, waits for the first
//! snapshot, and keeps the stream up in a background task: it reconnects with
//! jittered backoff, resumes from the last applied revision (so it never
//! applies an older one), acks every snapshot it applies and rejects, with a
//! reason, one it cannot use while keeping the previous.
//!
//! A bearer token never crosses the network in plain text by accident:
//! `https://` controllers are reached over TLS (the platform's CA
//! certificates, plus [`SubscriberConfig::ca_cert`] for a private CA), and a
//! token for a plain `http://` controller that is not on loopback is refused
//! before any connection unless [`SubscriberConfig::allow_plaintext_token`]
//! says a service mesh already encrypts that hop.
//!
//! ```no_run
//! # async fn example() -> Result<(), safemode::client::ClientError> {
//! use safemode::client::{Subscriber, SubscriberConfig};
//! use safemode::policy::{Action, Channel, Context, Namespace};
//!
//! let config = SubscriberConfig::new(["http://127.0.0.1:7700"], Namespace::live(),
//!     Channel::parse("chatbot").unwrap(), "chatbot-1");
//! let subscriber = Subscriber::connect(config).await?;
//! let reset = Action::parse("account.password_reset").unwrap();
//! let decision = subscriber.decide(&reset, &Context::default());
//! println!("{}", decision.outcome.kind().as_str());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod snapshot;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};
use tracing::{Instrument, debug, info, info_span, warn};

pub use snapshot::{ActivationInfo, DecisionReport, PolicySnapshot};

use crate::backoff::Backoff;
pub use crate::errors::error_chain;
use crate::policy::{Action, Channel, Context, Namespace, Revision};
use crate::wire::proto::subscribe_request::Message as Outbound;
use crate::wire::proto::subscribe_response::Message as Inbound;
use crate::wire::proto::subscription_service_client::SubscriptionServiceClient;
use crate::wire::proto::{self, SubscribeRequest};

/// Why the client could not get a policy.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a usable URL.
    #[error(
        "bad server address '{server}': {reason}; use a URL such as http://127.0.0.1:7700 (https://HOST:PORT for TLS)"
    )]
    BadServer {
        /// The address given.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The token would cross the network in plain text: the controller is
    /// reached over `http://` on a host that is not loopback, and plain text
    /// was not allowed.
    #[error(
        "refusing to send the token in plain text to {server}, which is not a loopback address: use https:// (with --ca-cert FILE for a private CA), or --insecure (SAFEMODE_INSECURE) if a service mesh already encrypts this hop"
    )]
    PlaintextToken {
        /// The address.
        server: String,
    },
    /// The file of extra CA certificates cannot be used.
    #[error(
        "cannot use the CA certificate file {}: {reason}; give a PEM file of the CA certificates that signed the controller's certificate (--ca-cert / SAFEMODE_CA_CERT)",
        path.display()
    )]
    CaCert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS could not be prepared for an `https://` controller (typically:
    /// this machine has no CA certificates and no extra CA was given).
    #[error(
        "cannot set up TLS for {server}: {reason}; install the platform's CA certificates (e.g. the ca-certificates package) or give --ca-cert FILE"
    )]
    TlsSetup {
        /// The address.
        server: String,
        /// The cause.
        reason: String,
    },
    /// The controller's certificate is not trusted (unknown CA, expired, or
    /// issued for another name).
    #[error(
        "the controller at {server} presented a certificate this client does not trust ({reason}); give the CA that signed it with --ca-cert FILE (SAFEMODE_CA_CERT), and check that --server names a host the certificate is for"
    )]
    Untrusted {
        /// The address.
        server: String,
        /// What rustls found wrong with the certificate.
        reason: String,
    },
    /// The TLS handshake failed for a reason other than the certificate.
    #[error(
        "TLS with the controller at {server} failed: {reason}; does it serve TLS (safemode serve --tls-cert/--tls-key)? a controller without TLS takes http://"
    )]
    Tls {
        /// The address.
        server: String,
        /// The cause.
        reason: String,
    },
    /// The controller could not be reached.
    #[error(
        "cannot reach the safemode controller at {server}: {reason}; is `safemode serve` running there? (--server / SAFEMODE_SERVER point elsewhere)"
    )]
    Unreachable {
        /// The address.
        server: String,
        /// The cause, from the transport.
        reason: String,
    },
    /// The controller refused or ended the stream.
    #[error("the controller refused the subscription: {0}")]
    Refused(String),
    /// The controller sent a snapshot this client cannot use.
    #[error("the controller sent a snapshot this client cannot use: {0}")]
    Rejected(String),
    /// No snapshot arrived in time.
    #[error("no snapshot arrived within {0:?}")]
    Timeout(Duration),
}

/// Settings of a subscriber.
#[derive(Clone)]
pub struct SubscriberConfig {
    /// Controller replicas' URLs, e.g. `http://127.0.0.1:7700`. The
    /// subscriber starts at a random one and moves to the next when a stream
    /// fails.
    pub servers: Vec<String>,
    /// The namespace to follow (`live` in production).
    pub namespace: Namespace,
    /// This service's channel.
    pub channel: Channel,
    /// A stable id of this instance, shown in `safemode status`.
    pub subscriber_id: String,
    /// Bearer token (a subscriber token is enough), when the controller
    /// requires one.
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for `https://` controllers,
    /// besides the platform's (a private CA). Default: none.
    pub ca_cert: Option<PathBuf>,
    /// Send the token over plain `http://` to a controller that is not on
    /// loopback. Only for a hop a service mesh already encrypts; otherwise
    /// such a connection is refused before it is made. Default: false.
    pub allow_plaintext_token: bool,
    /// Limit on connecting and on waiting for the first snapshot.
    pub connect_timeout: Duration,
    /// Decisions say `stale` when neither a snapshot nor a heartbeat arrived
    /// for this long.
    pub stale_after: Duration,
    /// Longest pause between reconnect attempts.
    pub max_backoff: Duration,
}

/// Everything but the token, which must never reach a log.
impl std::fmt::Debug for SubscriberConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriberConfig")
            .field("servers", &self.servers)
            .field("namespace", &self.namespace)
            .field("channel", &self.channel)
            .field("subscriber_id", &self.subscriber_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .field("allow_plaintext_token", &self.allow_plaintext_token)
            .field("connect_timeout", &self.connect_timeout)
            .field("stale_after", &self.stale_after)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

impl SubscriberConfig {
    /// Defaults for everything but the controllers and the identity of the
    /// subscriber.
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        namespace: Namespace,
        channel: Channel,
        subscriber_id: impl Into<String>,
    ) -> Self {
        SubscriberConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            namespace,
            channel,
            subscriber_id: subscriber_id.into(),
            token: None,
            ca_cert: None,
            allow_plaintext_token: false,
            connect_timeout: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// How [`endpoints`] prepares this subscriber's connections.
    pub fn endpoint_options(&self) -> EndpointOptions<'_> {
        EndpointOptions {
            sends_token: self.token.is_some(),
            ca_cert: self.ca_cert.as_deref(),
            allow_plaintext_token: self.allow_plaintext_token,
            connect_timeout: self.connect_timeout,
        }
    }
}

/// A live subscription with the newest applied snapshot.
pub struct Subscriber {
    snapshots: watch::Receiver<Option<Arc<PolicySnapshot>>>,
    freshness: Arc<Freshness>,
    stale_after: Duration,
    stop: CancellationToken,
}

impl Subscriber {
    /// Connects, waits for the first snapshot, and keeps the stream up in the
    /// background until the subscriber is dropped.
    pub async fn connect(config: SubscriberConfig) -> Result<Subscriber, ClientError> {
        let endpoints = endpoints(&config.servers, &config.endpoint_options())?;
        let (tx, snapshots) = watch::channel(None);
        let freshness = Arc::new(Freshness::new());
        let stop = CancellationToken::new();
        let (first_tx, first_rx) = oneshot::channel();
        // Every endpoint gets one try before the first connect gives up.
        let first_deadline = config.connect_timeout * (endpoints.len() as u32 + 1);
        let task = Task {
            next: rand::random_range(0..endpoints.len()),
            endpoints,
            config: config.clone(),
            snapshots: tx,
            freshness: freshness.clone(),
            first: Some(first_tx),
            first_errors: Vec::new(),
        };
        let span =
            info_span!("subscriber", channel = %config.channel, namespace = %config.namespace);
        tokio::spawn(task.run(stop.clone()).instrument(span));
        let subscriber = Subscriber {
            snapshots,
            freshness,
            stale_after: config.stale_after,
            stop,
        };
        match tokio::time::timeout(first_deadline, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::Refused("the stream ended".into())),
            Err(_) => Err(ClientError::Timeout(first_deadline)),
        }
    }

    /// The newest applied snapshot.
    pub fn current(&self) -> Option<Arc<PolicySnapshot>> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that wakes on every newly applied snapshot.
    pub fn changes(&self) -> watch::Receiver<Option<Arc<PolicySnapshot>>> {
        self.snapshots.clone()
    }

    /// Whether the policy may be out of date: nothing (snapshot or
    /// heartbeat) arrived for longer than the staleness limit, or the
    /// controller holds a newer revision than the one applied (for example
    /// one this client rejected).
    pub fn is_stale(&self) -> bool {
        let applied = self.snapshots.borrow().as_ref().map(|s| s.revision);
        self.freshness.is_stale(applied, self.stale_after)
    }

    /// Decides `action` for `ctx` with the newest snapshot.
    pub fn decide(&self, action: &Action, ctx: &Context) -> DecisionReport {
        let snapshot = self.current();
        DecisionReport::new(snapshot.as_deref(), action, ctx, self.is_stale())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// === endpoints ===

/// How [`endpoints`] prepares the connections to the controllers.
#[derive(Clone, Copy, Debug)]
pub struct EndpointOptions<'a> {
    /// Requests will carry a bearer token, which must not cross the network
    /// in plain text.
    pub sends_token: bool,
    /// A PEM file of CA certificates to trust for `https://`, besides the
    /// platform's.
    pub ca_cert: Option<&'a Path>,
    /// A token may go over plain `http://` to a host that is not loopback (a
    /// service mesh encrypts the hop).
    pub allow_plaintext_token: bool,
    /// Limit on connecting, and on the TLS handshake.
    pub connect_timeout: Duration,
}

/// Checks and prepares the controllers' addresses: `http://` or `https://`
/// only; TLS for `https://`; and no token in plain text to a host that is
/// not loopback unless `options` allow it. Connects to nothing, so a
/// refusal here comes before any byte is sent.
pub fn endpoints(
    servers: &[String],
    options: &EndpointOptions<'_>,
) -> Result<Vec<(String, Endpoint)>, ClientError> {
    if servers.is_empty() {
        return Err(ClientError::BadServer {
            server: String::new(),
            reason: "no controller address given".into(),
        });
    }
    let targets = servers
        .iter()
        .map(|server| Target::parse(server, options))
        .collect::<Result<Vec<_>, _>>()?;
    // The CA file is read once, and only when some controller needs TLS.
    let tls = if targets.iter().any(|t| t.tls) {
        Some(tls_config(options)?)
    } else {
        None
    };
    targets
        .into_iter()
        .map(|target| {
            let mut endpoint = Endpoint::from(target.uri)
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            if let (true, Some(tls)) = (target.tls, &tls) {
                endpoint = with_tls(endpoint, tls, &target.host, options.ca_cert.is_some())
                    .map_err(|e| ClientError::TlsSetup {
                        server: target.server.clone(),
                        reason: error_chain(&e),
                    })?;
            }
            Ok((target.server, endpoint))
        })
        .collect()
}

/// One checked controller address.
struct Target {
    server: String,
    uri: Uri,
    /// `https://`.
    tls: bool,
    /// The host, without the brackets of an IPv6 address.
    host: String,
}

impl Target {
    fn parse(server: &str, options: &EndpointOptions<'_>) -> Result<Target, ClientError> {
        let bad = |reason: String| ClientError::BadServer {
            server: server.to_string(),
            reason,
        };
        let uri: Uri = server.parse().map_err(|e| bad(error_chain(&e)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(other) => {
                return Err(bad(format!(
                    "the scheme {other}: is not supported, only http:// and https://"
                )));
            }
            None => {
                return Err(bad("it has no scheme (http:// or https://)".into()));
            }
        };
        let host = match uri.host() {
            Some(host) if !host.is_empty() => host,
            _ => return Err(bad("it names no host".into())),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        if !tls && options.sends_token && !options.allow_plaintext_token && !is_loopback(&host) {
            return Err(ClientError::PlaintextToken {
                server: server.to_string(),
            });
        }
        Ok(Target {
            server: server.to_string(),
            uri,
            tls,
            host,
        })
    }
}

/// Whether `host` (without IPv6 brackets) is this machine: `localhost`,
/// 127.0.0.0/8, `::1` (also written as an IPv4-mapped address).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// TLS settings shared by every `https://` controller: the handshake limit
/// and the extra CA certificates, checked here so that a wrong file is
/// named instead of every certificate seeming untrusted.
fn tls_config(options: &EndpointOptions<'_>) -> Result<ClientTlsConfig, ClientError> {
    let config = ClientTlsConfig::new().timeout(options.connect_timeout);
    let Some(path) = options.ca_cert else {
        return Ok(config);
    };
    let bad = |reason: String| ClientError::CaCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("it is not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "it holds no certificate (no -----BEGIN CERTIFICATE----- block)".into(),
        ));
    }
    // rustls skips certificates it cannot parse; a file of only such
    // certificates would otherwise fail later as "untrusted".
    let (usable, _) = rustls::RootCertStore::empty().add_parsable_certificates(certs);
    if usable == 0 {
        return Err(bad("none of its certificates can be parsed".into()));
    }
    Ok(config.ca_certificate(Certificate::from_pem(pem)))
}

/// `endpoint` over TLS to `host`, trusting the platform's CA certificates
/// and those of `tls`. A machine without CA certificates (a slim container)
/// still works when an extra CA was given.
fn with_tls(
    endpoint: Endpoint,
    tls: &ClientTlsConfig,
    host: &str,
    has_extra_ca: bool,
) -> Result<Endpoint, tonic::transport::Error> {
    // tonic would take the host from the URI, brackets of IPv6 included,
    // which is not a valid server name.
    let tls = tls.clone().domain_name(host);
    match endpoint.clone().tls_config(tls.clone().with_native_roots()) {
        Ok(endpoint) => Ok(endpoint),
        Err(e) if has_extra_ca => {
            debug!(error = %error_chain(&e), "no platform CA certificates; trusting --ca-cert only");
            endpoint.tls_config(tls)
        }
        Err(e) => Err(e),
    }
}

/// What a failed connection to `server` means for a person: a certificate
/// this client does not trust, a TLS handshake that failed otherwise, or a
/// controller that cannot be reached.
pub fn connect_failed(server: &str, error: &tonic::transport::Error) -> ClientError {
    let server = server.to_string();
    match tls_error(error) {
        // rustls says it best ("invalid peer certificate: UnknownIssuer");
        // the transport's wrapping adds nothing.
        Some(tls @ rustls::Error::InvalidCertificate(_)) => ClientError::Untrusted {
            server,
            reason: tls.to_string(),
        },
        Some(_) => ClientError::Tls {
            server,
            reason: error_chain(error),
        },
        None => ClientError::Unreachable {
            server,
            reason: error_chain(error),
        },
    }
}

/// The rustls error in `error`'s chain, if TLS failed. tokio-rustls wraps it
/// in an `io::Error`, whose `source()` skips it, so look inside those too.
fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        next = e.source();
    }
    None
}

/// The background side of a [`Subscriber`].
struct Task {
    /// Every controller, with its URL for messages.
    endpoints: Vec<(String, Endpoint)>,
    /// The endpoint the next stream opens on.
    next: usize,
    config: SubscriberConfig,
    snapshots: watch::Sender<Option<Arc<PolicySnapshot>>>,
    freshness: Arc<Freshness>,
    /// Told how the first attempt went, then dropped.
    first: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// Why each endpoint failed before the first snapshot.
    first_errors: Vec<ClientError>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);

impl Task {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, self.config.max_backoff);
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                result = self.session(&mut backoff) => result,
            };
            let error = match result {
                Ok(()) => ClientError::Refused("the controller ended the stream".into()),
                Err(e) => e,
            };
            // Whatever went wrong, the next stream goes to the next replica.
            self.next = (self.next + 1) % self.endpoints.len();
            if self.first.is_some() {
                self.first_errors.push(error);
                if self.first_errors.len() == self.endpoints.len() {
                    let error = first_failure(std::mem::take(&mut self.first_errors));
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(error));
                    }
                    return;
                }
                continue;
            }
            let pause = backoff.next_delay();
            warn!(error = %error, retry_in = ?pause, "subscription lost; reconnecting");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One stream, from hello to its end.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), ClientError> {
        let (server, endpoint) = self.endpoints[self.next].clone();
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_failed(&server, &e))?;
        let mut client = SubscriptionServiceClient::with_interceptor(
            channel,
            Bearer::new(self.config.token.as_deref())?,
        );
        let (out, out_rx) = mpsc::channel(16);
        let applied = self.snapshots.borrow().clone();
        let hello = proto::Hello {
            namespace: self.config.namespace.to_string(),
            channel: self.config.channel.as_str().to_string(),
            subscriber_id: self.config.subscriber_id.clone(),
            last_applied_revision: applied.as_ref().map_or(0, |s| s.revision),
            epoch: applied
                .as_ref()
                .map(|s| s.epoch.clone())
                .unwrap_or_default(),
        };
        send(&out, Outbound::Hello(hello)).await;
        let mut inbound = client
            .subscribe(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| refused(&server, s))?
            .into_inner();
        while let Some(message) = inbound.message().await.map_err(|s| refused(&server, s))? {
            self.freshness.heard();
            let wire = match message.message {
                Some(Inbound::Snapshot(wire)) => wire,
                Some(Inbound::Heartbeat(heartbeat)) => {
                    self.freshness.announced(heartbeat.revision);
                    continue;
                }
                None => continue,
            };
            let revision = wire.revision;
            // Even a snapshot this client cannot use says how far the
            // controller is: until it catches up, decisions say stale.
            self.freshness.announced(revision);
            let snapshot = match PolicySnapshot::from_wire(
                wire,
                &self.config.namespace,
                self.config.channel,
            ) {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    let reason = e.to_string();
                    warn!(revision, %reason, "snapshot rejected; keeping the previous one");
                    send(&out, reject(revision, reason.clone())).await;
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(ClientError::Rejected(reason)));
                    }
                    continue;
                }
            };
            let current = self.snapshots.borrow().clone();
            match current {
                // The store was replaced: a new history, whatever its revision.
                Some(current) if current.epoch != snapshot.epoch => {
                    info!(
                        revision,
                        "the controller's store has a new history; starting over"
                    );
                    self.snapshots.send_replace(Some(Arc::new(snapshot)));
                }
                Some(current) if revision < current.revision => {
                    let reason = format!(
                        "revision {revision} is older than the applied revision {}",
                        current.revision
                    );
                    warn!(%reason, "refusing to go backwards");
                    send(&out, reject(revision, reason)).await;
                    continue;
                }
                // The revision it already has (a new stream starts with the
                // current snapshot): acknowledge, change nothing.
                Some(current) if revision == current.revision => {}
                _ => {
                    debug!(revision, "snapshot applied");
                    self.snapshots.send_replace(Some(Arc::new(snapshot)));
                }
            }
            send(&out, Outbound::Ack(proto::Ack { revision })).await;
            backoff.reset();
            if let Some(first) = self.first.take() {
                let _ = first.send(Ok(()));
            }
        }
        Ok(())
    }
}

fn reject(revision: Revision, reason: String) -> Outbound {
    Outbound::Reject(proto::Reject { revision, reason })
}

/// When the client last heard from a controller, and how far that controller
/// said it was. Lock-free: decisions read it on every call.
#[derive(Debug)]
struct Freshness {
    start: Instant,
    /// Milliseconds after `start` of the last message.
    heard_ms: AtomicU64,
    /// The revision the controller last announced (snapshot or heartbeat).
    announced: AtomicI64,
}

impl Freshness {
    fn new() -> Self {
        Freshness {
            start: Instant::now(),
            heard_ms: AtomicU64::new(0),
            announced: AtomicI64::new(0),
        }
    }

    fn heard(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.heard_ms.store(ms, Ordering::Relaxed);
    }

    fn announced(&self, revision: Revision) {
        self.announced.store(revision, Ordering::Relaxed);
    }

    /// Stale: nothing heard for `limit`, or the controller holds a revision
    /// newer than `applied` (one this client rejected, or has yet to get).
    fn is_stale(&self, applied: Option<Revision>, limit: Duration) -> bool {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let silent_ms = now_ms.saturating_sub(self.heard_ms.load(Ordering::Relaxed));
        let behind = applied.is_none_or(|a| self.announced.load(Ordering::Relaxed) > a);
        silent_ms > limit.as_millis() as u64 || behind
    }
}

/// Adds `authorization: Bearer <token>` to every request, when there is a
/// token; and, for a server without tokens, the name the caller goes by.
#[derive(Clone)]
pub struct Bearer {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    principal: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Bearer {
    /// The interceptor for `token` (`None`: send no header).
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = token
            .map(|t| {
                let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {}", t.trim()).parse().map_err(|_| {
                        ClientError::Refused(
                            "the token has characters a header cannot carry".into(),
                        )
                    })?;
                // Kept out of debug output, and out of HTTP/2 header
                // compression tables (HPACK never indexes it).
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        Ok(Bearer {
            header,
            principal: None,
        })
    }

    /// Also names the caller `principal`: a server without a tokens file
    /// acts under that name (a server with one ignores it).
    pub fn as_principal(mut self, principal: Option<&str>) -> Result<Self, ClientError> {
        self.principal = principal
            .map(|p| {
                p.trim().parse().map_err(|_| {
                    ClientError::Refused(
                        "the principal has characters a header cannot carry".into(),
                    )
                })
            })
            .transpose()?;
        Ok(self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        if let Some(principal) = &self.principal {
            request
                .metadata_mut()
                .insert(crate::api::PRINCIPAL_HEADER, principal.clone());
        }
        Ok(request)
    }
}

/// The error to report when no endpoint gave a first snapshot: a refusal or
/// rejection says more than "unreachable"; if every endpoint was unreachable,
/// say so for all of them.
pub(crate) fn first_failure(errors: Vec<ClientError>) -> ClientError {
    let unreachable = |e: &ClientError| matches!(e, ClientError::Unreachable { .. });
    if errors.iter().all(unreachable) {
        let servers: Vec<String> = errors
            .iter()
            .filter_map(|e| match e {
                ClientError::Unreachable { server, .. } => Some(server.clone()),
                _ => None,
            })
            .collect();
        let reason = match errors.last() {
            Some(ClientError::Unreachable { reason, .. }) => reason.clone(),
            _ => String::new(),
        };
        return ClientError::Unreachable {
            server: servers.join(", "),
            reason,
        };
    }
    errors
        .into_iter()
        .find(|e| !unreachable(e))
        .expect("some error is not Unreachable")
}

async fn send(out: &mpsc::Sender<SubscribeRequest>, message: Outbound) {
    // The receiver lives as long as the request stream; if it is gone, the
    // session is ending and the next read reports why.
    let _ = out
        .send(SubscribeRequest {
            message: Some(message),
        })
        .await;
}

fn refused(server: &str, status: tonic::Status) -> ClientError {
    // A status with a source was made on this side from a transport failure;
    // one without came from the controller, whose message says what to do.
    if std::error::Error::source(&status).is_some() {
        ClientError::Unreachable {
            server: server.to_string(),
            reason: error_chain(&status),
        }
    } else {
        ClientError::Refused(status.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `endpoints` says about `server`: `Ok` or the error message.
    fn check(server: &str, sends_token: bool, insecure: bool, expected: Result<(), &str>) {
        let options = EndpointOptions {
            sends_token,
            ca_cert: None,
            allow_plaintext_token: insecure,
            connect_timeout: Duration::from_secs(1),
        };
        let actual = endpoints(&[server.to_string()], &options)
            .map(|_| ())
            .map_err(|e| e.to_string());
        match (&actual, expected) {
            (Ok(()), Ok(())) => {}
            (Err(message), Err(part)) if message.contains(part) => {}
            _ => panic!(
                "{server} (token: {sends_token}, insecure: {insecure}): expected {expected:?}, got {actual:?}"
            ),
        }
    }

    #[test]
    fn a_token_goes_in_plain_text_only_to_loopback_unless_allowed() {
        const REFUSED: &str = "refusing to send the token in plain text";
        let cases: &[(&str, bool, bool, Result<(), &str>)] = &[
            ("http://127.0.0.1:7700", true, false, Ok(())),
            ("http://127.1.2.3:7700", true, false, Ok(())),
            ("http://localhost:7700", true, false, Ok(())),
            ("http://LocalHost:7700", true, false, Ok(())),
            ("http://[::1]:7700", true, false, Ok(())),
            ("http://[::ffff:127.0.0.1]:7700", true, false, Ok(())),
            ("http://10.255.255.1:7700", true, false, Err(REFUSED)),
            ("http://[2001:db8::1]:7700", true, false, Err(REFUSED)),
            ("http://controller.example:7700", true, false, Err(REFUSED)),
            ("http://localhost.example:7700", true, false, Err(REFUSED)),
            ("http://0.0.0.0:7700", true, false, Err(REFUSED)),
            // Nothing secret to protect without a token.
            ("http://10.255.255.1:7700", false, false, Ok(())),
            // A service mesh encrypts the hop.
            ("http://10.255.255.1:7700", true, true, Ok(())),
        ];
        for (server, token, insecure, expected) in cases {
            check(server, *token, *insecure, *expected);
        }
    }

    #[test]
    fn only_http_and_https_are_spoken() {
        let cases: &[(&str, &str)] = &[
            (
                "ftp://127.0.0.1:7700",
                "the scheme ftp: is not supported, only http:// and https://",
            ),
            (
                "unix:/tmp/safemode.sock",
                "bad server address 'unix:/tmp/safemode.sock'",
            ),
            ("127.0.0.1:7700", "it has no scheme"),
            ("http://", "bad server address"),
            ("", "bad server address"),
        ];
        for (server, expected) in cases {
            check(server, false, false, Err(expected));
            check(server, true, true, Err(expected));
        }
    }

    #[test]
    fn the_extra_ca_file_is_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, expected) in [
            (&not_pem, "holds no certificate"),
            (&missing, "cannot use the CA certificate file"),
        ] {
            let options = EndpointOptions {
                sends_token: true,
                ca_cert: Some(path),
                allow_plaintext_token: false,
                connect_timeout: Duration::from_secs(1),
            };
            let error = endpoints(&["https://127.0.0.1:7700".into()], &options)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected) && error.contains(&path.display().to_string()),
                "{}: {error}",
                path.display()
            );
        }
    }

    #[test]
    fn a_client_behind_the_controller_is_stale_even_when_it_hears_from_it() {
        let limit = Duration::from_secs(3600);
        let freshness = Freshness::new();
        freshness.heard();
        assert!(freshness.is_stale(None, limit), "no policy yet");
        freshness.announced(5);
        assert!(!freshness.is_stale(Some(5), limit));
        // A newer revision was announced (and, say, rejected): still at 5.
        freshness.announced(6);
        freshness.heard();
        assert!(freshness.is_stale(Some(5), limit));
        assert!(!freshness.is_stale(Some(6), limit));
    }
}
