//! Bounds on what one caller can make a replica hold or do: request sizes,
//! names per request, subscription streams per token, per connection and per
//! replica. A subscriber token can never slow or fill the control plane: past
//! a bound the call is refused, and nothing else changes: RESOURCE_EXHAUSTED
//! or INVALID_ARGUMENT saying which bound and what to do, or, for a request
//! over [`MAX_CONTROL_REQUEST_BYTES`], gRPC's own OUT_OF_RANGE "decoded
//! message length too large", given before the request is decoded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Subscribers in one status page unless asked otherwise, and at most.
/// A subscriber's entry is at most about half a kilobyte (its id is at most
/// 128 bytes and its reject reason 256; the peer is an address), so a page
/// stays far below gRPC's 4 MiB.
pub const STATUS_PAGE_DEFAULT: usize = 1000;
/// See [`STATUS_PAGE_DEFAULT`].
pub const STATUS_PAGE_MAX: usize = 5000;

/// The largest answer one replica takes from another for a fleet status: a
/// page of [`STATUS_PAGE_MAX`] subscribers with room to spare.
pub const MAX_STATUS_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// The largest fleet request a replica decodes (a signed query: a few
/// hundred bytes).
pub const MAX_FLEET_REQUEST_BYTES: usize = 4 * 1024;

/// The largest encoded control request accepted (tonic refuses bigger ones
/// before they are decoded). A real request is a few kilobytes.
pub const MAX_CONTROL_REQUEST_BYTES: usize = 256 * 1024;

/// The largest message a subscriber may send (hello, ack, reject, and a
/// report, which may hold 64 KiB: a larger one is refused and the stream
/// goes on; one beyond this bound ends the stream, as any gRPC message
/// over its limit does).
pub const MAX_SUBSCRIBER_MESSAGE_BYTES: usize = 128 * 1024;

/// The most modes one apply may name.
pub const MAX_MODES_PER_REQUEST: usize = 32;

/// The most activation ids or modes one lift may name.
pub const MAX_TARGETS_PER_REQUEST: usize = 256;

/// The most channel names one request may give (there are six channels).
pub const MAX_CHANNELS_PER_REQUEST: usize = 16;

/// The most incidents or change requests one list answer holds, newest
/// first (the answer says how many matched).
pub const MAX_LISTED: usize = 200;

/// How many of a refused request's names its audit entry and log line
/// show, each cut to [`SHOWN_NAME_CHARS`].
const SHOWN_NAMES: usize = 3;
const SHOWN_NAME_CHARS: usize = 64;

/// A bounded, single-line summary of names a caller sent, for log lines and
/// the audit entry of a refused call: the count and the first few, each cut
/// short and with control characters escaped; never the caller's payload.
pub fn summary(names: &[String]) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(SHOWN_NAMES)
        .map(|name| {
            let mut cut: String = name
                .chars()
                .take(SHOWN_NAME_CHARS)
                .flat_map(char::escape_debug)
                .collect();
            if name.chars().count() > SHOWN_NAME_CHARS {
                cut.push('…');
            }
            cut
        })
        .collect();
    match names.len() {
        n if n <= SHOWN_NAMES => shown.join(", "),
        n => format!("{n} names, the first {SHOWN_NAMES}: {}", shown.join(", ")),
    }
}

/// How many subscription streams a replica admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams one token (one principal, without a tokens file) may hold.
    pub per_token: usize,
    /// Streams one HTTP/2 connection may carry.
    pub per_connection: usize,
    /// Streams the replica holds in all.
    pub per_replica: usize,
}

impl Default for StreamLimits {
    /// Sized for a fleet of thousands of channel-service instances sharing a
    /// few tokens and pooling their streams over connections, while no one
    /// token can take the whole replica.
    fn default() -> Self {
        StreamLimits {
            per_token: 10_000,
            per_connection: 1_000,
            per_replica: 50_000,
        }
    }
}

/// Counts open streams against [`StreamLimits`]; a [`StreamSlot`] is one
/// admitted stream, given back when dropped.
#[derive(Debug)]
pub struct StreamCounter {
    limits: StreamLimits,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_token: HashMap<String, usize>,
    by_connection: HashMap<String, usize>,
}

