//! What the background task and the decisions share: the applied snapshot,
//! swapped atomically, and how fresh it is, in atomics. Nothing here takes a
//! lock or allocates when read.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::PolicySnapshot;
use super::decision::FailClosedRule;
use crate::policy::Revision;

pub(super) struct Shared {
    /// The applied snapshot (from a controller, or the last-known-good file).
    pub current: ArcSwapOption<PolicySnapshot>,
    pub freshness: Freshness,
    /// Decisions say stale when the client has not known it was current for
    /// this long.
    pub stale_after: Duration,
    pub fail_closed: Option<FailClosedRule>,
}

/// How long ago the client last knew its policy was current: it heard from a
/// controller, and had applied the revision that controller announced.
#[derive(Debug)]
pub(super) struct Freshness {
    start: Instant,
    /// Milliseconds after `start` of the last moment the client knew it was
    /// current; [`NEVER`] until it first does.
    current_ms: AtomicU64,
    /// The revision the controller last announced (snapshot or heartbeat).
    announced: AtomicI64,
    /// The revision applied; -1: none.
    applied: AtomicI64,
}

const NEVER: u64 = u64::MAX;

/// How stale the policy is at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Staleness {
    /// Decisions must say stale.
    pub stale: bool,
    /// How long since the client last knew it was current (since it started,
    /// if it never did).
    pub for_: Duration,
}

impl Freshness {
    pub fn new(applied: Option<Revision>) -> Self {
        Freshness {
            start: Instant::now(),
            current_ms: AtomicU64::new(NEVER),
            announced: AtomicI64::new(applied.unwrap_or(0)),
            applied: AtomicI64::new(applied.unwrap_or(-1)),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A controller said it is at `revision`.
    pub fn heard(&self, revision: Revision) {
        self.announced.store(revision, Ordering::Release);
        self.mark_if_current();
    }

    /// The client applied (or confirmed it has) `revision`.
    pub fn applied(&self, revision: Revision) {
        self.applied.store(revision, Ordering::Release);
        self.mark_if_current();
    }

    fn mark_if_current(&self) {
        if self.applied.load(Ordering::Acquire) >= self.announced.load(Ordering::Acquire) {
            self.current_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// Stale: the client has not known it was current for longer than
    /// `limit`, never has since it started, or knows the controller is at a
    /// revision it has not applied (one it rejected, or has yet to receive).
    pub fn staleness(&self, limit: Duration) -> Staleness {
        let now = self.now_ms();
        let current = self.current_ms.load(Ordering::Acquire);
        let applied = self.applied.load(Ordering::Acquire);
        let behind = applied < 0 || self.announced.load(Ordering::Acquire) > applied;
        let (never, for_) = if current == NEVER {
            (true, Duration::from_millis(now))
        } else {
            (false, Duration::from_millis(now.saturating_sub(current)))
        };
        Staleness {
            stale: never || behind || for_ > limit,
            for_,
        }
    }
}

impl Shared {
    pub fn new(
        loaded: Option<Arc<PolicySnapshot>>,
        stale_after: Duration,
        fail_closed: Option<FailClosedRule>,
    ) -> Self {
        Shared {
            freshness: Freshness::new(loaded.as_ref().map(|s| s.revision)),
            current: ArcSwapOption::new(loaded),
            stale_after,
            fail_closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_until_current_and_again_once_behind() {
        let limit = Duration::from_secs(3600);
        let freshness = Freshness::new(None);
        assert!(freshness.staleness(limit).stale, "no policy yet");
        freshness.heard(5);
        assert!(
            freshness.staleness(limit).stale,
            "heard, but nothing applied"
        );
        freshness.applied(5);
        assert!(!freshness.staleness(limit).stale);
        // A newer revision was announced (and, say, rejected): still at 5.
        freshness.heard(6);
        assert!(freshness.staleness(limit).stale);
        freshness.applied(6);
        assert!(!freshness.staleness(limit).stale);
    }

    #[test]
    fn a_policy_loaded_from_disk_is_stale_until_a_controller_confirms_it() {
        let limit = Duration::from_secs(3600);
        let freshness = Freshness::new(Some(7));
        assert!(freshness.staleness(limit).stale);
        freshness.heard(7);
        assert!(!freshness.staleness(limit).stale);
    }
}
