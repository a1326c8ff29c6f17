//! A [`Session`] polled by hand, with a waker that counts its wake-ups,
//! over a real controller on the embedded store: what it yields, in
//! which order, and that whatever it waits for wakes it.

use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;
use std::task::Wake;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use safemode_controller::auth::{Principal, Tokens, hash_token};
use safemode_controller::{ApplyRequest, ControllerConfig};
use safemode_policy::catalog::Catalog;
use safemode_policy::{ChannelSet, ModeName, Reason};
use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::codec::Codec as _;

use super::*;

/// The subscriber's token.
const TOKEN: &str = "subscriber-token";

/// A heartbeat period no test reaches.
const NO_HEARTBEAT: Duration = Duration::from_secs(3600);

/// How long a test waits for what another task does.
const DEADLINE: Duration = Duration::from_secs(10);

/// A waker that counts its wake-ups.
#[derive(Default)]
struct WakeCount(AtomicUsize);

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// What one poll of the stream gave.
#[derive(Debug, PartialEq)]
enum Polled {
    Snapshot(Revision),
    Heartbeat(Revision),
    Failed(Code, String),
    Ended,
    Pending,
}

fn failed(status: Status) -> Polled {
    Polled::Failed(status.code(), status.message().to_string())
}

/// How shutdown ends a stream.
fn shutting_down() -> Polled {
    failed(Status::unavailable(
        "the controller is shutting down; reconnect",
    ))
}

/// A tokens file in which `token` alone may subscribe.
fn tokens_file(token: &str) -> Arc<Tokens> {
    let text = format!(
        "- {{principal: alice, roles: [subscriber], sha256: {}}}\n",
        hash_token(token)
    );
    Arc::new(Tokens::parse("tokens.yaml", &text).expect("a tokens file"))
}

/// `message` as the client sends it: a gRPC frame.
fn grpc_frame(message: &proto::SubscribeRequest) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    frame.into()
}

fn ack(revision: Revision) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        message: Some(Inbound::Ack(proto::Ack { revision })),
    }
}

fn reject(revision: Revision, reason: &str) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        message: Some(Inbound::Reject(proto::Reject {
            revision,
            reason: reason.to_string(),
        })),
    }
}

/// A session on `live`, channel `web`, over a controller of its own, with
/// the client's side of the stream, the server's tokens and shutdown.
struct Rig {
    controller: Arc<Controller>,
    /// Holds the store until the rig is dropped.
    _store: tempfile::TempDir,
    tokens: watch::Sender<Arc<Tokens>>,
    /// The client's messages, as gRPC frames; `None` once it closed.
    client: Option<mpsc::Sender<Bytes>>,
    /// The token the session's [`Shutdown`] follows: one of its own, not
    /// the controller's, whose cancellation would also stop the namespace
    /// follower and race it.
    shutdown: CancellationToken,
    session: Session,
    /// The waker every poll is given, and how often it was woken.
    wakes: Arc<WakeCount>,
    waker: Waker,
    /// The modes still to apply, one per flip.
    modes: std::vec::IntoIter<&'static str>,
}

