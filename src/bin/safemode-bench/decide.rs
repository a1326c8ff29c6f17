//! How fast `Subscriber::decide` answers, and what it allocates, for a
//! policy of ten active modes: single-threaded, and on every core at once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jiff::Timestamp;
use safemode::sim::percentile;
use safemode_client::{PolicySnapshot, Subscriber};
use safemode_policy::catalog::Catalog;
use safemode_policy::names::ACTIONS;
use safemode_policy::{
    Action, Activation, ActivationId, Change, Channel, ChannelSet, Context, EffectivePolicy,
    MethodSet, Namespace, Reason,
};
use safemode_wire::{self as wire, proto};
use serde::Serialize;

/// Counts the allocations of the threads that are deciding (other threads,
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

#[derive(Debug, Default, Serialize)]
pub struct DecideResult {
    /// The floor: an `ArcSwap` load plus one indexed read of a precompiled
    /// table (each input's decision, made beforehand), in batches like
    /// `decide`'s, on one thread, a batch of each in turn (so that both see
    /// the machine at the same moments): median and 99th percentile,
    /// nanoseconds per read.
    pub floor_ns_p50: f64,
    pub floor_ns_p99: f64,
    /// `single_thread.ns_p50` over `floor_ns_p50`.
    pub ratio_to_floor_p50: f64,
    /// Active modes in the policy.
    pub active_modes: usize,
    /// Distinct (action, context) inputs cycled through.
    pub inputs: usize,
    pub single_thread: Timing,
    pub all_cores: Timing,
}

