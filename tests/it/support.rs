//! Shared test harness: in-process servers on `127.0.0.1:0`, raw gRPC
//! subscribers that record every message, the `safemode` binary, and waiting
//! for a condition with a deadline (never a fixed sleep).

use std::future::Future;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use safemode_client::{Subscriber, SubscriberConfig};
use safemode_controller::ControllerConfig;
use safemode_grpc::server::{self, RunningServer, ServeConfig, SigningKeySource, StoreConfig};
use safemode_policy::Namespace;
use safemode_signing::{SigningKey, TrustedKeys};
use safemode_wire::proto::control_service_client::ControlServiceClient;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscribe_response::Message as Inbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use safemode_wire::proto::{self, SubscribeRequest};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `condition` until it holds; fails the test with `what` at the deadline.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it yields a value; fails the test with `what` at the
/// deadline.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A controller serving on a free loopback port from its own data directory.
pub struct TestServer {
    pub url: String,
    running: Option<RunningServer>,
    /// The public key it signs with, as its channel services trust it.
    trusted: TrustedKeys,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server on a fresh data directory.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Self::start_in(temp.path()).await;
        server._temp = Some(temp);
        server
    }

    /// A server on `data_dir` (reused across restarts).
    pub async fn start_in(data_dir: &Path) -> Self {
        Self::start_with(Self::config_in(data_dir)).await
    }

    /// How [`TestServer::start_in`] configures a server on `data_dir`.
    pub fn config_in(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreConfig::Embedded {
                data_dir: data_dir.to_path_buf(),
            },
            controller: ControllerConfig {
                catch_up_timeout: Duration::from_millis(300),
                ..ControllerConfig::default()
            },
            ..ServeConfig::default()
        }
    }

    /// A replica on the etcd cluster at `endpoints`, listening on `listen`
    /// (`127.0.0.1:0` for a free port).
    pub async fn on_etcd(endpoints: Vec<String>, listen: &str) -> Self {
        Self::start_with(ServeConfig {
            listen: listen.parse().unwrap(),
            signing_key: safemode_grpc::server::SigningKeySource::Key(
                crate::support::test_signing_key(),
            ),
            store: StoreConfig::Etcd {
                endpoints,
                prefix: "/safemode/".into(),
                tls: Default::default(),
            },
            controller: ControllerConfig {
                catch_up_timeout: Duration::from_millis(300),
                ..ControllerConfig::default()
            },
            ..ServeConfig::default()
        })
        .await
    }

    /// A server on a fresh data directory that requires the tokens of
    /// `principals`.
    pub async fn with_tokens(principals: &Principals) -> Self {
        Self::with_tokens_and(principals, |_| {}).await
    }

    /// Like [`TestServer::with_tokens`], with `adjust` applied to the
    /// configuration first.
    pub async fn with_tokens_and(
        principals: &Principals,
        adjust: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut config = ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: StoreConfig::Embedded {
                data_dir: temp.path().to_path_buf(),
            },
            tokens: Some(principals.file.path().to_path_buf()),
            ..ServeConfig::default()
        };
        adjust(&mut config);
        let mut server = Self::start_with(config).await;
        server._temp = Some(temp);
        server
    }

    /// A replica on etcd that requires the tokens of `principals`.
    pub async fn on_etcd_guarded(endpoints: Vec<String>, principals: &Principals) -> Self {
        Self::start_with(ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            signing_key: safemode_grpc::server::SigningKeySource::Key(
                crate::support::test_signing_key(),
            ),
            store: StoreConfig::Etcd {
                endpoints,
                prefix: "/safemode/".into(),
                tls: Default::default(),
            },
            tokens: Some(principals.file.path().to_path_buf()),
            ..ServeConfig::default()
        })
        .await
    }

    /// The address the server listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("server is running").addr
    }

    /// The address of its plain-HTTP listener, when it has one.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().expect("server is running").http_addr
    }

    /// A server with a custom configuration.
    pub async fn start_with(config: ServeConfig) -> Self {
        let running = server::start(config.clone()).await.expect("server starts");
        // Where a channel service gets the key: signing.pub in the data
        // directory, or the key the deployment gave every replica.
        let pem = match (&config.signing_key, &config.store) {
            (SigningKeySource::Key(key), _) => key.public_key().to_pem(),
            (SigningKeySource::File(path), _) => SigningKey::load(path)
                .expect("the signing key file")
                .public_key()
                .to_pem(),
            (SigningKeySource::InDataDir, StoreConfig::Embedded { data_dir }) => {
                std::fs::read_to_string(data_dir.join(server::PUBLIC_KEY_FILE))
                    .expect("the server wrote signing.pub")
            }
            (SigningKeySource::InDataDir, StoreConfig::Etcd { .. }) => {
                unreachable!("refused by server::start")
            }
        };
        let url = format!("http://{}", running.addr);
        register_key(&url, &pem);
        TestServer {
            url,
            running: Some(running),
            trusted: TrustedKeys::from_pem(&pem).expect("a public key"),
            _temp: None,
        }
    }

    /// The keys its subscribers must trust.
    pub fn trusted_keys(&self) -> TrustedKeys {
        self.trusted.clone()
    }

    /// A file of the keys its subscribers must trust (`--trusted-keys`).
    pub fn trusted_keys_file(&self) -> std::path::PathBuf {
        key_file_of(&self.url).expect("registered at start")
    }

    /// Settings of a subscriber of `channel` in `live` that trusts this
    /// server's key.
    pub fn subscriber_config(&self, channel: &str, id: &str) -> SubscriberConfig {
        let mut config = SubscriberConfig::new(
            [self.url.clone()],
            Namespace::live(),
            safemode_policy::Channel::parse(channel).unwrap(),
            id,
        );
        config.trusted_keys = Some(self.trusted_keys());
        config
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("server stops cleanly");
        }
    }

    /// A connected gRPC channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// A control-service client.
    pub async fn control(&self) -> ControlServiceClient<Channel> {
        ControlServiceClient::new(self.channel().await)
    }

    /// Applies modes in `live` on all channels; returns the revision.
    pub async fn apply(&self, modes: &[&str]) -> i64 {
        self.control()
            .await
            .apply_modes(proto::ApplyModesRequest {
                namespace: "live".into(),
                modes: modes.iter().map(|m| m.to_string()).collect(),
                reason: "test".into(),
                ..Default::default()
            })
            .await
            .expect("apply")
            .into_inner()
            .revision
    }

    /// A client subscriber of `channel` in `live`, with its first snapshot.
    pub async fn subscriber(&self, channel: &str, id: &str) -> Subscriber {
        Subscriber::connect(self.subscriber_config(channel, id))
            .await
            .expect("the subscriber connects")
    }

    /// The status of `namespace`.
    pub async fn status(&self, namespace: &str) -> proto::GetStatusResponse {
        safemode_wire::full_status(&mut self.control().await, namespace)
            .await
            .expect("status")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

/// One principal per role, with their tokens, and the tokens file a server
/// reads them from.
pub struct Principals {
    pub file: tempfile::NamedTempFile,
    tokens: std::collections::HashMap<String, String>,
}

impl Principals {
    /// A principal named after each role (admin, approver, commander, drill,
    /// subscriber, viewer, detector), a second approver `approver2`, and a
    /// second commander `commander2`.
    pub fn new() -> Self {
        use safemode_controller::auth::{Role, create_token};
        let people: &[(&str, Role)] = &[
            ("viewer", Role::Viewer),
            ("subscriber", Role::Subscriber),
            ("subscriber2", Role::Subscriber),
            ("commander", Role::Commander),
            ("commander2", Role::Commander),
            ("approver", Role::Approver),
            ("approver2", Role::Approver),
            ("drill", Role::Drill),
            ("admin", Role::Admin),
            ("detector", Role::Detector),
        ];
        let mut lines = String::from("# tokens for the tests\n");
        let mut tokens = std::collections::HashMap::new();
        for (name, role) in people {
            let new = create_token(name, &[*role]).unwrap();
            lines.push_str(&new.line);
            lines.push('\n');
            tokens.insert(name.to_string(), new.token);
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), lines).unwrap();
        Principals { file, tokens }
    }

    /// The token of `name`.
    pub fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }
}