impl StreamCounter {
    /// A counter enforcing `limits`.
    pub fn new(limits: StreamLimits) -> Arc<Self> {
        Arc::new(StreamCounter {
            limits,
            counts: Mutex::default(),
        })
    }

    /// Admits one more stream of `token` (the token's hash, or the
    /// principal's name without tokens) over `connection` (the peer
    /// address), or says which bound it would cross.
    pub fn admit(
        self: &Arc<Self>,
        token: &str,
        connection: &str,
    ) -> Result<StreamSlot, tonic::Status> {
        let mut counts = self.counts.lock().expect("poisoned");
        let limits = self.limits;
        if counts.total >= limits.per_replica {
            return Err(tonic::Status::resource_exhausted(format!(
                "this replica holds {} subscription streams, its limit; connect to another replica, or raise --max-streams",
                limits.per_replica
            )));
        }
        if counts.by_token.get(token).copied().unwrap_or(0) >= limits.per_token {
            return Err(tonic::Status::resource_exhausted(format!(
                "this token already holds {} subscription streams on this replica, its limit; close streams you no longer use, give other services their own token, or raise --max-streams-per-token",
                limits.per_token
            )));
        }
        if counts.by_connection.get(connection).copied().unwrap_or(0) >= limits.per_connection {
            return Err(tonic::Status::resource_exhausted(format!(
                "this connection already carries {} subscription streams, its limit; open another connection, or raise --max-streams-per-connection",
                limits.per_connection
            )));
        }
        counts.total += 1;
        *counts.by_token.entry(token.to_string()).or_default() += 1;
        *counts
            .by_connection
            .entry(connection.to_string())
            .or_default() += 1;
        Ok(StreamSlot {
            counter: self.clone(),
            token: token.to_string(),
            connection: connection.to_string(),
        })
    }

    /// Streams `token` holds now.
    pub fn held(&self, token: &str) -> usize {
        let counts = self.counts.lock().expect("poisoned");
        counts.by_token.get(token).copied().unwrap_or(0)
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.counts.lock().expect("poisoned").total
    }
}

/// One admitted stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamSlot {
    counter: Arc<StreamCounter>,
    token: String,
    connection: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.counter.counts.lock().expect("poisoned");
        counts.total -= 1;
        release(&mut counts.by_token, &self.token);
        release(&mut counts.by_connection, &self.connection);
    }
}

fn release(counts: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_refuses_the_stream_past_it_and_frees_on_drop() {
        let counter = StreamCounter::new(StreamLimits {
            per_token: 2,
            per_connection: 3,
            per_replica: 4,
        });
        let a1 = counter.admit("a", "c1").unwrap();
        let _a2 = counter.admit("a", "c1").unwrap();
        let token = counter.admit("a", "c2").unwrap_err();
        assert_eq!(token.code(), tonic::Code::ResourceExhausted);
        assert!(token.message().contains("this token"), "{token}");
        let _b1 = counter.admit("b", "c1").unwrap();
        let connection = counter.admit("b", "c1").unwrap_err();
        assert!(
            connection.message().contains("this connection"),
            "{connection}"
        );
        let _b2 = counter.admit("b", "c2").unwrap();
        let replica = counter.admit("c", "c3").unwrap_err();
        assert!(replica.message().contains("this replica"), "{replica}");
        assert_eq!(counter.open(), 4);
        drop(a1);
        assert_eq!(counter.open(), 3);
        counter.admit("a", "c2").unwrap();
    }

    #[test]
    fn a_summary_is_bounded_whatever_was_sent() {
        let many: Vec<String> = (0..20_000).map(|i| format!("mode-{i}")).collect();
        assert_eq!(
            summary(&many),
            "20000 names, the first 3: mode-0, mode-1, mode-2"
        );
        let long = vec!["x".repeat(100_000), "a\nb".to_string()];
        let text = summary(&long);
        assert!(text.chars().count() < 80, "{text}");
        assert!(text.ends_with("…, a\\nb"), "{text}");
    }
}
