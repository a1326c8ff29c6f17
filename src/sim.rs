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
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, DecisionReport, Subscriber, SubscriberConfig};
use crate::policy::{Action, Channel, Context, Revision};

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

/// Simulated channel services.
pub struct Sim {
    subscribers: Vec<(Channel, Subscriber)>,
    reports: Option<mpsc::Receiver<RevisionReport>>,
    applied: watch::Receiver<Vec<Revision>>,
    stop: CancellationToken,
}

/// What the sim needs to start.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Every subscriber's settings but its channel and id (taken from here
    /// for the controllers, namespace, token and TLS).
    pub base: SubscriberConfig,
    /// How many subscribers of which channel.
    pub channels: Vec<(Channel, usize)>,
    /// Subscriber ids are `{prefix}-{channel}-{n}`.
    pub id_prefix: String,
    /// A revision not applied by everyone within this long is reported
    /// incomplete.
    pub complete_within: Duration,
}

impl Sim {
    /// Connects every subscriber (each waits for its first snapshot).
    pub async fn start(config: SimConfig) -> Result<Sim, ClientError> {
        let stop = CancellationToken::new();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let total: usize = config.channels.iter().map(|(_, n)| n).sum();
        let (applied_tx, applied) = watch::channel(vec![0; total]);
        let mut connecting = Vec::with_capacity(total);
        for (channel, count) in &config.channels {
            for n in 0..*count {
                let mut subscriber = config.base.clone();
                subscriber.channel = *channel;
                subscriber.subscriber_id = format!("{}-{channel}-{n}", config.id_prefix);
                connecting.push((*channel, subscriber));
            }
        }
        let mut subscribers = Vec::with_capacity(total);
        // Connect in waves, so a thousand subscribers do not all dial at once.
        for wave in connecting.chunks(64) {
            let connected =
                futures_util::future::join_all(wave.iter().map(|(channel, config)| async move {
                    (*channel, Subscriber::connect(config.clone()).await)
                }))
                .await;
            for (channel, subscriber) in connected {
                subscribers.push((channel, subscriber?));
            }
        }
        let started = Timestamp::now();
        for (index, (_, subscriber)) in subscribers.iter().enumerate() {
            let mut changes = subscriber.changes();
            let events = events_tx.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let applied = changes.borrow_and_update().clone();
                    if let Some(snapshot) = applied {
                        let _ = events.send(Applied {
                            index,
                            revision: snapshot.revision,
                            issued_at: snapshot.issued_at,
                            applied_at: Timestamp::now(),
                        });
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        changed = changes.changed() => if changed.is_err() { return },
                    }
                }
            });
        }
        let layout: Vec<Channel> = subscribers.iter().map(|(c, _)| *c).collect();
        let order: Vec<Channel> = config.channels.iter().map(|(c, _)| *c).collect();
        let (reports_tx, reports) = mpsc::channel(1024);
        tokio::spawn(collect(
            events_rx,
            Tally {
                layout,
                order,
                started,
                complete_within: config.complete_within,
                pending: BTreeMap::new(),
                reached: vec![0; total],
            },
            reports_tx,
            applied_tx,
            stop.clone(),
        ));
        Ok(Sim {
            subscribers,
            reports: Some(reports),
            applied,
            stop,
        })
    }

    /// How many subscribers the sim runs.
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Whether the sim runs no subscriber.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// Reports of revisions issued after the sim started, as each completes
    /// (or is given up on). Can be taken once.
    pub fn reports(&mut self) -> Option<mpsc::Receiver<RevisionReport>> {
        self.reports.take()
    }

    /// Waits until every subscriber applied `revision` or a newer one.
    pub async fn wait_applied(&self, revision: Revision, within: Duration) -> bool {
        let mut applied = self.applied.clone();
        tokio::time::timeout(
            within,
            applied.wait_for(|a| a.iter().all(|r| *r >= revision)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// `action` decided in `ctx` by the first subscriber of `channel`.
    pub fn decide(
        &self,
        channel: Channel,
        action: &Action,
        ctx: &Context,
    ) -> Option<DecisionReport> {
        let (_, subscriber) = self.subscribers.iter().find(|(c, _)| *c == channel)?;
        Some(subscriber.decide(action, ctx).report())
    }

    /// The channels the sim runs, in order, each once.
    pub fn channels(&self) -> Vec<Channel> {
        let mut channels: Vec<Channel> = Vec::new();
        for (channel, _) in &self.subscribers {
            if !channels.contains(channel) {
                channels.push(*channel);
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

/// Revisions waiting for every subscriber.
struct Tally {
    /// The channel of each subscriber, by index.
    layout: Vec<Channel>,
    /// Channels in report order.
    order: Vec<Channel>,
    started: Timestamp,
    complete_within: Duration,
    pending: BTreeMap<Revision, Pending>,
    /// The newest revision each subscriber applied.
    reached: Vec<Revision>,
}

struct Pending {
    issued_at: Timestamp,
    /// When each subscriber applied it (or a newer one).
    applied: HashMap<usize, Timestamp>,
}

impl Tally {
    fn record(&mut self, event: &Applied) {
        let reached = &mut self.reached[event.index];
        *reached = (*reached).max(event.revision);
        // Snapshots issued before the sim started are where it began, not
        // changes it watched.
        if event.issued_at >= self.started {
            self.pending
                .entry(event.revision)
                .or_insert_with(|| Pending {
                    issued_at: event.issued_at,
                    applied: HashMap::new(),
                });
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
            .filter(|(_, p)| p.applied.len() == total || now.duration_since(p.issued_at) > limit)
            .map(|(r, _)| *r)
            .collect();
        done.into_iter()
            .filter_map(|revision| {
                let pending = self.pending.remove(&revision)?;
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
    applied: watch::Sender<Vec<Revision>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.recv() => {
                let Some(event) = event else { return };
                tally.record(&event);
                applied.send_replace(tally.reached.clone());
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
