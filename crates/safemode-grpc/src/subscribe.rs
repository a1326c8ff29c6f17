//! `safemode.v1.SubscriptionService`: one bidirectional stream per subscriber.
//!
//! The client says hello; the server sends the current snapshot at once,
//! every newer one, and heartbeats; the client acks or rejects each snapshot.
//! The server side of a stream is one [`Stream`], polled by hand over the
//! namespace watch, the client's messages, the heartbeat timer, revocation
//! and shutdown, each a wait made once for the stream's life, so a stream
//! costs no task of its own and a flip that wakes every stream makes no
//! wait anew.
//!
//! Everything sent is signed with the replica's key: snapshots once per
//! revision and channel ([`SnapshotCache`]), heartbeats once per channel and
//! revision per tick ([`HeartbeatCache`]). A signed heartbeat follows every
//! snapshot at once (while the follower keeps up), because clients count
//! only a signed, newer heartbeat as proof that their policy is current: a
//! snapshot can be replayed, a heartbeat's time cannot be moved.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker, ready};

use futures_util::Stream;
use jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, ReusableBoxFuture, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::fanout::subscription_service_server::SubscriptionService;
use super::limits::{StreamCounter, StreamSlot};
use super::outbound::{HeartbeatCache, Outbound, SnapshotCache};
use super::reports::{self, Pace, ReportPace, Turn};
use super::telemetry::{Committed, StreamLabels, StreamMetrics};
use super::{Credential, StreamConfig, authorize, invalid, invalid_name, principal, status};
use safemode_controller::auth::Operation;
use safemode_controller::reports::{Refusal, Sender};
use safemode_controller::{Controller, NamespaceView, Subscription};
use safemode_policy::{Channel, Namespace, Revision};
use safemode_signing::SigningKey;
use safemode_wire::proto::subscribe_request::Message as Inbound;
use safemode_wire::{self as wire, proto};

/// The subscription service.
pub struct SubscriptionApi {
    controller: Arc<Controller>,
    config: StreamConfig,
    /// Snapshots encoded once per revision and channel, for every stream.
    snapshots: Arc<SnapshotCache>,
    /// Open streams, against the configured limits.
    streams: Arc<StreamCounter>,
    /// Heartbeats signed once per channel and revision per tick.
    heartbeats: Arc<HeartbeatCache>,
    /// The pace of reports over every stream.
    report_pace: Arc<ReportPace>,
    /// The controller's shutdown as streams wait for it.
    shutdown: Shutdown,
}

impl SubscriptionApi {
    /// The service over `controller`. In a Tokio runtime: it starts the
    /// task that follows the controller's shutdown for the streams.
    pub fn new(controller: Arc<Controller>, config: StreamConfig) -> Self {
        SubscriptionApi {
            shutdown: Shutdown::follow(controller.shutdown_token()),
            heartbeats: Arc::new(HeartbeatCache::new(config.heartbeat)),
            controller,
            streams: StreamCounter::new(config.limits),
            report_pace: Arc::default(),
            config,
            snapshots: Arc::default(),
        }
    }
}

/// The controller's shutdown as a stream waits for it. A cancellation
/// token's own wait reads the token under its lock on every poll, and a
/// stream polls its wait whenever it is woken: a flip that wakes ten
/// thousand streams would take that one lock ten thousand times over, from
/// every core. Here a task of its own waits for the token, raises `down`
/// and only then cancels `wake`, the token streams register with; a stream
/// reads `down` (an atomic) and polls its registration again only when a
/// different task polls it ([`ShutdownWait`]).
#[derive(Clone)]
struct Shutdown {
    /// The token followed.
    followed: CancellationToken,
    down: Arc<AtomicBool>,
    wake: CancellationToken,
}

impl Shutdown {
    /// Follows `token`; in a Tokio runtime.
    fn follow(token: &CancellationToken) -> Self {
        let shutdown = Shutdown {
            followed: token.clone(),
            down: Arc::new(AtomicBool::new(false)),
            wake: CancellationToken::new(),
        };
        let (token, follower) = (token.clone(), shutdown.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            follower.down.store(true, Ordering::Release);
            follower.wake.cancel();
        });
        shutdown
    }

    /// A stream's wait.
    fn wait(&self) -> ShutdownWait {
        ShutdownWait {
            registration: Box::pin(self.wake.clone().cancelled_owned()),
            registered: None,
            shutdown: self.clone(),
        }
    }
}

