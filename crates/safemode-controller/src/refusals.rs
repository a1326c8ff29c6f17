//! How many refused writes of one principal are audited one by one. Every
//! audited refusal is an entry on the one audit chain that every change also
//! appends to, so a token that may not write (every channel service holds a
//! subscriber token) must not be able to crowd commanders out of it. Each
//! principal gets a burst, then one entry per refill interval; refusals in
//! between are counted and reported in the next entry (and logged).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refused writes audited one by one before the rate applies.
pub(crate) const BURST: u32 = 20;
/// After the burst, one audited refusal per principal per this long.
pub(crate) const REFILL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(crate) struct RefusalBudget {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    refilled: Instant,
    /// Refusals not audited one by one since the last audited one.
    unaudited: u64,
}

/// Whether to audit a refusal now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Audit it, saying how many before it were only counted.
    Audit { unaudited_before: u64 },
    /// Count it; the next audited refusal reports it.
    Count,
}

impl RefusalBudget {
    pub(crate) fn take(&self, principal: &str, now: Instant) -> Verdict {
        let mut buckets = self.buckets.lock().expect("refusal budget lock");
        let bucket = buckets.entry(principal.to_string()).or_insert(Bucket {
            tokens: BURST,
            refilled: now,
            unaudited: 0,
        });
        let earned = now.saturating_duration_since(bucket.refilled).as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            bucket.tokens = BURST.min(bucket.tokens.saturating_add(earned as u32));
            bucket.refilled = now;
        }
        if bucket.tokens == 0 {
            bucket.unaudited += 1;
            return Verdict::Count;
        }
        bucket.tokens -= 1;
        Verdict::Audit {
            unaudited_before: std::mem::take(&mut bucket.unaudited),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_and_the_rest_counted() {
        let budget = RefusalBudget::default();
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(
                budget.take("mallory", start),
                Verdict::Audit {
                    unaudited_before: 0
                }
            );
        }
        assert_eq!(budget.take("mallory", start), Verdict::Count);
        assert_eq!(budget.take("mallory", start), Verdict::Count);
        // Someone else's refusals are not held back by mallory's.
        assert_eq!(
            budget.take("bob", start),
            Verdict::Audit {
                unaudited_before: 0
            }
        );
        assert_eq!(
            budget.take("mallory", start + REFILL),
            Verdict::Audit {
                unaudited_before: 2
            }
        );
        assert_eq!(budget.take("mallory", start + REFILL), Verdict::Count);
    }
}
