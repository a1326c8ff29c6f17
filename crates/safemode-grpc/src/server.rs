//! Running a controller replica: check the configuration, open the store and
//! the mode catalogue, serve the gRPC API (control, subscription, health,
//! reflection) and shut down gracefully.
//!
//! [`start`] returns a [`RunningServer`] with the bound address, so tests run
//! real servers on `127.0.0.1:0`; `safemode serve` calls it and waits for a
//! signal. With a certificate and key it serves gRPC over TLS (rustls), so
//! tokens need not cross the network in plain text.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::{info, warn};

use crate::coalesce::Coalesced;
use crate::fleet::{Fleet, FleetApi, PeerSettings, peer_settings};
use crate::limits::{self, StreamLimits};
use crate::{Authenticator, ControlApi, StreamConfig, SubscriptionApi};
use safemode_controller::auth::{Reload, Tokens, TokensFile};
use safemode_controller::fleet::ReplicaRecord;
use safemode_controller::{Controller, ControllerConfig, Layout};
use safemode_policy::catalog::Catalog;
use safemode_signing::{SigningKey, TrustedKeys};
use safemode_store::Store;
use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};
pub use safemode_store::etcd::EtcdTls;
use safemode_store::etcd::{EtcdOptions, EtcdStore};
use safemode_support::files::{self, Existing, Readers};
use safemode_support::pem;
use safemode_wire::proto;

/// Where durable state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// One local file in `data_dir`: a single replica, nothing to install.
    Embedded {
        /// Directory of the store file; created if missing.
        data_dir: PathBuf,
    },
    /// An etcd cluster, shared by every replica.
    Etcd {
        /// Client URLs of the members.
        endpoints: Vec<String>,
        /// Every key safemode writes starts with this (see ARCHITECTURE.md).
        prefix: String,
        /// TLS files, for `https://` endpoints.
        tls: EtcdTls,
    },
}

type ControlServer = proto::control_service_server::ControlServiceServer<ControlApi>;
type FleetServer = proto::fleet_service_server::FleetServiceServer<FleetApi>;
type SubscriptionServer =
    crate::fanout::subscription_service_server::SubscriptionServiceServer<SubscriptionApi>;

/// Where the key a replica signs with comes from.
#[derive(Clone, Debug, Default)]
pub enum SigningKeySource {
    /// `signing.key` in the embedded store's data directory, made on first
    /// start (its public half is written beside it as `signing.pub`). With
    /// etcd there is no such directory: every replica must be given the same
    /// key, so this is refused.
    #[default]
    InDataDir,
    /// A PEM file (PKCS#8 Ed25519), e.g. a mounted Kubernetes Secret.
    File(PathBuf),
    /// A key already in memory (tests, a local drill, the bench).
    Key(SigningKey),
}