/// A control client that presents a token.
pub type Control = ControlServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, safemode_client::Bearer>,
>;

/// A control client presenting `token` (none: no header).
pub async fn control_as(server: &TestServer, token: Option<&str>) -> Control {
    ControlServiceClient::with_interceptor(
        server.channel().await,
        safemode_client::Bearer::new(token).unwrap(),
    )
}

/// A subscriber speaking the wire protocol directly: it records every
/// snapshot it receives, in order, and acks each one.
pub struct RawSubscriber {
    pub received: Arc<Mutex<Vec<proto::Snapshot>>>,
    out: mpsc::Sender<SubscribeRequest>,
    /// The status the stream ended with, if it ended.
    pub ended: Arc<Mutex<Option<tonic::Status>>>,
    /// The server's answers to the reports sent, in order.
    pub answers: Arc<Mutex<Vec<proto::ReportAnswer>>>,
    task: JoinHandle<()>,
}

impl RawSubscriber {
    /// Opens a stream and sends the hello; fails if the server refuses it.
    pub async fn connect(
        channel: Channel,
        namespace: &str,
        channel_name: &str,
        id: &str,
        last_applied: i64,
    ) -> Result<Self, tonic::Status> {
        let hello = proto::Hello {
            namespace: namespace.into(),
            channel: channel_name.into(),
            subscriber_id: id.into(),
            last_applied_revision: last_applied,
            epoch: String::new(),
        };
        Self::connect_with(channel, hello).await
    }

