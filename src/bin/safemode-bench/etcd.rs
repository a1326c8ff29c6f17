//! A single-node etcd for the benchmarks, on free loopback ports in a
//! temporary directory, and the baseline: N plain etcd watchers on one
//! prefix, timed from a put to the last watcher's event.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{Client, ConnectOptions, WatchOptions};
use tokio::process::{Child, Command};

use crate::cpu::{Processes, Spent};

pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Its process id, while it runs.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("etcd has exited")
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd (`binary`, e.g. `etcd` on PATH) and waits until it
    /// answers.
    pub async fn start(binary: &str) -> anyhow::Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let client = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let child = Command::new(binary)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("cannot run {binary}: install etcd (Debian: apt-get install etcd-server) or pass --etcd-binary PATH")
            })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = Client::connect([client.as_str()], Some(options())).await
                && c.status().await.is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer on {client} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Etcd {
            child,
            endpoint: client,
            _dir: dir,
        })
    }
}

/// Calls that fail rather than hang when etcd does not answer.
fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(30))
}

/// How many watchers saw each revision, and when the last one did.
type Seen = Arc<Mutex<HashMap<i64, (usize, Instant)>>>;

/// `watchers` watchers over `connections` connections on one prefix; then
/// `puts` puts of a `value_bytes`-byte value (as large as the snapshot a
/// subscriber receives), each timed from the call to the last watcher's
/// event. Returns the latencies in milliseconds, and the CPU time the
/// `processes` (and this one, the watchers') spent on the puts.
pub async fn baseline(
    endpoint: &str,
    processes: &Processes,
    watchers: usize,
    connections: usize,
    puts: usize,
    value_bytes: usize,
) -> anyhow::Result<(Vec<f64>, Spent)> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(Client::connect([endpoint], Some(options())).await?);
    }
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(watchers);
    for i in 0..watchers {
        let mut stream = clients[i % connections]
            .watch("/bench/", Some(WatchOptions::new().with_prefix()))
            .await?;
        let seen = seen.clone();
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            let mut created = false;
            while let Ok(Some(response)) = stream.message().await {
                if !created {
                    created = true;
                    ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let now = Instant::now();
                for event in response.events() {
                    if let Some(kv) = event.kv() {
                        let mut seen = seen.lock().unwrap();
                        let entry = seen.entry(kv.mod_revision()).or_insert((0, now));
                        entry.0 += 1;
                        entry.1 = entry.1.max(now);
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(std::sync::atomic::Ordering::Relaxed) < watchers {
        if Instant::now() > deadline {
            bail!("the etcd watchers were not all created within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut writer = clients[0].clone();
    let mut latencies = Vec::with_capacity(puts);
    let mut spent = Spent::default();
    for n in 0..puts {
        let before = processes.read()?;
        let started = Instant::now();
        // Every put a different value, as every flip is a new snapshot.
        let mut value = format!("{n} ").into_bytes();
        value.resize(value_bytes.max(value.len()), b'x');
        let put = writer.put("/bench/flip", value, None).await?;
        let revision = put.header().context("a put has a header")?.revision();
        let deadline = Instant::now() + Duration::from_secs(30);
        let last = loop {
            if let Some((count, last)) = seen.lock().unwrap().get(&revision)
                && *count == watchers
            {
                break *last;
            }
            if Instant::now() > deadline {
                bail!("not every etcd watcher saw revision {revision} within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        spent.add(before, processes.read()?);
        latencies.push(last.duration_since(started).as_secs_f64() * 1000.0);
    }
    for task in tasks {
        task.abort();
    }
    Ok((latencies, spent))
}
