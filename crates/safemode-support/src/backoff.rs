//! Jittered exponential backoff for reconnect loops (store watches, client
//! streams). Jitter spreads retries, so that replicas or a thousand
//! subscribers that lost the same peer do not all come back at once.

use std::time::Duration;

/// Delays that double from `min` up to `max`, each scaled by a random factor
/// in [0.5, 1.5).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`, never exceeds `max` (before jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current.mul_f64(0.5 + rand::random::<f64>());
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}