/// Everything `safemode serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP listener (`/healthz`, `/readyz`); `None`:
    /// no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// Serve the console on a non-loopback `http_listen` although it is
    /// plain HTTP: a TLS-terminating proxy fronts it (README, "The console").
    pub console_plain_http: bool,
    /// How often readiness is checked for the gRPC health service.
    pub readiness_interval: Duration,
    /// Which OTLP exports run (metrics here; traces are the process's
    /// `tracing` subscriber's): none unless the `OTEL_EXPORTER_OTLP_*`
    /// variables ask (`telemetry::Otlp::from_env`).
    pub otlp: crate::telemetry::Otlp,
    /// The store.
    pub store: StoreConfig,
    /// This replica's name in status, audit and logs; `None` names it
    /// after its host and the port it listens on (`vm:7700`), so that two
    /// replicas on one host are told apart.
    pub replica: Option<String>,
    /// Where the other replicas reach this one (`host:port`) to gather the
    /// fleet's status; `None`: the listen address, which must then name one
    /// host (not `0.0.0.0`) when the store is etcd.
    pub advertise: Option<String>,
    /// CA certificates (PEM) that verify other replicas' TLS certificates
    /// when they are asked for the fleet's status; required with TLS on
    /// etcd (`None` is refused there: which CA vouches is never guessed).
    pub peer_ca: Option<PathBuf>,
    /// The name other replicas' certificates are checked against; `None`:
    /// the host of each one's advertised address.
    pub peer_tls_name: Option<String>,
    /// How long this replica's record in the store outlives it when it
    /// stops without saying goodbye (the record's lease).
    pub replica_ttl: Duration,
    /// Directory of mode files; `None` serves the built-in standard modes.
    pub modes_dir: Option<PathBuf>,
    /// Directory of runbooks; `None` serves the built-in standard runbooks.
    pub runbooks_dir: Option<PathBuf>,
    /// The tokens file; without one, the server listens on loopback only and
    /// every caller may do everything.
    pub tokens: Option<PathBuf>,
    /// How often the tokens file is checked for changes (it is also re-read
    /// on SIGHUP).
    pub tokens_reload: Duration,
    /// PEM certificate chain (the server's certificate first) to serve TLS
    /// with; needs `tls_key`. Without both, the server speaks plain HTTP/2.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Whether runbooks whose drill expectations their own stages
    /// contradict are refused (always, but for the controller a drill runs
    /// itself: there the drill shows and fails the expectation).
    pub runbook_expectations: safemode_policy::Expectations,
    /// Heartbeat interval on subscription streams.
    pub heartbeat: Duration,
    /// How long shutdown waits for streams and calls to finish.
    pub shutdown_grace: Duration,
    /// How many subscription streams one token, one connection and the
    /// whole replica may hold.
    pub stream_limits: StreamLimits,
    /// The key snapshots, heartbeats and audit entries are signed with.
    pub signing_key: SigningKeySource,
    /// A PEM file of further public keys whose audit entries verify (keys
    /// used before a rotation); this replica's own key is always trusted.
    pub trusted_keys: Option<PathBuf>,
    /// Tunables of the controller.
    pub controller: ControllerConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            store: StoreConfig::Embedded {
                data_dir: PathBuf::from("safemode-data"),
            },
            replica: None,
            advertise: None,
            peer_ca: None,
            peer_tls_name: None,
            replica_ttl: Duration::from_secs(15),
            http_listen: None,
            console_plain_http: false,
            readiness_interval: Duration::from_secs(2),
            otlp: crate::telemetry::Otlp::default(),
            modes_dir: None,
            runbooks_dir: None,
            tokens: None,
            tokens_reload: Duration::from_secs(5),
            tls_cert: None,
            tls_key: None,
            runbook_expectations: safemode_policy::Expectations::MustHold,
            heartbeat: StreamConfig::default().heartbeat,
            shutdown_grace: Duration::from_secs(10),
            stream_limits: StreamLimits::default(),
            signing_key: SigningKeySource::default(),
            trusted_keys: None,
            controller: ControllerConfig::default(),
        }
    }
}

/// A replica serving in the background.
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The address of its plain-HTTP listener, when it has one.
    pub http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    join: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Asks the server to stop: streams end, new connections are refused.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the server to stop; re-raises a panic of the server task.
    pub async fn join(self) -> anyhow::Result<()> {
        match self.join.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown();
        self.join().await
    }
}

/// The settings a replica serves with, checked and read from their files:
/// what [`start`] and [`check`] share.
struct Settings {
    tokens: Option<(TokensFile, Tokens)>,
    tls: Option<ServerTlsConfig>,
    /// The same certificate for the `--http-listen` listener (HTTPS).
    https: Option<Arc<rustls::ServerConfig>>,
    catalog: Catalog,
    peers: PeerSettings,
}

