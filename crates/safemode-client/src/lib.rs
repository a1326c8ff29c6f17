//! The subscriber client: what a channel service (chatbot, IVR, agent desk,
//! web or mobile back end) links to receive its channel's policy and decide
//! locally, on every request.
//!
//! [`Subscriber::start`] returns at once with the last-known-good policy (if
//! a file of one is configured and usable) and keeps a stream to the
//! controllers up in the background: it reconnects with jittered backoff,
//! resumes from the last applied revision (so it never applies an older
//! one), acks every snapshot it applies and rejects, with a reason, one it
//! cannot use while keeping the previous. [`Subscriber::connect`] does the
//! same and waits for a first snapshot from a controller.
//!
//! Everything a controller sends is signed with its key; the subscriber is
//! configured with the controllers' public keys
//! ([`SubscriberConfig::trusted_keys`]) and refuses anything unsigned, signed
//! by another key or altered, whatever its revision or epoch: a rogue
//! process that speaks the protocol, or whoever can edit the last-known-good
//! file, cannot make it enforce a policy its controller never issued. Only
//! a signed heartbeat newer than the last one makes the policy current.
//!
//! [`Subscriber::decide`] takes no lock and allocates nothing: the applied
//! snapshot is swapped atomically, and the [`Decision`] borrows its messages
//! and reasons from it. Decisions say whether the policy may be stale, and a
//! [`FailClosed`] rule turns chosen actions into review or deny once it has
//! been stale for too long.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use safemode_client::policy::{
//!     Action, ActionSelector, Channel, Context, EffectKind, Namespace,
//! };
//! use safemode_client::{FailClosed, FailClosedEffect, Subscriber, SubscriberConfig, TrustedKeys};
//!
//! let mut config = SubscriberConfig::new(["http://127.0.0.1:7700"], Namespace::live(),
//!     Channel::parse("chatbot").unwrap(), "chatbot-1");
//! // The controller's public key: signing.pub in its data directory, or
//! // the output of `safemode key public`.
//! config.trusted_keys = Some(TrustedKeys::load("/etc/chatbot/safemode.pub".as_ref())?);
//! config.last_known_good = Some("/var/lib/chatbot/safemode.lkg".into());
//! config.fail_closed = Some(FailClosed::new(
//!     Duration::from_secs(300),
//!     vec![ActionSelector::parse("account.*").unwrap()],
//!     FailClosedEffect::Review { queue: "account-security".into() },
//! ));
//! let subscriber = Subscriber::start(config)?;
//!
//! // Parse actions once, at start; decide on every request.
//! let reset = Action::parse("account.password_reset").unwrap();
//! let decision = subscriber.decide(&reset, &Context::default());
//! if decision.effect() == EffectKind::Deny {
//!     println!("{}", decision.customer_message().unwrap_or("Not now."));
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod coarse;
mod connection;
mod decision;
mod lkg;
mod metrics;
pub mod reporting;
mod snapshot;
mod state;
mod task;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span};

pub use connection::{
    Bearer, EndpointOptions, connect_any, connect_failed, connect_first, endpoints, explain,
};
pub use decision::{Decision, FailClosed, FailClosedEffect};
pub use lkg::LastKnownGoodError;
pub use reporting::ReportReceipt;
pub use snapshot::{ActivationInfo, DecisionReport, PolicySnapshot};
pub(crate) use task::first_failure;