impl Rig {
    async fn new(heartbeat: Duration) -> Rig {
        let store = tempfile::tempdir().unwrap();
        let embedded =
            EmbeddedStore::open(&store.path().join("store.redb"), EmbeddedOptions::default())
                .unwrap();
        let controller = Controller::start(
            Arc::new(embedded),
            Arc::new(Catalog::standard()),
            ControllerConfig::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let live = Namespace::live();
        let subscription = controller
            .subscribe(
                &live,
                Channel::parse("web").unwrap(),
                "subscriber".into(),
                "peer".into(),
                0,
                "",
            )
            .await
            .unwrap();
        let (client, mut frames) = mpsc::channel::<Bytes>(64);
        let body = axum::body::Body::from_stream(futures_util::stream::poll_fn(move |cx| {
            frames
                .poll_recv(cx)
                .map(|frame| frame.map(Ok::<_, Infallible>))
        }));
        let decoder =
            tonic_prost::ProstCodec::<proto::SubscribeResponse, proto::SubscribeRequest>::default()
                .decoder();
        let inbound = Streaming::new_request(decoder, body, None, None);
        let (tokens, tokens_seen) = watch::channel(tokens_file(TOKEN));
        let credential = Credential {
            sha256: hash_token(TOKEN),
            tokens: tokens_seen,
        };
        let config = StreamConfig {
            heartbeat,
            ..StreamConfig::default()
        };
        let shutdown = CancellationToken::new();
        let signer = Signer {
            namespace: live.clone(),
            epoch: controller.epoch().to_string(),
            key: controller.signing_key().clone(),
            snapshots: Arc::default(),
            heartbeats: Arc::new(HeartbeatCache::new(config.heartbeat)),
        };
        let session = Session::new(
            subscription,
            inbound,
            &config,
            Shutdown::follow(&shutdown).wait(),
            signer,
        )
        .revoked_with(Some(credential), live);
        let wakes = Arc::new(WakeCount::default());
        Rig {
            controller,
            _store: store,
            tokens,
            client: Some(client),
            shutdown,
            session,
            waker: Waker::from(wakes.clone()),
            wakes,
            modes: vec![
                "throttle-high-risk",
                "incident-notice",
                "step-up-account-changes",
                "bots-faq-only",
            ]
            .into_iter(),
        }
    }

    /// A rig whose stream sent its first snapshot and heartbeat and
    /// waits; the snapshot's revision.
    async fn settled(heartbeat: Duration) -> (Rig, Revision) {
        let mut rig = Rig::new(heartbeat).await;
        let polled = rig.drain();
        let [Polled::Snapshot(first), Polled::Heartbeat(beat)] = polled[..] else {
            panic!("not a snapshot and its heartbeat: {polled:?}");
        };
        assert_eq!(beat, first);
        (rig, first)
    }

    fn poll(&mut self) -> Polled {
        let mut cx = Context::from_waker(&self.waker);
        match Pin::new(&mut self.session).poll_next(&mut cx) {
            Poll::Pending => Polled::Pending,
            Poll::Ready(None) => Polled::Ended,
            Poll::Ready(Some(Err(status))) => failed(status),
            Poll::Ready(Some(Ok(outbound))) => {
                let response =
                    proto::SubscribeResponse::decode(outbound.encode_to_vec().as_slice()).unwrap();
                match response.message {
                    Some(proto::subscribe_response::Message::Snapshot(snapshot)) => {
                        Polled::Snapshot(snapshot.revision)
                    }
                    Some(proto::subscribe_response::Message::Heartbeat(beat)) => {
                        Polled::Heartbeat(beat.revision)
                    }
                    other => panic!("unexpected: {other:?}"),
                }
            }
        }
    }

    /// Polls until the stream waits or ends (`Ended` included).
    fn drain(&mut self) -> Vec<Polled> {
        let mut polled = Vec::new();
        while polled.len() < 100 {
            match self.poll() {
                Polled::Pending => break,
                Polled::Ended => {
                    polled.push(Polled::Ended);
                    break;
                }
                item => polled.push(item),
            }
        }
        polled
    }

    fn wakes(&self) -> usize {
        self.wakes.0.load(Ordering::SeqCst)
    }

    /// Waits until the stream was woken after `before` wake-ups.
    async fn woken_since(&self, before: usize) {
        tokio::time::timeout(DEADLINE, async {
            while self.wakes() <= before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the stream was not woken");
    }

    /// Applies the next mode and waits until the namespace's view shows
    /// it; its revision.
    async fn flip(&mut self) -> Revision {
        let mode = self.modes.next().expect("a mode left to apply");
        let outcome = self
            .controller
            .apply(ApplyRequest {
                namespace: Namespace::live(),
                modes: vec![ModeName::parse(mode).unwrap()],
                channels: ChannelSet::ALL,
                as_of: None,
                actor: Principal::local(),
                reason: Reason::parse("test").unwrap(),
                change_id: None,
                dry_run: false,
            })
            .await
            .unwrap();
        self.live()
            .await
            .wait_for(DEADLINE, |view| view.revision >= outcome.revision)
            .await
            .unwrap();
        outcome.revision
    }

    /// The namespace's handle.
    async fn live(&self) -> Arc<safemode_controller::NamespaceHandle> {
        self.controller.namespace(&Namespace::live()).await.unwrap()
    }

    /// Queues `message` from the client.
    fn send(&self, message: &proto::SubscribeRequest) {
        let client = self.client.as_ref().expect("the client is open");
        client.try_send(grpc_frame(message)).unwrap();
    }

    /// Reloads the tokens without the subscriber's.
    fn revoke(&self) {
        self.tokens.send_replace(tokens_file("another-token"));
    }

    /// The reason of the subscriber's newest reject, as status shows it.
    async fn newest_reject_reason(&self) -> Option<String> {
        let records = self.live().await.subscribers.list();
        let [record] = &records[..] else {
            panic!("not one subscriber: {records:?}");
        };
        record.rejected.as_ref().map(|r| r.reason.clone())
    }
}

/// Every flip wakes a waiting stream, which then sends the newer
/// snapshot and its heartbeat: the view's wait is re-armed each time.
#[tokio::test]
async fn every_flip_wakes_the_stream_and_it_sends_the_newer_snapshot() {
    let (mut rig, mut last) = Rig::settled(NO_HEARTBEAT).await;
    for _ in 0..3 {
        let before = rig.wakes();
        let revision = rig.flip().await;
        assert!(revision > last);
        rig.woken_since(before).await;
        assert_eq!(
            rig.drain(),
            [Polled::Snapshot(revision), Polled::Heartbeat(revision)]
        );
        last = revision;
    }
}

/// Shutdown, followed through [`Shutdown`], wakes a waiting stream and
/// ends it with "shutting down"; nothing follows.
#[tokio::test]
async fn shutdown_wakes_the_stream_and_ends_it() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    let before = rig.wakes();
    rig.shutdown.cancel();
    rig.woken_since(before).await;
    assert_eq!(rig.poll(), shutting_down());
    assert_eq!(rig.poll(), Polled::Ended);
}

/// Shutdown comes first: before a revocation and a newer view that are
/// both ready too.
#[tokio::test]
async fn shutdown_comes_before_a_revocation_and_a_newer_view() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    let before = rig.wakes();
    rig.shutdown.cancel();
    rig.woken_since(before).await;
    rig.flip().await;
    rig.revoke();
    assert_eq!(rig.poll(), shutting_down());
    assert_eq!(rig.poll(), Polled::Ended);
}

/// A token revoked while a newer view waits to be sent gets no snapshot
/// of it: the stream ends with the revocation.
#[tokio::test]
async fn a_revocation_during_a_flip_ends_the_stream_without_the_snapshot() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    rig.flip().await;
    rig.revoke();
    assert_eq!(rig.poll(), failed(crate::revoked_token()));
    assert_eq!(rig.poll(), Polled::Ended);
    assert_eq!(rig.poll(), Polled::Ended);
}