/// Checks `config`'s values and reads its files (tokens, TLS certificate and
/// key, modes and runbooks), binding and opening nothing.
fn settings(config: &ServeConfig) -> anyhow::Result<Settings> {
    let tokens = match &config.tokens {
        Some(path) => Some(TokensFile::open(path)?),
        None if !config.listen.ip().is_loopback() => bail!(
            "refusing to listen on {} without a tokens file: anyone who reaches it could switch protections off; give --tokens FILE (see `safemode token create`), or listen on loopback (--listen 127.0.0.1:{})",
            config.listen,
            config.listen.port()
        ),
        None => None,
    };
    if config.heartbeat.is_zero() {
        bail!("the heartbeat interval must be longer than zero");
    }
    let streams = config.stream_limits;
    if streams.per_token == 0 || streams.per_connection == 0 || streams.per_replica == 0 {
        bail!(
            "the stream limits (--max-streams, --max-streams-per-token, --max-streams-per-connection) must be at least 1"
        );
    }
    if config.controller.max_namespaces == 0 {
        bail!("--max-namespaces must be at least 1");
    }
    if config.tokens_reload.is_zero() {
        bail!("the tokens file check interval must be longer than zero");
    }
    let tls = server_tls(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
    let https = match (&tls, &config.tls_cert, &config.tls_key) {
        (Some(_), Some(cert), Some(key)) => Some(crate::https::server_config(cert, key)?),
        _ => None,
    };
    if https.is_some() && config.console_plain_http {
        bail!(
            "--console-plain-http is for a plain-HTTP --http-listen behind a TLS proxy, but with --tls-cert that listener speaks HTTPS itself and serves the console: drop --console-plain-http"
        );
    }
    let peers = peer_settings(config)?;
    let catalog = Catalog::load_checking(
        config.modes_dir.as_deref(),
        config.runbooks_dir.as_deref(),
        config.runbook_expectations,
    )
    .context("cannot load the modes and runbooks")?;
    Ok(Settings {
        tokens,
        tls,
        https,
        catalog,
        peers,
    })
}

/// What `serve --check` finds: every setting checked and every file read
/// (tokens, certificates, keys, modes, runbooks), and what the replica
/// would serve, in lines for people. Nothing is bound, no store is opened,
/// and nothing is written (a signing key the embedded store would make is
/// said, not made).
pub fn check(config: &ServeConfig) -> anyhow::Result<Vec<String>> {
    let Settings {
        tokens,
        tls,
        https,
        catalog,
        peers,
    } = settings(config)?;
    let key = match (&config.signing_key, &config.store) {
        (SigningKeySource::Key(key), _) => format!("signing key {}", key.key_id()),
        (SigningKeySource::File(path), _) => {
            let key = SigningKey::load(path)
                .map_err(|e| anyhow!("cannot use the signing key (--signing-key): {e}"))?;
            format!("signing key {} from {}", key.key_id(), path.display())
        }
        (SigningKeySource::InDataDir, StoreConfig::Embedded { data_dir }) => {
            let path = data_dir.join(SIGNING_KEY_FILE);
            if path.exists() {
                let key = SigningKey::load(&path)
                    .map_err(|e| anyhow!("cannot use the signing key {}: {e}", path.display()))?;
                format!("signing key {} from {}", key.key_id(), path.display())
            } else {
                format!(
                    "a new signing key, made at {} on first start",
                    path.display()
                )
            }
        }
        (SigningKeySource::InDataDir, StoreConfig::Etcd { .. }) => bail!(
            "with --store etcd, give --signing-key FILE: every replica must sign with the same key (make one with `openssl genpkey -algorithm ed25519 -out signing.key`)"
        ),
    };
    let trusted = match config.trusted_keys.as_deref() {
        Some(path) => TrustedKeys::load(path)
            .map_err(|e| anyhow!("cannot use the trusted keys (--trusted-keys): {e}"))?
            .keys()
            .len(),
        None => 0,
    };
    let store = match &config.store {
        StoreConfig::Embedded { data_dir } => {
            format!("embedded store in {}", data_dir.display())
        }
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            Layout::new(prefix).map_err(|e| anyhow!("--etcd-prefix: {e}"))?;
            let options = EtcdOptions::checked(endpoints.clone(), tls).map_err(|e| anyhow!(e))?;
            format!(
                "etcd at {} (prefix {prefix}{}); not contacted",
                endpoints.join(","),
                if options.tls.is_some() { ", TLS" } else { "" }
            )
        }
    };
    let replica = config
        .replica
        .clone()
        .unwrap_or_else(|| default_replica_name(config.listen.port()));
    Ok([
        format!("would serve on {} as replica {replica}", config.listen),
        format!(
            "the other replicas reach it at {} (record renewed every {} of a {} lease){}",
            peers
                .advertise
                .clone()
                .unwrap_or_else(|| config.listen.to_string()),
            seconds(peers.ttl / 3),
            seconds(peers.ttl),
            match (&peers.ca, &peers.tls_name) {
                (None, _) => String::new(),
                (Some(_), Some(name)) => format!(", checking their certificates for {name}"),
                (Some(_), None) => ", checking their certificates for each one's host".to_string(),
            }
        ),
        match config.http_listen {
            Some(http) if https.is_some() => format!(
                "HTTP: /healthz, /readyz, /metrics and the console on {http} over HTTPS with the gRPC certificate (ALPN h2, http/1.1)"
            ),
            Some(http) if http.ip().is_loopback() => format!(
                "HTTP: /healthz, /readyz, /metrics and the console on {http} over plain HTTP (loopback)"
            ),
            Some(http) if config.console_plain_http => format!(
                "HTTP: /healthz, /readyz, /metrics and the console on {http} over plain HTTP, behind a TLS proxy (--console-plain-http)"
            ),
            Some(http) => format!(
                "HTTP: /healthz, /readyz and /metrics on {http} over plain HTTP; the console is refused there (serve TLS with --tls-cert, or put a TLS proxy in front and pass --console-plain-http)"
            ),
            None => "HTTP: none (no --http-listen)".to_string(),
        },
        format!("store: {store}"),
        format!(
            "modes: {}, runbooks: {} (catalogue fingerprint {})",
            catalog.modes.len(),
            catalog.runbooks.len(),
            &catalog.fingerprint[..12.min(catalog.fingerprint.len())]
        ),
        match &tokens {
            Some((_, tokens)) => format!("tokens: {} from the tokens file", tokens.len()),
            None => "tokens: none (no tokens file: loopback only, every caller may do everything)"
                .to_string(),
        },
        format!("gRPC: {}", if tls.is_some() { "TLS" } else { "plain text" }),
        match (config.otlp.traces, config.otlp.metrics) {
            (false, false) => "OTLP: none (no OTEL_EXPORTER_OTLP_* endpoint)".to_string(),
            (true, true) => "OTLP: traces and metrics over gRPC".to_string(),
            (true, false) => "OTLP: traces over gRPC".to_string(),
            (false, true) => "OTLP: metrics over gRPC".to_string(),
        },
        format!("{key}; {} more trusted key(s)", trusted),
    ]
    .into_iter()
    .chain(
        unaccepted_dead_ends(&catalog)
            .into_iter()
            .map(|warning| format!("warning: {warning}")),
    )
    .chain(["check passed: nothing was bound, opened or written".to_string()])
    .collect())
}