#[derive(Debug, Default, Serialize)]
pub struct Timing {
    pub threads: usize,
    pub decisions: u64,
    /// Nanoseconds per decision, per batch of 1,000: median, 99th
    /// percentile.
    pub ns_p50: f64,
    pub ns_p99: f64,
    /// Every thread together, from the first thread's start to the last
    /// one's end (thread start and warm-up excluded); on one thread, over
    /// the time its batches took (the floor's, between them, excluded).
    pub decisions_per_second: f64,
    /// Allocations made while deciding, per decision (counted by the global
    /// allocator on the deciding threads, inside the timed batches).
    pub allocations_per_decision: f64,
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
        // A fixed subscriber takes its snapshot as given: nothing to verify.
        ..Default::default()
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

/// One batch of [`BATCH`] decisions from input `*next` on; returns ns per
/// decision. With `count`, allocations inside the batch go to
/// [`ALLOCATIONS`].
fn decide_batch(
    subscriber: &Subscriber,
    inputs: &[(Action, Context)],
    next: &mut usize,
    count: bool,
) -> f64 {
    // Allocations are counted inside the batch only: the samples vector
    // growing is the benchmark's, not the decision's.
    COUNTING.with(|c| c.set(count));
    let batch = Instant::now();
    for _ in 0..BATCH {
        let (action, ctx) = std::hint::black_box(&inputs[*next % inputs.len()]);
        let decision = subscriber.decide(action, ctx);
        std::hint::black_box(&decision);
        *next += 1;
    }
    let elapsed = batch.elapsed();
    COUNTING.with(|c| c.set(false));
    elapsed.as_nanos() as f64 / BATCH as f64
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
    let mut next = 0;
    while start.elapsed() < duration {
        samples.push(decide_batch(subscriber, inputs, &mut next, count));
    }
    samples
}

/// One batch of the floor: the same inputs and batch as [`decide_batch`],
/// but each decision is an `ArcSwap` load and a read of the table entry
/// made for the input beforehand.
fn floor_batch(table: &ArcSwap<Vec<u32>>, inputs: &[(Action, Context)], next: &mut usize) -> f64 {
    let batch = Instant::now();
    for _ in 0..BATCH {
        let (_, ctx) = std::hint::black_box(&inputs[*next % inputs.len()]);
        std::hint::black_box(ctx);
        let table = table.load();
        let entry = table[*next % table.len()];
        std::hint::black_box(entry);
        *next += 1;
    }
    batch.elapsed().as_nanos() as f64 / BATCH as f64
}

/// The floor and single-threaded `decide`, a batch of each in turn for
/// `duration` each, so that both see the same moments of a machine whose
/// speed drifts: the floor's samples, `decide`'s, and the time `decide`'s
/// batches took in all.
fn floor_and_decide(
    subscriber: &Subscriber,
    table: &ArcSwap<Vec<u32>>,
    inputs: &[(Action, Context)],
    duration: Duration,
) -> (Vec<f64>, Vec<f64>, Duration) {
    let (mut floor, mut decide) = (Vec::new(), Vec::new());
    let (mut floor_next, mut decide_next) = (0, 0);
    let mut deciding = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < duration * 2 {
        floor.push(floor_batch(table, inputs, &mut floor_next));
        let batch = Instant::now();
        decide.push(decide_batch(subscriber, inputs, &mut decide_next, true));
        deciding += batch.elapsed();
    }
    (floor, decide, deciding)
}

/// The floor's table: one entry per input, its decision's effect (as a
/// number), decided once.
fn floor_table(subscriber: &Subscriber, inputs: &[(Action, Context)]) -> ArcSwap<Vec<u32>> {
    let table = inputs
        .iter()
        .map(|(action, ctx)| {
            let decision = subscriber.decide(action, ctx);
            let effect = format!("{:?}", decision.outcome());
            effect.len() as u32
        })
        .collect();
    ArcSwap::from_pointee(table)
}

fn timing(threads: usize, mut samples: Vec<f64>, wall: Duration, allocations: u64) -> Timing {
    samples.sort_by(f64::total_cmp);
    let decisions = (samples.len() * BATCH) as u64;
    Timing {
        threads,
        decisions,
        ns_p50: percentile(&samples, 0.50),
        ns_p99: percentile(&samples, 0.99),
        decisions_per_second: decisions as f64 / wall.as_secs_f64(),
        allocations_per_decision: allocations as f64 / decisions.max(1) as f64,
    }
}

pub fn run(duration: Duration) -> DecideResult {
    let (subscriber, active_modes) = subscriber();
    let inputs = inputs();
    let table = floor_table(&subscriber, &inputs);
    // Warm up both (and let the thread claim its slot in the pointer swap).
    floor_and_decide(&subscriber, &table, &inputs, Duration::from_millis(50));

    ALLOCATIONS.store(0, Ordering::Relaxed);
    let (mut floor, single, wall) = floor_and_decide(&subscriber, &table, &inputs, duration);
    floor.sort_by(f64::total_cmp);
    let single = timing(1, single, wall, ALLOCATIONS.swap(0, Ordering::Relaxed));

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Every thread warms up (claiming its slot in the pointer swap), then
    // all start together; the wall time runs from the first start to the
    // last end.
    let ready = Barrier::new(threads);
    let runs: Vec<(Vec<f64>, Instant, Instant)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    run_batches(&subscriber, &inputs, Duration::from_millis(10), false);
                    ready.wait();
                    let start = Instant::now();
                    let samples = run_batches(&subscriber, &inputs, duration, true);
                    (samples, start, Instant::now())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a decider"))
            .collect()
    });
    let first = runs.iter().map(|r| r.1).min().expect("one thread at least");
    let last = runs.iter().map(|r| r.2).max().expect("one thread at least");
    let samples = runs.into_iter().flat_map(|r| r.0).collect();
    let all = timing(
        threads,
        samples,
        last - first,
        ALLOCATIONS.swap(0, Ordering::Relaxed),
    );
    let floor_ns_p50 = percentile(&floor, 0.50);
    DecideResult {
        floor_ns_p50,
        floor_ns_p99: percentile(&floor, 0.99),
        ratio_to_floor_p50: single.ns_p50 / floor_ns_p50.max(f64::MIN_POSITIVE),
        active_modes,
        inputs: inputs.len(),
        single_thread: single,
        all_cores: all,
    }
}
