//! Subscribers for the benchmarks: raw subscription streams over a pool of
//! HTTP/2 connections (many streams share one, as channel services behind a
//! few client pods would). Each snapshot's signature is checked and the
//! snapshot compiled as the client module does (`verify_snapshot`,
//! `PolicySnapshot::from_wire`), once per distinct snapshot in the fleet's
//! process (as a process holding many subscribers would: the very same
//! contents, compared field by field, are not verified again); each
//! subscriber decodes its own copy, acks it, and reconnects
//! with jitter when its stream ends. They record when each revision arrived;
//! when the controller recorded the acks is read from its status.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use safemode_client::PolicySnapshot;
use safemode_grpc::coalesce::Coalesced;
use safemode_policy::{Channel, Namespace, Revision};
use safemode_signing::TrustedKeys;
use safemode_support::backoff::Backoff;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscribe_response::Message as Inbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use safemode_wire::proto::{self, SubscribeRequest};
use safemode_wire::signed::verify_snapshot;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel as Connection, Endpoint};

/// How one revision reached the fleet.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// Subscribers that received it, compiled it and sent their ack.
    pub acked: usize,
    /// When the last of them received it (the wall clock: the fleet may
    /// run in a process of its own, on the same machine).
    pub last_received: SystemTime,
}

/// What every subscriber holds now.
#[derive(Default)]
struct Ledger {
    by_revision: HashMap<Revision, Arrival>,
    /// Each subscriber's newest acked revision.
    acked: Vec<Revision>,
    /// Encoded sizes of the snapshots received (the `Snapshot` message, as
    /// sent): how many, their sum, the largest.
    payloads: u64,
    payload_bytes: u64,
    payload_max: u64,
}

/// The sizes of the snapshots the fleet received.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Payloads {
    pub mean_bytes: u64,
    pub max_bytes: u64,
}

/// The snapshots of each channel the fleet checked most recently, and
/// their outcomes: a process holding many subscribers of one channel
/// verifies and compiles each distinct snapshot once, and every subscriber
/// that receives the very same contents (compared field by field, signature
/// included) takes that outcome. Several per channel: replicas each issue
/// their own snapshot of a revision (issued at their own time), and their
/// streams deliver them interleaved.
struct Checked {
    by_channel: Mutex<HashMap<Channel, VecDeque<(proto::Snapshot, Outcome)>>>,
    /// How many one channel keeps: two for each replica (a revision's and
    /// the one before it), so that interleaved deliveries of every
    /// replica's snapshot never push out one still being delivered.
    per_channel: usize,
}

/// What checking a snapshot found: `Err` says why it is refused.
type Outcome = Result<(), String>;

impl Checked {
    /// Room for the snapshots of `replicas` replicas.
    fn new(replicas: usize) -> Self {
        Checked {
            by_channel: Mutex::default(),
            per_channel: 2 * replicas.max(1),
        }
    }

    /// The outcome of checking the very same `snapshot` of `channel`, if it
    /// was checked.
    fn outcome(&self, channel: Channel, snapshot: &proto::Snapshot) -> Option<Outcome> {
        let by_channel = self.by_channel.lock().unwrap();
        // The newest first: the one most subscribers are receiving.
        let (_, outcome) = by_channel
            .get(&channel)?
            .iter()
            .rev()
            .find(|(seen, _)| seen == snapshot)?;
        Some(outcome.clone())
    }

    /// Keeps `outcome` for `snapshot` of `channel`, in place of the one
    /// checked longest ago once the channel has its `per_channel`.
    fn keep(&self, channel: Channel, snapshot: proto::Snapshot, outcome: Outcome) {
        let mut by_channel = self.by_channel.lock().unwrap();
        let kept = by_channel.entry(channel).or_default();
        // Another subscriber may have checked the same one meanwhile.
        if kept.iter().any(|(seen, _)| *seen == snapshot) {
            return;
        }
        if kept.len() == self.per_channel {
            kept.pop_front();
        }
        kept.push_back((snapshot, outcome));
    }
}

pub struct Fleet {
    ledger: Arc<Mutex<Ledger>>,
    checked: Arc<Checked>,
    stop: CancellationToken,
    pub size: usize,
}

