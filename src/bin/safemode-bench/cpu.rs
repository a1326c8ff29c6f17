//! CPU time by process: what the controller, the fleet, etcd and the
//! benchmark itself each spent on a flip (or on a put of the etcd
//! baseline), so that a run's time is told apart by who spent it.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// User and system time process `pid` has used so far, all its threads,
/// in nanoseconds: its CPU-time clock (`clock_getcpuclockid`), which
/// Linux keeps for every process and lets any process read.
#[cfg(target_os = "linux")]
pub fn time_of(pid: u32) -> anyhow::Result<Duration> {
    use nix::time::{clock_getcpuclockid, clock_gettime};
    use nix::unistd::Pid;
    let raw = i32::try_from(pid).context("a process id beyond i32")?;
    let clock = clock_getcpuclockid(Pid::from_raw(raw))
        .with_context(|| format!("no CPU-time clock for process {pid}"))?;
    let used =
        clock_gettime(clock).with_context(|| format!("cannot read process {pid}'s CPU time"))?;
    Ok(Duration::from(used))
}

/// Elsewhere the benchmark cannot tell its processes' CPU time apart.
#[cfg(not(target_os = "linux"))]
pub fn time_of(pid: u32) -> anyhow::Result<Duration> {
    anyhow::bail!("cannot read process {pid}'s CPU time: the benchmark measures it on Linux only")
}

/// The processes of a run, read together.
pub struct Processes {
    controllers: Vec<u32>,
    fleet: Option<u32>,
    etcd: u32,
}

/// CPU time of each process of a run at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reading {
    controllers: Duration,
    /// `None` when the subscribers run in the benchmark's process.
    fleet: Option<Duration>,
    etcd: Duration,
    benchmark: Duration,
}

impl Processes {
    /// `fleet` is `None` when the subscribers run in the benchmark's own
    /// process (their time is then the benchmark's).
    pub fn new(controllers: Vec<u32>, fleet: Option<u32>, etcd: u32) -> Processes {
        Processes {
            controllers,
            fleet,
            etcd,
        }
    }

    pub fn read(&self) -> anyhow::Result<Reading> {
        let mut controllers = Duration::ZERO;
        for pid in &self.controllers {
            controllers += time_of(*pid)?;
        }
        Ok(Reading {
            controllers,
            fleet: self.fleet.map(time_of).transpose()?,
            etcd: time_of(self.etcd)?,
            benchmark: time_of(std::process::id())?,
        })
    }
}

/// CPU time summed over the spans between pairs of readings.
#[derive(Debug, Default)]
pub struct Spent {
    sum: Reading,
    spans: u32,
}

impl Spent {
    pub fn add(&mut self, before: Reading, after: Reading) {
        self.sum.controllers += after.controllers.saturating_sub(before.controllers);
        if let (Some(before), Some(after)) = (before.fleet, after.fleet) {
            let sum = self.sum.fleet.get_or_insert_default();
            *sum += after.saturating_sub(before);
        }
        self.sum.etcd += after.etcd.saturating_sub(before.etcd);
        self.sum.benchmark += after.benchmark.saturating_sub(before.benchmark);
        self.spans += 1;
    }

    /// Milliseconds per span, by process.
    pub fn per_span(&self) -> CpuPerFlip {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(self.spans.max(1));
        CpuPerFlip {
            controller: ms(self.sum.controllers),
            fleet: self.sum.fleet.map(ms),
            etcd: ms(self.sum.etcd),
            benchmark: ms(self.sum.benchmark),
        }
    }
}

/// CPU milliseconds per flip, from the commander's call until every
/// subscriber has sent its ack (the controller's handling of the last acks
/// falls after it: under 1 ms a flip at 1,000 subscribers), by process.
#[derive(Debug, Serialize)]
pub struct CpuPerFlip {
    /// The controller replicas, summed.
    pub controller: f64,
    /// The subscribers' process; `None` when they run in the benchmark's
    /// (their time is then in `benchmark`).
    pub fleet: Option<f64>,
    /// etcd: the store, or idle on the embedded store.
    pub etcd: f64,
    /// The benchmark's own process: the commander's call and the wait for
    /// the acks (and the subscribers, when they run in it).
    pub benchmark: f64,
}

/// CPU milliseconds per put of the etcd baseline, from the put until
/// every watcher has its event, by process.
#[derive(Debug, Serialize)]
pub struct CpuPerPut {
    pub etcd: f64,
    /// The watchers: the benchmark's process (with its put and its wait).
    pub watchers: f64,
}

impl From<CpuPerFlip> for CpuPerPut {
    fn from(spent: CpuPerFlip) -> CpuPerPut {
        CpuPerPut {
            etcd: spent.etcd,
            watchers: spent.benchmark,
        }
    }
}

// The clocks are read on Linux only.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_process_clock_counts_the_work_of_its_threads() {
        let me = std::process::id();
        let before = time_of(me).unwrap();
        // Work on another thread, measured by the amount done rather than
        // by time: a clock of this thread alone would not see it.
        std::thread::spawn(|| {
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = std::hint::black_box(x ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            x
        })
        .join()
        .unwrap();
        let after = time_of(me).unwrap();
        // Fifty million rounds take far more than 5 ms of CPU anywhere.
        assert!(
            after >= before + Duration::from_millis(5),
            "{before:?} then {after:?}"
        );
    }

    #[test]
    fn another_process_is_read_while_it_runs_and_is_an_error_once_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        // This process has done work the sleeping child has not: the two
        // clocks read apart.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = std::hint::black_box(x ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let read = time_of(pid);
        let mine = time_of(std::process::id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let its = read.unwrap();
        assert!(
            its + Duration::from_millis(5) <= mine,
            "the child {its:?}, this process {mine:?}"
        );
        let err = time_of(pid).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("process {pid}")),
            "{err:#}"
        );
    }
}
