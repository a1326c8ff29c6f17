//! Simulated channel services: many subscribers per channel, each a real
//! [`Subscriber`] over gRPC, that report when they applied each revision and
//! answer decisions. `safemode sim` runs them from the command line; drills
//! and benchmarks use them as a library.
//!
//! A revision is complete when every simulated subscriber has applied it or
//! a newer one (fan-out is the latest state, so a subscriber may skip a
//! revision; reaching a newer one counts as applying it). Time to apply is
//! measured from when the controller issued the revision (the snapshot's
//! `issued_at`, on the controller's clock) to when the subscriber applied
//! it, so it is exact on one machine and includes the clock offset across
//! machines.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use safemode_client::{ClientError, DecisionReport, Subscriber, SubscriberConfig};
use safemode_policy::{Action, Channel, Context, Revision};

/// How many subscribers of which channel.
pub fn parse_channels(text: &str) -> Result<Vec<(Channel, usize)>, String> {
    let mut channels: Vec<(Channel, usize)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not CHANNEL=COUNT, e.g. chatbot=50"))?;
        let channel = Channel::parse(name.trim()).map_err(|e| e.to_string())?;
        let count: usize = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| {
                format!("'{part}': the count must be a whole number from 1 to 100000")
            })?;
        if channels.iter().any(|(c, _)| *c == channel) {
            return Err(format!("{channel} is given twice; give each channel once"));
        }
        channels.push((channel, count));
    }
    if channels.is_empty() {
        return Err("no channels given; e.g. chatbot=50,ivr=20".into());
    }
    Ok(channels)
}

/// One simulated subscriber applied a revision.
#[derive(Clone, Debug)]
struct Applied {
    index: usize,
    revision: Revision,
    issued_at: Timestamp,
    applied_at: Timestamp,
}

/// How long one channel's subscribers took to apply a revision.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChannelTimes {
    /// The channel.
    pub channel: String,
    /// How many of its subscribers applied it.
    pub applied: usize,
    /// Of how many.
    pub subscribers: usize,
    /// Milliseconds from issue to apply: median, 99th percentile, slowest.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// Every simulated subscriber's apply of one revision.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RevisionReport {
    /// The revision.
    pub revision: Revision,
    /// When the controller issued it.
    pub issued_at: Timestamp,
    /// Whether every subscriber applied it (or a newer one).
    pub complete: bool,
    /// Per channel, in the order the sim was given them.
    pub channels: Vec<ChannelTimes>,
}

/// What the sim needs to start.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Every subscriber's settings but its channel and id (taken from here
    /// for the controllers, namespace, token, TLS and the trusted keys).
    pub base: SubscriberConfig,
    /// How many subscribers of which channel.
    pub channels: Vec<(Channel, usize)>,
    /// Subscriber ids are `{prefix}-{channel}-{n}`.
    pub id_prefix: String,
    /// A revision not applied by everyone within this long is reported
    /// incomplete.
    pub complete_within: Duration,
}

/// One simulated subscriber: its settings, and while it runs, its
/// subscription and the task that reports what it applies.
struct Slot {
    channel: Channel,
    config: SubscriberConfig,
    running: Option<(Subscriber, JoinHandle<()>)>,
}

/// Every revision each subscriber applied, and when: what waits and timings
/// are read from.
struct Progress {
    history: Mutex<Vec<Vec<(Revision, Timestamp)>>>,
    /// Bumped after every record, to wake whoever waits.
    generation: watch::Sender<u64>,
}

/// Simulated channel services.
pub struct Sim {
    slots: Vec<Slot>,
    progress: Arc<Progress>,
    events: mpsc::UnboundedSender<Applied>,
    reports: Option<mpsc::Receiver<RevisionReport>>,
    stop: CancellationToken,
}

