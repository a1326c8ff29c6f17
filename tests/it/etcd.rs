//! Real etcd for the tests: members started on free loopback ports with
//! temporary data directories, stopped by pid (SIGKILL), restarted on the same
//! data. No mock stands in for etcd. If the `etcd` binary is missing the test
//! fails and says how to install it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use safemode_store::Store;
use safemode_store::etcd::{EtcdOptions, EtcdStore};

use crate::store_contract::StoreHarness;
use crate::support::{wait_for, wait_until};

/// How long the harness waits for one answer from etcd before it asks
/// again.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A free loopback port (the listener is dropped; etcd binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The etcd binary, or a failure that says how to get it.
fn etcd_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "etcd is not installed: these tests run real etcd processes. Run scripts/test, \
             which installs it, or `apt-get install etcd-server` (Debian/Ubuntu), or put an \
             etcd 3.4+ binary on PATH"
        )
    })
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// Client TLS for a cluster: the members serve `cert` (signed by `ca`) and
/// ask every client for a certificate `ca` signed.
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What the harness itself connects with.
    pub client: etcd_client::TlsOptions,
}

/// An etcd cluster of one or more members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<ClientTls>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub async fn start(size: usize) -> Self {
        Self::start_with(size, None).await
    }

    /// Starts `size` members serving clients over TLS only, with client
    /// certificates required (`--client-cert-auth`).
    pub async fn start_tls(size: usize, tls: ClientTls) -> Self {
        Self::start_with(size, Some(tls)).await
    }

    async fn start_with(size: usize, tls: Option<ClientTls>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token: format!("safemode-test-{}", rand::random::<u32>()),
            tls,
            _dir: dir,
        };
        for i in 0..size {
            cluster.spawn(i, "new");
        }
        for i in 0..size {
            cluster
                .wait_member(i, "every etcd member has joined the cluster")
                .await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let binary = etcd_binary();
        let m = &mut self.members[i];
        let mut command = Command::new(binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// A store on every member.
    pub async fn store(&self) -> Arc<dyn Store> {
        Arc::new(
            EtcdStore::connect(EtcdOptions::new(self.endpoints()))
                .await
                .expect("connect to etcd"),
        )
    }

    /// How the harness connects (with TLS when the cluster wants it). Every
    /// call is bounded by [`PROBE_TIMEOUT`]: a member that listens but has
    /// not rejoined may never answer, and a probe that waited for it would
    /// hang the test instead of failing it at the wait's deadline.
    fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(PROBE_TIMEOUT)
            .with_timeout(PROBE_TIMEOUT);
        Some(match &self.tls {
            Some(tls) => options.with_tls(tls.client.clone()),
            None => options,
        })
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> usize {
        wait_for("the cluster has a leader", || self.leader_now()).await
    }

    async fn leader_now(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(mut client) =
                etcd_client::Client::connect([&m.client_url], self.connect_options()).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let me = status.header().map(|h| h.member_id());
            if status.leader() != 0 && Some(status.leader()) == me {
                return Some(i);
            }
        }
        None
    }

    /// The pid of member `i`, while it runs (a test may pause it with
    /// SIGSTOP to stall the store).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|child| child.id())
    }

    /// Kills member `i` with SIGKILL, by pid.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it has rejoined
    /// the cluster ([`EtcdCluster::wait_member`]).
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        self.wait_member(i, "the restarted etcd member rejoins the cluster")
            .await;
    }

    /// Waits until member `i` itself serves a linearizable read: it is in
    /// the cluster and follows a leader. The cluster answering is not
    /// enough, since two other members answer on their own; a test that
    /// kills one of them next would take the quorum down with it (two
    /// faults at once, where it meant one).
    async fn wait_member(&self, i: usize, what: &str) {
        let endpoint = self.members[i].client_url.clone();
        wait_until(what, || {
            let endpoint = endpoint.clone();
            let options = self.connect_options();
            async move {
                let Ok(mut client) = etcd_client::Client::connect([endpoint], options).await else {
                    return false;
                };
                // A linearizable read needs a leader and a quorum, and
                // writes nothing the tests could see.
                client.get("/", None).await.is_ok()
            }
        })
        .await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

// === The store contract, against etcd ===

/// A one-member etcd cluster for the store contract suite.
pub struct EtcdHarness {
    cluster: EtcdCluster,
    store: Option<Arc<dyn Store>>,
}

#[async_trait::async_trait]
impl StoreHarness for EtcdHarness {
    async fn start() -> Self {
        let cluster = EtcdCluster::start(1).await;
        let store = cluster.store().await;
        EtcdHarness {
            cluster,
            store: Some(store),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().expect("store is open")
    }

    async fn restart(&mut self) {
        self.store = None;
        // SIGKILL, not a clean stop: what etcd acknowledged must survive.
        self.cluster.restart(0).await;
        self.store = Some(self.cluster.store().await);
    }
}

crate::store_contract::store_contract_tests!(contract, EtcdHarness);