    /// Opens a stream with `hello`.
    pub async fn connect_with(
        channel: Channel,
        hello: proto::Hello,
    ) -> Result<Self, tonic::Status> {
        Self::open(channel, hello, true).await
    }

    /// Opens a stream that records snapshots and never acks one (a
    /// subscriber that hangs, or rejects: see [`RawSubscriber::reject`]).
    pub async fn connect_silent(
        channel: Channel,
        namespace: &str,
        channel_name: &str,
        id: &str,
    ) -> Result<Self, tonic::Status> {
        let hello = proto::Hello {
            namespace: namespace.into(),
            channel: channel_name.into(),
            subscriber_id: id.into(),
            last_applied_revision: 0,
            epoch: String::new(),
        };
        Self::open(channel, hello, false).await
    }

    /// Opens a stream with `hello`, authenticated with `token`.
    pub async fn connect_as(
        channel: Channel,
        hello: proto::Hello,
        token: &str,
    ) -> Result<Self, tonic::Status> {
        Self::open_as(channel, hello, true, Some(token)).await
    }

    async fn open(
        channel: Channel,
        hello: proto::Hello,
        acking: bool,
    ) -> Result<Self, tonic::Status> {
        Self::open_as(channel, hello, acking, None).await
    }

    async fn open_as(
        channel: Channel,
        hello: proto::Hello,
        acking: bool,
        token: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let (out, out_rx) = mpsc::channel(16);
        out.send(SubscribeRequest {
            message: Some(Outbound::Hello(hello)),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
        if let Some(token) = token {
            let bearer = format!("Bearer {token}").parse().expect("a header value");
            request.metadata_mut().insert("authorization", bearer);
        }
        let response = SubscriptionServiceClient::new(channel)
            .subscribe(request)
            .await?;
        assert!(
            response
                .metadata()
                .get(safemode_wire::REPORTS_HEADER)
                .is_some(),
            "a replica says it takes reports"
        );
        let mut inbound = response.into_inner();
        let received = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (r, e, acks, a) = (
            received.clone(),
            ended.clone(),
            out.clone(),
            answers.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        if let Some(Inbound::ReportAnswer(answer)) = &message.message {
                            a.lock().unwrap().push(answer.clone());
                        }
                        if let Some(Inbound::Snapshot(snapshot)) = message.message {
                            let revision = snapshot.revision;
                            r.lock().unwrap().push(snapshot);
                            if !acking {
                                continue;
                            }
                            let ack = SubscribeRequest {
                                message: Some(Outbound::Ack(proto::Ack { revision })),
                            };
                            if acks.send(ack).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        *e.lock().unwrap() = Some(status);
                        return;
                    }
                }
            }
        });
        Ok(RawSubscriber {
            received,
            out,
            ended,
            answers,
            task,
        })
    }

    /// Sends `report` on the stream.
    pub async fn report(&self, report: proto::Report) {
        let message = SubscribeRequest {
            message: Some(Outbound::Report(report)),
        };
        self.out.send(message).await.expect("stream open");
    }

    /// Tells the server this subscriber could not apply `revision`.
    pub async fn reject(&self, revision: i64, reason: &str) {
        let reject = SubscribeRequest {
            message: Some(Outbound::Reject(proto::Reject {
                revision,
                reason: reason.into(),
            })),
        };
        self.out.send(reject).await.expect("stream open");
    }

    /// Revisions received so far, in order.
    pub fn revisions(&self) -> Vec<i64> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.revision)
            .collect()
    }

    /// The newest snapshot received.
    pub fn latest(&self) -> Option<proto::Snapshot> {
        self.received.lock().unwrap().last().cloned()
    }
}

