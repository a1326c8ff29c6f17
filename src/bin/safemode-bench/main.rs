//! `safemode-bench`: how fast a flip reaches every channel, against plain
//! etcd watchers on the same machine; how fast `decide` answers and what it
//! allocates; the controller's memory per subscriber; and how long a
//! controller crash takes to heal. See BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release --bin safemode-bench -- --quick            # under a minute
//! cargo run --release --bin safemode-bench -- --out bench.json    # the full run
//! ```

mod controller;
mod cpu;
mod decide;
mod etcd;
mod fleet;
mod remote;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use clap::Parser;
use jiff::Timestamp;
use safemode::sim::percentile;
use safemode_wire::proto::control_service_client::ControlServiceClient;
use safemode_wire::{self as wire, proto};
use serde::Serialize;
use tonic::transport::{Channel as Connection, Endpoint};

use controller::{Controller, Store};
use fleet::Fleet;
use remote::{ChildFleet, Subscribers};

#[global_allocator]
static ALLOCATOR: decide::Counting = decide::Counting;

#[derive(Parser, Debug)]
#[command(
    name = "safemode-bench",
    about = "Benchmarks of safemode (see BENCHMARKS.md)"
)]
struct Args {
    /// A smoke run: 100 and 1,000 subscribers, 20 flips, one second of
    /// decisions (under a minute on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Write the results here (JSON).
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// Subscriber counts [default: 100,1000,10000; --quick: 100,1000].
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Flips per size [default: 200; --quick: 20].
    #[arg(long)]
    flips: Option<usize>,
    /// Stores to run the controller on.
    #[arg(long, value_delimiter = ',', default_value = "etcd,embedded")]
    stores: Vec<String>,
    /// Subscription streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd_binary: String,
    /// Seconds of decisions per decide run [default: 3; --quick: 1].
    #[arg(long)]
    decide_seconds: Option<u64>,
    /// Controller replicas over one etcd (etcd store only); subscribers'
    /// connections are spread evenly over them.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Run the subscribers in a process of their own rather than in the
    /// benchmark's.
    #[arg(long)]
    fleet_process: bool,
    // The controller under test runs as a child process of this binary.
    #[arg(long, hide = true)]
    controller: Option<SocketAddr>,
    #[arg(long, hide = true, default_value = "bench")]
    replica: String,
    // So does the fleet, with --fleet-process: the replicas' URLs.
    #[arg(long, hide = true)]
    fleet_child: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    fleet_size: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    fleet_connections: usize,
    #[arg(long, hide = true)]
    fleet_trusted: Option<PathBuf>,
    #[arg(long, hide = true)]
    data_dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    etcd: Option<String>,
    #[arg(long, hide = true)]
    signing_key: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    quick: bool,
    /// When the run started, and the commit its binary was built from
    /// (`git describe --always --dirty` at build time).
    started_at: Timestamp,
    commit: String,
    decide: decide::DecideResult,
    runs: Vec<Run>,
    /// Why the run stopped early (the runs before it are complete).
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    memory_gib: f64,
    cpu: String,
    os: String,
    etcd: String,
}

/// One store, one subscriber count.
#[derive(Debug, Serialize)]
struct Run {
    store: String,
    subscribers: usize,
    connections: usize,
    /// Controller replicas (over one store), subscribers spread evenly
    /// over them.
    replicas: usize,
    /// Where the subscribers ran: "in-process" (the benchmark's own
    /// process) or "separate-process".
    fleet: &'static str,
    flips: usize,
    /// Encoded size of the snapshots the subscribers received during the
    /// flips (the `Snapshot` message): mean and largest. The etcd
    /// baseline's value is as large as the mean.
    payload_bytes_mean: u64,
    payload_bytes_max: u64,
    /// From the commander's call to the last subscriber's receipt.
    received_ms: Summary,
    /// From the commander's call to the controller recording the last ack
    /// (the `acked_at` that `safemode status` shows; same machine, same
    /// clock).
    acked_ms: Summary,
    /// Plain etcd: from a put to the last of as many watchers' events.
    etcd_baseline_ms: Summary,
    /// Our time to the last receipt over the baseline's, at p50 and p99.
    ratio_p50: f64,
    ratio_p99: f64,
    /// Controller memory, idle and with every subscriber connected.
    rss_idle_bytes: u64,
    rss_connected_bytes: u64,
    rss_per_subscriber_bytes: f64,
    /// Controller killed and restarted: until every subscriber had
    /// reconnected and acked the latest revision again.
    reconnect_storm_ms: f64,
    /// CPU time per flip by process, from the commander's call until every
    /// subscriber has sent its ack (the controller's cost and the fleet's, told
    /// apart when the fleet runs in its own process).
    cpu_ms_per_flip: cpu::CpuPerFlip,
    /// The same for the etcd baseline, per put until every watcher has its
    /// event.
    etcd_baseline_cpu_ms_per_put: cpu::CpuPerPut,
}

