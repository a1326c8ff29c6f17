//! A rogue controller cannot make a client apply anything (issue 10,
//! finding 3): a small tonic server on loopback that speaks the
//! subscription protocol sends unsigned, wrongly signed, other-history and
//! edited snapshots, and forged heartbeats. The client applies none of
//! them, writes none of them to its last-known-good file, keeps deciding by
//! the real policy, and after a restart against the real controller follows
//! it. A subscriber that holds a revision the controller never issued (its
//! store was restored from an older backup) is told to start over and shows
//! in status.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use safemode_client::{Subscriber, SubscriberConfig};
use safemode_grpc::server::{ServeConfig, SigningKeySource, StoreConfig};
use safemode_policy::{Action, Channel, Context, EffectKind, Namespace};
use safemode_signing::SigningKey;
use safemode_wire::proto::subscribe_request::Message as FromClient;
use safemode_wire::proto::subscribe_response::Message as ToClient;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use safemode_wire::proto::subscription_service_server::{
    SubscriptionService, SubscriptionServiceServer,
};
use safemode_wire::proto::{self, SubscribeRequest, SubscribeResponse};
use safemode_wire::signed;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::support::{RawSubscriber, TestServer, test_signing_key, wait_until};

// === the rogue ===

/// What the rogue heard from its clients.
#[derive(Default)]
struct Heard {
    hellos: Vec<proto::Hello>,
    rejects: Vec<proto::Reject>,
    acks: Vec<i64>,
}

