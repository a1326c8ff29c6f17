//! The fleet: every replica serving the store, found through it, and this
//! replica's part of a fleet-wide status.
//!
//! Each replica keeps one record, `{prefix}replicas/{replica}`, bound to a
//! lease it renews every third of the lease's time to live: its name and the
//! address the others reach it at. The fleet costs one key and one renewal
//! per replica, whatever the number of subscribers (nothing is written per
//! subscriber: etcd's lease keep-alives already hurt at ~14k clients, etcd
//! issue 9911). A replica that stops says goodbye (it revokes the lease); one
//! that dies drops out when its lease lapses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::subscribers::{
    MAX_SUBSCRIBER_PROBLEMS, SubscriberCursor, SubscriberRecord, SubscriberState,
};
use crate::{Controller, Result};
use safemode_policy::{Channel, Namespace, Revision};
use safemode_store::Lease;
use safemode_support::backoff::Backoff;

/// The most replicas a fleet status asks; records beyond are named as a
/// problem, not asked.
pub const MAX_FLEET: usize = 64;

/// One replica's record in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Its name (`--replica`).
    pub replica: String,
    /// Where the other replicas reach it (`host:port`).
    pub address: String,
    /// Whether it serves gRPC over TLS.
    pub tls: bool,
    /// When it started.
    pub started_at: Timestamp,
    /// Its safemode version.
    pub version: String,
}

impl ReplicaRecord {
    /// Whether the name is one `--replica` accepts (1 to 128 characters,
    /// no spaces or controls) and the address one `--advertise` accepts.
    pub fn is_sound(&self) -> bool {
        !self.replica.is_empty()
            && self.replica.len() <= 128
            && !self
                .replica
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
            && address_problem(&self.address).is_none()
    }
}

/// What is wrong with `address` as where replicas reach one another
/// (`host:port`: a DNS name or an IP address, IPv6 in brackets, and a port
/// from 1 to 65535); `None` when nothing is. `--advertise` and every record
/// read from the store are checked with it.
pub fn address_problem(address: &str) -> Option<&'static str> {
    if address.contains("://") {
        return Some("give no scheme");
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Some("no port");
    };
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Some("the port is not 1 to 65535");
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        }
    };
    (!host_ok).then_some("the host is not a DNS name or an IP address")
}

/// Which subscribers a status shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriberFilter {
    /// Only this channel's.
    pub channel: Option<Channel>,
    /// Only those in this state.
    pub state: Option<SubscriberState>,
}

impl SubscriberFilter {
    fn admits(&self, record: &SubscriberRecord, state: SubscriberState) -> bool {
        self.channel.is_none_or(|c| c == record.channel) && self.state.is_none_or(|s| s == state)
    }
}

/// How many subscribers of one channel are in each state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    counts: [u32; 4],
}

impl ChannelCounts {
    /// The count of `state`.
    pub fn get(&self, state: SubscriberState) -> u32 {
        self.counts[Self::slot(state)]
    }

    /// Counts one more in `state`.
    pub fn add(&mut self, state: SubscriberState, n: u32) {
        let slot = &mut self.counts[Self::slot(state)];
        *slot = slot.saturating_add(n);
    }

    /// Every subscriber counted.
    pub fn total(&self) -> u32 {
        self.counts.iter().fold(0u32, |a, b| a.saturating_add(*b))
    }

    fn slot(state: SubscriberState) -> usize {
        SubscriberState::ALL
            .iter()
            .position(|s| *s == state)
            .expect("every state is in ALL")
    }
}

/// One subscriber in a fleet status, with where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriberAt {
    /// The subscriber.
    pub record: SubscriberRecord,
    /// Its state against the revision the status was asked for.
    pub state: SubscriberState,
    /// Where a page that ends with it continues.
    pub cursor: SubscriberCursor,
}

/// This replica's part of a fleet status.
#[derive(Clone, Debug, Default)]
pub struct ReplicaPart {
    /// The namespace's revision as this replica applied it (0: it does not
    /// follow the namespace).
    pub applied_revision: Revision,
    /// The subscribers of the channels the filter admits, per channel and
    /// state (every state: the summary shows what the page filters out).
    pub channels: BTreeMap<Channel, ChannelCounts>,
    /// A page of the subscribers the filter admits.
    pub subscribers: Vec<SubscriberAt>,
    /// Whether more come after the page.
    pub more: bool,
    /// How many subscribers the filter admits in all.
    pub total: usize,
    /// The replica's own problems and its subscribers'.
    pub problems: Vec<String>,
}