#[derive(Debug, Serialize)]
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(mut values: Vec<f64>) -> Summary {
        values.sort_by(f64::total_cmp);
        Summary {
            p50: percentile(&values, 0.50),
            p99: percentile(&values, 0.99),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// The first line `program args` prints, or "unknown".
fn first_line_of(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn machine(etcd_binary: &str) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: (memory_gib * 10.0).round() / 10.0,
        cpu,
        os: std::env::consts::OS.into(),
        etcd: first_line_of(etcd_binary, &["--version"]),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(listen) = args.controller {
        let signing_key = args
            .signing_key
            .as_deref()
            .context("the controller child needs --signing-key")?;
        return runtime.block_on(controller::serve(
            listen,
            &args.replica,
            args.data_dir.as_deref(),
            args.etcd.as_deref(),
            signing_key,
        ));
    }
    if let Some(urls) = &args.fleet_child {
        let trusted = args
            .fleet_trusted
            .as_deref()
            .context("the fleet child needs --fleet-trusted")?;
        return runtime.block_on(remote::serve(
            urls,
            args.fleet_size,
            args.fleet_connections,
            trusted,
        ));
    }
    let sizes = if args.sizes.is_empty() {
        if args.quick {
            vec![100, 1000]
        } else {
            vec![100, 1000, 10_000]
        }
    } else {
        args.sizes.clone()
    };
    let flips = args.flips.unwrap_or(if args.quick { 20 } else { 200 });
    let decide_for =
        Duration::from_secs(
            args.decide_seconds
                .unwrap_or(if args.quick { 1 } else { 3 }),
        );
    for store in &args.stores {
        if store != "etcd" && store != "embedded" {
            bail!("--stores: '{store}' is not a store; use etcd, embedded or both");
        }
    }
    if sizes.contains(&0) {
        bail!("--sizes: every subscriber count must be at least 1");
    }
    if flips == 0 {
        bail!("--flips must be at least 1");
    }
    if decide_for.is_zero() {
        bail!("--decide-seconds must be at least 1");
    }
    if args.streams_per_connection == 0 {
        bail!("--streams-per-connection must be at least 1");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if args.replicas > 1 && args.stores.iter().any(|s| s != "etcd") {
        bail!(
            "--replicas {}: replicas share one etcd; the embedded store has one replica. Add --stores etcd",
            args.replicas
        );
    }
    let started = Instant::now();
    let mut report = Report {
        machine: machine(&args.etcd_binary),
        quick: args.quick,
        started_at: Timestamp::now(),
        commit: env!("SAFEMODE_BUILD_COMMIT").to_string(),
        decide: decide::DecideResult::default(),
        runs: Vec::new(),
        failed: None,
    };

    eprintln!("decide: {decide_for:?} single-threaded, then on every core");
    report.decide = decide::run(decide_for);
    let decide = &report.decide;
    eprintln!(
        "  {:.0} ns per decision (p50, one thread), {:.0} ns on {} threads; allocations per decision {} and {}",
        decide.single_thread.ns_p50,
        decide.all_cores.ns_p50,
        decide.all_cores.threads,
        decide.single_thread.allocations_per_decision,
        decide.all_cores.allocations_per_decision
    );
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = propagation_runs(&args, &sizes, flips, &mut report.runs) => outcome,
            // Dropping the runs kills the controller and etcd processes and
            // removes their directories.
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    if let Err(e) = &outcome {
        report.failed = Some(format!("{e:#}"));
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    outcome
}

/// Every store and subscriber count, in turn, appended to `runs` as each
/// one completes.
async fn propagation_runs(
    args: &Args,
    sizes: &[usize],
    flips: usize,
    runs: &mut Vec<Run>,
) -> anyhow::Result<()> {
    for store in &args.stores {
        for &size in sizes {
            let run = propagation(args, store, size, flips)
                .await
                .with_context(|| format!("{store} with {size} subscribers"))?;
            eprintln!(
                "{store} {size} subscribers over {} connections: received p50 {:.1} ms p99 {:.1} ms max {:.1} ms; acked p50 {:.1} ms; etcd watchers p50 {:.1} ms (x{:.1}); {:.0} bytes per subscriber; storm {:.0} ms",
                run.connections,
                run.received_ms.p50,
                run.received_ms.p99,
                run.received_ms.max,
                run.acked_ms.p50,
                run.etcd_baseline_ms.p50,
                run.ratio_p50,
                run.rss_per_subscriber_bytes,
                run.reconnect_storm_ms
            );
            let cpu = &run.cpu_ms_per_flip;
            let etcd_cpu = &run.etcd_baseline_cpu_ms_per_put;
            eprintln!(
                "  CPU ms per flip: controller {:.1}, fleet {}, etcd {:.1}, benchmark {:.1}; per put of the baseline: etcd {:.1}, watchers {:.1}",
                cpu.controller,
                cpu.fleet
                    .map_or_else(|| "(in the benchmark)".to_string(), |f| format!("{f:.1}")),
                cpu.etcd,
                cpu.benchmark,
                etcd_cpu.etcd,
                etcd_cpu.watchers
            );
            runs.push(run);
        }
    }
    Ok(())
}

/// One store and subscriber count: memory, flips, the etcd baseline, the
/// reconnect storm.
async fn propagation(args: &Args, store: &str, size: usize, flips: usize) -> anyhow::Result<Run> {
    let connections = size.div_ceil(args.streams_per_connection);
    let etcd = etcd::Etcd::start(&args.etcd_binary).await?;
    let data = tempfile::tempdir()?;
    let store = match store {
        "etcd" => Store::Etcd(vec![etcd.endpoint.clone()]),
        _ => Store::Embedded(data.path().to_path_buf()),
    };
    let mut controllers = Controller::start(&store, args.replicas).await?;
    let urls: Vec<String> = controllers.iter().map(Controller::url).collect();
    let mut commander = commander(&urls[0]).await?;
    // Something to serve before anyone subscribes.
    let mut revision = flip(&mut commander, true).await?;
    let rss = |controllers: &[Controller]| -> anyhow::Result<u64> {
        controllers.iter().map(Controller::rss).sum()
    };
    let rss_idle = rss(&controllers)?;

    let trusted = controllers[0].trusted.clone();
    let fleet = if args.fleet_process {
        Subscribers::Child(Box::new(
            ChildFleet::start(&urls, size, connections, &trusted).await?,
        ))
    } else {
        Subscribers::InProcess(Fleet::connect(&urls, size, connections, trusted).await?)
    };
    if !fleet.all_acked(revision, Duration::from_secs(60)).await? {
        bail!("{size} subscribers did not all ack the first revision");
    }
    let rss_connected = rss(&controllers)?;

    fleet.forget().await?;
    let processes = cpu::Processes::new(
        controllers
            .iter()
            .map(Controller::pid)
            .collect::<anyhow::Result<_>>()?,
        fleet.pid()?,
        etcd.pid()?,
    );
    let mut spent = cpu::Spent::default();
    let mut received = Vec::with_capacity(flips);
    let mut acked = Vec::with_capacity(flips);
    for n in 0..flips {
        let before = processes.read()?;
        let started = SystemTime::now();
        let started_wall = Timestamp::now();
        revision = flip(&mut commander, n % 2 == 1).await?;
        let arrival = fleet
            .arrival(revision, Duration::from_secs(60))
            .await?
            .with_context(|| {
                format!("flip {n}: not every subscriber acked revision {revision} within 60 s")
            })?;
        // Before the wait for the controller's record of the acks, whose
        // status calls are the benchmark's, not the flip's.
        spent.add(before, processes.read()?);
        let took = arrival
            .last_received
            .duration_since(started)
            .unwrap_or_default();
        received.push(took.as_secs_f64() * 1000.0);
        let last_ack = last_ack_recorded(&mut commander, revision, size)
            .await
            .with_context(|| format!("flip {n}"))?;
        acked.push(last_ack.duration_since(started_wall).as_secs_f64() * 1000.0);
    }
    let payloads = fleet.payloads().await?;

    // Acks are forgotten first: a subscriber back before the restart is
    // noticed must still count. Every replica crashes at once.
    fleet.reset_acks().await?;
    let killed = Instant::now();
    for controller in &mut controllers {
        controller.crash().await?;
    }
    for controller in &mut controllers {
        controller.restart().await?;
    }
    if !fleet.all_acked(revision, Duration::from_secs(120)).await? {
        bail!("after the controller restart, not every subscriber acked again within 120 s");
    }
    let storm = killed.elapsed().as_secs_f64() * 1000.0;
    let place = fleet.place();
    drop(fleet);
    drop(controllers);

    let (baseline, baseline_spent) = etcd::baseline(
        &etcd.endpoint,
        &cpu::Processes::new(Vec::new(), None, etcd.pid()?),
        size,
        connections,
        flips,
        payloads.mean_bytes as usize,
    )
    .await?;
    let received = Summary::of(received);
    let baseline = Summary::of(baseline);
    Ok(Run {
        store: store.name().into(),
        subscribers: size,
        connections,
        replicas: args.replicas,
        fleet: place,
        flips,
        payload_bytes_mean: payloads.mean_bytes,
        payload_bytes_max: payloads.max_bytes,
        ratio_p50: received.p50 / baseline.p50.max(f64::MIN_POSITIVE),
        ratio_p99: received.p99 / baseline.p99.max(f64::MIN_POSITIVE),
        received_ms: received,
        acked_ms: Summary::of(acked),
        etcd_baseline_ms: baseline,
        rss_idle_bytes: rss_idle,
        rss_connected_bytes: rss_connected,
        rss_per_subscriber_bytes: rss_connected.saturating_sub(rss_idle) as f64 / size as f64,
        reconnect_storm_ms: storm,
        cpu_ms_per_flip: spent.per_span(),
        etcd_baseline_cpu_ms_per_put: baseline_spent.per_span().into(),
    })
}

/// A control client whose calls fail after 30 s rather than hang.
async fn commander(url: &str) -> anyhow::Result<ControlServiceClient<Connection>> {
    let connection = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the controller at {url}"))?;
    Ok(ControlServiceClient::new(connection))
}

/// When the controller recorded the last of `size` acks of `revision` (or
/// newer), read from its status; polled every millisecond until all are
/// there, for at most 60 s.
async fn last_ack_recorded(
    commander: &mut ControlServiceClient<Connection>,
    revision: i64,
    size: usize,
) -> anyhow::Result<Timestamp> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = safemode_wire::full_status(commander, "live").await?;
        let acks: Vec<&proto::SubscriberStatus> = status
            .subscribers
            .iter()
            .filter(|s| s.acked_revision >= revision)
            .collect();
        if acks.len() >= size {
            return acks
                .iter()
                .map(|s| {
                    let at = s.acked_at.as_ref().context("an ack without acked_at")?;
                    wire::timestamp_from_wire(at).map_err(anyhow::Error::msg)
                })
                .try_fold(Timestamp::UNIX_EPOCH, |latest, at| {
                    anyhow::Ok(latest.max(at?))
                });
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the controller recorded {} of {size} acks of revision {revision} within 60 s",
                acks.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One change: the incident notice on (`apply`) or off; its revision.
async fn flip(
    commander: &mut ControlServiceClient<Connection>,
    apply: bool,
) -> anyhow::Result<i64> {
    let revision = if apply {
        commander
            .apply_modes(proto::ApplyModesRequest {
                namespace: "live".into(),
                modes: vec!["incident-notice".into()],
                reason: "benchmark flip".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .revision
    } else {
        commander
            .lift_activations(proto::LiftActivationsRequest {
                namespace: "live".into(),
                targets: vec!["incident-notice".into()],
                reason: "benchmark flip".into(),
                all: true,
                incident_ok: false,
                change_id: String::new(),
                dry_run: false,
            })
            .await?
            .into_inner()
            .revision
    };
    Ok(revision)
}