/// A subscription server that sends every stream the same messages, then
/// keeps it open.
#[derive(Clone)]
struct Rogue {
    script: Arc<Vec<SubscribeResponse>>,
    heard: Arc<Mutex<Heard>>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriptionService for Rogue {
    type SubscribeStream = Responses;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let mut inbound = request.into_inner();
        let heard = self.heard.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let mut heard = heard.lock().unwrap();
                match message.message {
                    Some(FromClient::Hello(hello)) => heard.hellos.push(hello),
                    Some(FromClient::Reject(reject)) => heard.rejects.push(reject),
                    Some(FromClient::Ack(ack)) => heard.acks.push(ack.revision),
                    // A rogue ignores what channels report.
                    Some(FromClient::Report(_)) | None => {}
                }
            }
        });
        let script: Vec<Result<SubscribeResponse, Status>> =
            self.script.iter().cloned().map(Ok).collect();
        let stream = futures_util::stream::iter(script).chain(futures_util::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A rogue serving on a free loopback port.
struct RogueServer {
    url: String,
    heard: Arc<Mutex<Heard>>,
    task: tokio::task::JoinHandle<()>,
}

impl RogueServer {
    async fn start(script: Vec<SubscribeResponse>) -> RogueServer {
        let heard = Arc::new(Mutex::new(Heard::default()));
        let rogue = Rogue {
            script: Arc::new(script),
            heard: heard.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(SubscriptionServiceServer::new(rogue))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("the rogue serves");
        });
        RogueServer { url, heard, task }
    }

    fn rejects(&self) -> Vec<proto::Reject> {
        self.heard.lock().unwrap().rejects.clone()
    }

    fn hellos(&self) -> usize {
        self.heard.lock().unwrap().hellos.len()
    }

    fn acks(&self) -> Vec<i64> {
        self.heard.lock().unwrap().acks.clone()
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn snapshot(s: proto::Snapshot) -> SubscribeResponse {
    SubscribeResponse {
        message: Some(ToClient::Snapshot(s)),
    }
}

fn heartbeat(h: proto::Heartbeat) -> SubscribeResponse {
    SubscribeResponse {
        message: Some(ToClient::Heartbeat(h)),
    }
}

// === helpers ===

/// The signed snapshot the real controller sends a `channel` subscriber.
async fn real_snapshot(server: &TestServer, channel: &str) -> proto::Snapshot {
    let raw = RawSubscriber::connect(server.channel().await, "live", channel, "spy", 0)
        .await
        .unwrap();
    crate::support::wait_for("the real snapshot", || async { raw.latest() }).await
}

/// The first heartbeat the real controller sends a `channel` subscriber.
async fn real_heartbeat(server: &TestServer, channel: &str) -> proto::Heartbeat {
    let (out, rx) = mpsc::channel(4);
    out.send(SubscribeRequest {
        message: Some(FromClient::Hello(proto::Hello {
            namespace: "live".into(),
            channel: channel.into(),
            subscriber_id: "spy-heartbeat".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = SubscriptionServiceClient::new(server.channel().await)
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let found = tokio::time::timeout(crate::support::DEADLINE, async {
        loop {
            let message = inbound.message().await.unwrap().expect("the stream stays");
            if let Some(ToClient::Heartbeat(beat)) = message.message {
                return beat;
            }
        }
    })
    .await
    .expect("a heartbeat follows the first snapshot");
    drop(out);
    found
}

/// A `web` subscriber of `servers` that trusts `server`'s key and keeps its
/// policy in `lkg`.
fn web(servers: &[&str], server: &TestServer, lkg: &Path) -> SubscriberConfig {
    let mut config = SubscriberConfig::new(
        servers.iter().copied(),
        Namespace::live(),
        Channel::parse("web").unwrap(),
        "web-1",
    );
    config.trusted_keys = Some(server.trusted_keys());
    config.last_known_good = Some(lkg.to_path_buf());
    config.max_backoff = Duration::from_millis(200);
    config
}

/// The header's revision and the policy bytes of a last-known-good file.
fn saved_policy(lkg: &Path) -> (i64, Vec<u8>) {
    let bytes = std::fs::read(lkg).unwrap();
    let mut parts = bytes.splitn(3, |b| *b == b'\n');
    let _format = parts.next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(parts.next().unwrap()).unwrap();
    (
        header["revision"].as_i64().unwrap(),
        parts.next().unwrap().to_vec(),
    )
}

fn reset() -> Action {
    Action::parse("account.password_reset").unwrap()
}

/// A subscriber that is current at `revision` by the real controller.
async fn until_current(subscriber: &Subscriber, revision: i64) {
    wait_until(
        &format!("the subscriber is current at {revision}"),
        || async {
            subscriber.current().map(|s| s.revision) == Some(revision) && !subscriber.is_stale()
        },
    )
    .await;
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_controller_cannot_make_a_client_apply_anything() {
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let server = TestServer::start().await;
    let frozen = server.apply(&["freeze-credential-changes"]).await;

    // The service follows the real controller and saves its policy.
    let subscriber = Subscriber::start(web(&[&server.url], &server, &lkg)).unwrap();
    until_current(&subscriber, frozen).await;
    wait_until("the policy is saved", || async { lkg.exists() }).await;
    drop(subscriber);
    let saved = saved_policy(&lkg);
    assert_eq!(saved.0, frozen);

    let real = real_snapshot(&server, "web").await;
    assert_eq!(real.revision, frozen);
    assert!(!real.signature.is_empty(), "the controller signs snapshots");
    // What finding 3 sent: the real epoch, revision 10^15, no rules.
    let pinned = proto::Snapshot {
        schema_version: real.schema_version,
        namespace: "live".into(),
        channel: "web".into(),
        revision: 1_000_000_000_000_000,
        issued_at: real.issued_at,
        activations: Vec::new(),
        rules: Some(proto::ChannelRules::default()),
        epoch: real.epoch.clone(),
        ..Default::default()
    };
    let mut other_key = pinned.clone();
    signed::sign_snapshot(&mut other_key, &SigningKey::generate().0);
    let other_epoch = proto::Snapshot {
        revision: 1,
        epoch: "0123456789abcdef0123456789abcdef".into(),
        ..pinned.clone()
    };
    let mut edited = real.clone();
    edited.activations.clear();
    edited.rules = Some(proto::ChannelRules::default());
    let cases = [
        ("unsigned, real epoch, revision 10^15", pinned, "not signed"),
        (
            "signed by another key",
            other_key,
            "not among the trusted keys",
        ),
        ("from another epoch", other_epoch, "not signed"),
        (
            "the real snapshot with its rules removed",
            edited,
            "does not match its contents",
        ),
    ];
    for (case, forged, why) in cases {
        let rogue = RogueServer::start(vec![snapshot(forged)]).await;
        let subscriber = Subscriber::start(web(&[&rogue.url], &server, &lkg)).unwrap();
        wait_until(&format!("{case}: the client rejects it"), || async {
            !rogue.rejects().is_empty()
        })
        .await;
        let reject = &rogue.rejects()[0];
        assert!(reject.reason.contains(why), "{case}: {}", reject.reason);
        assert!(rogue.acks().is_empty(), "{case}: acked");
        let policy = subscriber.current().expect("the saved policy");
        assert_eq!(policy.revision, frozen, "{case}");
        assert_eq!(policy.epoch, real.epoch, "{case}");
        let reset = reset();
        let decision = subscriber.decide(&reset, &Context::default());
        assert_eq!(
            decision.effect(),
            EffectKind::Deny,
            "{case}: the freeze holds"
        );
        assert_eq!(decision.revision(), Some(frozen), "{case}");
        drop(decision);
        drop(subscriber);
        assert_eq!(
            saved_policy(&lkg),
            saved,
            "{case}: the saved policy changed"
        );
    }

    // Restarted with the rogue among its controllers, the service ends on
    // the real policy: it leaves the rogue for the real one.
    let rogue = RogueServer::start(vec![snapshot(proto::Snapshot {
        revision: 1_000_000_000_000_000,
        epoch: real.epoch.clone(),
        rules: Some(proto::ChannelRules::default()),
        ..real.clone()
    })])
    .await;
    let restarted = Subscriber::start(web(&[&rogue.url, &server.url], &server, &lkg)).unwrap();
    until_current(&restarted, frozen).await;
    assert_eq!(
        restarted.decide(&reset(), &Context::default()).effect(),
        EffectKind::Deny
    );
    let lifted = server.apply(&["incident-notice"]).await;
    until_current(&restarted, lifted).await;
    assert_eq!(
        restarted.current().unwrap().activations.len(),
        2,
        "it follows the real controller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_heartbeat_does_not_make_a_stale_policy_current() {
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let mut server = TestServer::start().await;
    let frozen = server.apply(&["freeze-credential-changes"]).await;
    let subscriber = Subscriber::start(web(&[&server.url], &server, &lkg)).unwrap();
    until_current(&subscriber, frozen).await;
    wait_until("the policy is saved", || async { lkg.exists() }).await;
    drop(subscriber);
    let real = real_snapshot(&server, "web").await;
    let ivr_beat = real_heartbeat(&server, "ivr").await;
    let web_beat = real_heartbeat(&server, "web").await;
    let trusted = server.trusted_keys();
    server.stop().await;

    let now = safemode_wire::timestamp_to_wire(jiff::Timestamp::now());
    let unsigned = proto::Heartbeat {
        revision: frozen,
        server_time: Some(now),
        ..Default::default()
    };
    let other_key = signed::signed_heartbeat(
        "live",
        "web",
        &real.epoch,
        frozen,
        now,
        &SigningKey::generate().0,
    );
    // Signed by the real key, for another channel, at the same revision:
    // replayed to `web`.
    assert_eq!(ivr_beat.revision, frozen);
    let ivr_for_web = ivr_beat.clone();
    assert!(
        signed::verify_heartbeat(&ivr_beat, "live", "ivr", &real.epoch, &trusted).is_ok(),
        "a real heartbeat"
    );
    for (case, forged) in [
        ("unsigned", unsigned),
        ("signed by another key", other_key),
        ("another channel's, replayed", ivr_for_web),
    ] {
        // The real snapshot, replayed (it verifies), then the heartbeat.
        let rogue = RogueServer::start(vec![snapshot(real.clone()), heartbeat(forged)]).await;
        let subscriber = Subscriber::start(web(&[&rogue.url], &server, &lkg)).unwrap();
        // The client leaves a replica whose heartbeat does not verify and
        // comes back: three streams, three forged heartbeats.
        wait_until(&format!("{case}: the client came back twice"), || async {
            rogue.hellos() >= 3
        })
        .await;
        assert!(
            subscriber.is_stale(),
            "{case}: a forged heartbeat made it current"
        );
        let reset = reset();
        let decision = subscriber.decide(&reset, &Context::default());
        assert!(decision.is_stale(), "{case}");
        assert_eq!(decision.revision(), Some(frozen), "{case}");
        assert_eq!(decision.effect(), EffectKind::Deny, "{case}");
    }

    // The real heartbeat of this very channel, replayed once it is older
    // than the client's staleness limit, says nothing about now.
    let limit = Duration::from_millis(200);
    let sent_at =
        safemode_wire::timestamp_from_wire(web_beat.server_time.as_ref().unwrap()).unwrap();
    wait_until("the captured heartbeat is older than the limit", || async {
        jiff::Timestamp::now().duration_since(sent_at) > jiff::SignedDuration::from_millis(300)
    })
    .await;
    let rogue = RogueServer::start(vec![snapshot(real.clone()), heartbeat(web_beat)]).await;
    let mut config = web(&[&rogue.url], &server, &lkg);
    config.stale_after = limit;
    // `connect` returns once a heartbeat confirmed the policy; none does.
    let refused = Subscriber::connect(config).await.err();
    assert!(
        refused.is_some(),
        "an old heartbeat confirmed the policy as current"
    );
    assert!(rogue.hellos() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_holding_a_revision_never_issued_starts_over_and_shows_in_status() {
    let data = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let start = |listen: std::net::SocketAddr| {
        TestServer::start_with(ServeConfig {
            listen,
            signing_key: SigningKeySource::Key(test_signing_key()),
            store: StoreConfig::Embedded {
                data_dir: data.path().to_path_buf(),
            },
            heartbeat: Duration::from_millis(100),
            ..ServeConfig::default()
        })
    };
    let mut server = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr();
    let noticed = server.apply(&["incident-notice"]).await;
    // A backup of the store at `noticed`.
    server.stop().await;
    copy_dir(data.path(), backup.path());
    let mut server = start(addr).await;
    for mode in [
        "freeze-credential-changes",
        "throttle-high-risk",
        "bots-faq-only",
    ] {
        server.apply(&[mode]).await;
    }
    let newest = server.apply(&["step-up-account-changes"]).await;
    let subscriber = Subscriber::start(web(&[&server.url], &server, &lkg)).unwrap();
    until_current(&subscriber, newest).await;

    // The store is restored from the backup: the same history (epoch), at
    // a revision below the one the subscriber holds, which this controller
    // will never issue again with these contents.
    server.stop().await;
    std::fs::remove_dir_all(data.path()).unwrap();
    copy_dir(backup.path(), data.path());
    let restored = start(addr).await;
    let current = restored.status("live").await.revision;
    assert!(
        current < newest,
        "the restored store ({current}) is behind the subscriber ({newest})"
    );
    assert!(current >= noticed);

    // Told to start over, the subscriber ends on the real revision.
    until_current(&subscriber, current).await;
    let policy = subscriber.current().unwrap();
    assert_eq!(
        policy.activations.len(),
        1,
        "only the backup's incident notice"
    );
    assert_eq!(policy.activations[0].mode, "incident-notice");
    assert_eq!(
        subscriber.decide(&reset(), &Context::default()).effect(),
        EffectKind::Allow,
        "the freeze it held was never issued by this store"
    );
    let status = restored.status("live").await;
    let problem = status
        .problems
        .iter()
        .find(|p| p.contains("web-1"))
        .unwrap_or_else(|| panic!("no problem names the subscriber: {:?}", status.problems));
    assert!(problem.contains(&newest.to_string()), "{problem}");
    assert!(problem.contains("never issued"), "{problem}");
    let shown = crate::support::safemode(&["--server", &restored.url, "status"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("web-1") && text.contains("never issued"),
        "{text}"
    );

    // And it follows the restored controller from there.
    let frozen = restored.apply(&["freeze-credential-changes"]).await;
    until_current(&subscriber, frozen).await;
}

/// Copies the files of directory `from` into `to` (created if missing).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_needs_the_controllers_key_and_safemode_key_public_prints_it() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(data.path()).await;

    // The library refuses to start without keys, and says where they are.
    let keyless = SubscriberConfig::new(
        [server.url.as_str()],
        Namespace::live(),
        Channel::parse("web").unwrap(),
        "web-keyless",
    );
    let error = Subscriber::start(keyless)
        .err()
        .expect("refused")
        .to_string();
    for part in [
        "SubscriberConfig::trusted_keys",
        "signing.pub",
        "safemode key public",
    ] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }

    // `safemode key public` prints what the controller wrote to signing.pub.
    let dir = data.path().display().to_string();
    let printed = crate::support::safemode(&["key", "public", "--data-dir", &dir]).await;
    assert_eq!(printed.status.code(), Some(0), "{printed:?}");
    let pem = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(
        pem,
        std::fs::read_to_string(data.path().join("signing.pub")).unwrap()
    );
    let key = data.path().join("signing.key").display().to_string();
    let by_file = crate::support::safemode(&["key", "public", "--signing-key", &key]).await;
    assert_eq!(String::from_utf8(by_file.stdout).unwrap(), pem);

    // A command that subscribes, with no key given and no
    // safemode-data/signing.pub where it runs, says what to pass.
    let elsewhere = tempfile::tempdir().unwrap();
    let url = server.url.clone();
    let refused = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
            .args(["--server", &url, "watch", "--channel", "web"])
            .current_dir(elsewhere.path())
            .env_remove("SAFEMODE_TRUSTED_KEYS")
            .env_remove("SAFEMODE_SERVER")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--trusted-keys FILE") && stderr.contains("safemode key public"),
        "{stderr}"
    );

    // Given the key, it decides by the controller's policy.
    let keys = data.path().join("signing.pub").display().to_string();
    let decided = crate::support::safemode(&[
        "--server",
        &server.url,
        "decide",
        "--channel",
        "web",
        "--action",
        "account.password_reset",
        "--trusted-keys",
        &keys,
    ])
    .await;
    assert_eq!(
        decided.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&decided.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_snapshot_of_an_older_history_is_never_a_way_back() {
    // Two stores whose controllers sign with the same key (a rebuilt store,
    // a staging copy): a snapshot captured from the older one is genuine.
    let (older_dir, newer_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_key = |dir: &Path| ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreConfig::Embedded {
            data_dir: dir.to_path_buf(),
        },
        signing_key: SigningKeySource::Key(test_signing_key()),
        ..ServeConfig::default()
    };
    let older = TestServer::start_with(with_key(older_dir.path())).await;
    older.apply(&["incident-notice"]).await;
    let captured = real_snapshot(&older, "web").await;
    drop(older);
    // The policy in force now, from the newer history, freezes resets.
    let mut newer = TestServer::start_with(with_key(newer_dir.path())).await;
    let frozen = newer.apply(&["freeze-credential-changes"]).await;
    let rogue = RogueServer::start(vec![snapshot(captured)]).await;
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let current = Subscriber::start(web(&[&newer.url], &newer, &lkg)).unwrap();
    until_current(&current, frozen).await;
    drop(current);
    // The service restarts while the real controller is away; the replay
    // is all that answers.
    newer.stop().await;
    let subscriber = Subscriber::start(web(&[&rogue.url], &newer, &lkg)).unwrap();
    wait_until("the replay is refused", || async {
        rogue
            .rejects()
            .iter()
            .any(|r| r.reason.contains("another store history"))
    })
    .await;
    let reset = reset();
    let decision = subscriber.decide(&reset, &Context::default());
    assert_eq!(decision.effect(), EffectKind::Deny, "the freeze holds");
    assert_eq!(subscriber.current().unwrap().revision, frozen);
    assert_eq!(saved_policy(&lkg).0, frozen, "nothing older was saved");
}