/// Each stage of `catalog`'s runbooks that leaves a dead end it does not
/// accept, in one line: served all the same (a controller that refused to
/// start would protect nothing), said at start, in `serve --check`, and when
/// an incident reaches the stage.
fn unaccepted_dead_ends(catalog: &Catalog) -> Vec<String> {
    let mut warnings = Vec::new();
    for runbook in catalog.runbooks.iter() {
        for stage in &runbook.stages {
            let unaccepted: Vec<String> = runbook
                .stage_dead_ends(stage, &catalog.modes)
                .iter()
                .filter(|d| !stage.accepts_dead_end(d.action))
                .map(|d| d.describe())
                .collect();
            if !unaccepted.is_empty() {
                warnings.push(format!(
                    "runbook {} stage {} leaves a dead end it does not accept: {}; `safemode runbook lint` says how to fix it",
                    runbook.name,
                    stage.severity,
                    unaccepted.join(", ")
                ));
            }
        }
    }
    warnings
}

/// How long a stopping replica waits to remove its fleet record.
const FLEET_GOODBYE: Duration = Duration::from_secs(3);

/// A duration for people: `5s`, `6.7s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Checks the configuration, opens store and catalogue, binds, and serves in
/// the background. Nothing is bound when the configuration is bad.
pub async fn start(config: ServeConfig) -> anyhow::Result<RunningServer> {
    let Settings {
        tokens,
        tls,
        https,
        catalog,
        peers,
    } = settings(&config)?;
    if tokens.is_some() && tls.is_none() && !config.listen.ip().is_loopback() {
        warn!(listen = %config.listen, "tokens will cross the network in plain text; serve TLS (--tls-cert/--tls-key) unless a service mesh encrypts this hop");
    }
    let (signing_key, trusted_keys) = signing_keys(
        &config.signing_key,
        &config.store,
        config.trusted_keys.as_deref(),
    )?;
    let (store, layout) = open_store(&config.store).await?;
    // Said once the settings are all checked: a refused start says one line.
    info!(key = %signing_key.key_id(), trusted = trusted_keys.keys().len(), "signing snapshots, heartbeats and audit entries");
    let listener =
        listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = match config.http_listen {
        Some(http) => {
            Some(listen(http).with_context(|| format!("cannot listen on {http} (--http-listen)"))?)
        }
        None => None,
    };
    let http_addr = match &http_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let replica = config
        .replica
        .clone()
        .unwrap_or_else(|| default_replica_name(addr.port()));

    let shutdown = CancellationToken::new();
    let authentication = tokens.is_some();
    // The tokens in force, replaced when the file changes. SIGHUP is
    // listened for from here on; the task that re-reads the file starts
    // once nothing else can fail.
    let (tokens, reloader) = match tokens {
        Some((file, tokens)) => {
            let (tx, rx) = tokio::sync::watch::channel(Arc::new(tokens));
            (Some(rx), Some((file, tx, Hangups::listen())))
        }
        None => (None, None),
    };
    for warning in unaccepted_dead_ends(&catalog) {
        warn!("{warning}");
    }
    let modes = catalog.modes.len();
    let runbooks = catalog.runbooks.len();
    let controller = Controller::start(
        store.clone(),
        Arc::new(catalog),
        ControllerConfig {
            layout,
            replica: replica.clone(),
            signing_key,
            trusted_keys,
            ..config.controller.clone()
        },
        shutdown.child_token(),
    )
    .await
    .context("cannot read the store")?;
    let metrics =
        crate::telemetry::ServerMetrics::new(&controller, &replica, config.otlp, &shutdown)?;
    let stream_config = StreamConfig {
        heartbeat: config.heartbeat,
        limits: config.stream_limits,
        metrics: metrics.streams(),
        ..StreamConfig::default()
    };
    let authenticator = Authenticator::new(tokens).counting(controller.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ControlServer>().await;
    health.set_serving::<SubscriptionServer>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build the reflection service")?;

    // The others reach this replica at the advertised address, or where it
    // listens (a single host: checked with the settings).
    let advertised = peers.advertise.clone().unwrap_or_else(|| addr.to_string());
    let serves_tls = tls.is_some();
    let fleet_record = controller.join_fleet(
        ReplicaRecord {
            replica: replica.clone(),
            address: advertised.clone(),
            tls: serves_tls,
            started_at: jiff::Timestamp::now(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        peers.ttl,
    );
    let fleet = Arc::new(Fleet::new(
        controller.clone(),
        replica.clone(),
        advertised.clone(),
        peers,
    ));
    let console = crate::console::ConsoleSettings::new(
        &controller,
        &replica,
        &fleet,
        &authenticator,
        authentication,
        http_addr,
        config.console_plain_http || https.is_some(),
        &shutdown,
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // Checked by `server_tls` already.
        builder = builder.tls_config(tls).context("cannot serve TLS")?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Every answer names the replica that gave it.
        .layer(tower::util::MapResponseLayer::new(answered_by(&replica)))
        // Every call is a span, in the caller's trace.
        .layer(crate::telemetry::RpcTraceLayer)
        // Health needs no token (probes and load balancers call it); every
        // other service does.
        .add_service(health_service)
        // No token: replicas sign these requests with the fleet's key, and
        // the service checks that before anything else.
        .add_service(
            FleetServer::new(FleetApi::new(controller.clone(), replica.clone()))
                .max_decoding_message_size(limits::MAX_FLEET_REQUEST_BYTES),
        )
        .add_service(InterceptedService::new(reflection, authenticator.clone()))
        .add_service(InterceptedService::new(
            reflection_alpha,
            authenticator.clone(),
        ))
        // Oversized requests are refused before they are decoded.
        .add_service(InterceptedService::new(
            ControlServer::new(ControlApi::new(
                controller.clone(),
                replica.clone(),
                fleet.clone(),
            ))
            .max_decoding_message_size(limits::MAX_CONTROL_REQUEST_BYTES),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            SubscriptionServer::new(SubscriptionApi::new(controller.clone(), stream_config))
                .max_decoding_message_size(limits::MAX_SUBSCRIBER_MESSAGE_BYTES),
            authenticator,
        ));

    info!(%addr, %replica, store = %store.describe(), modes, runbooks,
        authentication, tls = serves_tls, signing_key = %controller.signing_key().key_id(),
        "safemode controller serving");
    // The gRPC health service says what /readyz says.
    tokio::spawn(tracing::Instrument::instrument(
        follow_readiness(
            controller.clone(),
            health.clone(),
            config.readiness_interval,
            shutdown.clone(),
        ),
        tracing::info_span!("readiness", %replica),
    ));
    // Runbook triggers over the fleet's signals raise proposals.
    tokio::spawn(tracing::Instrument::instrument(
        crate::triggers::evaluate_triggers(
            controller.clone(),
            fleet.clone(),
            crate::triggers::TRIGGER_INTERVAL,
            shutdown.clone(),
        ),
        tracing::info_span!("triggers", %replica),
    ));
    if let Some(listener) = http_listener {
        // Every answer of the listener carries the console's security
        // headers, bare 404s, /metrics and the probes included.
        let app = crate::console::secured(
            http_surfaces(controller.clone(), metrics.clone())
                .merge(crate::console::router(console)),
        );
        let stop = shutdown.clone();
        info!(addr = ?http_addr, https = https.is_some(), "serving /healthz, /readyz, /metrics and the console");
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let served = crate::https::serve(listener, https, app, stop).await;
                if let Err(e) = served {
                    warn!(error = %e, "the HTTP listener failed");
                }
            },
            tracing::info_span!("http", %replica),
        ));
    }
    if let Some((file, tx, hangups)) = reloader {
        tokio::spawn(tracing::Instrument::instrument(
            reload_tokens(file, tx, hangups, config.tokens_reload, shutdown.clone()),
            tracing::info_span!("tokens", %replica),
        ));
    }
    // Small frames of many streams share a write (see `coalesce`); over
    // TLS, rustls decides how h2 writes.
    let coalesced = if serves_tls {
        Coalesced::beneath_tls
    } else {
        Coalesced::new
    };
    let incoming = futures_util::StreamExt::map(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        move |accepted| accepted.map(coalesced),
    );
    let token = shutdown.clone();
    let grace = config.shutdown_grace;
    let span = tracing::info_span!("server", %addr, %replica);
    let join = tokio::spawn(tracing::Instrument::instrument(
        async move {
            let signal = token.clone();
            let serve = router.serve_with_incoming_shutdown(incoming, async move {
                signal.cancelled().await;
                health.set_not_serving::<ControlServer>().await;
                health.set_not_serving::<SubscriptionServer>().await;
                info!("shutting down: draining streams and calls");
            });
            tokio::pin!(serve);
            tokio::select! {
                result = &mut serve => result.context("the gRPC server failed")?,
                () = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
                    warn!(?grace, "calls still running after the shutdown grace period; stopping anyway");
                }
            }
            // The fleet's record goes at once, not when its lease lapses.
            if tokio::time::timeout(FLEET_GOODBYE, fleet_record)
                .await
                .is_err()
            {
                warn!("could not remove this replica's fleet record in time; it lapses by itself");
            }
            // What the OTLP exporter still holds goes out before the end.
            let _ = tokio::task::spawn_blocking(move || metrics.shutdown()).await;
            info!("stopped");
            Ok(())
        },
        span,
    ));
    Ok(RunningServer {
        addr,
        http_addr,
        shutdown,
        join,
    })
}