/// One stream's wait for [`Shutdown`].
struct ShutdownWait {
    shutdown: Shutdown,
    /// Wakes the stream's task at shutdown, `down` already raised.
    registration: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `registration` was last polled with.
    registered: Option<Waker>,
}

impl ShutdownWait {
    /// Whether the controller is shutting down; if not, `cx` is woken when
    /// it does.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if self.shutdown.down.load(Ordering::Acquire) {
            return true;
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return false;
        }
        if self.registration.as_mut().poll(cx).is_ready() {
            return true;
        }
        self.registered = Some(cx.waker().clone());
        false
    }

    /// Whether the controller is shutting down, asked of the token itself
    /// (under its lock): for a stream about to end for another reason that
    /// shutdown may have caused before `down` was raised, such as its
    /// namespace's follower stopping.
    fn is_down(&self) -> bool {
        self.shutdown.down.load(Ordering::Acquire) || self.shutdown.followed.is_cancelled()
    }
}

/// The most client messages a stream takes before it lets its worker run
/// other tasks (it returns `Pending` and is polled again after them),
/// counted since it last returned `Pending`, across the items it sends
/// meanwhile (a report's answer): a client that queues acks by the
/// thousand, reports among them or not, delays its own stream, not the
/// others.
const MESSAGES_PER_POLL: usize = 32;

