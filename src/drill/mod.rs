//! Runbook drills: rehearse an incident end to end in a namespace of its
//! own and get a verdict.
//!
//! A drill starts simulated channel services ([`crate::sim`]) in a fresh
//! `drill-<id>` namespace (real subscribers already attached to a fixed
//! drill namespace take part too), declares the runbook's incident, walks
//! the severity path, and at each stage waits for every subscriber, times
//! each channel, and checks the runbook's drill expectations with the
//! client's own evaluator. Then it resolves the incident (with a second
//! principal approving, when the runbook asks for one), checks that every
//! channel is back to allow, and lifts anything left. Nothing outside the
//! drill namespace is touched.
//!
//! `--local` runs the controller in process, on the embedded store in a
//! temporary directory, with a tokens file of two drill principals, so a
//! runbook repository can drill in CI with nothing else installed.

pub mod render;
pub mod report;
mod run;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use safemode_client::{Bearer, EndpointOptions, SubscriberConfig, connect_any};
use safemode_controller::auth::{Role, create_token};
use safemode_grpc::server::{RunningServer, ServeConfig, StoreConfig};
use safemode_policy::catalog::Catalog;
use safemode_policy::runbook::Severity;
use safemode_policy::{Channel, Expectations, Namespace};
use safemode_signing::{SigningKey, TrustedKeys};
use safemode_wire::proto::control_service_client::ControlServiceClient;

pub use report::DrillReport;

/// A fault injected while a stage is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Kill this percentage of the simulated subscribers (at least one);
    /// they come back and must converge.
    KillSubscribers {
        /// 1 to 100.
        percent: u8,
    },
    /// Restart the in-process controller (`--local` only).
    RestartController,
}