/// The plain-HTTP surfaces: `/healthz` (the process lives), `/readyz`
/// (the replica has read `live`, and the store and its watch are healthy;
/// 503 with the reason when not) and `/metrics` (the Prometheus text
/// format). Nothing there changes state.
fn http_surfaces(
    controller: Arc<Controller>,
    metrics: Arc<crate::telemetry::ServerMetrics>,
) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render().await,
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let controller = controller.clone();
                async move {
                    match controller.readiness().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
}

/// Keeps the gRPC health service saying what `/readyz` says, checking every
/// `interval` until `shutdown` (which then says NOT_SERVING itself).
async fn follow_readiness(
    controller: Arc<Controller>,
    health: tonic_health::server::HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ready = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let now = controller.readiness().await;
        if shutdown.is_cancelled() {
            return;
        }
        match (&now, ready) {
            (Ok(()), false) => {
                info!("ready again");
                health.set_serving::<ControlServer>().await;
                health.set_serving::<SubscriptionServer>().await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
            }
            (Err(why), true) => {
                warn!(%why, "not ready: health says NOT_SERVING");
                health.set_not_serving::<ControlServer>().await;
                health.set_not_serving::<SubscriptionServer>().await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            _ => {}
        }
        ready = now.is_ok();
    }
}

/// Reads and checks the TLS certificate and key (both or neither), so that
/// a wrong file stops `serve` at once with its name, before anything is
/// bound. `None`: serve without TLS.
fn server_tls(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (cert_path, key_path) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => bail!(
            "--tls-cert needs --tls-key: give the certificate's private key too (or neither, to serve without TLS)"
        ),
        (None, Some(_)) => bail!(
            "--tls-key needs --tls-cert: give the certificate chain too (or neither, to serve without TLS)"
        ),
    };
    let in_pem = |what: &str, path: &Path, error: pem::PemError| match error {
        pem::PemError::Read(_) => anyhow!(pem::describe(what, path, &error)),
        _ => anyhow!("{}; give {what} in PEM", pem::describe(what, path, &error)),
    };
    let cert_pem =
        pem::certificates(cert_path).map_err(|e| in_pem("the TLS certificate", cert_path, e))?;
    let key_pem = pem::private_key(key_path).map_err(|e| in_pem("the TLS key", key_path, e))?;
    // tonic's TLS acceptor takes rustls' process-wide crypto provider. ring
    // is the one tonic is built with; installing it keeps the choice
    // unambiguous should another dependency enable a second provider (a
    // provider installed earlier by the embedding program is kept).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        // A client that stalls the handshake does not hold a connection.
        .timeout(Duration::from_secs(10));
    // Building the acceptor checks that the key is the certificate's.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| {
            anyhow!(
                "cannot serve TLS with the certificate {} and the key {}: {}; is the key the certificate's?",
                cert_path.display(),
                key_path.display(),
                safemode_support::errors::error_chain(&e)
            )
        })?;
    Ok(Some(tls))
}

