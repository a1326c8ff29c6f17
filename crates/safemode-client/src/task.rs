//! The background side of a [`Subscriber`](super::Subscriber): one stream
//! at a time to one controller replica, moving to the next replica when a
//! stream fails, with jittered backoff; every snapshot checked, applied or
//! rejected, and acknowledged.
//!
//! Nothing unsigned is used: a snapshot that is not signed by a trusted key
//! is rejected (nothing applied, nothing saved) and the client moves to
//! another replica, whatever revision or epoch it claims; so is a replica
//! whose heartbeat does not verify. Only a verified heartbeat newer than
//! the last one taken makes the policy current, because a signed snapshot
//! can be replayed by whoever captured it, a heartbeat's time cannot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use super::connection::{Bearer, connect_failed, explain, probe};
use super::reporting::{REPORT_EVERY, ReportReceipt, Rows, Tally};
use super::state::Shared;
use super::{ClientError, PolicySnapshot, SubscriberConfig, lkg};
use safemode_policy::Revision;
use safemode_signing::TrustedKeys;
use safemode_support::backoff::Backoff;
use safemode_support::errors::error_chain;
use safemode_wire as wire;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscribe_response::Message as Inbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use safemode_wire::proto::{self, SubscribeRequest};

const BACKOFF_MIN: Duration = Duration::from_millis(100);

pub(super) struct Task {
    /// The keys the controllers sign with.
    pub trusted: TrustedKeys,
    /// The time of the newest heartbeat taken (from any replica): older
    /// ones are replays and confirm nothing.
    pub last_beat: Option<(i64, i32)>,
    /// Every controller, with its URL for messages.
    pub endpoints: Vec<(String, Endpoint)>,
    /// The endpoint the next stream opens on.
    pub next: usize,
    pub config: SubscriberConfig,
    pub shared: Arc<Shared>,
    /// Wakes whoever waits for a change.
    pub changes: watch::Sender<Option<Arc<PolicySnapshot>>>,
    /// The newest snapshot to keep as last-known-good, encoded.
    pub keep: Option<watch::Sender<Option<Arc<Vec<u8>>>>>,
    /// The applied snapshot as kept, and when a confirmation of it was last
    /// saved.
    pub kept: Option<(lkg::Kept, Option<Instant>)>,
    /// Told how the first round of attempts went, then dropped.
    pub first: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// Why each endpoint failed before the first snapshot.
    pub first_errors: Vec<ClientError>,
    /// How many replicas in a row refused the token.
    pub refusals: usize,
    /// Told why the task stopped for good (the token was refused).
    pub ended: watch::Sender<Option<Arc<ClientError>>>,
    /// What the subscriber reports, and reports waiting for an answer.
    pub reporting: Reporting,
}

/// Where [`Subscriber::report_now`](super::Subscriber::report_now) is told
/// how its report was answered.
pub(super) type ReportAsk = oneshot::Sender<ReportReceipt>;

/// Reports sent and not answered yet, at most; a report due while this
/// many wait is kept for the next.
const MAX_UNANSWERED_REPORTS: usize = 4;

/// Tallies of replaced snapshots kept apart, at most; older ones are
/// folded into the next report's counts at once.
const MAX_RETIRED_TALLIES: usize = 8;

pub(super) struct Reporting {
    asks: mpsc::Receiver<ReportAsk>,
    /// Tallies of snapshots replaced since the last report, with their
    /// revisions.
    retired: Vec<(Revision, Arc<Tally>)>,
    /// Counts for the next report: what did not fit in the last one, and
    /// those of reports refused for coming too soon.
    carry: Rows,
    sequence: u64,
    /// Reports sent and not answered yet, oldest first.
    unanswered: VecDeque<Unanswered>,
    /// The controller of the stream takes reports (it said so in the
    /// stream's response header); none is sent otherwise.
    taken: bool,
}

struct Unanswered {
    sequence: u64,
    rows: Rows,
    ask: Option<ReportAsk>,
}

impl Reporting {
    pub fn new(asks: mpsc::Receiver<ReportAsk>) -> Self {
        Reporting {
            asks,
            retired: Vec::new(),
            carry: Rows::default(),
            sequence: 0,
            unanswered: VecDeque::new(),
            taken: false,
        }
    }