/// The policy core a service decides with (actions, channels, contexts,
/// outcomes), so that a service needs this crate alone.
pub use safemode_policy as policy;
use safemode_policy::{
    Action, Channel, Context, ContextClass, EffectKind, Namespace, SignalName, Verdict,
};
/// The controller keys a service trusts ([`SubscriberConfig::trusted_keys`]).
pub use safemode_signing::TrustedKeys;
pub use safemode_support::errors::error_chain;

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
        "refusing to send the token in plain text to {server}, which is not a loopback address: use https:// (with SubscriberConfig::ca_cert for a private CA), or set SubscriberConfig::allow_plaintext_token if a service mesh already encrypts this hop"
    )]
    PlaintextToken {
        /// The address.
        server: String,
    },
    /// The file of extra CA certificates cannot be used.
    #[error(
        "cannot use the CA certificate file {}: {reason}; give a PEM file of the CA certificates that signed the controller's certificate (SubscriberConfig::ca_cert)",
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
        "cannot set up TLS for {server}: {reason}; install the platform's CA certificates (e.g. the ca-certificates package) or give SubscriberConfig::ca_cert"
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
        "the controller at {server} presented a certificate this client does not trust ({reason}); give the CA that signed it in SubscriberConfig::ca_cert, and check that SubscriberConfig::servers names a host the certificate is for"
    )]
    Untrusted {
        /// The address.
        server: String,
        /// What rustls found wrong with the certificate.
        reason: String,
    },
    /// The TLS handshake failed for a reason other than the certificate.
    #[error(
        "TLS with the controller at {server} failed: {reason}; does the controller serve TLS (with a certificate and key)? a controller without TLS takes http://"
    )]
    Tls {
        /// The address.
        server: String,
        /// The cause.
        reason: String,
    },
    /// The controller could not be reached.
    #[error(
        "cannot reach the safemode controller at {server}: {reason}; is `safemode serve` running there? (SubscriberConfig::servers points elsewhere)"
    )]
    Unreachable {
        /// The address.
        server: String,
        /// The cause, from the transport.
        reason: String,
    },
    /// What answers at the address is not a safemode controller: a web
    /// server, or a gRPC server without the safemode services.
    #[error("{server} is not a safemode controller: check SubscriberConfig::servers ({reason})")]
    NotSafemode {
        /// The address.
        server: String,
        /// What answered instead.
        reason: String,
    },
    /// The address is `http://` but the controller there serves TLS.
    #[error(
        "{server} serves TLS, and this client spoke plain text to it: use https:// in SubscriberConfig::servers"
    )]
    PlaintextToTls {
        /// The address.
        server: String,
    },
    /// The controller refused the token (UNAUTHENTICATED or
    /// PERMISSION_DENIED): trying again with it cannot succeed.
    #[error(
        "the controller at {server} refused the token: {reason}; give a token it accepts (SubscriberConfig::token)"
    )]
    TokenRefused {
        /// The address.
        server: String,
        /// The controller's message.
        reason: String,
    },
    /// The controller refused or ended the stream.
    #[error("the controller refused the subscription: {0}")]
    Refused(String),
    /// The controller sent a snapshot this client cannot use.
    #[error("the controller sent a snapshot this client cannot use: {0}")]
    Rejected(String),
    /// The controller sent a snapshot or heartbeat that is not signed by a
    /// trusted key: a rogue, or a controller whose key this client was not
    /// given. Nothing of it was used.
    #[error(
        "the controller at {server} sent {what} this client does not trust: {reason}; nothing of it was used. If {server} is your controller, give its public key in SubscriberConfig::trusted_keys: signing.pub in its data directory, or `safemode key public`"
    )]
    NotTrusted {
        /// The address.
        server: String,
        /// "a snapshot" or "a heartbeat".
        what: &'static str,
        /// Why the signature was refused.
        #[source]
        reason: safemode_signing::SignatureError,
    },
    /// No snapshot arrived in time.
    #[error("no snapshot arrived within {0:?}")]
    Timeout(Duration),
    /// The subscriber's settings cannot work.
    #[error("bad subscriber settings: {0}")]
    BadConfig(String),
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
    /// Decisions say `stale` when the client has not known its policy was
    /// current (a snapshot or heartbeat at the revision it applied) for this
    /// long. Default: 30 s.
    pub stale_after: Duration,
    /// Longest pause between reconnect attempts.
    pub max_backoff: Duration,
    /// Where to keep the last-known-good policy: loaded at start, rewritten
    /// (atomically) after every applied snapshot. Default: none.
    pub last_known_good: Option<PathBuf>,
    /// Actions that go to review or are refused once the policy has been
    /// stale for too long. Default: none.
    pub fail_closed: Option<FailClosed>,
    /// The channel's own check of each snapshot before applying it.
    /// Default: none.
    pub check: Option<SnapshotCheck>,
    /// The public keys the controllers sign with: snapshots, heartbeats and
    /// the last-known-good file signed by anything else are refused.
    /// Required (the default, none, fails at start): the controller writes
    /// its key's public half to `signing.pub` in its data directory, and
    /// `safemode key public` prints it. Several keys during a rotation.
    pub trusted_keys: Option<TrustedKeys>,
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
            .field("last_known_good", &self.last_known_good)
            .field("fail_closed", &self.fail_closed)
            .field("check", &self.check.as_ref().map(|_| "<fn>"))
            .field("trusted_keys", &self.trusted_keys)
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
            last_known_good: None,
            fail_closed: None,
            check: None,
            trusted_keys: None,
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

/// A channel's own check of a snapshot before it applies it: `Err(reason)`
/// rejects it (the reason is shown in `safemode status`) and the previous
/// policy stays in force. For example, an IVR that cannot send customers to
/// the app may refuse a policy that routes them there.
pub type SnapshotCheck = Arc<dyn Fn(&PolicySnapshot) -> Result<(), String> + Send + Sync>;