impl Drop for RawSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The mode names of a snapshot's activations, sorted.
pub fn modes_of(snapshot: &proto::Snapshot) -> Vec<String> {
    let mut modes: Vec<String> = snapshot
        .activations
        .iter()
        .map(|a| a.mode.clone())
        .collect();
    modes.sort();
    modes
}

/// The public-key files of the servers tests started, by URL: a command
/// run against one trusts its key, as an operator sets
/// `SAFEMODE_TRUSTED_KEYS` for the controller they use.
static KEY_FILES: Mutex<Vec<(String, tempfile::TempPath)>> = Mutex::new(Vec::new());

/// Keeps `pem` in a file as the key of the server at `url` (by its
/// address: `http://` and `https://` alike).
pub fn register_key(url: &str, pem: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), pem).expect("write the public key");
    let addr = address_of(url).to_string();
    let mut files = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
    // A port is reused only after its server stopped.
    files.retain(|(a, _)| *a != addr);
    files.push((addr, file.into_temp_path()));
}

fn address_of(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

/// The public-key file of the server at `url`, if a test started it.
pub fn key_file_of(url: &str) -> Option<std::path::PathBuf> {
    let addr = address_of(url);
    let files = KEY_FILES.lock().unwrap_or_else(|e| e.into_inner());
    files
        .iter()
        .find(|(a, _)| a == addr)
        .map(|(_, path)| path.to_path_buf())
}

/// The public-key file for a command line: that of its first `--server`
/// if a test started it, else a key no server signs with (a command against
/// an address nobody serves is configured like any other, so that what it
/// says is about the address).
pub fn key_file_for(args: &[&str]) -> std::path::PathBuf {
    static UNRELATED: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    args.iter()
        .position(|a| *a == "--server")
        .and_then(|i| args.get(i + 1))
        .and_then(|servers| key_file_of(servers.split(',').next().unwrap_or_default()))
        .unwrap_or_else(|| {
            UNRELATED
                .get_or_init(|| {
                    let file = tempfile::NamedTempFile::new().expect("temp file");
                    std::fs::write(file.path(), SigningKey::generate().0.public_key().to_pem())
                        .expect("write a public key");
                    file.into_temp_path()
                })
                .to_path_buf()
        })
}

/// Runs the `safemode` binary with `args` (off the async runtime). It
/// trusts the key of the first `--server` ([`key_file_for`]; never a
/// `safemode-data/signing.pub` that happens to lie in the working
/// directory).
pub async fn safemode(args: &[&str]) -> Output {
    let keys = key_file_for(args);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_safemode"));
        command
            .args(&args)
            .env_remove("SAFEMODE_SERVER")
            .env_remove("RUST_LOG");
        command.env("SAFEMODE_TRUSTED_KEYS", keys);
        command.output().expect("the safemode binary runs")
    })
    .await
    .unwrap()
}