impl Controller {
    /// This replica's part of a fleet status of `namespace`, with each
    /// subscriber's state against `current`: counts per channel and state,
    /// and up to `limit` subscribers after `after`, of those `filter`
    /// admits. A namespace this replica does not follow has no subscribers
    /// here, and asking does not make it follow one.
    pub fn replica_part(
        &self,
        namespace: &Namespace,
        current: Revision,
        filter: SubscriberFilter,
        after: Option<&SubscriberCursor>,
        limit: usize,
    ) -> ReplicaPart {
        let mut part = ReplicaPart {
            problems: self.replica_problems(),
            ..ReplicaPart::default()
        };
        let Some(handle) = self.followed(namespace) else {
            return part;
        };
        part.applied_revision = handle.current().revision;
        let all = handle.subscribers.cursors();
        let mut problems: Vec<String> = all
            .iter()
            .filter_map(|(_, record)| record.problem())
            .collect();
        if problems.len() > MAX_SUBSCRIBER_PROBLEMS {
            let more = problems.len() - MAX_SUBSCRIBER_PROBLEMS;
            problems.truncate(MAX_SUBSCRIBER_PROBLEMS);
            problems.push(format!(
                "and {more} more subscribers with problems on replica {}",
                self.config.replica
            ));
        }
        part.problems.extend(problems);
        for (cursor, record) in all {
            let state = record.state(current);
            // The summary counts every state of the channels shown.
            if filter.channel.is_none_or(|c| c == record.channel) {
                part.channels
                    .entry(record.channel)
                    .or_default()
                    .add(state, 1);
            }
            if !filter.admits(&record, state) {
                continue;
            }
            part.total += 1;
            if after.is_some_and(|after| &cursor <= after) {
                continue;
            }
            if part.subscribers.len() < limit {
                part.subscribers.push(SubscriberAt {
                    record,
                    state,
                    cursor,
                });
            } else {
                part.more = true;
            }
        }
        part
    }

    /// The fleet's records as the store has them (this replica's among
    /// them once it has joined), by name; at most [`MAX_FLEET`], and how
    /// many more there were.
    pub async fn fleet(&self) -> Result<(Vec<ReplicaRecord>, usize)> {
        let prefix = self.config.layout.replicas_prefix();
        let range = self.store.range(&prefix).await?;
        let layout = &self.config.layout;
        let mut records: Vec<ReplicaRecord> = range
            .kvs
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<ReplicaRecord>(&kv.value) {
                // A record is where its name puts it, with a name and an
                // address a replica could have: anything else was not
                // written by a replica.
                Ok(record) if layout.replica_key(&record.replica) == kv.key && record.is_sound() => {
                    Some(record)
                }
                Ok(_) => {
                    warn!(key = %kv.key, "a replica record not where its name puts it, or with a bad name or address; skipped");
                    None
                }
                Err(e) => {
                    warn!(key = %kv.key, error = %e, "a replica record that cannot be read; skipped");
                    None
                }
            })
            .collect();
        records.sort_by(|a, b| a.replica.cmp(&b.replica));
        let more = records.len().saturating_sub(MAX_FLEET);
        records.truncate(MAX_FLEET);
        Ok((records, more))
    }

    /// Keeps `record` in the store, under a lease of `ttl` renewed every
    /// third of it, until the controller shuts down, when the lease is
    /// revoked and the record goes at once. A lapsed lease (the store was
    /// away longer than `ttl`) is granted again. The task ends once the
    /// record is removed: a stopping replica waits for it.
    pub fn join_fleet(
        self: &Arc<Self>,
        record: ReplicaRecord,
        ttl: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let controller = self.clone();
        let key = self.config.layout.replica_key(&record.replica);
        let value = serde_json::to_vec(&record).expect("a replica record serializes");
        let renew_every = ttl / 3;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let store = controller.store.clone();
            let mut backoff = Backoff::new(Duration::from_millis(200), renew_every);
            let mut lease: Option<Lease> = None;
            loop {
                let wait = match lease {
                    None => match store.put_leased(&key, value.clone(), ttl).await {
                        Ok(granted) => {
                            info!(%key, address = %record.address, "this replica joined the fleet");
                            lease = Some(granted);
                            backoff.reset();
                            renew_every
                        }
                        Err(e) => {
                            warn!(%key, error = %e, "cannot write this replica's fleet record; retrying");
                            backoff.next_delay()
                        }
                    },
                    Some(held) => match store.renew_lease(held).await {
                        Ok(true) => renew_every,
                        Ok(false) => {
                            warn!(%key, "this replica's fleet record lapsed; writing it again");
                            lease = None;
                            Duration::ZERO
                        }
                        Err(e) => {
                            warn!(%key, error = %e, "cannot renew this replica's fleet record; retrying");
                            backoff.next_delay()
                        }
                    },
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            if let Some(held) = lease
                && let Err(e) = store.revoke_lease(held).await
            {
                warn!(%key, error = %e, "cannot remove this replica's fleet record; it lapses by itself");
            }
        })
    }
}

/// A replica name as a key segment: the name's bytes outside
/// `A-Z a-z 0-9 . _ : -` as `%XX`, so no name reaches another's key.
pub(crate) fn replica_key_segment(replica: &str) -> String {
    let mut segment = String::with_capacity(replica.len());
    for byte in replica.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-') {
            segment.push(char::from(byte));
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    segment
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_name_cannot_reach_another_key() {
        assert_eq!(replica_key_segment("pod-0"), "pod-0");
        assert_eq!(replica_key_segment("vm:7700"), "vm:7700");
        assert_eq!(replica_key_segment("a/../b"), "a%2F..%2Fb");
        assert_eq!(replica_key_segment("é"), "%C3%A9");
    }

    #[test]
    fn counts_add_up_per_state() {
        let mut counts = ChannelCounts::default();
        counts.add(SubscriberState::Synced, 2);
        counts.add(SubscriberState::Rejected, 1);
        assert_eq!(counts.get(SubscriberState::Synced), 2);
        assert_eq!(counts.get(SubscriberState::Stale), 0);
        assert_eq!(counts.total(), 3);
    }
}