/// Where the first round of attempts is reported: a snapshot applied, or
/// why none was.
type FirstReport = oneshot::Receiver<Result<(), ClientError>>;

/// A live subscription with the newest applied snapshot.
pub struct Subscriber {
    shared: Arc<state::Shared>,
    changes: watch::Receiver<Option<Arc<PolicySnapshot>>>,
    /// A fixed subscriber's sender, kept so that `changes()` waits rather
    /// than ending.
    _fixed: Option<watch::Sender<Option<Arc<PolicySnapshot>>>>,
    /// Why the subscription stopped for good, once it has.
    ended: watch::Receiver<Option<Arc<ClientError>>>,
    stop: CancellationToken,
    /// Asks the task to report at once (`None`: a fixed subscriber).
    report_asks: Option<mpsc::Sender<task::ReportAsk>>,
}

/// Reads the last-known-good file that `config` names, checked exactly as
/// [`Subscriber::start`] checks it before a controller answers: `Ok(None)`
/// when `config` names no file or the file does not exist, and an error
/// that names the file and what is wrong with it otherwise. For tools that
/// inspect a saved policy, and for testing the reader with hostile files.
pub fn read_last_known_good(
    config: &SubscriberConfig,
) -> Result<Option<PolicySnapshot>, LastKnownGoodError> {
    let Some(path) = &config.last_known_good else {
        return Ok(None);
    };
    let trusted = config
        .trusted_keys
        .as_ref()
        .ok_or_else(|| LastKnownGoodError {
            path: path.display().to_string(),
            reason: "it cannot be checked without SubscriberConfig::trusted_keys, the controller's public key".into(),
        })?;
    let loaded = lkg::load(path, &config.namespace, config.channel, trusted)?;
    Ok(loaded.map(|(snapshot, _confirmed_ago)| snapshot))
}

impl Subscriber {
    /// Starts following the channel's policy and returns at once: with the
    /// last-known-good policy if one is configured and usable (stale until a
    /// controller confirms it), else with none (stale). The stream is kept
    /// up in the background until the subscriber is dropped, or until every
    /// replica in turn refuses the token ([`Subscriber::stopped`]). Must be
    /// called inside a Tokio runtime. Fails only on a bad configuration.
    pub fn start(config: SubscriberConfig) -> Result<Subscriber, ClientError> {
        // Nobody waits for the first snapshot: the task logs why none came.
        Ok(Subscriber::begin(config)?.0)
    }

