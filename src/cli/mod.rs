//! The `safemode` command line: `serve` runs a controller; every other command
//! is a client of one (`--server`). Arguments are checked here, before any
//! connection, so bad input fails fast with one clear line and changes
//! nothing. Exit codes: 0 success, 1 refused or failed, 2 bad usage.

mod output;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::Channel as GrpcChannel;

use crate::client::{self, ClientError, Subscriber, SubscriberConfig, error_chain};
use crate::controller::{Layout, LiftTarget};
use crate::policy::names::validate_label;
use crate::policy::{Action, Channel, ChannelSet, Context, MethodSet, ModeName, Namespace, Reason};
use crate::server::{self, ServeConfig, StoreConfig};
use crate::wire::proto::control_service_client::ControlServiceClient;
use crate::wire::{self, proto};

/// Incident degradation-mode controller for customer-support flows.
#[derive(Parser, Debug)]
#[command(name = "safemode", version, about, max_term_width = 100)]
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
    #[arg(long, global = true, value_enum, env = "SAFEMODE_OUTPUT", default_value_t = Format::Text)]
    output: Format,
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
    Serve(ServeArgs),
    /// List, apply and lift modes.
    #[command(subcommand)]
    Mode(ModeCommand),
    /// Show active activations and every connected subscriber's revision.
    Status(NamespaceArg),
    /// Subscribe as a channel and print every snapshot applied (and acked).
    Watch(WatchArgs),
    /// Subscribe as a channel, evaluate one action locally, print the decision.
    Decide(DecideArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback only until authentication exists).
    #[arg(long, env = "SAFEMODE_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
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
    /// This replica's name in status and logs [default: the host name].
    #[arg(long, env = "SAFEMODE_REPLICA")]
    replica: Option<String>,
    /// Directory of mode files (*.yaml); default: the built-in standard modes.
    #[arg(long, env = "SAFEMODE_MODES")]
    modes: Option<PathBuf>,
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

#[derive(Args, Debug)]
struct NamespaceArg {
    /// Namespace (`live` is production).
    #[arg(long, env = "SAFEMODE_NAMESPACE", default_value = Namespace::LIVE)]
    namespace: String,
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
        #[arg(long)]
        reason: Option<String>,
        /// Channels to cover, comma-separated, or `*` (default: all).
        #[arg(long)]
        channels: Option<String>,
        /// For read-only modes: serve data as of this time (RFC 3339; default now).
        #[arg(long)]
        as_of: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
    },
    /// Lift activations (by id) or every activation of a mode (by name).
    Lift {
        /// Activation ids (act_...) or mode names.
        #[arg(required = true)]
        targets: Vec<String>,
        /// Lift every activation of a named mode, when it has several.
        #[arg(long)]
        all: bool,
        /// Why (mandatory; audited).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
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
}