impl Fleet {
    /// `size` subscribers of the live namespace, spread over the channels
    /// and over `connections` connections, the connections spread over the
    /// replicas at `urls`; returns once every one has acked its first
    /// snapshot.
    pub async fn connect(
        urls: &[String],
        size: usize,
        connections: usize,
        trusted: TrustedKeys,
    ) -> anyhow::Result<Fleet> {
        let mut pool = Vec::with_capacity(connections);
        for n in 0..connections {
            let url = &urls[n % urls.len()];
            let endpoint = Endpoint::from_shared(url.to_string())?
                .connect_timeout(Duration::from_secs(10))
                .http2_adaptive_window(true);
            // Each connect is its own HTTP/2 connection, its acks coalesced
            // as the controller's snapshots are.
            pool.push(
                endpoint
                    .connect_with_connector(tower::service_fn(coalesced))
                    .await
                    .with_context(|| format!("cannot connect to the controller at {url}"))?,
            );
        }
        let ledger = Arc::new(Mutex::new(Ledger {
            acked: vec![0; size],
            ..Ledger::default()
        }));
        let fleet = Fleet {
            ledger,
            checked: Arc::new(Checked::new(urls.len())),
            stop: CancellationToken::new(),
            size,
        };
        let channels: Vec<Channel> = Channel::all().collect();
        for index in 0..size {
            let subscriber = Raw {
                index,
                channel: channels[index % channels.len()],
                connection: pool[index % pool.len()].clone(),
                ledger: fleet.ledger.clone(),
                checked: fleet.checked.clone(),
                trusted: trusted.clone(),
            };
            tokio::spawn(subscriber.run(fleet.stop.clone()));
        }
        fleet
            .wait(
                |ledger| ledger.acked.iter().all(|r| *r > 0),
                Duration::from_secs(120),
            )
            .await
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("not every subscriber connected within 120 s"))?;
        Ok(fleet)
    }

    /// Polls `done` every millisecond (the arrival times themselves are
    /// taken by the subscribers, so polling adds nothing to them).
    async fn wait(&self, done: impl Fn(&Ledger) -> bool, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if done(&self.ledger.lock().unwrap()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until every subscriber has sent its ack of `revision`; then how
    /// it arrived.
    pub async fn arrival(&self, revision: Revision, within: Duration) -> Option<Arrival> {
        let size = self.size;
        self.wait(
            |l| {
                l.by_revision
                    .get(&revision)
                    .is_some_and(|a| a.acked == size)
            },
            within,
        )
        .await
        .then(|| self.ledger.lock().unwrap().by_revision[&revision])
    }

    /// Waits until every subscriber has sent an ack of `revision` or newer.
    pub async fn all_acked(&self, revision: Revision, within: Duration) -> bool {
        self.wait(|l| l.acked.iter().all(|r| *r >= revision), within)
            .await
    }

    /// Forgets every subscriber's acks (before a controller crash: each must
    /// ack again once it is back).
    pub fn reset_acks(&self) {
        self.ledger.lock().unwrap().acked.fill(0);
    }

    /// Forgets what arrived (before a run whose arrivals are counted).
    pub fn forget(&self) {
        let mut ledger = self.ledger.lock().unwrap();
        ledger.by_revision.clear();
        ledger.payloads = 0;
        ledger.payload_bytes = 0;
        ledger.payload_max = 0;
    }

    /// The sizes of the snapshots received since [`Fleet::forget`].
    pub fn payloads(&self) -> Payloads {
        let ledger = self.ledger.lock().unwrap();
        Payloads {
            mean_bytes: ledger.payload_bytes / ledger.payloads.max(1),
            max_bytes: ledger.payload_max,
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP connection to `uri` whose small frames share writes (the
/// controller's [`Coalesced`]): a hundred subscribers acking one flip on a
/// connection write their acks together, as a gRPC client in Go does.
async fn coalesced(uri: Uri) -> std::io::Result<TokioIo<Coalesced<TcpStream>>> {
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{uri} has no host and port"),
        ));
    };
    // An IPv6 address comes bracketed, as in the URI.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(Coalesced::new(stream)))
}

struct Raw {
    index: usize,
    channel: Channel,
    connection: Connection,
    ledger: Arc<Mutex<Ledger>>,
    checked: Arc<Checked>,
    trusted: TrustedKeys,
}

impl Raw {
    /// What a channel service does before it acks: verify, check and
    /// compile; once per distinct snapshot in this process.
    fn check(&self, snapshot: proto::Snapshot, namespace: &Namespace) -> Outcome {
        if let Some(outcome) = self.checked.outcome(self.channel, &snapshot) {
            return outcome;
        }
        let received = snapshot.clone();
        let mut snapshot = snapshot;
        let outcome = verify_snapshot(&mut snapshot, &self.trusted)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                PolicySnapshot::from_wire(snapshot, namespace, self.channel)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
        self.checked.keep(self.channel, received, outcome.clone());
        outcome
    }

    async fn run(self, stop: CancellationToken) {
        let mut applied: Revision = 0;
        let mut epoch = String::new();
        // The client module's reconnect pacing: jittered, from 100 ms, and
        // back to 100 ms once a stream has delivered a snapshot.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                delivered = self.stream(&mut applied, &mut epoch) => if delivered {
                    backoff.reset();
                }
            }
            // The stream ended (the controller went away): come back after
            // a jittered pause, as real clients do.
            let pause = backoff.next_delay();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One stream, until it ends; whether it delivered a snapshot.
    async fn stream(&self, applied: &mut Revision, epoch: &mut String) -> bool {
        let (out, rx) = mpsc::channel(8);
        let hello = proto::Hello {
            namespace: "live".into(),
            channel: self.channel.as_str().into(),
            subscriber_id: format!("bench-{}", self.index),
            last_applied_revision: *applied,
            epoch: epoch.clone(),
        };
        let _ = out
            .send(SubscribeRequest {
                message: Some(Outbound::Hello(hello)),
            })
            .await;
        let mut client = SubscriptionServiceClient::new(self.connection.clone());
        let Ok(response) = client.subscribe(ReceiverStream::new(rx)).await else {
            return false;
        };
        let mut inbound = response.into_inner();
        let mut delivered = false;
        let namespace = Namespace::live();
        while let Ok(Some(message)) = inbound.message().await {
            let Some(Inbound::Snapshot(snapshot)) = message.message else {
                continue;
            };
            let received = SystemTime::now();
            let size = snapshot.encoded_len() as u64;
            delivered = true;
            let revision = snapshot.revision;
            let snapshot_epoch = snapshot.epoch.clone();
            let reply = match self.check(snapshot, &namespace) {
                Ok(()) => Outbound::Ack(proto::Ack { revision }),
                Err(e) => {
                    eprintln!(
                        "bench subscriber {}: rejecting revision {revision}: {e}",
                        self.index
                    );
                    Outbound::Reject(proto::Reject {
                        revision,
                        reason: e,
                    })
                }
            };
            let acked = matches!(reply, Outbound::Ack(_));
            let _ = out
                .send(SubscribeRequest {
                    message: Some(reply),
                })
                .await;
            if !acked {
                continue;
            }
            *applied = revision;
            *epoch = snapshot_epoch;
            let mut ledger = self.ledger.lock().unwrap();
            let arrival = ledger.by_revision.entry(revision).or_insert(Arrival {
                acked: 0,
                last_received: received,
            });
            arrival.acked += 1;
            arrival.last_received = arrival.last_received.max(received);
            ledger.acked[self.index] = revision;
            ledger.payloads += 1;
            ledger.payload_bytes += size;
            ledger.payload_max = ledger.payload_max.max(size);
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(revision: Revision, replica: i64) -> proto::Snapshot {
        proto::Snapshot {
            revision,
            issued_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000 + revision,
                nanos: replica as i32,
            }),
            signature: vec![1; 64],
            ..proto::Snapshot::default()
        }
    }

    fn web() -> Channel {
        Channel::parse("web").unwrap()
    }

    #[test]
    fn the_snapshots_of_every_replica_are_remembered_each_with_its_outcome() {
        for replicas in [1, 3, 9] {
            let checked = Checked::new(replicas);
            for replica in 0..replicas as i64 {
                checked.keep(web(), issued(7, replica), Err(format!("replica {replica}")));
            }
            // Delivered interleaved, every one is known, each with its own
            // outcome.
            for replica in (0..replicas as i64).rev().chain(0..replicas as i64) {
                assert_eq!(
                    checked.outcome(web(), &issued(7, replica)),
                    Some(Err(format!("replica {replica}"))),
                    "{replicas} replicas"
                );
            }
            assert_eq!(checked.outcome(web(), &issued(8, 0)), None);
            assert_eq!(
                checked.outcome(Channel::parse("ivr").unwrap(), &issued(7, 0)),
                None
            );
        }
    }

    #[test]
    fn only_the_very_same_snapshot_takes_an_outcome() {
        let checked = Checked::new(1);
        checked.keep(web(), issued(7, 0), Ok(()));
        assert_eq!(checked.outcome(web(), &issued(7, 0)), Some(Ok(())));
        // One byte of the signature, or the rules, changed: checked anew.
        let mut forged = issued(7, 0);
        forged.signature[63] ^= 1;
        assert_eq!(checked.outcome(web(), &forged), None);
        let mut other_rules = issued(7, 0);
        other_rules.rules = Some(proto::ChannelRules::default());
        assert_eq!(checked.outcome(web(), &other_rules), None);
        let mut unsigned = issued(7, 0);
        unsigned.signature.clear();
        assert_eq!(checked.outcome(web(), &unsigned), None);
    }

    #[test]
    fn a_channel_keeps_two_snapshots_a_replica_and_each_once() {
        let checked = Checked::new(3);
        checked.keep(web(), issued(1, 0), Ok(()));
        checked.keep(web(), issued(1, 0), Err("checked again".into()));
        assert_eq!(checked.outcome(web(), &issued(1, 0)), Some(Ok(())));
        for revision in 2..=6 {
            checked.keep(web(), issued(revision, 0), Ok(()));
        }
        assert_eq!(checked.outcome(web(), &issued(1, 0)), Some(Ok(())));
        // The seventh pushes out the one checked longest ago.
        checked.keep(web(), issued(7, 0), Ok(()));
        assert_eq!(checked.outcome(web(), &issued(1, 0)), None);
        assert_eq!(checked.outcome(web(), &issued(2, 0)), Some(Ok(())));
        assert_eq!(checked.outcome(web(), &issued(7, 0)), Some(Ok(())));
    }
}