/// A reload that keeps the token keeps the stream (it is woken and
/// yields nothing), and a later revocation still wakes it.
#[tokio::test]
async fn a_reload_that_keeps_the_token_keeps_the_stream() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    for _ in 0..2 {
        let before = rig.wakes();
        rig.tokens.send_replace(tokens_file(TOKEN));
        rig.woken_since(before).await;
        assert_eq!(rig.drain(), []);
    }
    let before = rig.wakes();
    rig.revoke();
    rig.woken_since(before).await;
    assert_eq!(rig.poll(), failed(crate::revoked_token()));
}

/// A newer view is sent before client messages queued earlier: a
/// message that ends the stream comes after the snapshot and its
/// heartbeat.
#[tokio::test]
async fn a_newer_view_comes_before_queued_client_messages() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    rig.send(&proto::SubscribeRequest { message: None });
    let revision = rig.flip().await;
    assert_eq!(
        rig.drain(),
        [
            Polled::Snapshot(revision),
            Polled::Heartbeat(revision),
            failed(invalid("message", "empty message")),
            Polled::Ended,
        ]
    );
}

/// One poll takes at most [`MESSAGES_PER_POLL`] client messages, then
/// wakes its own task and waits; the next poll takes the rest. The
/// messages are acks, but for rejects at the last place a poll may
/// take, the first it may not, and the last: the newest reject's reason
/// (its place, in status) says how far each poll went.
#[tokio::test]
async fn a_poll_takes_a_bounded_number_of_client_messages_then_wakes_itself() {
    let (mut rig, first) = Rig::settled(NO_HEARTBEAT).await;
    let last = MESSAGES_PER_POLL + 8;
    for place in 1..=last {
        if [MESSAGES_PER_POLL, MESSAGES_PER_POLL + 1, last].contains(&place) {
            rig.send(&reject(first, &place.to_string()));
        } else {
            rig.send(&ack(first));
        }
    }
    let before = rig.wakes();
    assert_eq!(rig.poll(), Polled::Pending);
    assert_eq!(
        rig.wakes(),
        before + 1,
        "the bounded poll did not wake itself"
    );
    assert_eq!(
        rig.newest_reject_reason().await,
        Some(MESSAGES_PER_POLL.to_string())
    );

    assert_eq!(rig.poll(), Polled::Pending);
    assert_eq!(
        rig.wakes(),
        before + 1,
        "a poll within the bound woke itself"
    );
    assert_eq!(rig.newest_reject_reason().await, Some(last.to_string()));
}

