//! The fleet in a process of its own (`--fleet-process`): this same binary,
//! started with `--fleet-child`, holding the subscribers, so that the
//! controller's cost and the subscribers' are told apart (in `top`, in a
//! profile, and in that the benchmark's own process does not run them). The
//! benchmark asks it questions on its stdin, one line each, and reads one
//! line of JSON back; it exits when its stdin closes.

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use safemode_policy::Revision;
use safemode_signing::TrustedKeys;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;

use crate::fleet::{Arrival, Fleet, Payloads};

/// The subscribers, here or in a child process.
pub enum Subscribers {
    InProcess(Fleet),
    Child(Box<ChildFleet>),
}

impl Subscribers {
    /// Where they run, as the report says it.
    pub fn place(&self) -> &'static str {
        match self {
            Subscribers::InProcess(_) => "in-process",
            Subscribers::Child(_) => "separate-process",
        }
    }

    /// The process they run in, when it is not the benchmark's.
    pub fn pid(&self) -> anyhow::Result<Option<u32>> {
        match self {
            Subscribers::InProcess(_) => Ok(None),
            Subscribers::Child(child) => child
                .child
                .id()
                .map(Some)
                .context("the fleet process has exited"),
        }
    }

    pub async fn all_acked(&self, revision: Revision, within: Duration) -> anyhow::Result<bool> {
        match self {
            Subscribers::InProcess(fleet) => Ok(fleet.all_acked(revision, within).await),
            Subscribers::Child(child) => {
                child
                    .ask(&Question::AllAcked {
                        revision,
                        within_ms: within.as_millis() as u64,
                    })
                    .await
            }
        }
    }

    pub async fn arrival(
        &self,
        revision: Revision,
        within: Duration,
    ) -> anyhow::Result<Option<Arrival>> {
        match self {
            Subscribers::InProcess(fleet) => Ok(fleet.arrival(revision, within).await),
            Subscribers::Child(child) => {
                let answer: Option<WireArrival> = child
                    .ask(&Question::Arrival {
                        revision,
                        within_ms: within.as_millis() as u64,
                    })
                    .await?;
                Ok(answer.map(|a| Arrival {
                    acked: a.acked,
                    last_received: UNIX_EPOCH + Duration::from_nanos(a.last_received_unix_ns),
                }))
            }
        }
    }

    pub async fn reset_acks(&self) -> anyhow::Result<()> {
        match self {
            Subscribers::InProcess(fleet) => {
                fleet.reset_acks();
                Ok(())
            }
            Subscribers::Child(child) => child.ask(&Question::ResetAcks).await,
        }
    }

    pub async fn forget(&self) -> anyhow::Result<()> {
        match self {
            Subscribers::InProcess(fleet) => {
                fleet.forget();
                Ok(())
            }
            Subscribers::Child(child) => child.ask(&Question::Forget).await,
        }
    }

    pub async fn payloads(&self) -> anyhow::Result<Payloads> {
        match self {
            Subscribers::InProcess(fleet) => Ok(fleet.payloads()),
            Subscribers::Child(child) => child.ask(&Question::Payloads).await,
        }
    }
}

/// What the benchmark asks the child fleet, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
enum Question {
    AllAcked { revision: Revision, within_ms: u64 },
    Arrival { revision: Revision, within_ms: u64 },
    ResetAcks,
    Forget,
    Payloads,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireArrival {
    acked: usize,
    last_received_unix_ns: u64,
}

/// The child fleet, seen from the benchmark.
pub struct ChildFleet {
    child: Child,
    io: Mutex<(ChildStdin, Lines<BufReader<ChildStdout>>)>,
    _keys: tempfile::TempDir,
}

impl ChildFleet {
    /// Starts the child with `size` subscribers over `connections`
    /// connections to the replicas at `urls`; returns once every one has
    /// acked its first snapshot.
    pub async fn start(
        urls: &[String],
        size: usize,
        connections: usize,
        trusted: &TrustedKeys,
    ) -> anyhow::Result<ChildFleet> {
        let keys = tempfile::tempdir().context("cannot make a directory for the trusted keys")?;
        let file = keys.path().join("trusted.pem");
        let pem: String = trusted.keys().iter().map(|k| k.to_pem()).collect();
        std::fs::write(&file, pem).context("cannot write the trusted keys")?;
        let mut child = Command::new(std::env::current_exe().context("where am I")?)
            .arg("--fleet-child")
            .arg(urls.join(","))
            .arg("--fleet-size")
            .arg(size.to_string())
            .arg("--fleet-connections")
            .arg(connections.to_string())
            .arg("--fleet-trusted")
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the fleet process")?;
        let stdin = child.stdin.take().expect("piped");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("the fleet process did not connect within 300 s")??
            .context("the fleet process exited before it connected")?;
        if line != "ready" {
            bail!("the fleet process said: {line}");
        }
        Ok(ChildFleet {
            child,
            io: Mutex::new((stdin, lines)),
            _keys: keys,
        })
    }

    async fn ask<T: for<'de> Deserialize<'de>>(&self, question: &Question) -> anyhow::Result<T> {
        let mut io = self.io.lock().await;
        let mut line = serde_json::to_string(question)?;
        line.push('\n');
        io.0.write_all(line.as_bytes()).await?;
        io.0.flush().await?;
        let answer =
            io.1.next_line()
                .await?
                .context("the fleet process exited")?;
        serde_json::from_str(&answer)
            .with_context(|| format!("the fleet process answered {answer:?} to {question:?}"))
    }
}

/// The child's side: connect, say `ready`, answer until stdin closes.
pub async fn serve(
    urls: &str,
    size: usize,
    connections: usize,
    trusted: &Path,
) -> anyhow::Result<()> {
    let trusted = TrustedKeys::load(trusted).context("cannot read the trusted keys")?;
    let urls: Vec<String> = urls.split(',').map(str::to_string).collect();
    let fleet = match Fleet::connect(&urls, size, connections, trusted).await {
        Ok(fleet) => fleet,
        Err(e) => {
            println!("error: {e:#}");
            return Err(e);
        }
    };
    println!("ready");
    // Standard input is read on a thread of its own (blocking reads), each
    // line handed over.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let question: Question =
            serde_json::from_str(&line).with_context(|| format!("the benchmark asked {line:?}"))?;
        let answer = match question {
            Question::AllAcked {
                revision,
                within_ms,
            } => serde_json::to_string(
                &fleet
                    .all_acked(revision, Duration::from_millis(within_ms))
                    .await,
            )?,
            Question::Arrival {
                revision,
                within_ms,
            } => {
                let arrival = fleet
                    .arrival(revision, Duration::from_millis(within_ms))
                    .await
                    .map(|a| WireArrival {
                        acked: a.acked,
                        last_received_unix_ns: a
                            .last_received
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64),
                    });
                serde_json::to_string(&arrival)?
            }
            Question::ResetAcks => {
                fleet.reset_acks();
                "null".into()
            }
            Question::Forget => {
                fleet.forget();
                "null".into()
            }
            Question::Payloads => serde_json::to_string(&fleet.payloads())?,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