    /// The stream ended: reports it did not answer go with the next one
    /// (the controller may have counted some already: a count may be
    /// reported twice, never lost), and whoever waits on one is told.
    fn stream_ended(&mut self, why: &str) {
        self.taken = false;
        for sent in self.unanswered.drain(..) {
            self.carry.merge(sent.rows);
            if let Some(ask) = sent.ask {
                let _ = ask.send(ReportReceipt::Lost(format!(
                    "the stream ended before the controller answered ({why}); the counts go with the next report"
                )));
            }
        }
    }

    /// Keeps the tally of a replaced snapshot for the next report.
    fn retire(&mut self, revision: Revision, tally: Arc<Tally>) {
        if self.retired.len() >= MAX_RETIRED_TALLIES {
            let (revision, tally) = self.retired.remove(0);
            tally.drain(revision, &mut self.carry);
        }
        self.retired.push((revision, tally));
    }
}

impl Task {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, self.config.max_backoff);
        loop {
            let result = tokio::select! {
                () = stop.cancelled() => return,
                result = self.session(&mut backoff) => result,
            };
            let error = match result {
                Ok(()) => ClientError::Refused("the controller ended the stream".into()),
                Err(e) => e,
            };
            self.reporting.stream_ended(&error.to_string());
            // Whatever went wrong, the next stream goes to the next replica.
            self.next = (self.next + 1) % self.endpoints.len();
            // A token refused is final once every replica has refused it in
            // turn: one replica may not have read a new tokens file yet.
            if matches!(error, ClientError::TokenRefused { .. }) {
                self.refusals += 1;
            } else {
                self.refusals = 0;
            }
            if self.refusals >= self.endpoints.len() {
                let mut error = error;
                if let Some(first) = self.first.take() {
                    match first.send(Err(error)) {
                        // `connect` says it.
                        Ok(()) => return,
                        Err(Err(unsent)) => error = unsent,
                        Err(Ok(())) => return,
                    }
                }
                info!(%error, "the controllers refused the token; the subscription stops");
                self.ended.send_replace(Some(Arc::new(error)));
                return;
            }
            if self.first.is_some() {
                self.first_errors.push(error);
                if self.first_errors.len() < self.endpoints.len() {
                    continue;
                }
                // Every replica had its try: say why (to `connect`, or else
                // to the log), and keep trying.
                let error = first_failure(std::mem::take(&mut self.first_errors));
                if let Some(first) = self.first.take()
                    && let Err(Err(error)) = first.send(Err(error))
                {
                    warn!(%error, "no controller answered; retrying in the background");
                }
            } else {
                warn!(%error, "subscription lost; reconnecting");
            }
            let pause = backoff.next_delay();
            debug!(retry_in = ?pause, "waiting before the next attempt");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One stream, from hello to its end.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), ClientError> {
        let (server, endpoint) = self.endpoints[self.next].clone();
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => {
                return Err(match probe(&server).await {
                    Some(error) => error,
                    None => connect_failed(&server, &e),
                });
            }
        };
        let mut client = SubscriptionServiceClient::with_interceptor(
            channel,
            Bearer::new(self.config.token.as_deref())?,
        );
        let (out, out_rx) = mpsc::channel(16);
        let applied = self.shared.current.load_full();
        let hello = proto::Hello {
            namespace: self.config.namespace.to_string(),
            channel: self.config.channel.as_str().to_string(),
            subscriber_id: self.config.subscriber_id.clone(),
            last_applied_revision: applied.as_ref().map_or(0, |s| s.revision),
            epoch: applied
                .as_ref()
                .map(|s| s.epoch.clone())
                .unwrap_or_default(),
        };
        send(&out, Outbound::Hello(hello)).await;
        let mut inbound = match client.subscribe(ReceiverStream::new(out_rx)).await {
            Ok(response) => {
                self.reporting.taken = response.metadata().get(wire::REPORTS_HEADER).is_some();
                response.into_inner()
            }
            Err(status) => return Err(refused(&server, status).await),
        };
        // What this controller holds: its store history (from its first
        // snapshot) and its newest revision.
        let mut heard = Heard::default();
        // A replica that stops talking (its follower is unhealthy, it hangs)
        // is left for another before decisions go stale.
        let silence = self.config.stale_after;
        let mut heard_at = tokio::time::Instant::now();
        let mut report_every =
            tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
        report_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                message = tokio::time::timeout_at(heard_at + silence, inbound.message()) => message,
                _ = report_every.tick() => {
                    self.report(&out, None).await;
                    continue;
                }
                Some(ask) = self.reporting.asks.recv() => {
                    self.report(&out, Some(ask)).await;
                    continue;
                }
            };
            heard_at = tokio::time::Instant::now();
            let message = match message {
                Err(_) => {
                    return Err(ClientError::Unreachable {
                        server,
                        reason: format!("no message for {silence:?}"),
                    });
                }
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => return Err(refused(&server, status).await),
            };
            let mut wire = match message.message {
                Some(Inbound::Snapshot(wire)) => wire,
                Some(Inbound::Heartbeat(heartbeat)) => {
                    // A stream's heartbeats are checked against the epoch
                    // of its first (verified) snapshot; none comes first.
                    let Some(epoch) = heard.epoch.clone() else {
                        continue;
                    };
                    wire::signed::verify_heartbeat(
                        &heartbeat,
                        self.config.namespace.as_str(),
                        self.config.channel.as_str(),
                        &epoch,
                        &self.trusted,
                    )
                    .map_err(|reason| ClientError::NotTrusted {
                        server: server.clone(),
                        what: "a heartbeat",
                        reason,
                    })?;
                    let Some(time) = heartbeat.server_time.map(|t| (t.seconds, t.nanos)) else {
                        continue;
                    };
                    // A heartbeat older than the staleness limit says
                    // nothing about now: a replay (by whoever captured it),
                    // or a controller whose clock is far behind this one.
                    let age = heartbeat
                        .server_time
                        .and_then(|t| wire::timestamp_from_wire(&t).ok())
                        .and_then(|at| Duration::try_from(Timestamp::now().duration_since(at)).ok())
                        .unwrap_or(Duration::ZERO);
                    if age > self.config.stale_after {
                        warn!(
                            ?age,
                            "a heartbeat this old confirms nothing (a replay, or the controller's clock is behind this machine's)"
                        );
                        continue;
                    }
                    if self.last_beat.is_some_and(|last| time <= last) {
                        debug!(
                            ?time,
                            "a heartbeat no newer than the last one taken confirms nothing"
                        );
                        continue;
                    }
                    self.last_beat = Some(time);
                    if let Some((kept, _)) = &mut self.kept {
                        kept.confirmed_by(&heartbeat);
                    }
                    heard.revision = heartbeat.revision;
                    let behind = self.observe(&heard, true);
                    if !behind
                        && self.shared.current.load().is_some()
                        && let Some(first) = self.first.take()
                    {
                        let _ = first.send(Ok(()));
                    }
                    // The stream stays up: a later failure starts over
                    // from the shortest pause, and a replica's refusal of
                    // the token long ago no longer counts.
                    backoff.reset();
                    self.refusals = 0;
                    continue;
                }
                Some(Inbound::ReportAnswer(answer)) => {
                    self.answered(answer);
                    continue;
                }
                None => continue,
            };
            let revision = wire.revision;
            // Checked before anything else is looked at: a snapshot that is
            // not signed by a trusted key tells nothing, not even that the
            // controller holds a newer revision.
            if let Err(reason) = wire::signed::verify_snapshot(&mut wire, &self.trusted) {
                let error = ClientError::NotTrusted {
                    server: server.clone(),
                    what: "a snapshot",
                    reason,
                };
                warn!(revision, %error, "snapshot refused; keeping the previous policy and trying another replica");
                self.shared.counts.rejected();
                send(&out, reject(revision, error.to_string())).await;
                // Leaving at once would cancel the stream before the reject
                // is sent: close this side and give the controller a moment
                // to end its own (a real one does at once).
                drop(out);
                let _ = tokio::time::timeout(REJECT_GRACE, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Err(error);
            }
            heard = Heard {
                epoch: Some(wire.epoch.clone()),
                revision,
            };
            let received = self.receive(wire);
            self.observe(&heard, false);
            match received {
                Ok(()) => {
                    send(&out, Outbound::Ack(proto::Ack { revision })).await;
                }
                Err(Refusal::Unusable(reason)) => {
                    warn!(revision, %reason, "snapshot rejected; keeping the previous one");
                    self.shared.counts.rejected();
                    send(&out, reject(revision, reason.clone())).await;
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(ClientError::Rejected(reason)));
                    }
                }
                Err(Refusal::Older(reason)) => {
                    warn!(%reason, "refusing to go backwards");
                    self.shared.counts.rejected();
                    send(&out, reject(revision, reason)).await;
                }
            }
        }
    }

    /// Sends what was counted since the last report, if anything (or if
    /// `ask` waits for an answer).
    async fn report(&mut self, out: &mpsc::Sender<SubscribeRequest>, ask: Option<ReportAsk>) {
        let reporting = &mut self.reporting;
        let mut rows = std::mem::take(&mut reporting.carry);
        self.shared.unapplied.drain(0, &mut rows);
        for (revision, tally) in reporting.retired.drain(..) {
            tally.drain(revision, &mut rows);
        }
        if let Some(current) = self.shared.current.load_full()
            && let Some(tally) = &current.tally
        {
            tally.drain(current.revision, &mut rows);
        }
        self.shared.signals.drain(&mut rows);
        if rows.is_empty() && ask.is_none() {
            return;
        }
        if !reporting.taken {
            reporting.carry = rows;
            if let Some(ask) = ask {
                let _ = ask.send(ReportReceipt::Refused(
                    "this controller takes no reports (an older version); the counts are kept for one that does".into(),
                ));
            }
            return;
        }
        if reporting.unanswered.len() >= MAX_UNANSWERED_REPORTS {
            reporting.carry = rows;
            if let Some(ask) = ask {
                let _ = ask.send(ReportReceipt::Refused(format!(
                    "{MAX_UNANSWERED_REPORTS} reports are waiting for the controller's answer; the counts go with the next one"
                )));
            }
            return;
        }
        reporting.sequence += 1;
        let (report, sent) = rows.take_report(reporting.sequence);
        reporting.carry = rows;
        reporting.unanswered.push_back(Unanswered {
            sequence: reporting.sequence,
            rows: sent,
            ask,
        });
        send(out, Outbound::Report(report)).await;
    }

    /// The controller's answer to a report: one refused for coming too soon
    /// goes with the next.
    fn answered(&mut self, answer: proto::ReportAnswer) {
        let reporting = &mut self.reporting;
        while let Some(sent) = reporting.unanswered.pop_front() {
            if sent.sequence < answer.sequence {
                // Answers come in order; an earlier one missing was lost.
                continue;
            }
            if sent.sequence > answer.sequence {
                reporting.unanswered.push_front(sent);
                return;
            }
            let receipt = if answer.accepted && answer.left_out > 0 {
                if sent.ask.is_none() {
                    warn!(reason = %answer.reason, "the controller left rows of a report out");
                }
                ReportReceipt::Partial {
                    left_out: answer.left_out,
                    reason: answer.reason.clone(),
                }
            } else if answer.accepted {
                ReportReceipt::Accepted
            } else {
                // Whoever asked for the report is told; a report of the
                // background interval is logged.
                if sent.ask.is_none() {
                    warn!(reason = %answer.reason, "the controller refused a report");
                }
                if answer.retry_after_seconds > 0 {
                    reporting.carry.merge(sent.rows);
                    ReportReceipt::TooSoon {
                        retry_after: Duration::from_secs(answer.retry_after_seconds.into()),
                        reason: answer.reason.clone(),
                    }
                } else {
                    ReportReceipt::Refused(answer.reason.clone())
                }
            };
            if let Some(ask) = sent.ask {
                let _ = ask.send(receipt);
            }
            return;
        }
    }

    /// Records whether the client is behind what the controller holds (a
    /// newer revision, or another store history); returns it. A `confirmed`
    /// observation (a verified, newer heartbeat) when it is not behind makes
    /// the policy current, and saves the confirmation now and then.
    fn observe(&mut self, heard: &Heard, confirmed: bool) -> bool {
        // Taken before the moment is recorded, so the saved confirmation is
        // never newer than the one this process goes by.
        let now = Timestamp::now();
        let applied = self.shared.current.load();
        let behind = match applied.as_deref() {
            None => true,
            Some(applied) => {
                heard.epoch.as_ref().is_some_and(|e| *e != applied.epoch)
                    || heard.revision > applied.revision
            }
        };
        if !confirmed {
            self.shared.freshness.note_behind(behind);
            return behind;
        }
        self.shared.freshness.observe(behind);
        if behind {
            return behind;
        }
        if let (Some(keep), Some((kept, saved))) = (&self.keep, &mut self.kept)
            && saved.is_none_or(|at| at.elapsed() >= CONFIRM_EVERY)
        {
            keep.send_replace(Some(Arc::new(kept.file(now))));
            *saved = Some(Instant::now());
        }
        behind
    }

    /// Checks and applies one snapshot, whose signature was verified.
    fn receive(&mut self, wire: proto::Snapshot) -> Result<(), Refusal> {
        let revision = wire.revision;
        let start_over_from = wire.start_over_from;
        let kept = self.keep.as_ref().map(|_| lkg::Kept::of(&wire));
        let snapshot = PolicySnapshot::from_wire(wire, &self.config.namespace, self.config.channel)
            .map_err(|e| Refusal::Unusable(e.to_string()))?;
        if let Some(check) = &self.config.check {
            check(&snapshot).map_err(|reason| {
                Refusal::Unusable(format!("this channel cannot enforce it: {reason}"))
            })?;
        }
        let current = self.shared.current.load_full();
        match current {
            // Another history issued no later than the policy held: a
            // replayed capture, or a store older than the one it replaces.
            // Never a way back to a softer policy.
            Some(current)
                if current.epoch != snapshot.epoch && snapshot.issued_at <= current.issued_at =>
            {
                return Err(Refusal::Older(format!(
                    "it is from another store history (epoch {}) and was issued at {}, not after the applied policy ({}); a replaced store's controller issues newer ones",
                    snapshot.epoch, snapshot.issued_at, current.issued_at
                )));
            }
            // The store was replaced: a new history, whatever its revision.
            Some(current) if current.epoch != snapshot.epoch => {
                info!(
                    revision,
                    "the controller's store has a new history; starting over"
                );
            }
            // The controller never issued the revision this client holds
            // (it came from a rogue, or the store was restored from an
            // older backup) and says so, for exactly that revision.
            Some(current) if start_over_from != 0 && start_over_from == current.revision => {
                warn!(
                    revision,
                    held = current.revision,
                    "the controller never issued the revision held; starting over from its current one"
                );
            }
            Some(current) if revision < current.revision => {
                return Err(Refusal::Older(format!(
                    "revision {revision} is older than the applied revision {}",
                    current.revision
                )));
            }
            // The revision it already has (a new stream starts with the
            // current snapshot): acknowledge, change nothing.
            Some(current) if revision == current.revision => {
                // Kept from here on (a restart began from the file), so
                // that its confirmations are saved as they come.
                if self.kept.is_none() {
                    self.kept = kept.map(|kept| (kept, None));
                }
                return Ok(());
            }
            _ => {}
        }
        debug!(revision, "snapshot applied");
        self.shared.counts.applied();
        let mut snapshot = snapshot;
        snapshot.tally = Some(self.shared.new_tally(snapshot.revision));
        if let Some(replaced) = self.shared.current.load_full()
            && let Some(tally) = &replaced.tally
        {
            self.reporting.retire(replaced.revision, tally.clone());
        }
        let snapshot = Arc::new(snapshot);
        self.shared.current.store(Some(snapshot.clone()));
        self.changes.send_replace(Some(snapshot));
        if let (Some(keep), Some(kept)) = (&self.keep, kept) {
            keep.send_replace(Some(Arc::new(kept.file(Timestamp::now()))));
            // Not yet confirmed: the first signed heartbeat for it is saved
            // at once.
            self.kept = Some((kept, None));
        }
        Ok(())
    }
}

