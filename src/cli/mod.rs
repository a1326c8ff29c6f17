//! The `safemode` command line: `serve` runs a controller; every other command
//! is a client of one (`--server`). Arguments are checked here, before any
//! connection, so bad input fails fast with one clear line and changes
//! nothing. Exit codes: 0 success, 1 refused or failed, 2 bad usage, 3 the
//! change waits for a second approver (only a request was made), 10 and up
//! `decide --exit-code`'s effects.

mod drill;
mod governance;
mod output;
mod retry;
mod sim;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel as GrpcChannel;

use safemode_client::{self as client, Bearer, Subscriber, SubscriberConfig};
use safemode_controller::{ControllerConfig, Layout, LiftTarget, SubscriberState};
use safemode_grpc::limits::StreamLimits;
use safemode_grpc::server::{self, EtcdTls, ServeConfig, SigningKeySource, StoreConfig};
use safemode_policy::names::validate_label;
use safemode_policy::{
    Action, Channel, ChannelSet, Context, EffectKind, MethodSet, ModeName, Namespace, Reason,
};
use safemode_wire::proto::control_service_client::ControlServiceClient;
use safemode_wire::{self as wire, proto};

use crate::client_errors;
use crate::telemetry;
use safemode_grpc::telemetry::Otlp;

/// Incident degradation-mode controller for customer-support flows.
#[derive(Parser, Debug)]
#[command(name = "safemode", version, max_term_width = 100)]
pub struct Cli {
    /// Controller replicas to talk to, comma-separated; the first that
    /// answers serves the command, and `watch`/`decide` fail over between them.
    #[arg(
        long = "server",
        global = true,
        env = "SAFEMODE_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7700"
    )]
    servers: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, env = "SAFEMODE_OUTPUT", default_value_t = Format::Text)]
    output: Format,
    /// Bearer token, when the controller has a tokens file.
    #[arg(long, global = true, env = "SAFEMODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the bearer token from this file instead.
    #[arg(
        long,
        global = true,
        env = "SAFEMODE_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Who you are, to a local server without a tokens file (so that two
    /// people can still be two principals for four-eyes); ignored by a server
    /// with tokens [default: $USER].
    #[arg(long, global = true, env = "SAFEMODE_PRINCIPAL")]
    principal: Option<String>,
    /// A PEM file of CA certificates to trust for https:// controllers,
    /// besides the platform's (a private CA).
    #[arg(long, global = true, env = "SAFEMODE_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Send the token over plain http:// to a controller that is not on
    /// loopback: only when a service mesh already encrypts this hop.
    /// Certificates are still checked for https://.
    #[arg(
        long,
        global = true,
        env = "SAFEMODE_INSECURE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure: bool,
    /// Name this command's change (1 to 64 of A-Z a-z 0-9 . _ -), so that
    /// running it again, e.g. after a timeout, is applied at most once
    /// [default: a new id per command]. A command is retried against the
    /// next --server with the same id by itself.
    #[arg(long, global = true, env = "SAFEMODE_CHANGE_ID", value_name = "ID")]
    change_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON object per result (per line for `watch`).
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a controller (embedded store by default).
    Serve(Box<ServeArgs>),
    /// List, apply and lift modes.
    #[command(subcommand)]
    Mode(ModeCommand),
    /// Show active activations, and every subscriber on every replica with
    /// its state (SYNCED, NOT_ACKED, STALE, REJECTED), per channel first.
    Status(StatusArgs),
    /// Subscribe as a channel and print every snapshot applied (and acked).
    Watch(WatchArgs),
    /// Subscribe as a channel, evaluate one action locally, print the decision.
    Decide(DecideArgs),
    /// Report a signal counter (login.failed, password_reset.requested, ...)
    /// as a channel would, through a short-lived subscriber: for scripts,
    /// tests and detectors.
    Signal(SignalArgs),
    /// What the policy in force and the channels' reports show: the
    /// inconsistency map (the easiest path), soft downtime, dead ends and
    /// signals, across the fleet.
    Insights(InsightsArgs),
    /// Simulate channel services: many subscribers per channel that report
    /// how long each took to apply each revision, and answer decisions.
    Sim(SimArgs),
    /// Rehearse runbooks end to end in drill namespaces and get a verdict.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Declare, escalate, resolve and look at incidents.
    #[command(subcommand)]
    Incident(IncidentCommand),
    /// Approve another principal's pending request (four-eyes).
    Approve {
        /// The request (req_...), from `safemode requests`.
        request_id: String,
        /// Why (default: the requester's reason).
        #[arg(long, value_parser = reason_arg)]
        reason: Option<String>,
        /// Only show what approving would do, per channel: nothing is
        /// changed, audited or approved.
        #[arg(long)]
        dry_run: bool,
    },
    /// Take back a pending request, so that nobody can approve it.
    Withdraw {
        /// The request (req_...), from `safemode requests`.
        request_id: String,
        /// Why (default: "withdrawn").
        #[arg(long, value_parser = reason_arg)]
        reason: Option<String>,
    },
    /// Early-warning proposals: list them (open ones), accept one (declares
    /// its incident), dismiss one, or raise one as an external detector.
    Proposals(ProposalsArgs),
    /// List requests waiting for a second approver.
    Requests {
        /// Also the approved, superseded, expired and withdrawn ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
    /// Show the audit log; --verify checks its hash chain.
    Audit {
        /// Only this incident's entries: its id (inc_...), or its type when
        /// exactly one incident of that type is active in --namespace.
        #[arg(long)]
        incident: Option<String>,
        /// Only this namespace's entries (live, or drill-...).
        #[arg(long)]
        namespace: Option<String>,
        /// Check every entry's hash and its chain; exit 1 on any problem.
        #[arg(long)]
        verify: bool,
    },
    /// List the server's runbooks, or lint runbook files.
    #[command(subcommand)]
    Runbook(RunbookCommand),
    /// Create tokens for the tokens file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The controller's signing key: print its public half for channel
    /// services to trust.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print a completion script for a shell, e.g.
    /// `safemode completions bash > /etc/bash_completion.d/safemode`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Print the public key (PEM) of a signing key, for channel services'
    /// trusted keys (`--trusted-keys`, `SubscriberConfig::trusted_keys`).
    Public {
        /// The signing key file (PKCS#8 PEM), as given to `serve --signing-key`.
        #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
        signing_key: Option<PathBuf>,
        /// The embedded store's data directory: its signing.key
        /// [default: safemode-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// The public keys a subscribing command trusts.
#[derive(Args, Debug)]
struct TrustedKeysArg {
    /// PEM file of the controller's public key(s): snapshots and heartbeats
    /// signed by any other key are refused [default: safemode-data/signing.pub,
    /// when it exists; otherwise required]. `safemode key public` prints it.
    #[arg(
        long = "trusted-keys",
        env = "SAFEMODE_TRUSTED_KEYS",
        value_name = "FILE"
    )]
    trusted_keys: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum IncidentCommand {
    /// Apply a runbook's stage for a severity and record the incident.
    Declare {
        /// The incident type: a runbook name (`safemode runbook list`).
        #[arg(value_name = "TYPE")]
        runbook: String,
        /// sev4 (least severe) to sev1 (most severe).
        #[arg(long)]
        severity: String,
        /// Why (mandatory; audited).
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: Option<String>,
        /// Limit every mode to these channels, comma-separated or repeated.
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
        /// Only show what the change would do, per channel, and whether it
        /// needs a second approver: nothing is changed, audited or requested.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move an incident to another severity's stage.
    Escalate {
        /// The incident: its id (inc_...), or its type (runbook name) when
        /// exactly one incident of that type is active in the namespace.
        id: String,
        #[command(flatten)]
        namespace: NamespaceArg,
        /// The severity to move to.
        #[arg(long)]
        severity: String,
        /// Why (default: "moved to SEVERITY").
        #[arg(long, value_parser = reason_arg)]
        reason: Option<String>,
        /// Only show what the change would do, per channel, and whether it
        /// needs a second approver: nothing is changed, audited or requested.
        #[arg(long)]
        dry_run: bool,
    },
    /// Lift an incident's modes and close it (may need a second approver).
    Resolve {
        /// The incident: its id (inc_...), or its type (runbook name) when
        /// exactly one incident of that type is active in the namespace.
        id: String,
        /// Why (mandatory; audited).
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
        /// Only show what the change would do, per channel, and whether it
        /// needs a second approver: nothing is changed, audited or requested.
        #[arg(long)]
        dry_run: bool,
    },
    /// List incidents.
    List {
        /// Also the resolved ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
    /// Show one incident with its timeline.
    Show {
        /// The incident: its id (inc_...), or its type (runbook name) when
        /// exactly one incident of that type is active in the namespace.
        id: String,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
}

#[derive(Subcommand, Debug)]
enum RunbookCommand {
    /// List the runbooks the controller serves.
    List,
    /// Check runbook files (and a modes/ directory beside them); every error
    /// with file, line and column. Needs no server.
    Lint {
        /// Runbook files or directories [default: runbooks].
        paths: Vec<PathBuf>,
        /// Mode files to check the runbooks against [default: a modes/
        /// directory beside them, else the built-in modes].
        #[arg(long)]
        modes: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new token once, and the line to add to the tokens file.
    Create {
        /// Who the token belongs to.
        #[arg(long)]
        principal: String,
        /// A role (comma-separated, or repeated): viewer, subscriber, commander,
        /// approver, drill, admin, detector (raises proposals only).
        #[arg(long = "role", required = true, value_delimiter = ',')]
        roles: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback only without --tokens).
    #[arg(long, env = "SAFEMODE_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Also serve HTTP here: `/healthz` (the process lives), `/readyz`
    /// (namespace live is read and the store and its watch are healthy; 503
    /// with the reason when not) and `/metrics`. With --tls-cert it speaks
    /// HTTPS with the same certificate (HTTP/2 and HTTP/1.1).
    /// The web console is served here too: over HTTPS, or over plain HTTP
    /// on a loopback address (see --console-plain-http).
    #[arg(long, env = "SAFEMODE_HTTP_LISTEN", value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Serve the web console on a non-loopback --http-listen although that
    /// listener speaks plain HTTP: say so only when a TLS-terminating proxy
    /// (an ingress, a mesh) fronts it. Without it the console (not health)
    /// is refused there. Refused with --tls-cert (the listener then speaks
    /// HTTPS itself).
    #[arg(long, env = "SAFEMODE_CONSOLE_PLAIN_HTTP")]
    console_plain_http: bool,
    /// Check every flag and read every file (tokens, certificates, keys,
    /// modes, runbooks), print what would be served, and exit without
    /// binding, opening the store or writing anything.
    #[arg(long)]
    check: bool,
    /// Where durable state lives: one local file, or an etcd cluster shared by
    /// every replica.
    #[arg(long, value_enum, env = "SAFEMODE_STORE", default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// Directory of the embedded store; created if missing [default: safemode-data].
    #[arg(long, env = "SAFEMODE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(long, env = "SAFEMODE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Prefix of every key safemode writes to etcd.
    #[arg(long, env = "SAFEMODE_ETCD_PREFIX", default_value = Layout::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA certificates (PEM) that vouch for the etcd members, with https://
    /// endpoints [default: the platform's].
    #[arg(long, env = "SAFEMODE_ETCD_CA_CERT", value_name = "FILE")]
    etcd_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd that asks for one
    /// (--client-cert-auth); needs --etcd-key.
    #[arg(long, env = "SAFEMODE_ETCD_CERT", value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert.
    #[arg(long, env = "SAFEMODE_ETCD_KEY", value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// This replica's name in status, audit and logs [default: the host
    /// name and the listen port, e.g. vm:7700].
    #[arg(long, env = "SAFEMODE_REPLICA")]
    replica: Option<String>,
    /// Where the other replicas reach this one (HOST:PORT) to gather the
    /// fleet's status, e.g. $(POD_IP):7700 [default: --listen, when it
    /// names one host].
    #[arg(long, env = "SAFEMODE_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// CA certificates (PEM) that verify the other replicas' TLS
    /// certificates (required with --tls-cert and --store etcd; for a
    /// self-signed certificate, the --tls-cert file).
    #[arg(long, env = "SAFEMODE_PEER_CA", value_name = "FILE")]
    peer_ca: Option<PathBuf>,
    /// The name the other replicas' certificates must carry, e.g. the
    /// Service's DNS name [default: the host of each one's address].
    #[arg(long, env = "SAFEMODE_PEER_TLS_NAME", value_name = "NAME")]
    peer_tls_name: Option<String>,
    /// How long this replica's record in the store outlives it when it
    /// dies without saying goodbye, e.g. 15s (2s to 5m).
    #[arg(long, env = "SAFEMODE_REPLICA_TTL", default_value = "15s", value_parser = parse_duration)]
    replica_ttl: Duration,
    /// Directory of mode files (*.yaml); default: the built-in standard modes.
    #[arg(long, env = "SAFEMODE_MODES")]
    modes: Option<PathBuf>,
    /// Directory of runbooks (*.yaml); default: the built-in standard runbooks.
    #[arg(long, env = "SAFEMODE_RUNBOOKS")]
    runbooks: Option<PathBuf>,
    /// Tokens file (hashed tokens, principals and roles), re-read when it
    /// changes (see --tokens-check-interval, and on SIGHUP). Without one the
    /// server listens on loopback only and every caller may do everything.
    #[arg(long, env = "SAFEMODE_TOKENS")]
    tokens: Option<PathBuf>,
    /// How often the tokens file is checked for changes, e.g. 5s.
    #[arg(long, env = "SAFEMODE_TOKENS_CHECK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    tokens_check_interval: Duration,
    /// PEM certificate chain to serve gRPC over TLS with (needs --tls-key);
    /// without it the server speaks plain HTTP/2.
    #[arg(long, env = "SAFEMODE_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SAFEMODE_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The Ed25519 signing key (PKCS#8 PEM) that snapshots, heartbeats and
    /// audit entries are signed with; the same file for every replica
    /// [default: signing.key in --data-dir, made on first start; required
    /// with --store etcd].
    #[arg(long, env = "SAFEMODE_SIGNING_KEY", value_name = "FILE")]
    signing_key: Option<PathBuf>,
    /// PEM file of further public keys whose audit entries verify (keys
    /// signed with before a rotation).
    #[arg(long, env = "SAFEMODE_TRUSTED_KEYS", value_name = "FILE")]
    trusted_keys: Option<PathBuf>,
    /// The most subscription streams this replica holds.
    #[arg(long, env = "SAFEMODE_MAX_STREAMS", default_value_t = StreamLimits::default().per_replica)]
    max_streams: usize,
    /// The most subscription streams one token holds on this replica.
    #[arg(long, env = "SAFEMODE_MAX_STREAMS_PER_TOKEN", default_value_t = StreamLimits::default().per_token)]
    max_streams_per_token: usize,
    /// The most subscription streams one connection carries.
    #[arg(long, env = "SAFEMODE_MAX_STREAMS_PER_CONNECTION", default_value_t = StreamLimits::default().per_connection)]
    max_streams_per_connection: usize,
    /// The most namespaces (live and drills) this replica follows at once,
    /// each with one store watch.
    #[arg(long, env = "SAFEMODE_MAX_NAMESPACES", default_value_t = safemode_controller::DEFAULT_MAX_NAMESPACES)]
    max_namespaces: usize,
    /// Make this replica's modes and runbooks the ones every replica must
    /// serve (replicas with others refuse changes until restarted with them).
    #[arg(long)]
    adopt_catalog: bool,
    /// Heartbeat interval on subscription streams, e.g. 10s. Keep it well
    /// under the clients' staleness limit (30s by default).
    #[arg(long, env = "SAFEMODE_HEARTBEAT", default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
}

/// Where `serve` keeps durable state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// One local file (--data-dir).
    Embedded,
    /// An etcd cluster (--etcd-endpoints).
    Etcd,
}

#[derive(Subcommand, Debug)]
enum DrillCommand {
    /// Drill runbooks: declare, walk the severity path, check every stage's
    /// expectations and apply limits, resolve, check restoration. Exit 0
    /// only if every drill passed.
    Run(DrillRunArgs),
}

#[derive(Args, Debug)]
struct DrillRunArgs {
    /// Runbooks to drill: built-in runbook names, or runbook files (a
    /// modes/ directory beside them is used if there is one).
    runbooks: Vec<String>,
    /// Drill every runbook in DIR (and its modes/ directory).
    #[arg(long, value_name = "DIR")]
    all: Option<PathBuf>,
    /// Run the controller in process, on the embedded store in a temporary
    /// directory (nothing else needed); otherwise drill --server.
    #[arg(long)]
    local: bool,
    /// Simulated subscribers per channel.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chatbot=5,ivr=5,agent-desk=5,web=5,mobile=5,email=5"
    )]
    channels: Vec<String>,
    /// Write report.md, journal.json and junit.xml here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// The severities to walk, e.g. sev3,sev2,sev1 [default: every stage,
    /// least severe first].
    #[arg(long, value_delimiter = ',')]
    severity_path: Vec<String>,
    /// A fault while the middle stage is active: kill-subscribers=N% or
    /// restart-controller (with --local).
    #[arg(long)]
    fault: Option<String>,
    /// A fixed drill namespace (drill-NAME): real subscribers attached to it
    /// take part [default: a new drill-<id> per runbook].
    #[arg(long)]
    namespace: Option<String>,
    /// Another principal's token (drill or approver role), for the changes
    /// that need a second approver (not needed with --local).
    #[arg(long, env = "SAFEMODE_APPROVER_TOKEN", hide_env_values = true)]
    approver_token: Option<String>,
    /// Read the approver's token from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "approver_token")]
    approver_token_file: Option<PathBuf>,
    /// How long every subscriber may take to converge on a change (after
    /// that it counts as never applied).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    converge_within: Duration,
    /// Not needed with --local, which knows its controller's key.
    #[command(flatten)]
    trusted: TrustedKeysArg,
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Subscribers per channel.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chatbot=50,ivr=20,agent-desk=10,web=20"
    )]
    channels: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
    /// Actions each channel decides after every revision, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "account.password_reset,payment.refund"
    )]
    decide: Vec<String>,
    /// Stop after this many revisions [default: run until Ctrl-C].
    #[arg(long)]
    revisions: Option<usize>,
    #[command(flatten)]
    trusted: TrustedKeysArg,
}