/// The longest reject reason kept, in bytes (longer ones are cut at a
/// character boundary): status pages hold up to thousands of subscribers,
/// each with its reason, and must stay far below 4 MiB.
const MAX_REASON_BYTES: usize = 256;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<Outbound, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriptionService for SubscriptionApi {
    type SubscribeStream = ResponseStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<proto::SubscribeRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let credential = request.extensions().get::<Credential>().cloned();
        let mut actor = principal(&request)?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        // A stream holds a place from the start (its hello may take a
        // while): one token, one connection, or everyone together can hold
        // only so many.
        let token: Arc<str> = credential
            .as_ref()
            .map_or(actor.name.as_str(), |c| c.sha256.as_str())
            .into();
        let slot = self.streams.admit(&token, &peer)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.config.hello_timeout, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no hello within {:?}; send a Hello first",
                    self.config.hello_timeout
                )));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before the hello")),
            Ok(Ok(Some(proto::SubscribeRequest {
                message: Some(Inbound::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => return Err(invalid("message", "the first message must be a Hello")),
        };
        let namespace =
            Namespace::parse(&hello.namespace).map_err(invalid_name("hello.namespace"))?;
        let channel = Channel::parse(&hello.channel).map_err(invalid_name("hello.channel"))?;
        let id = hello.subscriber_id.trim();
        wire::check_subscriber_id(id).map_err(|e| invalid("hello.subscriber_id", e))?;
        if hello.last_applied_revision < 0 {
            return Err(invalid("hello.last_applied_revision", "must be 0 or more"));
        }
        // The token may have been revoked while the hello was awaited.
        if let Some(credential) = &credential {
            actor = credential.current()?;
        }
        let what = format!("subscribe to {channel}");
        authorize(
            &self.controller,
            &actor,
            Operation::Subscribe,
            Some(&namespace),
            &what,
        )
        .await?;
        // Only whoever may change a namespace makes this replica follow
        // it at will; a subscriber-only token can never squat the bound.
        let may_change = actor.may(Operation::Change, Some(&namespace)).is_ok();
        // A viewer may watch the policy, but only channel services report
        // (their counts feed insights and proposals); asked again on each
        // report while tokens can change.
        let report_denied = actor
            .may(Operation::Report, Some(&namespace))
            .err()
            .map(|denied| denied.to_string());
        let id: Arc<str> = id.into();
        self.controller
            .check_follow(&namespace, may_change)
            .await
            .map_err(status)?;
        let subscription = self
            .controller
            .subscribe(
                &namespace,
                channel,
                id.to_string(),
                peer,
                hello.last_applied_revision,
                &hello.epoch,
            )
            .await
            .map_err(status)?;
        debug!(%namespace, %channel, subscriber = &*id, "subscriber connected");
        let reached = subscription.views.borrow().revision;
        let session = Session::new(
            subscription,
            inbound,
            &self.config,
            self.shutdown.wait(),
            Signer {
                namespace: namespace.clone(),
                epoch: self.controller.epoch().to_string(),
                key: self.controller.signing_key().clone(),
                snapshots: self.snapshots.clone(),
                heartbeats: self.heartbeats.clone(),
            },
        )
        .revoked_with(credential, namespace.clone())
        .holding(slot)
        .reporting(Reporting {
            // A revision the hello claims beyond what the namespace reached was
            // never sent: reports may not name it.
            pace: Pace::new(hello.last_applied_revision.min(reached)),
            turns: self.report_pace.clone(),
            streams: self.streams.clone(),
            controller: self.controller.clone(),
            turn: Turn {
                token: token.clone(),
                namespace: namespace.clone(),
                channel,
                subscriber: id.clone(),
            },
            sender: Sender {
                token,
                principal: actor.name.as_str().into(),
                channel,
                subscriber: id,
            },
            denied: report_denied,
            asked: None,
            refusals: Refusals::default(),
        });
        let mut response = Response::new(Box::pin(session) as ResponseStream);
        response.metadata_mut().insert(
            wire::REPORTS_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        Ok(response)
    }
}

/// What a stream signs with, and the caches that share the signatures.
struct Signer {
    namespace: Namespace,
    /// The store epoch snapshots are sent in.
    epoch: String,
    key: SigningKey,
    snapshots: Arc<SnapshotCache>,
    heartbeats: Arc<HeartbeatCache>,
}

/// Where a stream's reports go.
struct Reporting {
    /// The revisions its reports may name.
    pace: Pace,
    /// The replica's pace, and the streams each token holds.
    turns: Arc<ReportPace>,
    streams: Arc<StreamCounter>,
    controller: Arc<Controller>,
    turn: Turn,
    sender: Sender,
    /// Why the stream's principal may not report, if it may not (as of
    /// the hello; asked again on each report while tokens can change).
    denied: Option<String>,
    /// When the stream first asked for a turn (whether it got one or not):
    /// its reports are its own turns, not first reports, and its next turn
    /// is a gap after that at the soonest.
    asked: Option<Instant>,
    /// Refusals not yet counted in the book.
    refusals: Refusals,
}

/// A stream's refused reports, counted in the book at most once per gap
/// (a sender of refused reports cannot make the book's lock its own), and
/// when the stream ends.
#[derive(Debug, Default)]
struct Refusals {
    pending: [u64; Refusal::ALL.len()],
    counted_at: Option<Instant>,
}

impl Reporting {
    /// Counts a refusal for `why`; into the book now if none was counted
    /// within the last gap.
    fn refused(&mut self, why: Refusal, now: Instant) {
        let at = Refusal::ALL.iter().position(|r| *r == why).expect("a kind");
        self.refusals.pending[at] += 1;
        self.count_refusals_due(now);
    }

    /// Counts the refusals waiting in the book, if any wait and none were
    /// counted within the last gap (called on each refusal and on each
    /// heartbeat tick, so none waits much longer than a gap).
    fn count_refusals_due(&mut self, now: Instant) {
        let waiting = self.refusals.pending.iter().any(|n| *n > 0);
        let due = self
            .refusals
            .counted_at
            .is_none_or(|at| now.saturating_duration_since(at) >= reports::MIN_REPORT_GAP);
        if waiting && due {
            self.refusals.counted_at = Some(now);
            self.count_refusals();
        }
    }

    fn count_refusals(&mut self) {
        let book = self.controller.reports();
        for (why, n) in Refusal::ALL.iter().zip(&mut self.refusals.pending) {
            if *n > 0 {
                book.refused(
                    &self.turn.namespace,
                    &self.sender,
                    *why,
                    std::mem::take(n),
                    Timestamp::now(),
                );
            }
        }
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        self.count_refusals();
    }
}

/// The server side of one stream.
struct Session {
    subscription: Subscription,
    inbound: Streaming<proto::SubscribeRequest>,
    heartbeat: Interval,
    /// The wait for shutdown; made once, so that a wake-up of ten thousand
    /// streams neither re-registers each with the token all of them share
    /// nor takes its lock.
    shutdown: ShutdownWait,
    signer: Signer,
    /// Newest revision sent; `None` until the first snapshot.
    sent: Option<Revision>,
    /// A heartbeat is due at once (a snapshot was just sent).
    beat_now: bool,
    /// The stream ends after the next item.
    ending: bool,
    /// Client messages taken since the stream last returned `Pending`.
    taken: usize,
    /// The caller's token and namespace, for its reports' roles (`None`: a
    /// server without tokens).
    credential: Option<(Credential, Namespace)>,
    /// Resolves when that token is revoked: the stream then ends.
    revoked: Option<Pin<Box<dyn Future<Output = Status> + Send>>>,
    /// Resolves when the namespace has a newer view.
    view_changed: ReusableBoxFuture<'static, ViewChanged>,
    /// The stream's place under the stream limits, freed when it ends.
    slot: Option<StreamSlot>,
    /// What the stream counts, and its labels.
    metrics: StreamMetrics,
    labels: StreamLabels,
    /// When the newest revision sent was committed, to time its ack.
    committed: Option<Committed>,
    /// When the stream opened.
    connected_at: Timestamp,
    /// Where its reports go, and their pace.
    reporting: Option<Reporting>,
    /// An answer to a report, sent next.
    answer: Option<proto::ReportAnswer>,
}

impl Session {
    fn new(
        subscription: Subscription,
        inbound: Streaming<proto::SubscribeRequest>,
        config: &StreamConfig,
        shutdown: ShutdownWait,
        signer: Signer,
    ) -> Self {
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let labels = StreamMetrics::labels(&signer.namespace, subscription.channel);
        // The first snapshot reads the newest view anyway: only newer ones
        // wake the stream.
        let mut views = subscription.views.clone();
        views.mark_unchanged();
        let view_changed = ReusableBoxFuture::new(view_changed(views));
        Session {
            metrics: config.metrics.clone(),
            labels,
            committed: None,
            connected_at: Timestamp::now(),
            subscription,
            inbound,
            heartbeat,
            shutdown,
            signer,
            sent: None,
            beat_now: false,
            ending: false,
            taken: 0,
            credential: None,
            revoked: None,
            view_changed,
            slot: None,
            reporting: None,
            answer: None,
        }
    }

    /// Takes reports into `reporting`'s book.
    fn reporting(mut self, reporting: Reporting) -> Self {
        self.reporting = Some(reporting);
        self
    }

    /// Ends the stream once `credential`'s token is revoked or may no
    /// longer subscribe to `namespace`.
    fn revoked_with(mut self, credential: Option<Credential>, namespace: Namespace) -> Self {
        self.revoked = credential
            .clone()
            .map(|credential| revoked(credential, namespace.clone()));
        self.credential = credential.map(|c| (c, namespace));
        self
    }

    /// Keeps `slot` for as long as the stream lives.
    fn holding(mut self, slot: StreamSlot) -> Self {
        self.slot = Some(slot);
        self
    }

    /// The next message to send, `None` ending the stream quietly. Polled
    /// by hand rather than by an `async` loop over `select!`: a flip wakes
    /// every stream, and each poll would otherwise make its waits anew
    /// (registering with the namespace's watch and the tokens' again, and
    /// taking them off when another wait won) and move the whole session
    /// in and out of the loop's future. Here every wait lives as long as
    /// the stream and is only polled. The order is the same as it was:
    /// shutdown, then revocation, then a newer view, then the client's
    /// messages, then the heartbeat.
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Outbound, Status>>> {
        if self.sent.is_none() {
            return Poll::Ready(Some(Ok(self.snapshot())));
        }
        if std::mem::take(&mut self.beat_now)
            && let Some(beat) = self.beat()
        {
            return Poll::Ready(Some(Ok(beat)));
        }
        if let Some(answer) = self.answer.take() {
            return Poll::Ready(Some(Ok(report_answer(answer))));
        }
        loop {
            if self.shutdown.poll(cx) {
                return Poll::Ready(Some(Err(shutting_down())));
            }
            // Before a view or a heartbeat: a token found revoked gets
            // nothing more.
            if let Some(revoked) = &mut self.revoked
                && let Poll::Ready(status) = revoked.as_mut().poll(cx)
            {
                return Poll::Ready(Some(Err(status)));
            }
            if let Poll::Ready((views, changed)) = self.view_changed.poll(cx) {
                if changed.is_err() {
                    // The follower stops at shutdown too.
                    return Poll::Ready(Some(Err(if self.shutdown.is_down() {
                        shutting_down()
                    } else {
                        Status::unavailable("namespace follower stopped; reconnect")
                    })));
                }
                self.view_changed.set(view_changed(views));
                let revision = self.subscription.views.borrow().revision;
                if Some(revision) > self.sent {
                    return Poll::Ready(Some(Ok(self.snapshot())));
                }
                continue;
            }
            if self.taken == MESSAGES_PER_POLL {
                // Polled again after the tasks already queued.
                self.taken = 0;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Poll::Ready(message) = Pin::new(&mut self.inbound).poll_next(cx) {
                self.taken += 1;
                match message {
                    Some(Ok(message)) => {
                        if let Err(status) = self.receive(message) {
                            return Poll::Ready(Some(Err(status)));
                        }
                        if let Some(answer) = self.answer.take() {
                            return Poll::Ready(Some(Ok(report_answer(answer))));
                        }
                    }
                    // The client closed its side, or the connection broke.
                    None | Some(Err(_)) => return Poll::Ready(None),
                }
                continue;
            }
            if self.heartbeat.poll_tick(cx).is_ready() {
                if let Some(reporting) = &mut self.reporting {
                    reporting.count_refusals_due(Instant::now());
                }
                if let Some(beat) = self.beat() {
                    return Poll::Ready(Some(Ok(beat)));
                }
                continue;
            }
            self.taken = 0;
            return Poll::Pending;
        }
    }

    /// A signed heartbeat at the revision this replica holds (a client
    /// behind it knows it is stale). A heartbeat says "your policy is
    /// current": only while the follower keeps up with the store (`None`
    /// otherwise), and never before the first snapshot.
    fn beat(&self) -> Option<Outbound> {
        if !self.subscription.health.is_healthy() {
            return None;
        }
        self.sent?;
        let revision = self.subscription.views.borrow().revision;
        let signer = &self.signer;
        Some(Outbound::Encoded(signer.heartbeats.get(
            &signer.namespace,
            self.subscription.channel,
            revision,
            &signer.epoch,
            &signer.key,
        )))
    }

    /// The snapshot of the newest view for this stream's channel.
    fn snapshot(&mut self) -> Outbound {
        let view = self.subscription.views.borrow_and_update().clone();
        let channel = self.subscription.channel;
        let signer = &self.signer;
        let make = || super::convert::snapshot_to_wire(&view, view.channel(channel), &signer.epoch);
        let encoded = match self.subscription.start_over_from.take() {
            // Signed for this stream alone: it names the revision this
            // subscriber claimed, so it replaces only that.
            Some(claimed) => {
                let mut snapshot = make();
                snapshot.start_over_from = claimed;
                super::outbound::encode_signed(snapshot, &signer.key)
            }
            // Converted, encoded and signed by the first stream of the
            // channel to send this revision; the others share the bytes.
            None => signer.snapshots.get(&view, channel, &signer.key, make),
        };
        self.sent = Some(view.revision);
        self.subscription.registration.sent(view.revision);
        if let Some(reporting) = &mut self.reporting {
            reporting.pace.sent(view.revision);
        }
        self.metrics.sent(&self.labels);
        self.committed = view.last_change.as_ref().map(|change| Committed {
            revision: view.revision,
            at: change.at,
        });
        self.heartbeat.reset();
        self.beat_now = true;
        Outbound::Encoded(encoded)
    }

    fn receive(&mut self, message: proto::SubscribeRequest) -> Result<(), Status> {
        let registration = &self.subscription.registration;
        match message.message {
            Some(Inbound::Ack(ack)) => {
                registration
                    .acked(ack.revision)
                    .map_err(|e| invalid("ack.revision", e))?;
                let converged = self.committed.take().and_then(|c| {
                    let took = c.convergence(ack.revision, self.connected_at, Timestamp::now());
                    // Only the first ack of a revision counts.
                    if took.is_none() {
                        self.committed = Some(c);
                    }
                    took
                });
                self.metrics.acked(&self.labels, converged);
                Ok(())
            }
            Some(Inbound::Reject(reject)) => {
                // Shown in status on a terminal: no control characters.
                let mut reason: String = reject
                    .reason
                    .trim()
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .scan(0, |bytes, c| {
                        *bytes += c.len_utf8();
                        (*bytes <= MAX_REASON_BYTES).then_some(c)
                    })
                    .collect();
                if reason.is_empty() {
                    reason = "no reason given".to_string();
                }
                warn!(revision = reject.revision, %reason, "subscriber rejected a snapshot");
                registration
                    .rejected(reject.revision, reason)
                    .map_err(|e| invalid("reject.revision", e))?;
                self.metrics.rejected(&self.labels);
                Ok(())
            }
            Some(Inbound::Report(report)) => {
                self.report(&report);
                Ok(())
            }
            Some(Inbound::Hello(_)) => Err(invalid(
                "message",
                "hello was already received on this stream",
            )),
            None => Err(invalid("message", "empty message")),
        }
    }
}

impl Session {
    /// Takes a report into the replica's book, or refuses it; either way
    /// the answer is sent next, and the policy stream goes on.
    fn report(&mut self, report: &proto::Report) {
        let Some(reporting) = &mut self.reporting else {
            return;
        };
        // The token's roles now: one demoted to viewer stops reporting at
        // once (a revoked one ends the stream on its own).
        let denied = match &self.credential {
            Some((credential, namespace)) => match credential.current() {
                Ok(principal) => principal
                    .may(Operation::Report, Some(namespace))
                    .err()
                    .map(|denied| denied.to_string()),
                Err(revoked) => Some(revoked.message().to_string()),
            },
            None => reporting.denied.clone(),
        };
        let now = Instant::now();
        let checked = match denied {
            Some(denied) => Err((
                reports::refused(report, format!("{denied}; this report is dropped")),
                Refusal::NotPermitted,
            )),
            None => {
                let Reporting {
                    pace,
                    turns,
                    streams,
                    turn,
                    asked,
                    ..
                } = &*reporting;
                pace.check(report, self.subscription.channel, || {
                    turns.take(turn, *asked, streams.held(&turn.token), now)
                })
            }
        };
        // Once a stream asked for a turn, its next reports are its own
        // turns, a gap after it asked: losing the race for its token's first
        // reports once does not make it lose them for ever, and asking again
        // at once does not skip them.
        if matches!(&checked, Ok(_) | Err((_, Refusal::TooSoon))) {
            reporting.asked.get_or_insert(now);
        }
        let answer = match checked {
            Ok(rows) => {
                let current = self.subscription.views.borrow().revision;
                let recorded = reporting.controller.reports().record(
                    &self.signer.namespace,
                    &reporting.sender,
                    current,
                    &rows,
                    Timestamp::now(),
                );
                reports::accepted(report, recorded)
            }
            Err((refusal, why)) => {
                debug!(reason = %refusal.reason, "report refused");
                reporting.refused(why, now);
                refusal
            }
        };
        self.answer = Some(answer);
    }
}

impl Stream for Session {
    type Item = Result<Outbound, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let session = self.get_mut();
        if session.ending {
            return Poll::Ready(None);
        }
        let item = ready!(session.poll_item(cx));
        session.ending = !matches!(item, Some(Ok(_)));
        Poll::Ready(item)
    }
}

/// The wait for a newer namespace view, on a receiver of its own (the
/// session's marks what it sent); it hands the receiver back to wait again.
type ViewChanged = (
    watch::Receiver<Arc<NamespaceView>>,
    Result<(), watch::error::RecvError>,
);

async fn view_changed(mut views: watch::Receiver<Arc<NamespaceView>>) -> ViewChanged {
    let changed = views.changed().await;
    (views, changed)
}

/// Resolves once `credential`'s token is revoked or may no longer subscribe
/// to `namespace`.
fn revoked(
    mut credential: Credential,
    namespace: Namespace,
) -> Pin<Box<dyn Future<Output = Status> + Send>> {
    Box::pin(async move { credential.revoked(Operation::Subscribe, &namespace).await })
}

fn shutting_down() -> Status {
    Status::unavailable("the controller is shutting down; reconnect")
}

fn report_answer(answer: proto::ReportAnswer) -> Outbound {
    Outbound::Message(proto::SubscribeResponse {
        message: Some(proto::subscribe_response::Message::ReportAnswer(answer)),
    })
}

#[cfg(test)]
#[path = "subscribe_tests.rs"]
mod tests;