/// An error ends the stream: every later poll gives `None`, even with
/// a newer view to send.
#[tokio::test]
async fn an_error_ends_the_stream_and_nothing_follows() {
    let (mut rig, first) = Rig::settled(NO_HEARTBEAT).await;
    rig.send(&ack(first + 1));
    assert!(
        matches!(rig.poll(), Polled::Failed(Code::InvalidArgument, m) if m.starts_with("ack.revision"))
    );
    assert_eq!(rig.poll(), Polled::Ended);
    rig.flip().await;
    assert_eq!(rig.poll(), Polled::Ended);
}

/// A client that closes its side ends the stream quietly.
#[tokio::test]
async fn a_client_that_closes_ends_the_stream_quietly() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    let before = rig.wakes();
    rig.client = None;
    rig.woken_since(before).await;
    assert_eq!(rig.poll(), Polled::Ended);
    assert_eq!(rig.poll(), Polled::Ended);
}

/// A namespace follower that stops (dropping the view's sender) wakes
/// the stream and ends it.
#[tokio::test]
async fn a_stopped_namespace_follower_ends_the_stream() {
    let (mut rig, _) = Rig::settled(NO_HEARTBEAT).await;
    let before = rig.wakes();
    rig.live().await.stop();
    rig.woken_since(before).await;
    assert_eq!(
        rig.poll(),
        failed(Status::unavailable("namespace follower stopped; reconnect"))
    );
    assert_eq!(rig.poll(), Polled::Ended);
}

/// An idle stream is woken for every heartbeat and sends one.
#[tokio::test]
async fn an_idle_stream_is_woken_for_every_heartbeat() {
    let (mut rig, first) = Rig::settled(Duration::from_millis(20)).await;
    for _ in 0..3 {
        let before = rig.wakes();
        rig.woken_since(before).await;
        assert_eq!(rig.drain(), [Polled::Heartbeat(first)]);
    }
}

/// A stream that ends for another reason at shutdown (its namespace's
/// follower stops too) says it is shutting down, even before the follower
/// task has raised `down`: the token itself is asked.
#[tokio::test]
async fn shutdown_is_known_before_the_follower_task_has_run() {
    let token = CancellationToken::new();
    let wait = Shutdown::follow(&token).wait();
    assert!(!wait.is_down());
    token.cancel();
    // Nothing awaited since: on this single-threaded runtime the follower
    // task has not run.
    assert!(!wait.shutdown.down.load(Ordering::Acquire));
    assert!(wait.is_down());
}