#[derive(Args, Debug)]
struct WatchArgs {
    #[command(flatten)]
    subscriber: SubscriberArgs,
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
    /// Verification method the customer passed (repeatable), e.g. push.
    #[arg(long = "method")]
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
    /// What the bot flagged the session with (repeatable).
    #[arg(long = "bot-flag")]
    bot_flags: Vec<String>,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    // Colour only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`safemode status | head -1`): not a failure.
        Err(e) if e.is::<OutputClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Mode(ModeCommand::List) => {
            let mut client = control(&cli.servers).await?;
            let response = client
                .list_modes(proto::ListModesRequest {})
                .await
                .map_err(refused)?;
            emit(output::modes(format, &response.into_inner()))?;
            Ok(())
        }
        Command::Mode(ModeCommand::Apply {
            modes,
            reason,
            channels,
            as_of,
            namespace,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            for mode in &modes {
                ModeName::parse(mode)?;
            }
            let reason = parse_reason(reason)?;
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
            let mut client = control(&cli.servers).await?;
            let response = client
                .apply_modes(proto::ApplyModesRequest {
                    namespace: namespace.to_string(),
                    modes,
                    channels,
                    reason: reason.as_str().to_string(),
                    as_of: as_of.map(wire::timestamp_to_wire),
                })
                .await
                .map_err(refused)?;
            emit(output::applied(format, &response.into_inner()))?;
            Ok(())
        }
        Command::Mode(ModeCommand::Lift {
            targets,
            all,
            reason,
            namespace,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            for target in &targets {
                LiftTarget::parse(target)?;
            }
            let reason = parse_reason(reason)?;
            let mut client = control(&cli.servers).await?;
            let response = client
                .lift_activations(proto::LiftActivationsRequest {
                    namespace: namespace.to_string(),
                    targets,
                    reason: reason.as_str().to_string(),
                    all,
                })
                .await
                .map_err(refused)?;
            emit(output::lifted(format, &response.into_inner()))?;
            Ok(())
        }
        Command::Status(namespace) => {
            let namespace = parse_namespace(&namespace)?;
            let mut client = control(&cli.servers).await?;
            let response = client
                .get_status(proto::GetStatusRequest {
                    namespace: namespace.to_string(),
                })
                .await
                .map_err(refused)?;
            emit(output::status(format, &response.into_inner()))?;
            Ok(())
        }
        Command::Watch(args) => {
            let config = subscriber_config(&cli.servers, &args.subscriber)?;
            let subscriber = Subscriber::connect(config).await?;
            let mut changes = subscriber.changes();
            loop {
                if let Some(snapshot) = changes.borrow_and_update().clone() {
                    emit(output::snapshot(format, &snapshot))?;
                }
                tokio::select! {
                    changed = changes.changed() => changed.context("the subscriber stopped")?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Decide(args) => {
            let config = subscriber_config(&cli.servers, &args.subscriber)?;
            let action = Action::parse(&args.action)?;
            let ctx = decide_context(&args)?;
            let subscriber = Subscriber::connect(config).await?;
            emit(output::decision(format, &subscriber.decide(&action, &ctx)))?;
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = match args.store {
        StoreKind::Embedded => {
            if !args.etcd_endpoints.is_empty() {
                bail!("--etcd-endpoints needs --store etcd");
            }
            StoreConfig::Embedded {
                data_dir: args
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from("safemode-data")),
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
            }
        }
    };
    let defaults = ServeConfig::default();
    let running = server::start(ServeConfig {
        listen: args.listen,
        store,
        replica: args.replica.unwrap_or(defaults.replica.clone()),
        modes_dir: args.modes,
        heartbeat: args.heartbeat,
        ..defaults
    })
    .await?;
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

/// A missing `--reason` is the same mistake as an empty one, and gets the
/// same one-line answer.
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
    let duration = jiff::SignedDuration::try_from(span)
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            format!("'{text}' is not a usable duration; write hours or less, e.g. 500ms, 10s or 1m")
        })?;
    Ok(duration)
}

fn subscriber_config(
    servers: &[String],
    args: &SubscriberArgs,
) -> anyhow::Result<SubscriberConfig> {
    let namespace = parse_namespace(&args.namespace)?;
    let channel = Channel::parse(&args.channel).map_err(|e| anyhow!("--channel: {e}"))?;
    let id = args
        .subscriber_id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", std::process::id()));
    Ok(SubscriberConfig::new(
        servers.to_vec(),
        namespace,
        channel,
        id,
    ))
}

fn decide_context(args: &DecideArgs) -> anyhow::Result<Context> {
    if !(0.0..=1.0).contains(&args.confidence) {
        bail!("--confidence {} is outside 0 to 1", args.confidence);
    }
    if let Some(amount) = args.amount {
        if !amount.is_finite() || amount < 0.0 {
            bail!("--amount must be a number of 0 or more");
        }
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

/// A control-service client on the first replica that accepts a connection
/// (so an unreachable server fails here, with the addresses in the message).
/// Only connecting fails over: a request that reached a replica is never sent
/// twice.
async fn control(servers: &[String]) -> anyhow::Result<ControlServiceClient<GrpcChannel>> {
    let mut last_error = String::new();
    for (_, endpoint) in client::endpoints(servers, Duration::from_secs(5))? {
        match endpoint.timeout(Duration::from_secs(30)).connect().await {
            Ok(channel) => return Ok(ControlServiceClient::new(channel)),
            Err(e) => last_error = error_chain(&e),
        }
    }
    Err(ClientError::Unreachable {
        server: servers.join(", "),
        reason: last_error,
    }
    .into())
}

/// Standard output was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
struct OutputClosed;

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

/// A refusal from the controller: its message already says what to do.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}", status.message())
}
