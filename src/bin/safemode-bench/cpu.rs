//! CPU time by process, from /proc: what the controller, the fleet, etcd
//! and the benchmark itself each spent on a flip (or on a put of the etcd
//! baseline), so that a run's time is told apart by who spent it.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// Clock ticks per second of the times in `/proc/PID/stat` (`USER_HZ`):
/// 100 on every Linux architecture this runs on (x86-64, arm64).
const USER_HZ: u64 = 100;

/// User and system time process `pid` has used so far: whole ticks, which
/// Linux derives from its precise run time (summed over many flips, the
/// tick's 10 ms is small against the total).
pub fn time_of(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| {
        format!("cannot read /proc/{pid}/stat (CPU time is measured on Linux only)")
    })?;
    used(&stat).with_context(|| format!("/proc/{pid}/stat: {stat}"))
}

/// User and system time in a `/proc/PID/stat` line.
fn used(stat: &str) -> anyhow::Result<Duration> {
    // The command name, in parentheses, may hold spaces and parentheses:
    // fields are counted from after its last `)`. utime and stime are
    // fields 14 and 15 of the line, the 12th and 13th after the name.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command name")?;
    let mut fields = after_name.split_whitespace().skip(11);
    let mut tick = || -> anyhow::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .context("no utime and stime")
    };
    let ticks = tick()? + tick()?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
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
    fleet: Duration,
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

    /// Whether the subscribers have a process of their own.
    pub fn fleet_apart(&self) -> bool {
        self.fleet.is_some()
    }

    pub fn read(&self) -> anyhow::Result<Reading> {
        let mut controllers = Duration::ZERO;
        for pid in &self.controllers {
            controllers += time_of(*pid)?;
        }
        Ok(Reading {
            controllers,
            fleet: self.fleet.map(time_of).transpose()?.unwrap_or_default(),
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
        self.sum.fleet += after.fleet.saturating_sub(before.fleet);
        self.sum.etcd += after.etcd.saturating_sub(before.etcd);
        self.sum.benchmark += after.benchmark.saturating_sub(before.benchmark);
        self.spans += 1;
    }

    /// Milliseconds per span, by process.
    pub fn per_span(&self, fleet_apart: bool) -> CpuPerFlip {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(self.spans.max(1));
        CpuPerFlip {
            controller: ms(self.sum.controllers),
            fleet: fleet_apart.then(|| ms(self.sum.fleet)),
            etcd: ms(self.sum.etcd),
            benchmark: ms(self.sum.benchmark),
        }
    }
}

/// CPU milliseconds per flip, from the commander's call until every
/// subscriber has acked, by process.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_time_are_read_after_the_command_name() {
        // A name with a space and a parenthesis; utime 250, stime 120.
        let line = "4242 (safemode (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 120 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(used(line).unwrap(), Duration::from_millis(3700));
        assert!(used("4242 (cut short) S 1 2").is_err());
        assert!(used("no name at all").is_err());
    }

    #[test]
    fn this_process_can_be_read() {
        time_of(std::process::id()).unwrap();
    }
}