/// What the controller of the current stream said it holds.
#[derive(Default)]
struct Heard {
    /// Its store history, once its first snapshot arrived.
    epoch: Option<String>,
    /// Its newest revision.
    revision: Revision,
}

/// How long a client that refuses a replica's snapshot waits for its reject
/// to be delivered before it moves on.
const REJECT_GRACE: Duration = Duration::from_secs(1);

/// How often a confirmation that the kept policy is still current is saved.
const CONFIRM_EVERY: Duration = Duration::from_secs(5);

enum Refusal {
    /// The snapshot cannot be used (schema, rules, or the channel's own
    /// check).
    Unusable(String),
    /// Older than the one applied.
    Older(String),
}

/// Writes each newest encoded snapshot to the last-known-good file, one
/// write at a time, so an older snapshot never overwrites a newer one.
pub(super) async fn keep_last_known_good(
    path: std::path::PathBuf,
    mut newest: watch::Receiver<Option<Arc<Vec<u8>>>>,
) {
    while newest.changed().await.is_ok() {
        let Some(bytes) = newest.borrow_and_update().clone() else {
            continue;
        };
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || lkg::save(&target, &bytes)).await;
        match written {
            Ok(Ok(())) => debug!(path = %path.display(), "last-known-good policy saved"),
            Ok(Err(e)) => warn!(path = %path.display(), error = %error_chain(&e),
                "cannot save the last-known-good policy; a restart without the controller would start with none"),
            Err(e) => warn!(error = %e, "the last-known-good writer failed"),
        }
    }
}

