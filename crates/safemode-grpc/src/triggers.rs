//! The trigger evaluator: a task on every replica that, every
//! [`TRIGGER_INTERVAL`], sums each runbook trigger's signal over its window
//! across the fleet ([`Fleet::tallies`]) in every namespace this replica
//! follows (`live` always, and the drills it follows), and raises a proposal
//! when the sum is above the trigger's threshold.
//!
//! Every replica runs it and sees the same sum; the controller's raise is a
//! compare-and-put on the trigger's key (`Controller::raise_from_trigger`),
//! so the fleet raises one proposal per firing condition, never one per
//! replica. A fleet answer that misses a replica only under-counts, so it
//! can delay a proposal, never invent one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::fleet::Fleet;
use crate::insights::FleetTallies;
use safemode_controller::{Controller, SignalCount};
use safemode_policy::Namespace;

/// How often every replica evaluates the triggers: the width of a report
/// bucket.
pub const TRIGGER_INTERVAL: Duration = Duration::from_secs(10);

/// Evaluates the triggers every `interval` until `shutdown`.
pub(crate) async fn evaluate_triggers(
    controller: Arc<Controller>,
    fleet: Arc<Fleet>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if !controller.runbooks().iter().any(|r| !r.triggers.is_empty()) {
        debug!("no runbook has triggers; nothing to evaluate");
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for namespace in controller.followed_namespaces() {
            evaluate_namespace(&controller, &fleet, &namespace).await;
        }
    }
}

/// One pass over `namespace`: one fleet gathering per distinct window.
async fn evaluate_namespace(controller: &Controller, fleet: &Fleet, namespace: &Namespace) {
    let mut gathered: HashMap<Duration, FleetTallies> = HashMap::new();
    for runbook in controller.runbooks().iter() {
        for trigger in &runbook.triggers {
            let tallies = match gathered.entry(trigger.within) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(fleet.tallies(namespace, trigger.within).await)
                }
            };
            let tallies = &*tallies;
            let mut channels: Vec<SignalCount> = tallies
                .tallies
                .signals
                .iter()
                .filter(|((_, signal), _)| *signal == trigger.signal)
                .map(|((channel, _), n)| SignalCount {
                    channel: channel.to_string(),
                    count: *n,
                })
                .collect();
            let count: u64 = channels.iter().map(|c| c.count).sum();
            if !trigger.fires(count) {
                continue;
            }
            channels.sort_by(|a, b| b.count.cmp(&a.count).then(a.channel.cmp(&b.channel)));
            match controller
                .raise_from_trigger(
                    namespace,
                    runbook,
                    trigger,
                    count,
                    channels,
                    tallies.partial,
                )
                .await
            {
                Ok(_) => {}
                Err(e) => warn!(%namespace, runbook = %runbook.name, trigger = %trigger.describe(),
                    error = %e, "a trigger fired and its proposal could not be raised; the next pass tries again"),
            }
        }
    }
}