impl Fault {
    /// Parses `kill-subscribers=10%` or `restart-controller`.
    pub fn parse(text: &str) -> Result<Fault, String> {
        if text == "restart-controller" {
            return Ok(Fault::RestartController);
        }
        if let Some(share) = text.strip_prefix("kill-subscribers=") {
            return share
                .strip_suffix('%')
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| (1..=100).contains(p))
                .map(|percent| Fault::KillSubscribers { percent })
                .ok_or_else(|| {
                    format!("'{text}': give a share from 1% to 100%, e.g. kill-subscribers=10%")
                });
        }
        Err(format!(
            "unknown fault '{text}'; faults: kill-subscribers=N% (1 to 100), restart-controller (with --local)"
        ))
    }

    /// How the report names it.
    pub fn describe(self) -> String {
        match self {
            Fault::KillSubscribers { percent } => format!("kill-subscribers={percent}%"),
            Fault::RestartController => "restart-controller".into(),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The controller to drill against.
#[derive(Clone, Debug)]
pub enum Target {
    /// An in-process controller serving the drilled runbooks.
    Local,
    /// A running controller (its replicas' URLs).
    Remote {
        /// Controller URLs.
        servers: Vec<String>,
        /// The commander's token (a drill token is enough).
        token: Option<String>,
        /// A second principal's token, to approve what needs approval.
        approver_token: Option<String>,
        /// Extra CA certificates for `https://`.
        ca_cert: Option<PathBuf>,
        /// Allow a token over plain `http://` off loopback.
        insecure: bool,
        /// The public keys the controller signs with (`--trusted-keys`):
        /// the drill's subscribers refuse anything else.
        trusted_keys: TrustedKeys,
    },
}

/// Where the drilled runbooks come from: built in, a directory, or files.
pub struct RunbookSource {
    /// The modes and runbooks, as loaded here.
    pub catalog: Arc<Catalog>,
    /// The directories a local controller serves (`None`: built in).
    pub modes_dir: Option<PathBuf>,
    /// See `modes_dir`.
    pub runbooks_dir: Option<PathBuf>,
    /// The runbooks to drill, in order.
    pub names: Vec<String>,
    /// Each drilled runbook's file as given, by runbook name (none for a
    /// built-in runbook).
    files: std::collections::HashMap<String, String>,
    /// Holds copied runbook files while the drill runs.
    _copies: Option<tempfile::TempDir>,
}

impl RunbookSource {
    /// Every runbook in `dir` (with the modes in `dir/modes/`, if there is
    /// one, else the built-in modes).
    pub fn directory(dir: &Path) -> Result<RunbookSource, String> {
        let modes_dir = Some(dir.join("modes")).filter(|m| m.is_dir());
        let catalog = Catalog::load_checking(
            modes_dir.as_deref(),
            Some(dir),
            Expectations::CheckedByDrill,
        )
        .map_err(|e| e.lines().join("\n"))?;
        let names = catalog
            .runbooks
            .iter()
            .map(|r| r.name.to_string())
            .collect::<Vec<_>>();
        if names.is_empty() {
            return Err(format!("{} holds no runbooks (*.yaml)", dir.display()));
        }
        // A runbook is named after its file's stem.
        let files = names
            .iter()
            .filter_map(|name| {
                ["yaml", "yml"]
                    .iter()
                    .map(|ext| dir.join(format!("{name}.{ext}")))
                    .find(|path| path.is_file())
                    .map(|path| (name.clone(), path.display().to_string()))
            })
            .collect();
        Ok(RunbookSource {
            catalog: Arc::new(catalog),
            modes_dir,
            runbooks_dir: Some(dir.to_path_buf()),
            names,
            files,
            _copies: None,
        })
    }

    /// Runbooks named (built in) or given as files (with the modes in a
    /// `modes/` directory beside the first, if there is one).
    pub fn given(runbooks: &[String]) -> Result<RunbookSource, String> {
        if runbooks.is_empty() {
            return Err("no runbook given; name runbooks (safemode runbook list), give runbook files, or --all DIR".into());
        }
        let files: Vec<&String> = runbooks.iter().filter(|r| is_file(r)).collect();
        if files.is_empty() {
            let catalog = Catalog::standard();
            for name in runbooks {
                if catalog.runbooks.get(name).is_none() {
                    let known: Vec<String> = catalog
                        .runbooks
                        .iter()
                        .map(|r| r.name.to_string())
                        .collect();
                    return Err(format!(
                        "no built-in runbook '{name}' and no such file; {}runbooks: {}",
                        safemode_policy::names::did_you_mean(
                            name,
                            known.iter().map(String::as_str)
                        ),
                        known.join(", ")
                    ));
                }
            }
            return Ok(RunbookSource {
                catalog: Arc::new(catalog),
                modes_dir: None,
                runbooks_dir: None,
                names: runbooks.to_vec(),
                files: Default::default(),
                _copies: None,
            });
        }
        if files.len() != runbooks.len() {
            return Err("give runbook names or runbook files, not both".into());
        }
        let copies =
            tempfile::tempdir().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        for file in &files {
            let path = Path::new(file.as_str());
            let name = path
                .file_name()
                .ok_or_else(|| format!("{file} names no file"))?;
            std::fs::copy(path, copies.path().join(name))
                .map_err(|e| format!("cannot read {file}: {e}"))?;
        }
        let beside = Path::new(files[0].as_str())
            .parent()
            .map(|p| p.join("modes"))
            .filter(|m| m.is_dir());
        let catalog = Catalog::load_checking(
            beside.as_deref(),
            Some(copies.path()),
            Expectations::CheckedByDrill,
        )
        .map_err(|e| e.lines().join("\n"))?;
        let named: Vec<(String, String)> = files
            .iter()
            .filter_map(|f| {
                let stem = Path::new(f.as_str()).file_stem()?.to_str()?;
                Some((stem.to_string(), f.to_string()))
            })
            .collect();
        Ok(RunbookSource {
            catalog: Arc::new(catalog),
            modes_dir: beside,
            runbooks_dir: Some(copies.path().to_path_buf()),
            names: named.iter().map(|(name, _)| name.clone()).collect(),
            files: named.into_iter().collect(),
            _copies: Some(copies),
        })
    }
}

impl RunbookSource {
    /// The file runbook `name` was read from, as given (`None`: built in).
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }
}

/// Whether lifting any of `runbook`'s modes needs a second approver.
fn needs_approver(
    runbook: &safemode_policy::Runbook,
    modes: &safemode_policy::ModeCatalog,
) -> bool {
    runbook.stages.iter().flat_map(|s| &s.modes).any(|staged| {
        modes
            .get(staged.mode.as_str())
            .is_none_or(|m| runbook.lift_needs_approval(m))
    })
}

fn is_file(arg: &str) -> bool {
    arg.ends_with(".yaml") || arg.contains('/') || Path::new(arg).is_file()
}

/// Everything a drill run needs.
pub struct DrillOptions {
    /// The controller.
    pub target: Target,
    /// The runbooks.
    pub source: RunbookSource,
    /// Simulated subscribers per channel (channels a runbook's expectations
    /// ask about are added, one subscriber each, if missing).
    pub channels: Vec<(Channel, usize)>,
    /// The severities to walk; default: every stage, least severe first.
    pub severity_path: Option<Vec<Severity>>,
    /// A fault to inject while the middle stage of the path is active.
    pub fault: Option<Fault>,
    /// A fixed drill namespace (real subscribers attached to it take part);
    /// default: a new `drill-<id>` per runbook.
    pub namespace: Option<Namespace>,
    /// How long every subscriber may take to converge before the drill says
    /// it did not (apply limits are checked separately).
    pub converge_within: Duration,
    /// Who runs the drill, as the command knows it (`--principal`, else
    /// `$USER`); the report names the principal the controller saw instead
    /// when a running controller declared the drill's incident.
    pub principal: Option<String>,
    /// The command that runs the drill, for the report, with token values
    /// already redacted.
    pub command_line: String,
}

/// The version of `safemode` a report names.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a drill could not run at all (a drill that runs and fails is a
/// report with `passed: false`).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The local controller would not start.
    #[error("cannot start the local controller: {0}")]
    Local(String),
    /// The controller cannot be reached.
    #[error(transparent)]
    Client(#[from] safemode_client::ClientError),
}

/// A call to the controller.
type Call = tonic::codegen::http::Request<tonic::body::Body>;

/// The drill's control client: its calls carry the command's trace context.
type Control = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<
        tower::util::MapRequest<tonic::transport::Channel, fn(Call) -> Call>,
        Bearer,
    >,
>;

/// The controller as the drill reaches it: as the commander and as the
/// approver, and, when local, the server itself (for a restart).
pub(crate) struct Harness {
    pub servers: Vec<String>,
    pub label: String,
    commander: (Option<String>, String),
    approver: (Option<String>, String),
    ca_cert: Option<PathBuf>,
    insecure: bool,
    /// The keys the controller signs with.
    trusted_keys: TrustedKeys,
    pub local: Option<LocalController>,
}

/// The in-process controller of a `--local` drill.
pub(crate) struct LocalController {
    pub server: Option<RunningServer>,
    pub config: ServeConfig,
    _data: tempfile::TempDir,
    _tokens: tempfile::NamedTempFile,
}

impl LocalController {
    /// Stops the controller (gracefully: streams end) and starts it again on
    /// the same address and data.
    pub async fn restart(&mut self) -> Result<(), String> {
        if let Some(server) = self.server.take() {
            server.stop().await.map_err(|e| format!("{e:#}"))?;
        }
        let server = safemode_grpc::server::start(self.config.clone())
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.server = Some(server);
        Ok(())
    }
}

impl Harness {
    async fn new(target: &Target, source: &RunbookSource) -> Result<Harness, DrillError> {
        match target {
            Target::Remote {
                servers,
                token,
                approver_token,
                ca_cert,
                insecure,
                trusted_keys,
            } => Ok(Harness {
                trusted_keys: trusted_keys.clone(),
                label: servers.join(","),
                servers: servers.clone(),
                commander: (token.clone(), "drill-commander".into()),
                approver: (approver_token.clone(), "drill-approver".into()),
                ca_cert: ca_cert.clone(),
                insecure: *insecure,
                local: None,
            }),
            Target::Local => {
                let data = tempfile::tempdir().map_err(|e| DrillError::Local(e.to_string()))?;
                let commander = create_token("drill-commander", &[Role::Drill])
                    .map_err(|e| DrillError::Local(e.to_string()))?;
                let approver = create_token("drill-approver", &[Role::Drill])
                    .map_err(|e| DrillError::Local(e.to_string()))?;
                let mut tokens =
                    tempfile::NamedTempFile::new().map_err(|e| DrillError::Local(e.to_string()))?;
                tokens
                    .write_all(format!("{}\n{}\n", commander.line, approver.line).as_bytes())
                    .map_err(|e| DrillError::Local(e.to_string()))?;
                // The drill knows the key of the controller it runs, and
                // keeps it across a restart.
                let (key, _) = SigningKey::generate();
                let trusted_keys =
                    TrustedKeys::new([key.public_key().clone()]).expect("one key is a valid set");
                let config = ServeConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    signing_key: safemode_grpc::server::SigningKeySource::Key(key),
                    store: StoreConfig::Embedded {
                        data_dir: data.path().to_path_buf(),
                    },
                    replica: Some("drill".into()),
                    modes_dir: source.modes_dir.clone(),
                    runbooks_dir: source.runbooks_dir.clone(),
                    tokens: Some(tokens.path().to_path_buf()),
                    runbook_expectations: Expectations::CheckedByDrill,
                    ..ServeConfig::default()
                };
                let server = safemode_grpc::server::start(config.clone())
                    .await
                    .map_err(|e| DrillError::Local(format!("{e:#}")))?;
                // A restart must come back on the same address.
                let config = ServeConfig {
                    listen: server.addr,
                    ..config
                };
                Ok(Harness {
                    servers: vec![format!("http://{}", server.addr)],
                    label: "local".into(),
                    commander: (Some(commander.token), "drill-commander".into()),
                    approver: (Some(approver.token), "drill-approver".into()),
                    ca_cert: None,
                    insecure: false,
                    trusted_keys,
                    local: Some(LocalController {
                        server: Some(server),
                        config,
                        _data: data,
                        _tokens: tokens,
                    }),
                })
            }
        }
    }

    async fn client(
        &self,
        (token, name): &(Option<String>, String),
    ) -> Result<Control, DrillError> {
        let bearer = Bearer::new(token.as_deref())?.as_principal(Some(name))?;
        let options = EndpointOptions {
            sends_token: token.is_some(),
            ca_cert: self.ca_cert.as_deref(),
            allow_plaintext_token: self.insecure,
            connect_timeout: Duration::from_secs(5),
        };
        let channel = connect_any(&self.servers, &options, Duration::from_secs(30)).await?;
        let traced =
            tower::ServiceExt::map_request(channel, crate::telemetry::traced as fn(Call) -> Call);
        Ok(ControlServiceClient::with_interceptor(traced, bearer))
    }

    /// The commander's control client.
    pub async fn commander(&self) -> Result<Control, DrillError> {
        self.client(&self.commander).await
    }

    /// The approver's control client.
    pub async fn approver(&self) -> Result<Control, DrillError> {
        self.client(&self.approver).await
    }

    /// What to do when the approver's approval failed: give an approver
    /// token, or give another one.
    pub fn approver_hint(&self) -> &'static str {
        match (&self.local, &self.approver.0) {
            (Some(_), _) => "",
            (None, Some(_)) => {
                " (the --approver-token was refused: it must be another principal's drill or approver token)"
            }
            (None, None) => {
                " (against a running controller, give --approver-token: another principal's drill or approver token)"
            }
        }
    }

    /// Settings for the drill's simulated subscribers (the commander's token
    /// may subscribe).
    pub fn subscriber_base(&self, namespace: Namespace, channel: Channel) -> SubscriberConfig {
        let mut config = SubscriberConfig::new(self.servers.clone(), namespace, channel, "drill");
        config.token = self.commander.0.clone();
        config.ca_cert = self.ca_cert.clone();
        config.allow_plaintext_token = self.insecure;
        config.trusted_keys = Some(self.trusted_keys.clone());
        config.max_backoff = Duration::from_millis(500);
        config
    }
}