fn reject(revision: Revision, reason: String) -> Outbound {
    Outbound::Reject(proto::Reject { revision, reason })
}

/// The error to report when no endpoint gave a first snapshot: a refusal or
/// rejection says more than "unreachable"; if every endpoint was unreachable,
/// say so for all of them.
pub(crate) fn first_failure(errors: Vec<ClientError>) -> ClientError {
    let unreachable = |e: &ClientError| matches!(e, ClientError::Unreachable { .. });
    if errors.iter().all(unreachable) {
        let servers: Vec<String> = errors
            .iter()
            .filter_map(|e| match e {
                ClientError::Unreachable { server, .. } => Some(server.clone()),
                _ => None,
            })
            .collect();
        let reason = match errors.last() {
            Some(ClientError::Unreachable { reason, .. }) => reason.clone(),
            _ => String::new(),
        };
        return ClientError::Unreachable {
            server: servers.join(", "),
            reason,
        };
    }
    errors
        .into_iter()
        .find(|e| !unreachable(e))
        .expect("some error is not Unreachable")
}

async fn send(out: &mpsc::Sender<SubscribeRequest>, message: Outbound) {
    // The receiver lives as long as the request stream; if it is gone, the
    // session is ending and the next read reports why.
    let _ = out
        .send(SubscribeRequest {
            message: Some(message),
        })
        .await;
}

