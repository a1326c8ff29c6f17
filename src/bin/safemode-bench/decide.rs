//! How fast `Subscriber::decide` answers, and what it allocates, for a
//! policy of ten active modes: single-threaded, and on every core at once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use safemode::catalog::Catalog;
use safemode::client::{PolicySnapshot, Subscriber};
use safemode::policy::names::ACTIONS;
use safemode::policy::{
    Action, Activation, ActivationId, Change, Channel, ChannelSet, Context, EffectivePolicy,
    MethodSet, Namespace, Reason,
};
use safemode::sim::percentile;
use safemode::wire::{self, proto};
use serde::Serialize;

/// Counts the allocations of a thread while it is deciding (other threads,
/// such as the runtime's, are not counted; the rest of the benchmark pays
/// one thread-local read per allocation).
pub struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[derive(Debug, Serialize)]
pub struct DecideResult {
    /// Active modes in the policy.
    pub active_modes: usize,
    /// Distinct (action, context) inputs cycled through.
    pub inputs: usize,
    pub single_thread: Timing,
    pub all_cores: Timing,
    /// Allocations per decision (counted over the single-threaded run).
    pub allocations_per_decision: f64,
}

#[derive(Debug, Serialize)]
pub struct Timing {
    pub threads: usize,
    pub decisions: u64,
    /// Nanoseconds per decision, per batch of 1,000: median, 99th
    /// percentile.
    pub ns_p50: f64,
    pub ns_p99: f64,
    /// Every thread together.
    pub decisions_per_second: f64,
}

const BATCH: usize = 1000;

/// A web subscriber holding ten active standard modes.
fn subscriber() -> (Subscriber, usize) {
    let catalog = Catalog::standard();
    let change = Change {
        principal: "bench".into(),
        reason: Reason::parse("benchmark").expect("a valid reason"),
        at: Timestamp::now(),
        incident_id: None,
    };
    let activations: Vec<Activation> = catalog
        .modes
        .iter()
        .filter(|m| m.name.as_str() != "incident-notice")
        .take(10)
        .map(|m| {
            let id = ActivationId::from_random(rand::random());
            Activation::new(id, m, ChannelSet::ALL, change.at, &change)
        })
        .collect();
    let policy = EffectivePolicy::compile(&activations);
    let channel = Channel::parse("web").expect("web");
    let namespace = Namespace::live();
    let snapshot = proto::Snapshot {
        schema_version: wire::SCHEMA_VERSION,
        namespace: namespace.to_string(),
        channel: channel.as_str().into(),
        revision: 1,
        issued_at: Some(wire::timestamp_to_wire(Timestamp::now())),
        activations: activations.iter().map(wire::activation_to_wire).collect(),
        rules: Some(wire::channel_policy_to_wire(policy.channel(channel))),
        epoch: "bench".into(),
    };
    let snapshot =
        PolicySnapshot::from_wire(snapshot, &namespace, channel).expect("a valid snapshot");
    (Subscriber::fixed(snapshot), activations.len())
}

fn inputs() -> Vec<(Action, Context)> {
    let contexts = [
        Context::default(),
        Context {
            confidence: 0.95,
            methods: MethodSet::parse(&["webauthn"]).expect("a method"),
            ..Context::default()
        },
        Context {
            confidence: 0.5,
            failed_attempts: 2,
            amount: Some(900.0),
            handoff_from_bot: true,
            ..Context::default()
        },
    ];
    ACTIONS
        .iter()
        .flat_map(|a| {
            contexts
                .iter()
                .map(move |c| (Action::parse(a).expect("known"), c.clone()))
        })
        .collect()
}

/// Decides in batches for `duration`; returns ns per decision of each batch.
fn run_batches(
    subscriber: &Subscriber,
    inputs: &[(Action, Context)],
    duration: Duration,
    count: bool,
) -> Vec<f64> {
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < duration {
        // Allocations are counted inside the batch only: the samples vector
        // growing is the benchmark's, not the decision's.
        COUNTING.with(|c| c.set(count));
        let batch = Instant::now();
        for _ in 0..BATCH {
            let (action, ctx) = &inputs[i % inputs.len()];
            let decision = subscriber.decide(action, ctx);
            std::hint::black_box(decision.effect());
            i += 1;
        }
        let elapsed = batch.elapsed();
        COUNTING.with(|c| c.set(false));
        samples.push(elapsed.as_nanos() as f64 / BATCH as f64);
    }
    samples
}

fn timing(threads: usize, mut samples: Vec<f64>, wall: Duration) -> Timing {
    samples.sort_by(f64::total_cmp);
    let decisions = (samples.len() * BATCH) as u64;
    Timing {
        threads,
        decisions,
        ns_p50: percentile(&samples, 0.50),
        ns_p99: percentile(&samples, 0.99),
        decisions_per_second: decisions as f64 / wall.as_secs_f64(),
    }
}

pub fn run(duration: Duration) -> DecideResult {
    let (subscriber, active_modes) = subscriber();
    let inputs = inputs();
    // Warm up (and let each thread claim its slot in the pointer swap).
    run_batches(&subscriber, &inputs, Duration::from_millis(50), false);

    ALLOCATIONS.store(0, Ordering::Relaxed);
    let wall = Instant::now();
    let single = run_batches(&subscriber, &inputs, duration, true);
    let wall = wall.elapsed();
    let single_allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let single = timing(1, single, wall);

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wall = Instant::now();
    let all: Vec<f64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    // Each thread claims its slot before counting starts.
                    run_batches(&subscriber, &inputs, Duration::from_millis(10), false);
                    run_batches(&subscriber, &inputs, duration, false)
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a decider"))
            .collect()
    });
    let all = timing(threads, all, wall.elapsed());
    DecideResult {
        active_modes,
        inputs: inputs.len(),
        allocations_per_decision: single_allocations as f64 / single.decisions as f64,
        single_thread: single,
        all_cores: all,
    }
}