/// The key this replica signs with, and the keys whose signatures it
/// accepts (its own and those of `trusted`).
fn signing_keys(
    source: &SigningKeySource,
    store: &StoreConfig,
    trusted: Option<&Path>,
) -> anyhow::Result<(SigningKey, TrustedKeys)> {
    let key = match (source, store) {
        (SigningKeySource::Key(key), _) => key.clone(),
        (SigningKeySource::File(path), _) => SigningKey::load(path)
            .map_err(|e| anyhow!("cannot use the signing key (--signing-key): {e}"))?,
        (SigningKeySource::InDataDir, StoreConfig::Embedded { data_dir }) => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
            let path = data_dir.join(SIGNING_KEY_FILE);
            let (key, created) = SigningKey::load_or_create(&path)
                .map_err(|e| anyhow!("cannot use the signing key {}: {e}", path.display()))?;
            let public = data_dir.join(PUBLIC_KEY_FILE);
            files::write_atomically(
                &public,
                key.public_key().to_pem().as_bytes(),
                Readers::Anyone,
                Existing::Replace,
            )
            .with_context(|| format!("cannot write {}", public.display()))?;
            if created {
                info!(key = %key.key_id(), path = %path.display(), public = %public.display(),
                    "made a new signing key; channel services must trust its public half");
            }
            key
        }
        (SigningKeySource::InDataDir, StoreConfig::Etcd { .. }) => bail!(
            "with --store etcd, give --signing-key FILE: every replica must sign with the same key (make one with `openssl genpkey -algorithm ed25519 -out signing.key`)"
        ),
    };
    let mut keys = vec![key.public_key().clone()];
    if let Some(path) = trusted {
        let more = TrustedKeys::load(path)
            .map_err(|e| anyhow!("cannot use the trusted keys (--trusted-keys): {e}"))?;
        keys.extend(more.keys().iter().cloned());
    }
    let trusted = TrustedKeys::new(keys).map_err(|e| anyhow!("--trusted-keys: {e}"))?;
    Ok((key, trusted))
}