    /// Starts, and waits for a first snapshot from a controller, confirmed
    /// current by its signed heartbeat (which a replica sends right after
    /// the snapshot while it keeps up with its store): fails if none
    /// answers (every replica tried once), if the first snapshot cannot be
    /// used or is not signed by a trusted key, or if no confirmation comes
    /// in time. For tools; a channel service wants [`Subscriber::start`],
    /// which enforces the last-known-good policy while the controller is
    /// away.
    pub async fn connect(config: SubscriberConfig) -> Result<Subscriber, ClientError> {
        let (subscriber, first, deadline) = Subscriber::begin(config)?;
        match tokio::time::timeout(deadline, first).await {
            Ok(Ok(Ok(()))) => Ok(subscriber),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::Refused("the stream ended".into())),
            Err(_) => Err(ClientError::Timeout(deadline)),
        }
    }

    /// Starts; returns the subscriber, where the first round of attempts
    /// will be reported, and how long that round may take.
    fn begin(config: SubscriberConfig) -> Result<(Subscriber, FirstReport, Duration), ClientError> {
        let endpoints = endpoints(&config.servers, &config.endpoint_options())?;
        let trusted = config.trusted_keys.clone().ok_or_else(|| {
            ClientError::BadConfig(
                "no trusted keys: set SubscriberConfig::trusted_keys to the controller's public key, which it writes to signing.pub in its data directory and `safemode key public` prints; without it nothing the controller sends can be checked".into(),
            )
        })?;
        // Everything that would make every attempt fail is refused now, not
        // retried forever.
        Bearer::new(config.token.as_deref())?;
        safemode_wire::check_subscriber_id(&config.subscriber_id)
            .map_err(|e| ClientError::BadConfig(format!("subscriber id: {e}")))?;
        if config.stale_after.is_zero() {
            return Err(ClientError::BadConfig(
                "stale_after must be longer than zero".into(),
            ));
        }
        if let Some(path) = &config.last_known_good {
            lkg::check_writable(path)
                .map_err(|e| ClientError::BadConfig(format!("last-known-good file: {e}")))?;
        }
        let book = Arc::<reporting::Book>::default();
        let loaded = match &config.last_known_good {
            None => None,
            Some(path) => match lkg::load(path, &config.namespace, config.channel, &trusted) {
                Ok(Some((snapshot, ago))) => {
                    info!(path = %path.display(), revision = snapshot.revision, confirmed_ago = ?ago,
                        "enforcing the last-known-good policy until a controller answers");
                    let mut snapshot = snapshot;
                    snapshot.tally =
                        Some(Arc::new(reporting::Tally::new(&book, snapshot.revision)));
                    Some((Arc::new(snapshot), ago))
                }
                Ok(None) => None,
                Err(e) => {
                    error!(error = %e,
                        "starting with no policy (decisions say stale) until a controller answers");
                    None
                }
            },
        };
        let fail_closed = config
            .fail_closed
            .as_ref()
            .map(decision::FailClosedRule::new);
        let first_policy = loaded.as_ref().map(|(snapshot, _)| snapshot.clone());
        let shared = Arc::new(state::Shared::new(
            loaded,
            config.stale_after,
            fail_closed,
            (
                config.namespace.to_string(),
                config.channel.as_str().to_string(),
            ),
            book,
        ));
        let (changes_tx, changes) = watch::channel(first_policy);
        let stop = CancellationToken::new();
        let span =
            info_span!("subscriber", channel = %config.channel, namespace = %config.namespace);
        let keep = config.last_known_good.clone().map(|path| {
            let (tx, rx) = watch::channel(None);
            let writer = task::keep_last_known_good(path, rx);
            let stop = stop.clone();
            tokio::spawn(
                async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = writer => {}
                    }
                }
                .instrument(span.clone()),
            );
            tx
        });
        let (first_tx, first_rx) = oneshot::channel();
        let (ended_tx, ended) = watch::channel(None);
        let (report_tx, report_rx) = mpsc::channel(4);
        // Every endpoint gets one try before the first connect gives up.
        let first_deadline = config.connect_timeout * (endpoints.len() as u32 + 1);
        let task = task::Task {
            trusted,
            last_beat: None,
            next: rand::random_range(0..endpoints.len()),
            endpoints,
            config,
            shared: shared.clone(),
            changes: changes_tx,
            keep,
            kept: None,
            first: Some(first_tx),
            first_errors: Vec::new(),
            refusals: 0,
            ended: ended_tx,
            reporting: task::Reporting::new(report_rx),
        };
        tokio::spawn(task.run(stop.clone()).instrument(span));
        let subscriber = Subscriber {
            shared,
            changes,
            _fixed: None,
            ended,
            stop,
            report_asks: Some(report_tx),
        };
        Ok((subscriber, first_rx, first_deadline))
    }

    /// A subscriber that never connects and always decides with `snapshot`,
    /// never stale: for testing a channel service against a known policy.
    pub fn fixed(snapshot: PolicySnapshot) -> Subscriber {
        let snapshot = Arc::new(snapshot);
        let labels = (
            snapshot.namespace.to_string(),
            snapshot.channel.as_str().to_string(),
        );
        let shared = Arc::new(state::Shared::new(
            Some((snapshot.clone(), Some(Duration::ZERO))),
            Duration::MAX,
            None,
            labels,
            Arc::default(),
        ));
        shared.freshness.observe(false);
        let (fixed, changes) = watch::channel(Some(snapshot));
        Subscriber {
            shared,
            changes,
            _fixed: Some(fixed),
            ended: watch::channel(None).1,
            stop: CancellationToken::new(),
            report_asks: None,
        }
    }

    /// Reports this subscriber's metrics through `meter` (the service's
    /// own meter provider's, e.g. `opentelemetry::global::meter("chatbot")`):
    /// decisions by action and effect, stale and failed-closed decisions,
    /// the applied revision, applies and rejects, each labelled with the
    /// subscriber's namespace and channel. They are counted whether or not
    /// this is called; registering only makes the SDK read them when it
    /// collects. Call it once per meter.
    pub fn register_metrics(&self, meter: &opentelemetry::metrics::Meter) {
        let (namespace, channel) = &self.shared.labels;
        metrics::register(meter, &self.shared, namespace, channel);
    }

    /// Counts `n` of the signal `name` (`login.failed`,
    /// `password_reset.requested`, ...), reported with the next report.
    /// The client counts failed step-ups and exhausted attempts itself
    /// (`safemode.step_up_failed`, `safemode.attempts_exhausted`). At most
    /// [`reporting::MAX_SIGNAL_NAMES`] names per report interval; counts of
    /// further names are dropped and logged.
    pub fn signal(&self, name: &SignalName, n: u64) {
        self.shared.signals.add(name, n);
    }

    /// Sends what was counted now instead of at the next interval, and
    /// waits (up to `timeout`) for the controller's answer: for tools such
    /// as `safemode signal`. The controller takes one report per subscriber
    /// id at most every [`reporting::REPORT_EVERY`], over all its streams
    /// (the first at any time); counts of a report refused for coming too
    /// soon, or lost with its stream, are kept for the next. A controller
    /// that takes no reports (an older version) is sent none.
    pub async fn report_now(&self, timeout: Duration) -> Result<ReportReceipt, ClientError> {
        let Some(asks) = &self.report_asks else {
            return Err(ClientError::BadConfig(
                "a fixed subscriber has no controller to report to".into(),
            ));
        };
        let (tx, rx) = oneshot::channel();
        let asked = async {
            asks.send(tx)
                .await
                .map_err(|_| ClientError::Refused("the subscription stopped".into()))?;
            rx.await.map_err(|_| {
                ClientError::Refused(
                    "the stream ended before the controller answered the report".into(),
                )
            })
        };
        match tokio::time::timeout(timeout, asked).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// The newest applied snapshot.
    pub fn current(&self) -> Option<Arc<PolicySnapshot>> {
        self.shared.current.load_full()
    }

    /// A receiver that wakes on every newly applied snapshot, for services
    /// that must react (a bot that narrows its intents).
    pub fn changes(&self) -> watch::Receiver<Option<Arc<PolicySnapshot>>> {
        self.changes.clone()
    }

    /// Waits until the subscription stops for good and says why: every
    /// controller replica in turn refused the token (UNAUTHENTICATED or
    /// PERMISSION_DENIED), so trying again cannot help. Any other failure
    /// is retried in the background, and this never returns.
    pub async fn stopped(&self) -> Arc<ClientError> {
        let mut ended = self.ended.clone();
        let why = match ended.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            // The task ended without a reason: it was cancelled.
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Whether the policy may be out of date: the client has not known it
    /// was current for longer than the staleness limit (or never has since
    /// it started), or the controller holds a revision it has not applied
    /// (for example one this client rejected).
    pub fn is_stale(&self) -> bool {
        self.shared.freshness.staleness().stale
    }

    /// Decides `action` for `ctx` with the newest snapshot. Takes no lock and
    /// allocates nothing. Inlined into the caller (its rare paths are calls
    /// of their own), so that the decision is built where it is used: 3% of
    /// a decision's time in `safemode-bench`.
    #[inline(always)]
    pub fn decide<'a>(&'a self, action: &'a Action, ctx: &Context) -> Decision<'a> {
        let snapshot = self.shared.current.load();
        // No clock read while the policy is current and far from its limit.
        let staleness = self.shared.freshness.decision_staleness();
        let policy = snapshot.as_deref().map(|s| &s.policy);
        let verdict = match policy {
            Some(policy) => policy.verdict(action, ctx),
            None => Verdict::allow(),
        };
        // What is counted is read from the verdict, not from its outcome.
        let fail_closed = self.shared.fail_closed.as_ref().filter(|rule| {
            staleness.stale && rule.overrides(action.as_str(), staleness.for_, verdict.kind())
        });
        let (effect, escalated) = match fail_closed {
            Some(rule) => (rule.effect(), rule.is_escalated()),
            None => (verdict.kind(), verdict.is_escalated()),
        };
        // Counted once, for the report and the metrics, into the tally of
        // the snapshot used: one atomic addition (`reporting.rs`).
        let class = ContextClass::of_decision(ctx, escalated);
        let tally = snapshot
            .as_deref()
            .and_then(|s| s.tally.as_deref())
            .unwrap_or(&self.shared.unapplied);
        tally.count(
            metrics::action_slot(action),
            class,
            effect,
            staleness.stale,
            fail_closed.is_some(),
        );
        // A step-up whose attempts ran out is counted by its class, above.
        if ctx.failed_attempts > 0 && effect == EffectKind::StepUp && !class.attempts_exhausted {
            self.shared.signals.step_up_failed();
        }
        Decision {
            snapshot,
            action,
            verdict,
            fail_closed,
            stale: staleness.stale,
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_reaches_a_log() {
        let mut config = SubscriberConfig::new(
            ["http://127.0.0.1:7700"],
            Namespace::live(),
            Channel::parse("web").unwrap(),
            "web-1",
        );
        config.token = Some("smt_secret".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("smt_secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
