//! The subscriber client as a channel service uses it, against a real
//! controller: the last-known-good policy survives the controller and the
//! service restarting, a damaged, edited or future-dated file is refused
//! (its policy must carry a trusted controller's signature), staleness turns into
//! failing closed for the chosen actions and back, and a snapshot the
//! channel cannot use is rejected, visibly, while the old policy holds.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use safemode_client::{FailClosed, FailClosedEffect, Subscriber, SubscriberConfig};
use safemode_grpc::server::{ServeConfig, SigningKeySource, StoreConfig};
use safemode_policy::{Action, ActionSelector, Channel, Context, EffectKind, Namespace};
use safemode_signing::SigningKey;
use safemode_wire::proto;

use crate::support::{TestServer, safemode, test_signing_key, wait_until};

/// A `web` subscriber of `server` that trusts its key.
fn config(server: &TestServer, id: &str) -> SubscriberConfig {
    let mut config = SubscriberConfig::new(
        [server.url.clone()],
        Namespace::live(),
        Channel::parse("web").unwrap(),
        id,
    );
    config.trusted_keys = Some(server.trusted_keys());
    config
}

fn action(name: &str) -> Action {
    Action::parse(name).unwrap()
}

/// A controller on `addr` and `data_dir` that sends heartbeats every 100 ms,
/// so that a client's staleness limits can be short. Every one signs with
/// the same key, as a deployment's controller keeps its key when its store
/// is replaced.
async fn chatty(addr: std::net::SocketAddr, data_dir: &Path) -> TestServer {
    TestServer::start_with(ServeConfig {
        listen: addr,
        signing_key: SigningKeySource::Key(test_signing_key()),
        store: StoreConfig::Embedded {
            data_dir: data_dir.to_path_buf(),
        },
        heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await
}

/// Waits until `subscriber` has applied `revision` and is not stale.
async fn until_current(subscriber: &Subscriber, revision: i64) {
    wait_until(
        &format!("the subscriber is current at {revision}"),
        || async {
            subscriber.current().map(|s| s.revision) == Some(revision) && !subscriber.is_stale()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_channel_keeps_its_policy_then_fails_closed_then_recovers() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut server = chatty("127.0.0.1:0".parse().unwrap(), data.path()).await;
    let frozen = server.apply(&["freeze-credential-changes"]).await;

    let mut config = config(&server, "web-1");
    config.last_known_good = Some(files.path().join("web.lkg"));
    config.stale_after = Duration::from_secs(1);
    config.max_backoff = Duration::from_millis(200);
    config.fail_closed = Some(FailClosed::new(
        Duration::from_secs(3),
        vec![
            ActionSelector::parse("account.*").unwrap(),
            ActionSelector::parse("payment.payout").unwrap(),
        ],
        FailClosedEffect::Review {
            queue: "held-while-cut-off".into(),
        },
    ));
    let subscriber = Subscriber::start(config.clone()).unwrap();
    until_current(&subscriber, frozen).await;
    let (reset, payout) = (action("account.password_reset"), action("payment.payout"));
    let ctx = Context::default();
    assert_eq!(subscriber.decide(&reset, &ctx).effect(), EffectKind::Deny);
    assert_eq!(subscriber.decide(&payout, &ctx).effect(), EffectKind::Allow);
    // Heartbeats keep it current while the controller is there.
    wait_until("a heartbeat confirmed the policy", || async {
        !subscriber.is_stale() && files.path().join("web.lkg").exists()
    })
    .await;

    // The controller goes away: the policy holds, then says stale.
    let addr = server.addr();
    server.stop().await;
    wait_until("decisions say stale", || async { subscriber.is_stale() }).await;
    let held = subscriber.decide(&reset, &ctx);
    assert_eq!(held.effect(), EffectKind::Deny, "the freeze still holds");
    assert_eq!(held.revision(), Some(frozen));
    assert!(held.is_stale() && !held.is_fail_closed());
    drop(held);

    // Stale beyond the second limit: the listed actions go to review; the
    // freeze stays a deny (failing closed never softens), and an action not
    // listed keeps the old policy.
    wait_until("the payout fails closed", || async {
        subscriber.decide(&payout, &ctx).is_fail_closed()
    })
    .await;
    let closed = subscriber.decide(&payout, &ctx);
    assert_eq!(closed.effect(), EffectKind::Review);
    assert!(closed.customer_message().is_some());
    drop(closed);
    let reset_decision = subscriber.decide(&reset, &ctx);
    assert_eq!(reset_decision.effect(), EffectKind::Deny);
    assert!(!reset_decision.is_fail_closed());
    drop(reset_decision);
    let view = action("order.view");
    assert_eq!(subscriber.decide(&view, &ctx).effect(), EffectKind::Allow);

    // The service restarts, still cut off: it does not get a fresh grace
    // period. Its saved policy was last known current as long ago as
    // before, so it fails closed at once.
    let mut again = config.clone();
    again.subscriber_id = "web-1-restarted".into();
    let restarted = Subscriber::start(again).unwrap();
    let after_restart = restarted.decide(&payout, &ctx);
    assert_eq!(after_restart.revision(), Some(frozen));
    assert!(after_restart.is_fail_closed(), "{after_restart:?}");
    drop(after_restart);

    // A new service with no saved policy at all fails closed at once too.
    let mut fresh = config.clone();
    fresh.subscriber_id = "web-new".into();
    fresh.last_known_good = Some(files.path().join("new.lkg"));
    let new = Subscriber::start(fresh).unwrap();
    let nothing = new.decide(&payout, &ctx);
    assert!(nothing.revision().is_none() && nothing.is_fail_closed());
    drop(nothing);

    // The controller is back: fresh policy, not stale, no longer closed.
    let server = chatty(addr, data.path()).await;
    until_current(&subscriber, frozen).await;
    until_current(&restarted, frozen).await;
    wait_until("it no longer fails closed", || async {
        let back = subscriber.decide(&payout, &ctx);
        back.effect() == EffectKind::Allow && !back.is_stale() && !back.is_fail_closed()
    })
    .await;
    // And it follows new changes again.
    let noticed = server.apply(&["incident-notice"]).await;
    until_current(&subscriber, noticed).await;
    assert_eq!(subscriber.current().unwrap().activations.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_restarted_while_the_controller_is_down_enforces_the_saved_policy() {
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let mut server = TestServer::start().await;
    let frozen = server
        .apply(&["freeze-credential-changes", "bots-faq-only"])
        .await;
    let mut first = config(&server, "web-1");
    first.last_known_good = Some(lkg.clone());
    let url = server.url.clone();
    let subscriber = Subscriber::start(first.clone()).unwrap();
    until_current(&subscriber, frozen).await;
    wait_until("the policy is saved", || async { lkg.exists() }).await;

    // The service and the controller both go down; the service comes back
    // alone.
    drop(subscriber);
    server.stop().await;
    let restarted = Subscriber::start(first).unwrap();
    let reset = action("account.password_reset");
    let decision = restarted.decide(&reset, &Context::default());
    assert_eq!(decision.effect(), EffectKind::Deny);
    assert_eq!(decision.revision(), Some(frozen));
    assert!(decision.is_stale(), "nobody confirmed it yet");
    assert_eq!(
        decision.reasons().count(),
        1,
        "the freeze, the only mode covering a password reset on the web"
    );
    drop(decision);
    assert_eq!(restarted.current().unwrap().activations.len(), 2);

    // `safemode decide` is a tool: with the controller down it says so.
    let refused = safemode(&[
        "--server",
        &url,
        "decide",
        "--channel",
        "web",
        "--action",
        "account.password_reset",
    ])
    .await;
    assert_eq!(refused.status.code(), Some(1));
}

/// Log lines written while `f` runs on this thread.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer(Arc::new(Mutex::new(Vec::new())));
    let writer = buffer.clone();
    let collector = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let result = tracing::subscriber::with_default(collector, f);
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (result, text)
}

/// A last-known-good file `good` edited by `edit` (its header as JSON, its
/// snapshot decoded), with its length and checksum recomputed, as whoever
/// can write the file could.
fn tamper(
    good: &[u8],
    edit: impl FnOnce(serde_json::Value, &mut proto::Snapshot) -> serde_json::Value,
) -> Vec<u8> {
    use prost::Message as _;
    use sha2::Digest as _;
    let mut parts = good.splitn(3, |b| *b == b'\n');
    let format = parts.next().unwrap().to_vec();
    let header: serde_json::Value = serde_json::from_slice(parts.next().unwrap()).unwrap();
    let mut snapshot = proto::Snapshot::decode(parts.next().unwrap()).unwrap();
    assert!(
        !snapshot.signature.is_empty(),
        "the file keeps the signature"
    );
    let mut header = edit(header, &mut snapshot);
    let payload = snapshot.encode_to_vec();
    header["length"] = payload.len().into();
    header["sha256"] = format!("{:x}", sha2::Sha256::digest(&payload)).into();
    let mut file = format;
    file.push(b'\n');
    file.extend_from_slice(serde_json::to_string(&header).unwrap().as_bytes());
    file.push(b'\n');
    file.extend_from_slice(&payload);
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_saved_policy_is_refused_and_the_service_starts_with_none() {
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let mut server = TestServer::start().await;
    let frozen = server.apply(&["freeze-credential-changes"]).await;
    let mut saving = config(&server, "web-1");
    saving.last_known_good = Some(lkg.clone());
    let subscriber = Subscriber::start(saving.clone()).unwrap();
    until_current(&subscriber, frozen).await;
    wait_until("the policy is saved", || async { lkg.exists() }).await;
    drop(subscriber);
    server.stop().await;
    let good = std::fs::read(&lkg).unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    let mut other_channel = config(&server, "ivr-1");
    other_channel.channel = Channel::parse("ivr").unwrap();
    other_channel.last_known_good = Some(lkg.clone());
    // Finding 4: every rule removed, the checksum (which is the file's own)
    // recomputed; re-signed by another key; and a policy made to look
    // current until 2099.
    let no_rules = tamper(&good, |header, snapshot| {
        snapshot.activations.clear();
        snapshot.rules = Some(proto::ChannelRules::default());
        header
    });
    let resigned = tamper(&good, |header, snapshot| {
        snapshot.activations.clear();
        snapshot.rules = Some(proto::ChannelRules::default());
        safemode_wire::signed::sign_snapshot(snapshot, &SigningKey::generate().0);
        header
    });
    let future = tamper(&good, |mut header, _| {
        header["confirmed_at"] = "2099-01-01T00:00:00Z".into();
        header
    });
    let cases: [(&str, Vec<u8>, &SubscriberConfig, &str); 8] = [
        (
            "every rule removed, checksum recomputed",
            no_rules,
            &saving,
            "does not match its contents",
        ),
        (
            "re-signed by another key",
            resigned,
            &saving,
            "not among the trusted keys",
        ),
        ("confirmed in 2099", future, &saving, "in the future"),
        (
            "truncated",
            good[..good.len() - 10].to_vec(),
            &saving,
            "cut short",
        ),
        (
            "one byte flipped",
            flipped,
            &saving,
            "does not match its checksum",
        ),
        ("empty", Vec::new(), &saving, "empty or cut short"),
        (
            "not ours",
            b"hello\nworld\n".to_vec(),
            &saving,
            "does not start with",
        ),
        (
            "another channel's",
            good.clone(),
            &other_channel,
            "is not the subscribed 'ivr'",
        ),
    ];
    let reset = action("account.password_reset");
    for (case, bytes, config, expected) in cases {
        std::fs::write(&lkg, &bytes).unwrap();
        let (started, log) = logged(|| Subscriber::start(config.clone()));
        let started = started.unwrap_or_else(|e| panic!("{case}: it must start: {e}"));
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert_eq!(said.len(), 1, "{case}: one log line, not: {log}");
        let line = said[0];
        assert!(line.contains("ERROR"), "{case}: {line}");
        assert!(
            line.contains(&lkg.display().to_string()) && line.contains(expected),
            "{case}: {line}"
        );
        assert!(line.contains("starting with no policy"), "{case}: {line}");
        assert!(started.current().is_none(), "{case}: garbage was trusted");
        let decision = started.decide(&reset, &Context::default());
        assert!(decision.is_stale(), "{case}");
        assert_eq!(decision.revision(), None, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_channel_cannot_use_is_rejected_and_the_old_policy_holds() {
    let server = TestServer::start().await;
    let frozen = server.apply(&["freeze-credential-changes"]).await;
    let mut config = config(&server, "web-no-routing");
    // This web back end cannot send customers elsewhere.
    config.check = Some(Arc::new(
        |snapshot: &safemode_client::PolicySnapshot| match snapshot
            .activations
            .iter()
            .find(|a| a.mode == "verified-channels-only")
        {
            Some(a) => Err(format!(
                "cannot route customers to other channels ({})",
                a.id
            )),
            None => Ok(()),
        },
    ));
    let subscriber = Subscriber::start(config).unwrap();
    until_current(&subscriber, frozen).await;

    let routed = server.apply(&["verified-channels-only"]).await;
    let status = crate::support::wait_for("the reject reaches the controller", || async {
        let status = server.status("live").await;
        status
            .subscribers
            .into_iter()
            .find(|s| s.subscriber_id == "web-no-routing" && s.rejected_revision == routed)
    })
    .await;
    assert_eq!(status.acked_revision, frozen);
    assert!(
        status.reject_reason.contains("cannot route customers"),
        "{}",
        status.reject_reason
    );
    assert_eq!(
        subscriber.current().unwrap().revision,
        frozen,
        "the old policy holds"
    );
    assert!(subscriber.is_stale(), "behind the controller");
    let reset = action("account.password_reset");
    assert_eq!(
        subscriber.decide(&reset, &Context::default()).effect(),
        EffectKind::Deny
    );

    // The operator sees it in `safemode status`.
    let shown = safemode(&["--server", &server.url, "status"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("cannot route customers"), "{text}");
}

/// A policy from another store history (the controller's store was
/// replaced) is never taken for current, even while that controller talks,
/// if the channel cannot use the new history's snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_a_replaced_store_is_stale() {
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let old_data = tempfile::tempdir().unwrap();
    let mut old = chatty("127.0.0.1:0".parse().unwrap(), old_data.path()).await;
    for mode in [
        "incident-notice",
        "throttle-high-risk",
        "freeze-credential-changes",
    ] {
        old.apply(&[mode]).await;
    }
    let mut saving = config(&old, "web-1");
    saving.last_known_good = Some(lkg.clone());
    let subscriber = Subscriber::start(saving.clone()).unwrap();
    wait_until("the policy is saved", || async {
        lkg.exists() && !subscriber.is_stale()
    })
    .await;
    drop(subscriber);
    let addr = old.addr();
    old.stop().await;

    // The same address, a new, empty store: a new history at a lower
    // revision. This channel refuses its snapshots.
    let new_data = tempfile::tempdir().unwrap();
    let new = chatty(addr, new_data.path()).await;
    let replaced_at = new.apply(&["incident-notice"]).await;
    let mut refusing = saving.clone();
    refusing.stale_after = Duration::from_secs(1);
    refusing.check = Some(Arc::new(|_: &safemode_client::PolicySnapshot| {
        Err("this channel is being migrated".to_string())
    }));
    let subscriber = Subscriber::start(refusing).unwrap();
    let held = subscriber.current().expect("the saved policy").revision;
    assert!(replaced_at < held, "the new history is at a lower revision");
    // Heartbeats keep arriving (every 100 ms), and they say a revision
    // below the saved one; it is still behind: another history.
    wait_until("the new store's snapshot is rejected", || async {
        new.status("live")
            .await
            .subscribers
            .iter()
            .any(|s| s.subscriber_id == "web-1" && s.rejected_revision == replaced_at)
    })
    .await;
    for _ in 0..3 {
        assert!(subscriber.is_stale());
        assert_eq!(subscriber.current().unwrap().revision, held);
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_policys_age_is_what_the_controller_signed_not_what_the_file_says() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let lkg = files.path().join("web.lkg");
    let mut server = chatty("127.0.0.1:0".parse().unwrap(), data.path()).await;
    let revision = server.apply(&["incident-notice"]).await;
    let mut config = config(&server, "web-1");
    config.last_known_good = Some(lkg.clone());
    config.fail_closed = Some(FailClosed::new(
        Duration::from_secs(3600),
        vec![ActionSelector::parse("account.*").unwrap()],
        FailClosedEffect::Deny,
    ));
    let subscriber = Subscriber::start(config.clone()).unwrap();
    until_current(&subscriber, revision).await;
    wait_until("a signed heartbeat is saved with the policy", || async {
        std::fs::read(&lkg)
            .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains("\"heartbeat\":"))
    })
    .await;
    drop(subscriber);
    server.stop().await;
    let reset = action("account.password_reset");

    // Confirmed an instant ago, by the controller: the saved policy decides.
    let restarted = Subscriber::start(config.clone()).unwrap();
    assert_eq!(
        restarted.decide(&reset, &Context::default()).effect(),
        EffectKind::Allow,
        "a policy the controller confirmed moments ago is within the hour"
    );
    drop(restarted);

    // Whoever can write the file moves its confirmation to now and drops the
    // signed heartbeat: its age is then unknown, which is long ago.
    let good = std::fs::read(&lkg).unwrap();
    let edited = tamper(&good, |mut header, _| {
        header["confirmed_at"] = jiff::Timestamp::now().to_string().into();
        header.as_object_mut().unwrap().remove("heartbeat");
        header
    });
    std::fs::write(&lkg, edited).unwrap();
    let restarted = Subscriber::start(config.clone()).unwrap();
    assert_eq!(
        restarted.decide(&reset, &Context::default()).effect(),
        EffectKind::Deny,
        "no signed confirmation: the listed actions fail closed at once"
    );
    drop(restarted);

    // A heartbeat that is not the controller's is refused with the file.
    let forged = tamper(&good, |mut header, _| {
        header["heartbeat"] = "AAAA".into();
        header
    });
    std::fs::write(&lkg, forged).unwrap();
    let (started, log) = logged(|| Subscriber::start(config.clone()));
    let restarted = started.unwrap();
    assert!(restarted.current().is_none(), "the file was refused whole");
    assert!(log.contains("heartbeat"), "{log}");
}