/// Drills every runbook of `options`, one after another, each in its own
/// namespace; returns a report per runbook.
pub async fn run(options: DrillOptions) -> Result<Vec<DrillReport>, DrillError> {
    if options.fault == Some(Fault::RestartController) && !matches!(options.target, Target::Local) {
        return Err(DrillError::Options(
            "--fault restart-controller needs --local: a drill restarts only a controller it runs itself".into(),
        ));
    }
    if let Some(namespace) = &options.namespace
        && !namespace.is_drill()
    {
        return Err(DrillError::Options(format!(
            "--namespace {namespace}: a drill runs only in a drill-* namespace, never in {namespace}"
        )));
    }
    if let Some(path) = &options.severity_path
        && let Some(pair) = path.windows(2).find(|p| p[0] == p[1])
    {
        return Err(DrillError::Options(format!(
            "--severity-path: {} follows itself; each step must move to another severity",
            pair[0]
        )));
    }
    for name in &options.source.names {
        let Some(runbook) = options.source.catalog.runbooks.get(name) else {
            return Err(DrillError::Options(format!("no runbook '{name}'")));
        };
        // Resolving lifts everything: against a controller with tokens, a
        // second principal must be at hand before anything is declared.
        if let Target::Remote {
            token: Some(_),
            approver_token: None,
            ..
        } = &options.target
            && needs_approver(runbook, &options.source.catalog.modes)
        {
            return Err(DrillError::Options(format!(
                "runbook {name} needs a second approver to resolve (or to go down a severity): give --approver-token, another principal's drill or approver token"
            )));
        }
        if let Some(path) = &options.severity_path {
            for severity in path {
                if runbook.stage(*severity).is_none() {
                    return Err(DrillError::Options(format!(
                        "--severity-path: runbook {name} has no stage for {severity}; it has {}",
                        runbook
                            .severities()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
    }
    let mut harness = Harness::new(&options.target, &options.source).await?;
    let mut reports = Vec::new();
    for name in &options.source.names {
        let runbook = options
            .source
            .catalog
            .runbooks
            .get(name)
            .expect("checked above")
            .clone();
        reports.push(run::drill(&mut harness, &runbook, &options).await);
    }
    if let Some(local) = harness.local.as_mut()
        && let Some(server) = local.server.take()
    {
        let _ = server.stop().await;
    }
    Ok(reports)
}