/// A `safemode serve` process; killed (SIGKILL) when dropped.
pub struct ServeProcess {
    child: std::process::Child,
    pub url: String,
}

impl ServeProcess {
    /// `safemode serve --listen 127.0.0.1:0 --data-dir DIR`.
    pub fn start_in(data_dir: &std::path::Path) -> Self {
        let dir = data_dir.display().to_string();
        Self::start(&["--data-dir", &dir], &[])
    }

    /// `safemode serve --listen 127.0.0.1:0 ARGS...` with `env` added;
    /// returns once it serves (its log says where).
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_on("127.0.0.1:0", args, env)
    }

    /// Like [`ServeProcess::start`], listening on `listen` (a replica
    /// restarted on the address its clients know).
    pub fn start_on(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
            .args(["serve", "--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("safemode serve starts");
        // The log line announcing the server carries the bound address.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                panic!(
                    "safemode serve {args:?} exited before serving:\n{}",
                    log.join("\n")
                );
            };
            let line = line.unwrap();
            if let Some(rest) = line.split("addr=").nth(1)
                && line.contains("serving")
            {
                break rest.split_whitespace().next().unwrap().to_string();
            }
            log.push(line);
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let url = format!("http://{addr}");
        if let Some(dir) = args
            .iter()
            .position(|a| *a == "--data-dir")
            .and_then(|i| args.get(i + 1))
            && let Ok(pem) = std::fs::read_to_string(Path::new(dir).join(server::PUBLIC_KEY_FILE))
            && args.iter().all(|a| *a != "--signing-key")
        {
            register_key(&url, &pem);
        }
        ServeProcess { child, url }
    }

    /// The process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end (after a signal sent to [`Self::pid`]).
    pub fn wait(&mut self) {
        self.child.wait().unwrap();
    }

    /// SIGKILL, and wait for it to end.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The signing key every replica of a test on etcd shares, as replicas of
/// one deployment share theirs (`serve --signing-key`).
pub fn test_signing_key() -> safemode_signing::SigningKey {
    test_key().0.clone()
}

/// A file holding [`test_signing_key`], for `serve --signing-key`.
pub fn test_signing_key_file() -> std::path::PathBuf {
    test_key().1.to_path_buf()
}

fn test_key() -> &'static (SigningKey, tempfile::TempPath) {
    static KEY: std::sync::OnceLock<(SigningKey, tempfile::TempPath)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let (key, pem) = SigningKey::generate();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), pem).expect("write the signing key");
        (key, file.into_temp_path())
    })
}

/// What a refused command must leave as it was: namespace live's revision,
/// the audit log's length, and every request of live with its state.
pub async fn observed_state(server: &TestServer) -> (i64, usize, Vec<(String, String)>) {
    let mut control = server.control().await;
    let revision = server.status("live").await.revision;
    let entries = control
        .get_audit(proto::GetAuditRequest::default())
        .await
        .expect("the audit log reads")
        .into_inner()
        .entries
        .len();
    let requests = control
        .list_requests(proto::ListRequestsRequest {
            namespace: "live".into(),
            include_decided: true,
        })
        .await
        .expect("the requests read")
        .into_inner()
        .requests
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    (revision, entries, requests)
}