#[derive(Args, Debug)]
struct NamespaceArg {
    /// Namespace (`live` is production).
    #[arg(long, env = "SAFEMODE_NAMESPACE", default_value = Namespace::LIVE)]
    namespace: String,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    namespace: NamespaceArg,
    /// Only this channel's subscribers (and summary).
    #[arg(long, value_name = "CHANNEL", value_parser = channel_arg)]
    channel: Option<Channel>,
    /// Only subscribers in this state: synced, not-acked, stale or rejected.
    #[arg(long, value_name = "STATE", value_parser = state_arg, conflicts_with = "wait_synced")]
    state: Option<SubscriberState>,
    /// Wait until every subscriber (of --channel, if given) on every replica
    /// has acknowledged the namespace's current revision; exit 1 naming who
    /// has not when --timeout passes.
    #[arg(long)]
    wait_synced: bool,
    /// How long --wait-synced waits, e.g. 30s or 2m (at most 24h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = wait_timeout_arg, requires = "wait_synced")]
    timeout: Duration,
}

/// A `--channel` value.
fn channel_arg(text: &str) -> Result<Channel, String> {
    Channel::parse(text).map_err(|e| e.to_string())
}

/// A `--timeout` value of `status --wait-synced`: a duration of at most a
/// day.
fn wait_timeout_arg(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout > Duration::from_secs(24 * 3600) {
        return Err(format!("'{text}' is longer than 24h; wait at most a day"));
    }
    Ok(timeout)
}

