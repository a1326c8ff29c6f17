//! `Subscriber::decide` allocates nothing: counted with a counting global
//! allocator, per thread, around decisions on a real subscription (ten
//! active modes, every channel action, contexts of every kind), on a
//! subscriber that has failed closed, and on one with no policy yet.
//!
//! Its own test binary, because the global allocator is per binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use safemode_client::{FailClosed, FailClosedEffect, Subscriber, SubscriberConfig};
use safemode_grpc::server::{ServeConfig, StoreConfig};
use safemode_policy::names::ACTIONS;
use safemode_policy::{
    Action, ActionSelector, Channel, Context, MethodSet, Namespace, Outcome, Text,
};
use safemode_signing::TrustedKeys;
use safemode_wire::proto;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Contexts of every kind a channel sends.
fn contexts() -> Vec<Context> {
    vec![
        Context::default(),
        Context {
            confidence: 0.95,
            methods: MethodSet::parse(&["webauthn", "push"]).unwrap(),
            ..Context::default()
        },
        Context {
            confidence: 0.5,
            methods: MethodSet::parse(&["sms_otp"]).unwrap(),
            failed_attempts: 2,
            amount: Some(5000.0),
            ..Context::default()
        },
        Context {
            handoff_from_bot: true,
            bot_flags: vec!["account_takeover_suspected".into()],
            amount: Some(10.0),
            ..Context::default()
        },
    ]
}

/// Decides every action in every context `rounds` times and returns how many
/// allocations that took on this thread, after one decision to warm up: the
/// lock-free pointer swap claims a slot once per thread (the only allocation
/// allowed, and not per input: every input is counted from its first time).
fn count(subscriber: &Subscriber, actions: &[Action], contexts: &[Context], rounds: usize) -> u64 {
    let decide_all = |check: &mut dyn FnMut(&safemode_client::Decision<'_>)| {
        for action in actions {
            for ctx in contexts {
                let decision = subscriber.decide(action, ctx);
                check(&decision);
                std::hint::black_box(decision.customer_message());
                std::hint::black_box(decision.reasons().count());
            }
        }
    };
    std::hint::black_box(subscriber.decide(&actions[0], &contexts[0]).effect());
    // The names a decision carries are interned texts: copying one into the
    // decision copies a pointer, with no reference count to add to (an
    // atomic addition, and a subtraction when the decision is dropped).
    let mut named = 0;
    decide_all(&mut |d| {
        let names: Vec<&Text> = match d.outcome() {
            Outcome::StepUp { required, .. } => vec![&required.escalate_queue],
            Outcome::Review { queue, .. } => vec![queue],
            Outcome::Deny(deny) => deny.alternative.iter().collect(),
            _ => vec![],
        };
        for name in names {
            assert!(name.is_interned(), "{name} is not interned");
            named += 1;
        }
    });
    assert!(named > 0, "some decisions name a queue or an alternative");
    let before = allocations();
    for _ in 0..rounds {
        decide_all(&mut |d| {
            std::hint::black_box(d.outcome());
        });
    }
    allocations() - before
}

#[tokio::test(flavor = "current_thread")]
async fn deciding_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = safemode_grpc::server::start(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreConfig::Embedded {
            data_dir: dir.path().to_path_buf(),
        },
        ..ServeConfig::default()
    })
    .await
    .unwrap();
    let url = format!("http://{}", server.addr);
    // Its channel services trust the public key it keeps beside its data.
    let trusted =
        TrustedKeys::load(&dir.path().join(safemode_grpc::server::PUBLIC_KEY_FILE)).unwrap();
    let modes = [
        "freeze-credential-changes",
        "step-up-account-changes",
        "bots-faq-only",
        "read-only-last-known-good",
        "verified-channels-only",
        "review-refunds-payouts",
        "throttle-high-risk",
        "handoff-guard",
        "incident-notice",
        "step-up-no-sms",
    ];
    let mut control = proto::control_service_client::ControlServiceClient::connect(url.clone())
        .await
        .unwrap();
    let applied = control
        .apply_modes(proto::ApplyModesRequest {
            namespace: "live".into(),
            modes: modes.iter().map(|m| m.to_string()).collect(),
            reason: "ten active modes".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let actions: Vec<Action> = ACTIONS.iter().map(|a| Action::parse(a).unwrap()).collect();
    let contexts = contexts();
    for channel in ["chatbot", "agent-desk", "web"] {
        let mut config = SubscriberConfig::new(
            [url.as_str()],
            Namespace::live(),
            Channel::parse(channel).unwrap(),
            format!("alloc-{channel}"),
        );
        config.trusted_keys = Some(trusted.clone());
        let subscriber = Subscriber::connect(config).await.unwrap();
        // Wait (bounded) until the ten modes are applied.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while subscriber.current().map(|s| s.revision) != Some(applied.revision) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the modes never arrived"
            );
            let mut changes = subscriber.changes();
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
        assert_eq!(subscriber.current().unwrap().activations.len(), 10);
        let reset = Action::parse("account.password_reset").unwrap();
        assert_eq!(
            subscriber
                .decide(&reset, &Context::default())
                .effect()
                .as_str(),
            "deny"
        );
        let n = count(&subscriber, &actions, &contexts, 100);
        assert_eq!(
            n,
            0,
            "{channel}: {n} allocations in {} decisions",
            100 * actions.len() * contexts.len()
        );
    }

    // Failed closed, with no policy at all: the controller never answers.
    let mut config = SubscriberConfig::new(
        ["http://127.0.0.1:1"],
        Namespace::live(),
        Channel::parse("web").unwrap(),
        "alloc-cut-off",
    );
    config.trusted_keys = Some(trusted);
    config.fail_closed = Some(FailClosed::new(
        Duration::ZERO,
        vec![ActionSelector::parse("account.*").unwrap()],
        FailClosedEffect::Review {
            queue: "account-security".into(),
        },
    ));
    let cut_off = Subscriber::start(config).unwrap();
    let reset = Action::parse("account.password_reset").unwrap();
    assert!(cut_off.decide(&reset, &Context::default()).is_stale());
    // The limit is zero: as soon as any time has passed, it fails closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cut_off.decide(&reset, &Context::default()).is_fail_closed() {
        assert!(std::time::Instant::now() < deadline, "never failed closed");
        tokio::task::yield_now().await;
    }
    let n = count(&cut_off, &actions, &contexts, 100);
    assert_eq!(n, 0, "failed closed: {n} allocations");
    server.stop().await.unwrap();
}
