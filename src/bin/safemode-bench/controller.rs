//! The controller under test, in a child process of its own (so that its
//! memory is its own): this same binary, started with `--controller`. It
//! exits when its stdin closes, so it never outlives the benchmark, however
//! that ends. The benchmark makes the controller's signing key and hands it
//! to the child (`--signing-key`), so the subscribers know which key to
//! trust, across a crash and restart too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use safemode_signing::{SigningKey, TrustedKeys};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where the controller keeps its state.
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded store, in this directory.
    Embedded(PathBuf),
    /// An etcd cluster.
    Etcd(Vec<String>),
}

impl Store {
    pub fn name(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Etcd(_) => "etcd",
        }
    }
}

/// A running controller process.
pub struct Controller {
    child: Child,
    pub addr: SocketAddr,
    store: Store,
    /// Its replica name.
    name: String,
    /// The file of its signing key, kept for a restart.
    key_file: Arc<tempfile::TempDir>,
    /// The public half of its key, for subscribers to trust.
    pub trusted: TrustedKeys,
}

/// The signing key's file name in the key directory.
const KEY_FILE: &str = "signing.key";

impl Controller {
    /// Starts `replicas` controllers over `store` with one new signing key
    /// (replicas of one deployment share it), each on a free port, and
    /// waits until every one serves.
    pub async fn start(store: &Store, replicas: usize) -> anyhow::Result<Vec<Controller>> {
        let dir = tempfile::tempdir().context("cannot make a directory for the signing key")?;
        let (key, pem) = SigningKey::generate();
        std::fs::write(dir.path().join(KEY_FILE), pem).context("cannot write the signing key")?;
        let trusted = TrustedKeys::new([key.public_key().clone()])?;
        let key_file = Arc::new(dir);
        let mut started = Vec::with_capacity(replicas);
        for n in 0..replicas {
            started.push(
                Controller::spawn(
                    store,
                    "127.0.0.1:0".parse()?,
                    format!("bench-{n}"),
                    key_file.clone(),
                    trusted.clone(),
                )
                .await?,
            );
        }
        Ok(started)
    }

    async fn spawn(
        store: &Store,
        listen: SocketAddr,
        name: String,
        key_file: Arc<tempfile::TempDir>,
        trusted: TrustedKeys,
    ) -> anyhow::Result<Controller> {
        let mut command = Command::new(std::env::current_exe().context("where am I")?);
        command.arg("--controller").arg(listen.to_string());
        command.arg("--replica").arg(&name);
        command
            .arg("--signing-key")
            .arg(key_file.path().join(KEY_FILE));
        match store {
            Store::Embedded(dir) => command.arg("--data-dir").arg(dir),
            Store::Etcd(endpoints) => command.arg("--etcd").arg(endpoints.join(",")),
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the controller process")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the controller did not start within 60 s")??
            .context("the controller exited before it served")?;
        let addr = line
            .strip_prefix("serving ")
            .with_context(|| format!("the controller said {line:?}"))?
            .parse()?;
        Ok(Controller {
            child,
            addr,
            store: store.clone(),
            name,
            key_file,
            trusted,
        })
    }

    /// The URL subscribers and commanders use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident memory of the controller process, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        rss_of(self.pid()?)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the controller has exited")
    }

    /// Kills the controller (SIGKILL: a crash, not a goodbye).
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        Ok(self.child.kill().await?)
    }

    /// Starts it again on the same address, store and key (after
    /// [`Controller::crash`]); returns when it serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let again = Controller::spawn(
            &self.store,
            self.addr,
            self.name.clone(),
            self.key_file.clone(),
            self.trusted.clone(),
        )
        .await?;
        *self = again;
        Ok(())
    }
}

/// VmRSS of process `pid`, from /proc.
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read /proc (memory is measured on Linux only)")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// The child's side: serve until killed, saying where on stdout.
pub async fn serve(
    listen: SocketAddr,
    replica: &str,
    data_dir: Option<&Path>,
    etcd: Option<&str>,
    signing_key: &Path,
) -> anyhow::Result<()> {
    use safemode_grpc::server::{ServeConfig, StoreConfig};
    let store = match (data_dir, etcd) {
        (Some(dir), None) => StoreConfig::Embedded {
            data_dir: dir.to_path_buf(),
        },
        (None, Some(endpoints)) => StoreConfig::Etcd {
            endpoints: endpoints.split(',').map(str::to_string).collect(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        _ => bail!("give --data-dir or --etcd"),
    };
    let running = safemode_grpc::server::start(ServeConfig {
        listen,
        store,
        replica: Some(replica.into()),
        // The benchmark's subscribers have no tokens: as many streams as
        // it asks for.
        stream_limits: safemode_grpc::limits::StreamLimits {
            per_token: 1_000_000,
            per_connection: 1_000_000,
            per_replica: 1_000_000,
        },
        // The benchmark's key, which its subscribers trust.
        signing_key: safemode_grpc::server::SigningKeySource::File(signing_key.to_path_buf()),
        ..ServeConfig::default()
    })
    .await?;
    println!("serving {}", running.addr);
    // The benchmark holds our stdin open for as long as it wants us.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    running.join().await
}