/// A `--state` value.
fn state_arg(text: &str) -> Result<SubscriberState, String> {
    SubscriberState::parse(text).ok_or_else(|| {
        format!("'{text}' is not a subscriber state; give synced, not-acked, stale or rejected")
    })
}

#[derive(Subcommand, Debug)]
enum ModeCommand {
    /// List the modes the controller serves.
    List,
    /// Apply one or more modes in one atomic change; prints the new revision.
    Apply {
        /// Modes to apply (`safemode mode list`).
        #[arg(required = true)]
        modes: Vec<String>,
        /// Why (mandatory; audited).
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: Option<String>,
        /// Channels to cover, comma-separated or repeated, or `*` (default: all).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// For read-only modes: serve data as of this time (RFC 3339; default now).
        #[arg(long)]
        as_of: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
        /// Only show what the change would do, per channel, and whether it
        /// needs a second approver: nothing is changed, audited or requested.
        #[arg(long)]
        dry_run: bool,
    },
    /// Lift activations (by id) or every activation of a mode (by name).
    Lift {
        /// Activation ids (act_...) or mode names.
        #[arg(required = true)]
        targets: Vec<String>,
        /// Lift every activation of a named mode, when it has several.
        #[arg(long)]
        all: bool,
        /// Lift modes of an active incident outside the incident (otherwise
        /// refused, naming it); the incident's timeline records the lift.
        #[arg(long)]
        incident_ok: bool,
        /// Why (mandatory; audited).
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
        /// Only show what the change would do, per channel, and whether it
        /// needs a second approver: nothing is changed, audited or requested.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
struct SubscriberArgs {
    /// The channel to subscribe as.
    #[arg(long)]
    channel: String,
    /// Subscriber id shown in status (default: cli-<pid>).
    #[arg(long)]
    subscriber_id: Option<String>,
    #[command(flatten)]
    namespace: NamespaceArg,
    #[command(flatten)]
    trusted: TrustedKeysArg,
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    subscriber: SubscriberArgs,
}

#[derive(Args, Debug)]
struct SignalArgs {
    /// The signal, e.g. login.failed: dot-separated words of a-z, 0-9 and _.
    name: String,
    /// How many to report (1 to 1000000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    #[command(flatten)]
    subscriber: SubscriberArgs,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct ProposalsArgs {
    #[command(subcommand)]
    command: Option<ProposalsCommand>,
    /// Also the accepted and dismissed ones.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    namespace: NamespaceArg,
}

#[derive(Subcommand, Debug)]
enum ProposalsCommand {
    /// Accept an open proposal: declares its incident at its severity (the
    /// incident's timeline cites the evidence). Needs the commander role.
    Accept {
        /// The proposal (prp_...), from `safemode proposals`.
        proposal_id: String,
        /// Why.
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: String,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
    /// Dismiss an open proposal: nothing is declared. Needs the commander
    /// role.
    Dismiss {
        /// The proposal (prp_...), from `safemode proposals`.
        proposal_id: String,
        /// Why it is not an incident (kept in the audit log).
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: String,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
    /// Raise a proposal as an external detector (a monitoring alert):
    /// never declares anything. Needs the detector or commander role.
    Raise {
        /// The incident type (runbook) to propose, e.g. credential-stuffing.
        #[arg(long = "type")]
        runbook: String,
        /// The stage to propose: sev4, sev3, sev2 or sev1.
        #[arg(long)]
        severity: String,
        /// What the detector saw: one line, at most 500 characters.
        #[arg(long)]
        summary: String,
        /// Why (the alert's name, say), as audited.
        #[arg(long, required = true, value_parser = reason_arg)]
        reason: String,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
}

#[derive(Args, Debug)]
struct InsightsArgs {
    #[command(flatten)]
    namespace: NamespaceArg,
    /// The window of reports: 1m or 15m.
    #[arg(long, default_value = "15m", value_parser = insights_window)]
    window: u32,
}

/// `--window`: 1m or 15m, in seconds.
fn insights_window(text: &str) -> Result<u32, String> {
    match text {
        "1m" | "60s" => Ok(60),
        "15m" | "900s" => Ok(900),
        _ => Err(format!(
            "{text:?} is not a window insights keeps: give 1m or 15m"
        )),
    }
}

#[derive(Args, Debug)]
struct DecideArgs {
    #[command(flatten)]
    subscriber: SubscriberArgs,
    /// The action, e.g. account.password_reset.
    #[arg(long)]
    action: String,
    /// Identity confidence of the customer, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    confidence: f64,
    /// Verification methods the customer passed (comma-separated, or
    /// repeated), e.g. push.
    #[arg(long = "method", value_delimiter = ',')]
    methods: Vec<String>,
    /// Failed verification attempts so far.
    #[arg(long, default_value_t = 0)]
    attempts: u32,
    /// Amount of money involved.
    #[arg(long)]
    amount: Option<f64>,
    /// The session was handed over from a bot.
    #[arg(long)]
    handoff: bool,
    /// What the bot flagged the session with (comma-separated, or repeated).
    #[arg(long = "bot-flag", value_delimiter = ',')]
    bot_flags: Vec<String>,
    /// Exit with the effect: 0 allow, 11 throttle, 12 step_up, 13 review,
    /// 14 read_only, 15 route, 16 deny (1 stays an error).
    #[arg(long)]
    exit_code: bool,
}

/// How long `safemode signal` waits for the controller to take its count.
const SIGNAL_DEADLINE: Duration = Duration::from_secs(30);

/// The global flags of the commands that talk to a controller, by clap id.
const CLIENT_FLAGS: [&str; 8] = [
    "servers",
    "output",
    "token",
    "token_file",
    "principal",
    "ca_cert",
    "insecure",
    "change_id",
];

/// Which of [`CLIENT_FLAGS`] the command at `path` ("mode apply") uses; its
/// help hides the others and its command line refuses them.
fn client_flags_used(path: &str) -> &'static [&'static str] {
    const READ: &[&str] = &[
        "servers",
        "output",
        "token",
        "token_file",
        "principal",
        "ca_cert",
        "insecure",
    ];
    match path {
        // Changes: a change id names them across retries.
        "mode apply" | "mode lift" | "incident declare" | "incident escalate"
        | "incident resolve" | "approve" | "withdraw" | "proposals accept"
        | "proposals dismiss" | "proposals raise" => &CLIENT_FLAGS,
        // No controller involved.
        "serve" | "completions" | "key public" => &[],
        "runbook lint" | "token create" => &["output"],
        _ => READ,
    }
}

/// The command-line grammar: [`Cli`], with each command's help listing only
/// the global flags it uses.
fn grammar() -> clap::Command {
    let command = <Cli as clap::CommandFactory>::command();
    let globals: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    hide_unused_flags(command, "", &globals)
}

/// Gives each command under `command` (at `path`) a hidden, local copy of
/// each global flag it does not use: clap then copies the global one into
/// it no more, so its help leaves the flag out, and [`unused_flag_given`]
/// finds it given there.
fn hide_unused_flags(
    mut command: clap::Command,
    path: &str,
    globals: &[clap::Arg],
) -> clap::Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    if names.is_empty() {
        let used = client_flags_used(path);
        for global in globals {
            let id = global.get_id().as_str();
            let own = command.get_arguments().any(|a| a.get_id() == id);
            if !own && !used.contains(&id) {
                command = command.arg(global.clone().global(false).hide(true));
            }
        }
        return command;
    }
    for name in names {
        let sub = if path.is_empty() {
            name.clone()
        } else {
            format!("{path} {name}")
        };
        command = command.mut_subcommand(&name, |c| hide_unused_flags(c, &sub, globals));
    }
    command
}

/// A global flag given on the command line to a command that does not use
/// it ("--change-id is not used by `safemode status`"), before or after the
/// command's name.
fn unused_flag_given(grammar: &clap::Command, matches: &clap::ArgMatches) -> Option<String> {
    let mut levels = vec![matches];
    let mut path = Vec::new();
    let mut command = grammar;
    while let Some((name, sub)) = levels.last().and_then(|m| m.subcommand()) {
        command = command.find_subcommand(name)?;
        path.push(name);
        levels.push(sub);
    }
    let path = path.join(" ");
    let used = client_flags_used(&path);
    let leaf = levels.last()?;
    grammar
        .get_arguments()
        .filter(|a| a.is_global_set() && !used.contains(&a.get_id().as_str()))
        // A command's own flag of the same name (`token create
        // --principal`) is its own. A command run without its subcommand
        // (`safemode proposals`) has no hidden copies: its children share it.
        .filter(|a| {
            command.has_subcommands()
                || command
                    .get_arguments()
                    .any(|own| own.get_id() == a.get_id() && own.is_hide_set())
        })
        .find(|a| {
            let id = a.get_id().as_str();
            [matches, leaf]
                .iter()
                .any(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        })
        .map(|a| {
            format!(
                "--{} is not used by `safemode {path}`: leave it out (`safemode {path} --help` lists what it takes)",
                a.get_long().unwrap_or(a.get_id().as_str())
            )
        })
}

/// A usage error on one line: clap's message and tips, without the usage
/// block (`--help` shows that).
fn usage_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let parts: Vec<String> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| line.strip_prefix("error: ").unwrap_or(line).to_string())
        .collect();
    format!("error: {} (see --help)", parts.join(" "))
}

/// The command's name as typed, without flags (`mode apply`): its root
/// span's name.
fn command_name(matches: &clap::ArgMatches) -> String {
    let mut words = Vec::new();
    let mut at = matches;
    while let Some((name, sub)) = at.subcommand() {
        words.push(name);
        at = sub;
    }
    words.join(" ")
}

/// Exit code of bad usage: a flag or argument missing, unknown, or not of
/// the accepted form.
const USAGE: u8 = 2;

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let mut grammar = grammar();
    let parsed = grammar
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|matches| {
            Ok((
                <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?,
                matches,
            ))
        });
    let (cli, command_name) = match parsed {
        Ok((cli, matches)) => match unused_flag_given(&grammar, &matches) {
            None => (cli, command_name(&matches)),
            Some(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(USAGE);
            }
        },
        Err(error) => {
            use clap::error::ErrorKind;
            return match error.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = error.print();
                    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(USAGE))
                }
                _ => {
                    eprintln!("{}", usage_line(&error));
                    ExitCode::from(USAGE)
                }
            };
        }
    };
    let default_log = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    // Colour only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's channel lives on this runtime.
    let entered = runtime.enter();
    // The name the replica's spans carry: --replica, else the one `serve`
    // gives it (known here unless the port is picked at start).
    let replica = match &cli.command {
        Command::Serve(args) => args.replica.clone().or_else(|| {
            (args.listen.port() != 0).then(|| server::default_replica_name(args.listen.port()))
        }),
        _ => None,
    };
    let (role, otlp) = match &cli.command {
        Command::Serve(_) => match Otlp::from_env() {
            Ok(otlp) => (
                telemetry::Role::Serve {
                    replica: replica.as_deref(),
                },
                otlp,
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        // A command still runs when its own export is misconfigured.
        _ => match Otlp::from_env() {
            Ok(otlp) => (telemetry::Role::Command, otlp),
            Err(e) => {
                eprintln!("warning: {e}; this command exports no spans");
                (telemetry::Role::Command, Otlp::default())
            }
        },
    };
    let serving = matches!(role, telemetry::Role::Serve { .. });
    let (telemetry, problem) = telemetry::init(default_log, ansi, role, otlp);
    match problem {
        // A replica does not start without the export it was asked for.
        Some(problem) if serving => {
            eprintln!("error: {problem}");
            return ExitCode::FAILURE;
        }
        Some(problem) => eprintln!("warning: {problem}; this command exports no spans"),
        None => {}
    }
    let span = match &cli.command {
        // A server's spans are its calls'; it has no root of its own.
        Command::Serve(_) => tracing::Span::none(),
        _ => telemetry::command_span(&command_name),
    };
    let result = runtime.block_on(tracing::Instrument::instrument(run(cli), span));
    drop(entered);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`safemode status | head -1`): not a failure.
        Err(e) if e.is::<OutputClosed>() => ExitCode::SUCCESS,
        Err(e) if e.is::<ExitWith>() => match e.downcast_ref::<ExitWith>() {
            Some(ExitWith(code)) => ExitCode::from(*code),
            None => ExitCode::FAILURE,
        },
        Err(e) => {
            // Refusals quote what the caller sent; one line, like stdout.
            eprintln!("error: {}", output::single_line(&client_errors::render(&e)));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    let token = read_token(cli.token, cli.token_file.as_deref())?;
    let caller = Caller {
        token,
        principal: cli.principal.or_else(|| std::env::var("USER").ok()),
        ca_cert: cli.ca_cert,
        insecure: cli.insecure,
        change_id: retry::change_id(cli.change_id.as_deref())?,
        connected: std::sync::Mutex::new(None),
    };
    let result = dispatch(cli.command, cli.servers, format, &caller).await;
    // A call the server answered with a refusal: say what is wrong in the
    // terms of the address it went to, when the status says more than its
    // message (not a safemode controller, plain text to TLS).
    let Err(error) = result else {
        return Ok(());
    };
    let connected = caller
        .connected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let (Some(Refusal(status)), Some(server)) = (error.downcast_ref::<Refusal>(), connected)
        && let Some(explained) = explain_control(&server, status).await
    {
        return Err(explained.into());
    }
    Err(error)
}

/// Runs `command`.
async fn dispatch(
    command: Command,
    servers: Vec<String>,
    format: Format,
    caller: &Caller,
) -> anyhow::Result<()> {
    match command {
        Command::Completions { shell } => {
            let mut command = grammar();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "safemode", &mut script);
            emit(String::from_utf8(script).context("the completion script is not UTF-8")?)
        }
        Command::Serve(args) => serve(*args).await,
        Command::Mode(ModeCommand::List) => {
            let mut client = control(&servers, caller).await?;
            let response = client
                .list_modes(proto::ListModesRequest {})
                .await
                .map_err(refused)?;
            emit(output::show(
                format,
                &output::Modes::from(response.into_inner()),
            ))?;
            Ok(())
        }
        Command::Mode(ModeCommand::Apply {
            modes,
            reason,
            channels,
            as_of,
            namespace,
            dry_run,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            for mode in &modes {
                ModeName::parse(mode)?;
            }
            let reason = parse_reason(reason)?;
            let channels = (!channels.is_empty()).then(|| channels.join(","));
            let channels = match channels.as_deref() {
                None => Vec::new(),
                Some(list) if list.trim().is_empty() => {
                    bail!(
                        "--channels is empty; name channels (e.g. chatbot,ivr) or leave it out for all"
                    )
                }
                Some(list) => {
                    let names: Vec<&str> = list.split(',').map(str::trim).collect();
                    ChannelSet::parse_selector(&names)
                        .map_err(|e| anyhow!("--channels: {e}"))?
                        .to_names()
                        .into_iter()
                        .filter(|n| n != "*")
                        .collect()
                }
            };
            let as_of = as_of
                .map(|t| {
                    t.parse::<jiff::Timestamp>().map_err(|e| {
                        anyhow!("--as-of '{t}': {e}; use RFC 3339, e.g. 2026-11-21T09:30:00Z")
                    })
                })
                .transpose()?;
            let request = proto::ApplyModesRequest {
                namespace: namespace.to_string(),
                modes,
                channels,
                reason: reason.as_str().to_string(),
                as_of: as_of.map(wire::timestamp_to_wire),
                change_id: String::new(),
                dry_run,
            };
            let response = retry::write(&servers, caller, "mode apply", |mut client, change_id| {
                let request = proto::ApplyModesRequest {
                    change_id,
                    ..request.clone()
                };
                Box::pin(async move { client.apply_modes(request).await })
            })
            .await?;
            if dry_run {
                let preview = output::Previewed::new(response.namespace, response.preview)?;
                return emit(output::show(format, &preview));
            }
            emit(output::show(format, &output::Applied::from(response)))?;
            Ok(())
        }
        Command::Mode(ModeCommand::Lift {
            targets,
            all,
            incident_ok,
            reason,
            namespace,
            dry_run,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            for target in &targets {
                LiftTarget::parse(target)?;
            }
            let reason = parse_reason(reason)?;
            let request = proto::LiftActivationsRequest {
                namespace: namespace.to_string(),
                targets,
                reason: reason.as_str().to_string(),
                all,
                incident_ok,
                change_id: String::new(),
                dry_run,
            };
            let response = retry::write(&servers, caller, "mode lift", |mut client, change_id| {
                let request = proto::LiftActivationsRequest {
                    change_id,
                    ..request.clone()
                };
                Box::pin(async move { client.lift_activations(request).await })
            })
            .await?;
            if dry_run {
                let preview = output::Previewed::new(response.namespace, response.preview)?;
                return emit(output::show(format, &preview));
            }
            let pending = response.pending.is_some();
            emit(output::show(format, &output::Lifted::from(response)))?;
            requested_only(pending)
        }
        Command::Status(args) => {
            let namespace = parse_namespace(&args.namespace)?;
            let mut client = control(&servers, caller).await?;
            let request = proto::GetStatusRequest {
                namespace: namespace.to_string(),
                channel: args.channel.map(|c| c.to_string()).unwrap_or_default(),
                state: args.state.map(|s| s.to_string()).unwrap_or_default(),
                ..proto::GetStatusRequest::default()
            };
            if args.wait_synced {
                return wait_synced(client, (&servers, caller), request, args.timeout, format)
                    .await;
            }
            let response = safemode_wire::full_status_of(&mut client, request)
                .await
                .map_err(refused)?;
            // Open proposals: what a commander should decide next. A store
            // that does not answer already shows in the status.
            let proposals = client
                .list_proposals(proto::ListProposalsRequest {
                    namespace: namespace.to_string(),
                    include_closed: false,
                })
                .await
                .map(|r| r.into_inner())
                .unwrap_or_default();
            let status = output::Status::from(response).with_proposals(proposals);
            emit(output::show(format, &status))?;
            // Shown, and still a failure: nothing can be changed now, and
            // what is shown may be out of date.
            match status.store_unreachable() {
                Some(why) => Err(anyhow!("{why}")),
                None => Ok(()),
            }
        }
        Command::Watch(args) => {
            let config = subscriber_config(&servers, caller, &args.subscriber)?;
            let subscriber = Subscriber::connect(config).await?;
            let mut changes = subscriber.changes();
            loop {
                if let Some(snapshot) = changes.borrow_and_update().clone() {
                    emit(output::show(format, &output::Snapshot::from(&*snapshot)))?;
                }
                tokio::select! {
                    // First: when the token is refused the subscription
                    // ends, and so do its changes.
                    biased;
                    why = subscriber.stopped() => {
                        return Err(anyhow!("{}", client_errors::in_flags(&why)));
                    }
                    changed = changes.changed() => changed.context("the subscriber stopped")?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Decide(args) => {
            let config = subscriber_config(&servers, caller, &args.subscriber)?;
            let action = Action::parse(&args.action)?;
            let ctx = decide_context(&args)?;
            let subscriber = Subscriber::connect(config).await?;
            let report = subscriber.decide(&action, &ctx).report();
            let policy = subscriber.current();
            let activations = policy.as_deref().map_or(&[][..], |p| &p.activations[..]);
            emit(output::show(
                format,
                &output::Decision::new(&report, activations),
            ))?;
            match decide_exit_code(args.exit_code, report.outcome.kind()) {
                0 => Ok(()),
                code => Err(ExitWith(code).into()),
            }
        }
        Command::Signal(args) => {
            let name = safemode_policy::SignalName::parse(&args.name)?;
            if name.is_reserved() {
                bail!(
                    "signal '{name}' is under safemode., which the client counts itself; give your own name, like login.failed"
                );
            }
            let config = subscriber_config(&servers, caller, &args.subscriber)?;
            let subscriber = Subscriber::connect(config).await?;
            subscriber.signal(&name, args.count);
            // A controller busy with this token's other reports says when to
            // come back: the count waits in the client until then.
            let deadline = tokio::time::Instant::now() + SIGNAL_DEADLINE;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match subscriber.report_now(left).await? {
                    client::ReportReceipt::Accepted => {
                        return emit(output::show(
                            format,
                            &output::Signalled {
                                signal: name.to_string(),
                                count: args.count,
                                channel: args.subscriber.channel.clone(),
                                namespace: args.subscriber.namespace.namespace.clone(),
                            },
                        ));
                    }
                    client::ReportReceipt::TooSoon {
                        retry_after,
                        reason,
                    } => {
                        if tokio::time::Instant::now() + retry_after >= deadline {
                            bail!(
                                "the signal was not counted: the controller is busy with this token's reports ({reason}); retry later, or add counts up with --count"
                            );
                        }
                        tokio::time::sleep(retry_after).await;
                    }
                    client::ReportReceipt::Refused(reason) => {
                        bail!("the controller refused the report: {reason}")
                    }
                    // A signal is one row: left out, it was not counted.
                    client::ReportReceipt::Partial { reason, .. } => {
                        bail!("the controller did not count the signal: {reason}")
                    }
                    client::ReportReceipt::Lost(reason) => {
                        bail!(
                            "the report's answer was lost: {reason}; it may or may not be counted"
                        )
                    }
                    other => bail!("the controller answered the report with {other:?}"),
                }
            }
        }
        Command::Insights(args) => {
            let namespace = parse_namespace(&args.namespace)?;
            let mut client = control(&servers, caller).await?;
            let response = client
                .get_insights(proto::GetInsightsRequest {
                    namespace: namespace.to_string(),
                    window_seconds: args.window,
                })
                .await
                .map_err(refused)?;
            emit(output::show(
                format,
                &output::Insights::from(response.into_inner()),
            ))
        }
        Command::Sim(args) => sim::run(&servers, caller, format, args).await,
        Command::Drill(DrillCommand::Run(args)) => drill::run(&servers, caller, format, args).await,
        Command::Incident(command) => governance::incident(&servers, caller, format, command).await,
        Command::Approve {
            request_id,
            reason,
            dry_run,
        } => governance::approve(&servers, caller, format, &request_id, reason, dry_run).await,
        Command::Withdraw { request_id, reason } => {
            governance::withdraw(&servers, caller, format, &request_id, reason).await
        }
        Command::Proposals(args) => governance::proposals(&servers, caller, format, args).await,
        Command::Requests { all, namespace } => {
            let namespace = parse_namespace(&namespace)?;
            governance::requests(&servers, caller, format, &namespace, all).await
        }
        Command::Audit {
            incident,
            namespace,
            verify,
        } => governance::audit(&servers, caller, format, incident, namespace, verify).await,
        Command::Runbook(RunbookCommand::List) => {
            governance::runbooks(&servers, caller, format).await
        }
        Command::Runbook(RunbookCommand::Lint { paths, modes }) => {
            governance::lint(format, paths, modes.as_deref())
        }
        Command::Token(TokenCommand::Create { principal, roles }) => {
            governance::create_token(format, &principal, &roles)
        }
        Command::Key(KeyCommand::Public {
            signing_key,
            data_dir,
        }) => {
            let path = signing_key.unwrap_or_else(|| {
                data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
                    .join(server::SIGNING_KEY_FILE)
            });
            let key = safemode_signing::SigningKey::load(&path).map_err(|e| {
                anyhow!("{e}; give the key `serve` signs with: --signing-key FILE, or --data-dir DIR of an embedded store that has started once")
            })?;
            emit(key.public_key().to_pem())
        }
    }
}

/// The data directory `serve` uses by default.
const DEFAULT_DATA_DIR: &str = "safemode-data";

/// The trusted keys of a subscribing command: `--trusted-keys FILE`, or the
/// default controller's `safemode-data/signing.pub` when it exists.
fn trusted_keys(arg: &TrustedKeysArg) -> anyhow::Result<safemode_signing::TrustedKeys> {
    let default = PathBuf::from(DEFAULT_DATA_DIR).join(server::PUBLIC_KEY_FILE);
    let path = match &arg.trusted_keys {
        Some(path) => path.clone(),
        None if default.exists() => default,
        None => bail!(
            "give --trusted-keys FILE (SAFEMODE_TRUSTED_KEYS): the controller's public key, which it writes to signing.pub in its data directory and `safemode key public` prints; {} does not exist here",
            default.display()
        ),
    };
    safemode_signing::TrustedKeys::load(&path).map_err(|e| anyhow!("--trusted-keys: {e}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = match args.store {
        StoreKind::Embedded => {
            if !args.etcd_endpoints.is_empty() {
                bail!("--etcd-endpoints needs --store etcd");
            }
            if args.etcd_ca_cert.is_some() || args.etcd_cert.is_some() || args.etcd_key.is_some() {
                bail!("--etcd-ca-cert, --etcd-cert and --etcd-key need --store etcd");
            }
            StoreConfig::Embedded {
                data_dir: args
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            }
        }
        StoreKind::Etcd => {
            if args.data_dir.is_some() {
                bail!(
                    "--data-dir is for the embedded store; with --store etcd, state lives in etcd"
                );
            }
            StoreConfig::Etcd {
                endpoints: args.etcd_endpoints,
                prefix: args.etcd_prefix,
                tls: EtcdTls {
                    ca_cert: args.etcd_ca_cert,
                    cert: args.etcd_cert,
                    key: args.etcd_key,
                },
            }
        }
    };
    if let Some(name) = &args.replica {
        let printable = !name.is_empty()
            && name.len() <= 128
            && !name.chars().any(|c| c.is_control() || c.is_whitespace());
        if !printable {
            bail!(
                "bad --replica {name:?}: give 1 to 128 characters without spaces, e.g. the pod name; by default a replica is named after its host and port"
            );
        }
    }
    let defaults = ServeConfig::default();
    let config = ServeConfig {
        listen: args.listen,
        http_listen: args.http_listen,
        otlp: Otlp::from_env().map_err(|e| anyhow!(e))?,
        console_plain_http: args.console_plain_http,
        store,
        replica: args.replica,
        advertise: args.advertise,
        peer_ca: args.peer_ca,
        peer_tls_name: args.peer_tls_name,
        replica_ttl: args.replica_ttl,
        modes_dir: args.modes,
        runbooks_dir: args.runbooks,
        tokens: args.tokens,
        tokens_reload: args.tokens_check_interval,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        heartbeat: args.heartbeat,
        signing_key: args
            .signing_key
            .map_or(SigningKeySource::InDataDir, SigningKeySource::File),
        trusted_keys: args.trusted_keys,
        stream_limits: StreamLimits {
            per_token: args.max_streams_per_token,
            per_connection: args.max_streams_per_connection,
            per_replica: args.max_streams,
        },
        controller: ControllerConfig {
            adopt_catalog: args.adopt_catalog,
            max_namespaces: args.max_namespaces,
            ..ControllerConfig::default()
        },
        ..defaults
    };
    if args.check {
        return emit(
            server::check(&config)?
                .into_iter()
                .map(|line| format!("{}\n", output::single_line(&line)))
                .collect(),
        );
    }
    let running = server::start(config).await?;
    shutdown_signal().await;
    running.stop().await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (how Kubernetes stops a pod).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A `--reason` as clap checks it: a blank or overlong one is a usage
/// error (exit 2), like a missing one.
fn reason_arg(text: &str) -> Result<String, String> {
    Reason::parse(text)
        .map(|r| r.as_str().to_string())
        .map_err(|e| e.to_string())
}

/// The reason of a command whose `--reason` clap already checked.
fn parse_reason(reason: Option<String>) -> anyhow::Result<Reason> {
    Ok(Reason::parse(reason.as_deref().unwrap_or_default())?)
}

fn parse_namespace(arg: &NamespaceArg) -> anyhow::Result<Namespace> {
    Namespace::parse(&arg.namespace).map_err(|e| anyhow!("--namespace: {e}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let span: jiff::Span = text
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write e.g. 500ms, 10s or 1m"))?;
    // Days and longer have no fixed length; nobody wants a heartbeat that
    // long anyway.
    let signed = jiff::SignedDuration::try_from(span).map_err(|_| {
        format!("'{text}' is not a usable duration; write hours or less, e.g. 500ms, 10s or 1m")
    })?;
    Duration::try_from(signed)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("'{text}' is not longer than zero; write e.g. 500ms, 10s or 1m"))
}

fn subscriber_config(
    servers: &[String],
    caller: &Caller,
    args: &SubscriberArgs,
) -> anyhow::Result<SubscriberConfig> {
    let namespace = parse_namespace(&args.namespace)?;
    let channel = Channel::parse(&args.channel).map_err(|e| anyhow!("--channel: {e}"))?;
    let id = args
        .subscriber_id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", std::process::id()));
    let trusted = trusted_keys(&args.trusted)?;
    subscriber_base(servers, caller, namespace, channel, &id, trusted)
}

/// A subscriber's settings from the global flags.
fn subscriber_base(
    servers: &[String],
    caller: &Caller,
    namespace: Namespace,
    channel: Channel,
    id: &str,
    trusted: safemode_signing::TrustedKeys,
) -> anyhow::Result<SubscriberConfig> {
    let mut config = SubscriberConfig::new(servers.to_vec(), namespace, channel, id);
    config.trusted_keys = Some(trusted);
    config.token = caller.token.clone();
    config.ca_cert = caller.ca_cert.clone();
    config.allow_plaintext_token = caller.insecure;
    Ok(config)
}

fn decide_context(args: &DecideArgs) -> anyhow::Result<Context> {
    if !(0.0..=1.0).contains(&args.confidence) {
        bail!("--confidence {} is outside 0 to 1", args.confidence);
    }
    if let Some(amount) = args.amount
        && (!amount.is_finite() || amount < 0.0)
    {
        bail!("--amount must be a number of 0 or more");
    }
    for flag in &args.bot_flags {
        validate_label("bot flag", flag)?;
    }
    Ok(Context {
        confidence: args.confidence,
        methods: MethodSet::parse(&args.methods).map_err(|e| anyhow!("--method: {e}"))?,
        failed_attempts: args.attempts,
        amount: args.amount,
        handoff_from_bot: args.handoff,
        bot_flags: args.bot_flags.clone(),
    })
}

/// The control client the CLI uses: it sends the bearer token.
/// An answer from a controller.
type Answer = tonic::codegen::http::Response<tonic::body::Body>;

/// A call to a controller.
type Call = tonic::codegen::http::Request<tonic::body::Body>;

/// A channel that sends the command's trace context with every call and
/// notes which replica gave each answer.
type Answered = tower::util::MapResponse<
    tower::util::MapRequest<GrpcChannel, fn(Call) -> Call>,
    fn(Answer) -> Answer,
>;

type Control = ControlServiceClient<InterceptedService<Answered, Bearer>>;

/// Notes the replica an answer names ([`wire::REPLICA_HEADER`]), for the
/// output to say who answered.
fn note_replica(answer: Answer) -> Answer {
    if let Some(name) = answer
        .headers()
        .get(wire::REPLICA_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        output::answered_by(name);
    }
    answer
}

/// Who the CLI calls as: a token, and the name to go by on a server without
/// tokens; and how the token is kept safe on the way.
pub(crate) struct Caller {
    token: Option<String>,
    principal: Option<String>,
    /// Extra CA certificates for https:// controllers (--ca-cert).
    ca_cert: Option<PathBuf>,
    /// A token may go in plain text to a controller not on loopback
    /// (--insecure).
    insecure: bool,
    /// The change id every write of this command carries (--change-id).
    change_id: safemode_controller::ChangeId,
    /// The server the last control client connected to: a refusal is
    /// explained for it.
    connected: std::sync::Mutex<Option<String>>,
}

/// How long connecting to a controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A control-service client on the first replica that accepts a connection
/// (so an unreachable server fails here, with the addresses in the message).
/// Reads fail over only while connecting; writes go through
/// [`retry::write`], which sends them again elsewhere under their change id.
async fn control(servers: &[String], caller: &Caller) -> anyhow::Result<Control> {
    let bearer = Bearer::new(caller.token.as_deref())?.as_principal(caller.principal.as_deref())?;
    // The same checks as a subscriber's: https:// gets TLS, and no token
    // goes in plain text off this machine unless --insecure says so.
    let options = client::EndpointOptions {
        sends_token: caller.token.is_some(),
        ca_cert: caller.ca_cert.as_deref(),
        allow_plaintext_token: caller.insecure,
        connect_timeout: CONNECT_TIMEOUT,
    };
    let (server, channel) =
        client::connect_first(servers, &options, Duration::from_secs(30)).await?;
    *caller.connected.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
    let traced = tower::ServiceExt::map_request(channel, telemetry::traced as fn(Call) -> Call);
    let answered = tower::ServiceExt::map_response(traced, note_replica as fn(Answer) -> Answer);
    Ok(ControlServiceClient::with_interceptor(answered, bearer))
}

/// The token from --token, or read from --token-file (secrets stay out of
/// shell history and process lists).
fn read_token(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    match (token, file) {
        (Some(token), _) => Ok(Some(token.trim().to_string())),
        (None, Some(path)) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = token.trim();
            if token.is_empty() {
                bail!("the token file {} is empty", path.display());
            }
            Ok(Some(token.to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// The exit code of `decide`: 0 unless `--exit-code` asks for the effect
/// in it, 0 for allow and 10 plus the effect's place in the restrictiveness
/// order for the others (throttle 11, step_up 12, review 13, read_only 14,
/// route 15, deny 16), so a script can branch without parsing output.
fn decide_exit_code(asked: bool, effect: EffectKind) -> u8 {
    if !asked {
        return 0;
    }
    match effect {
        EffectKind::Allow => 0,
        EffectKind::Throttle => 11,
        EffectKind::StepUp => 12,
        EffectKind::Review => 13,
        EffectKind::ReadOnly => 14,
        EffectKind::Route => 15,
        EffectKind::Deny => 16,
    }
}

/// The exit code of a change that only made a request for a second
/// approver: nothing changed yet.
const REQUESTED_ONLY: u8 = 3;

/// Ends a change command: with [`REQUESTED_ONLY`] when `pending` (its
/// output said who must approve), else successfully.
fn requested_only(pending: bool) -> anyhow::Result<()> {
    if pending {
        Err(ExitWith(REQUESTED_ONLY).into())
    } else {
        Ok(())
    }
}

/// The command has said all it has to say and exits with this code.
#[derive(Debug, thiserror::Error)]
#[error("exit code {0}")]
struct ExitWith(u8);

/// Standard output was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
struct OutputClosed;

/// How often `status --wait-synced` asks again.
const WAIT_SYNCED_EVERY: Duration = Duration::from_millis(500);

/// `status --wait-synced`: asks for the fleet's status until every
/// subscriber `request` covers is SYNCED on a whole (not partial) answer,
/// showing progress on a terminal; then shows the status. When `timeout`
/// passes first, it fails naming who is not synced.
async fn wait_synced(
    mut client: Control,
    (servers, caller): (&[String], &Caller),
    request: proto::GetStatusRequest,
    timeout: Duration,
    format: Format,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let progress = std::io::stderr().is_terminal();
    let waited = || {
        jiff::SignedDuration::try_from(timeout)
            .map(|d| format!("{d:#}"))
            .unwrap_or_else(|_| format!("{timeout:?}"))
    };
    loop {
        let now = tokio::time::Instant::now();
        let status = match safemode_wire::full_status_of(&mut client, request.clone()).await {
            Ok(response) => output::Status::from(response),
            // The replica asked went away: ask the first that answers (the
            // next --server), until the time is up.
            Err(failure) if now < deadline => {
                if progress {
                    eprint!(
                        "\r\x1b[K{}",
                        output::single_line(&format!("asking again: {}", failure.message()))
                    );
                }
                tokio::time::sleep(WAIT_SYNCED_EVERY.min(deadline - now)).await;
                if let Ok(next) = control(servers, caller).await {
                    client = next;
                }
                continue;
            }
            Err(failure) => return Err(refused(failure)),
        };
        let waiting = status.not_synced(Some(request.channel.as_str()).filter(|c| !c.is_empty()));
        if waiting.is_none() {
            if progress {
                eprint!("\r\x1b[K");
            }
            return emit(output::show(format, &status));
        }
        if progress {
            eprint!("\r\x1b[K{}", output::single_line(&status.progress()));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            if progress {
                eprintln!();
            }
            emit(output::show(format, &status))?;
            bail!(
                "not synced after {}: {}",
                waited(),
                waiting.unwrap_or_default()
            );
        }
        tokio::time::sleep(WAIT_SYNCED_EVERY.min(deadline - now)).await;
    }
}

/// Writes a rendered result to standard output. When the reader has gone
/// away (a broken pipe), the command ends quietly instead of panicking.
fn emit(text: String) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// A refusal from the controller: its message already says what to do,
/// unless the status says more ([`client::explain`], in `run`).
fn refused(status: tonic::Status) -> anyhow::Error {
    Refusal(status).into()
}

/// What [`client::explain`] says of a control call's failure, but for a
/// refused token: the controller's own message says which token or role is
/// missing for this call (a subscription needs no more than a subscriber).
pub(crate) async fn explain_control(
    server: &str,
    status: &tonic::Status,
) -> Option<client::ClientError> {
    client::explain(server, status)
        .await
        .filter(|e| !matches!(e, client::ClientError::TokenRefused { .. }))
}

/// A control call's failure, as the server (or the transport) said it.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.message())]
struct Refusal(tonic::Status);