impl Sim {
    /// Connects every subscriber (each waits for its first snapshot).
    pub async fn start(config: SimConfig) -> Result<Sim, ClientError> {
        let stop = CancellationToken::new();
        let (events, events_rx) = mpsc::unbounded_channel();
        let total: usize = config.channels.iter().map(|(_, n)| n).sum();
        let progress = Arc::new(Progress {
            history: Mutex::new(vec![Vec::new(); total]),
            generation: watch::channel(0).0,
        });
        let mut slots = Vec::with_capacity(total);
        for (channel, count) in &config.channels {
            for n in 0..*count {
                let mut subscriber = config.base.clone();
                subscriber.channel = *channel;
                subscriber.subscriber_id = format!("{}-{channel}-{n}", config.id_prefix);
                slots.push(Slot {
                    channel: *channel,
                    config: subscriber,
                    running: None,
                });
            }
        }
        let mut sim = Sim {
            slots,
            progress,
            events,
            reports: None,
            stop,
        };
        let everyone: Vec<usize> = (0..total).collect();
        sim.connect(&everyone).await?;
        let (reports_tx, reports) = mpsc::channel(1024);
        sim.reports = Some(reports);
        tokio::spawn(Instrument::instrument(
            collect(
                events_rx,
                Tally {
                    layout: sim.slots.iter().map(|s| s.channel).collect(),
                    order: config.channels.iter().map(|(c, _)| *c).collect(),
                    baseline: sim.newest_applied(),
                    complete_within: config.complete_within,
                    pending: BTreeMap::new(),
                    reported: Default::default(),
                    reached: vec![Vec::new(); total],
                },
                reports_tx,
                sim.stop.clone(),
            ),
            info_span!("sim reports"),
        ));
        Ok(sim)
    }

    /// Connects the subscribers at `indices`, in waves so that a thousand do
    /// not all dial at once, and starts reporting what they apply.
    async fn connect(&mut self, indices: &[usize]) -> Result<(), ClientError> {
        for wave in indices.chunks(64) {
            let connected = futures_util::future::join_all(wave.iter().map(|&i| {
                let config = self.slots[i].config.clone();
                async move { (i, Subscriber::connect(config).await) }
            }))
            .await;
            for (index, subscriber) in connected {
                let subscriber = subscriber?;
                let watcher = tokio::spawn(
                    report_applies(
                        index,
                        subscriber.changes(),
                        self.progress.clone(),
                        self.events.clone(),
                        self.stop.clone(),
                    )
                    .instrument(info_span!("sim subscriber", index)),
                );
                self.slots[index].running = Some((subscriber, watcher));
            }
        }
        Ok(())
    }

    /// The newest revision any subscriber applied so far.
    fn newest_applied(&self) -> Revision {
        let history = self.progress.history.lock().expect("sim progress lock");
        history
            .iter()
            .filter_map(|h| h.last().map(|(r, _)| *r))
            .max()
            .unwrap_or(0)
    }