/// The signing key's file name in the embedded store's data directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// Its public half, written beside it for channel services to trust.
pub const PUBLIC_KEY_FILE: &str = "signing.pub";

/// Opens the configured store and the key layout under its prefix.
async fn open_store(config: &StoreConfig) -> anyhow::Result<(Arc<dyn Store>, Layout)> {
    match config {
        StoreConfig::Embedded { data_dir } => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
            let path = data_dir.join("store.redb");
            // Opening may recover the file after a crash: blocking work.
            let opened = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    EmbeddedStore::open(&path, EmbeddedOptions::default())
                })
                .await?
            };
            let store = opened
                .with_context(|| format!("cannot open the embedded store {}", path.display()))?;
            Ok((Arc::new(store), Layout::default()))
        }
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let layout = Layout::new(prefix).map_err(|e| anyhow!("--etcd-prefix: {e}"))?;
            let options = EtcdOptions::checked(endpoints.clone(), tls).map_err(|e| anyhow!(e))?;
            let store = EtcdStore::connect(options).await?;
            Ok((Arc::new(store), layout))
        }
    }
}

/// The host name (the pod name on Kubernetes), else a name from the pid,
/// with the port the replica listens on: unique among the replicas of one
/// host, and the address to look for.
pub fn default_replica_name(port: u16) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("safemode-{}", std::process::id()));
    format!("{host}:{port}")
}