async fn refused(server: &str, status: tonic::Status) -> ClientError {
    // A refused token, something else at the address, plain text to TLS.
    if let Some(error) = explain(server, &status).await {
        return error;
    }
    // A status with a source was made on this side from a transport failure;
    // one without came from the controller, whose message says what to do.
    if std::error::Error::source(&status).is_some() {
        ClientError::Unreachable {
            server: server.to_string(),
            reason: error_chain(&status),
        }
    } else {
        ClientError::Refused(status.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safemode_policy::SignalName;

    fn rows(signal: &str, n: u64) -> Rows {
        let signals = super::super::reporting::Signals::default();
        signals.add(&SignalName::parse(signal).unwrap(), n);
        let mut rows = Rows::default();
        signals.drain(&mut rows);
        rows
    }

    #[test]
    fn reports_a_broken_stream_never_answered_go_with_the_next() {
        let (_asks, asked) = mpsc::channel(1);
        let mut reporting = Reporting::new(asked);
        reporting.taken = true;
        let (ask, told) = oneshot::channel();
        for (sequence, ask) in [(1, Some(ask)), (2, None), (3, None), (4, None)] {
            reporting.unanswered.push_back(Unanswered {
                sequence,
                rows: rows("login.failed", sequence),
                ask,
            });
        }
        reporting.stream_ended("connection reset");
        // Nothing waits any more, so the next stream reports again; the
        // counts are all kept for it, and whoever asked is told.
        assert!(reporting.unanswered.is_empty());
        assert!(
            !reporting.taken,
            "the next stream says again whether it takes reports"
        );
        let (report, _) = reporting.carry.take_report(5);
        assert_eq!(report.signals.len(), 1);
        assert_eq!(
            (report.signals[0].name.as_str(), report.signals[0].count),
            ("login.failed", 1 + 2 + 3 + 4)
        );
        match told.blocking_recv().unwrap() {
            ReportReceipt::Lost(why) => assert!(why.contains("connection reset"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