    /// How many subscribers the sim runs (killed ones included).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the sim runs no subscriber.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Each subscriber's id, in order.
    pub fn subscriber_ids(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| s.config.subscriber_id.clone())
            .collect()
    }

    /// Reports of revisions issued after the sim started, as each completes
    /// (or is given up on). Can be taken once.
    pub fn reports(&mut self) -> Option<mpsc::Receiver<RevisionReport>> {
        self.reports.take()
    }

    /// Waits until every running subscriber applied `revision` or a newer
    /// one; `false` if that takes longer than `within`.
    pub async fn wait_applied(&self, revision: Revision, within: Duration) -> bool {
        let mut generation = self.progress.generation.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            generation.borrow_and_update();
            if self.all_applied(revision) {
                return true;
            }
            match tokio::time::timeout_at(deadline, generation.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.all_applied(revision),
            }
        }
    }

    fn all_applied(&self, revision: Revision) -> bool {
        let history = self.progress.history.lock().expect("sim progress lock");
        self.slots
            .iter()
            .zip(history.iter())
            .filter(|(slot, _)| slot.running.is_some())
            .all(|(_, applied)| applied.last().is_some_and(|(r, _)| *r >= revision))
    }

    /// For each subscriber, its channel and when it first applied `revision`
    /// or a newer one (`None`: not yet).
    pub fn applied_at(&self, revision: Revision) -> Vec<(Channel, Option<Timestamp>)> {
        let history = self.progress.history.lock().expect("sim progress lock");
        self.slots
            .iter()
            .zip(history.iter())
            .map(|(slot, applied)| {
                let at = applied
                    .iter()
                    .find(|(r, _)| *r >= revision)
                    .map(|(_, at)| *at);
                (slot.channel, at)
            })
            .collect()
    }

    /// Disconnects `count` running subscribers chosen at random; returns
    /// their indices.
    pub fn kill(&mut self, count: usize) -> Vec<usize> {
        let mut running: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].running.is_some())
            .collect();
        let mut killed = Vec::with_capacity(count.min(running.len()));
        while killed.len() < count && !running.is_empty() {
            let index = running.swap_remove(rand::random_range(0..running.len()));
            if let Some((subscriber, watcher)) = self.slots[index].running.take() {
                watcher.abort();
                drop(subscriber);
            }
            // A revived subscriber starts with no memory of what it applied.
            self.progress.history.lock().expect("sim progress lock")[index].clear();
            killed.push(index);
        }
        killed
    }

    /// Connects the subscribers at `indices` again (fresh clients, as after
    /// a crash: no memory of what they applied).
    pub async fn revive(&mut self, indices: &[usize]) -> Result<(), ClientError> {
        self.connect(indices).await
    }

    /// `action` decided in `ctx` by the first running subscriber of
    /// `channel`.
    pub fn decide(
        &self,
        channel: Channel,
        action: &Action,
        ctx: &Context,
    ) -> Option<DecisionReport> {
        let (subscriber, _) = self
            .slots
            .iter()
            .filter(|s| s.channel == channel)
            .find_map(|s| s.running.as_ref())?;
        Some(subscriber.decide(action, ctx).report())
    }

    /// How many activations each running subscriber's applied policy holds.
    pub fn active_counts(&self) -> Vec<(Channel, usize)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let (subscriber, _) = s.running.as_ref()?;
                Some((
                    s.channel,
                    subscriber.current().map_or(0, |p| p.activations.len()),
                ))
            })
            .collect()
    }

    /// The channels the sim runs, in order, each once.
    pub fn channels(&self) -> Vec<Channel> {
        let mut channels: Vec<Channel> = Vec::new();
        for slot in &self.slots {
            if !channels.contains(&slot.channel) {
                channels.push(slot.channel);
            }
        }
        channels
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reports every snapshot one subscriber applies.
async fn report_applies(
    index: usize,
    mut changes: watch::Receiver<Option<Arc<safemode_client::PolicySnapshot>>>,
    progress: Arc<Progress>,
    events: mpsc::UnboundedSender<Applied>,
    stop: CancellationToken,
) {
    loop {
        let applied = changes.borrow_and_update().clone();
        if let Some(snapshot) = applied {
            let applied_at = Timestamp::now();
            progress.history.lock().expect("sim progress lock")[index]
                .push((snapshot.revision, applied_at));
            progress.generation.send_modify(|g| *g += 1);
            let _ = events.send(Applied {
                index,
                revision: snapshot.revision,
                issued_at: snapshot.issued_at,
                applied_at,
            });
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Revisions waiting for every subscriber.
struct Tally {
    /// The channel of each subscriber, by index.
    layout: Vec<Channel>,
    /// Channels in report order.
    order: Vec<Channel>,
    /// The newest revision any subscriber had when the sim started: where
    /// it began, not a change it watched.
    baseline: Revision,
    complete_within: Duration,
    pending: BTreeMap<Revision, Pending>,
    /// Revisions already reported.
    reported: std::collections::HashSet<Revision>,
    /// Every revision each subscriber applied, and when (to fill in a
    /// revision first seen after some subscribers had moved past it).
    reached: Vec<Vec<(Revision, Timestamp)>>,
}

struct Pending {
    issued_at: Timestamp,
    /// When the sim first saw it (the deadline counts from here, on this
    /// machine's clock).
    first_seen: Timestamp,
    /// When each subscriber applied it (or a newer one).
    applied: HashMap<usize, Timestamp>,
}

impl Tally {
    fn record(&mut self, event: &Applied) {
        self.reached[event.index].push((event.revision, event.applied_at));
        if event.revision > self.baseline
            && !self.reported.contains(&event.revision)
            && !self.pending.contains_key(&event.revision)
        {
            // Subscribers that already moved past it applied it then.
            let applied = self
                .reached
                .iter()
                .enumerate()
                .filter_map(|(i, history)| {
                    let at = history.iter().find(|(r, _)| *r >= event.revision)?.1;
                    Some((i, at))
                })
                .collect();
            self.pending.insert(
                event.revision,
                Pending {
                    issued_at: event.issued_at,
                    first_seen: Timestamp::now(),
                    applied,
                },
            );
        }
        for (_, pending) in self.pending.range_mut(..=event.revision) {
            pending
                .applied
                .entry(event.index)
                .or_insert(event.applied_at);
        }
    }

    /// Reports of revisions every subscriber applied, and of those past the
    /// deadline; they stop being pending.
    fn finished(&mut self, now: Timestamp) -> Vec<RevisionReport> {
        let total = self.layout.len();
        let limit = jiff::SignedDuration::try_from(self.complete_within)
            .unwrap_or(jiff::SignedDuration::MAX);
        let done: Vec<Revision> = self
            .pending
            .iter()
            .filter(|(_, p)| p.applied.len() == total || now.duration_since(p.first_seen) > limit)
            .map(|(r, _)| *r)
            .collect();
        done.into_iter()
            .filter_map(|revision| {
                let pending = self.pending.remove(&revision)?;
                self.reported.insert(revision);
                Some(self.report(revision, &pending))
            })
            .collect()
    }

    fn report(&self, revision: Revision, pending: &Pending) -> RevisionReport {
        let channels = self
            .order
            .iter()
            .map(|channel| {
                let mut times: Vec<f64> = pending
                    .applied
                    .iter()
                    .filter(|(i, _)| self.layout[**i] == *channel)
                    .map(|(_, at)| {
                        at.duration_since(pending.issued_at).as_secs_f64().max(0.0) * 1000.0
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                ChannelTimes {
                    channel: channel.to_string(),
                    applied: times.len(),
                    subscribers: self.layout.iter().filter(|c| *c == channel).count(),
                    p50_ms: percentile(&times, 0.50),
                    p99_ms: percentile(&times, 0.99),
                    max_ms: times.last().copied().unwrap_or(0.0),
                }
            })
            .collect();
        RevisionReport {
            revision,
            issued_at: pending.issued_at,
            complete: pending.applied.len() == self.layout.len(),
            channels,
        }
    }
}

/// The `q` quantile of sorted `times` (nearest rank); 0 for none.
pub fn percentile(times: &[f64], q: f64) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    let rank = (q * times.len() as f64).ceil() as usize;
    times[rank.clamp(1, times.len()) - 1]
}

async fn collect(
    mut events: mpsc::UnboundedReceiver<Applied>,
    mut tally: Tally,
    reports: mpsc::Sender<RevisionReport>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.recv() => {
                let Some(event) = event else { return };
                tally.record(&event);
            }
            _ = tick.tick() => {}
        }
        for report in tally.finished(Timestamp::now()) {
            // Nobody reading reports is fine: the sim still answers decisions.
            let _ = reports.try_send(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_parsed_with_clear_errors() {
        let parsed = parse_channels("chatbot=50, ivr=20").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].1, 50);
        for (bad, says) in [
            ("", "no channels given"),
            ("chatbot", "is not CHANNEL=COUNT"),
            ("chatbot=0", "whole number from 1"),
            ("chatbot=x", "whole number from 1"),
            ("fax=1", "unknown channel"),
            ("web=1,web=2", "given twice"),
        ] {
            let error = parse_channels(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let times: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&times, 0.5), 50.0);
        assert_eq!(percentile(&times, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