/// Connections the kernel may queue before the server accepts them (capped by
/// `net.core.somaxconn`). The default of 128 resets connections when
/// thousands of subscribers reconnect at once after a replica restart.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted replica binds its address again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// SIGHUP, on Unix; nothing elsewhere.
struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening: from now on SIGHUP no longer ends the process.
    fn listen() -> Self {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| warn!(error = %e, "cannot listen for SIGHUP; the tokens file is still checked periodically"))
                .ok();
            Hangups { signal }
        }
        #[cfg(not(unix))]
        Hangups {}
    }

    /// The next SIGHUP.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            signal.recv().await;
            return;
        }
        std::future::pending().await
    }
}

/// Re-reads the tokens file every `every` and on SIGHUP, until `shutdown`:
/// a change, once two reads agree, replaces the tokens (a removed token is
/// refused from the next call on, and its subscription streams end); a file
/// that cannot be used changes nothing and is logged as an error, once per
/// problem.
async fn reload_tokens(
    mut file: TokensFile,
    tokens: tokio::sync::watch::Sender<Arc<Tokens>>,
    mut hangups: Hangups,
    every: Duration,
    shutdown: CancellationToken,
) {
    /// How soon a file read once, changed, is read again to take it.
    const SETTLE: Duration = Duration::from_millis(200);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut problem: Option<String> = None;
    let mut settling = false;
    loop {
        let settle = tokio::time::sleep(SETTLE);
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = settle, if settling => {}
            () = hangups.recv() => info!(path = %file.path().display(), "SIGHUP: re-reading the tokens file"),
        }
        settling = false;
        match file.reload() {
            Reload::Unchanged => problem = None,
            Reload::Settling => settling = true,
            Reload::Changed(new) => {
                problem = None;
                let change = new.describe_change(&tokens.borrow());
                tokens.send_replace(Arc::new(new));
                info!(path = %file.path().display(), %change, "tokens file changed; the new tokens apply from now on");
            }
            Reload::Unusable(text) => {
                if problem.as_ref() != Some(&text) {
                    tracing::error!(error = %text, "the tokens file cannot be used; still accepting the tokens read before");
                    problem = Some(text);
                }
            }
        }
    }
}

/// Marks each answer with the replica's name ([`safemode_wire::REPLICA_HEADER`]).
fn answered_by(
    replica: &str,
) -> impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone + use<>
{
    // Replica names are checked to be header-safe (no spaces or controls).
    let name = http::HeaderValue::from_str(replica).ok();
    move |mut response| {
        if let Some(name) = &name {
            response
                .headers_mut()
                .insert(safemode_wire::REPLICA_HEADER, name.clone());
        }
        response
    }
}
