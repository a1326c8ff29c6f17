//! Subscribers connected to this replica, per namespace, with the revision
//! each was sent, acknowledged and rejected: what `safemode status` shows a
//! commander.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use jiff::Timestamp;

use safemode_policy::{Channel, Revision};

/// One connected subscriber, as status shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriberRecord {
    /// The id the subscriber gave in its hello.
    pub subscriber_id: String,
    /// Its channel.
    pub channel: Channel,
    /// Remote address.
    pub peer: String,
    /// When the stream opened.
    pub connected_at: Timestamp,
    /// Newest revision sent.
    pub sent_revision: Revision,
    /// Newest revision acknowledged, and when (0: none yet).
    pub acked_revision: Revision,
    /// When the newest acknowledgement arrived.
    pub acked_at: Option<Timestamp>,
    /// Newest rejected revision, why, and when.
    pub rejected: Option<Rejection>,
    /// The revision it claimed to hold when it connected, if the store never
    /// reached it: it held a policy this controller never issued (from a
    /// rogue, or before the store was restored from an older backup) and
    /// was told to start over.
    pub claimed_unissued: Option<Revision>,
}

impl SubscriberRecord {
    /// The status problem line of a subscriber that came holding a revision
    /// never issued.
    pub fn problem(&self) -> Option<String> {
        self.claimed_unissued.map(|claimed| {
            format!(
                "subscriber {} ({}, {}) held revision {claimed}, which this controller never issued (a rogue controller's policy, or a store restored from an older backup); it was told to start over: check that service's controller addresses and trusted keys",
                self.subscriber_id, self.channel, self.peer
            )
        })
    }

    /// Where it stands when `current` is the namespace's revision: a
    /// rejection newer than its acknowledgement is `REJECTED`; an
    /// acknowledgement of `current` (or newer) is `SYNCED`; a revision sent
    /// and not answered (or nothing answered at all) is `NOT_ACKED`; an
    /// older acknowledgement with nothing newer sent is `STALE`.
    pub fn state(&self, current: Revision) -> SubscriberState {
        let acked = self.acked_at.map(|_| self.acked_revision);
        if let Some(rejected) = &self.rejected
            && acked.is_none_or(|acked| rejected.revision > acked)
        {
            return SubscriberState::Rejected;
        }
        match acked {
            Some(acked) if acked >= current => SubscriberState::Synced,
            Some(acked) if self.sent_revision > acked => SubscriberState::NotAcked,
            Some(_) => SubscriberState::Stale,
            None => SubscriberState::NotAcked,
        }
    }

    /// A subscriber may only answer for a revision it was sent.
    fn check_sent(&self, revision: Revision) -> Result<(), UnknownRevision> {
        if revision < 0 || revision > self.sent_revision {
            return Err(UnknownRevision {
                revision,
                sent: self.sent_revision,
            });
        }
        Ok(())
    }
}

/// Where a subscriber stands against the namespace's current revision, in
/// the terms SREs know from `istioctl proxy-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubscriberState {
    /// It acknowledged the current revision.
    Synced,
    /// It was sent a revision it has not answered yet.
    NotAcked,
    /// It acknowledged an older revision and the current one has not
    /// reached it (its replica is behind, or it was never sent it).
    Stale,
    /// Its newest answer rejects a snapshot.
    Rejected,
}

impl SubscriberState {
    /// Every state, in the order a summary shows them.
    pub const ALL: [SubscriberState; 4] = [
        SubscriberState::Synced,
        SubscriberState::NotAcked,
        SubscriberState::Stale,
        SubscriberState::Rejected,
    ];

    /// The state's name in status and metrics: `SYNCED`, `NOT_ACKED`,
    /// `STALE`, `REJECTED`.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberState::Synced => "SYNCED",
            SubscriberState::NotAcked => "NOT_ACKED",
            SubscriberState::Stale => "STALE",
            SubscriberState::Rejected => "REJECTED",
        }
    }

    /// The state a name gives, in any case, with `-` or `_` (`stale`,
    /// `not-acked`, `NOT_ACKED`).
    pub fn parse(name: &str) -> Option<SubscriberState> {
        let name = name.trim().to_ascii_uppercase().replace('-', "_");
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for SubscriberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot a subscriber could not apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The rejected revision.
    pub revision: Revision,
    /// The subscriber's reason.
    pub reason: String,
    /// When the rejection arrived.
    pub at: Timestamp,
}

/// Where a page of subscribers ends: the last one's id and stream.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubscriberCursor {
    subscriber_id: String,
    stream: u64,
}

impl SubscriberCursor {
    /// The cursor of a page token; `None` if it is not one.
    pub fn parse(token: &str) -> Option<SubscriberCursor> {
        let (stream, id) = token.split_once(':')?;
        Some(SubscriberCursor {
            stream: stream.parse().ok()?,
            subscriber_id: id.to_string(),
        })
    }

    /// The page token that continues after this cursor.
    pub fn token(&self) -> String {
        format!("{}:{}", self.stream, self.subscriber_id)
    }
}

/// How many subscribers' problems one replica's part of a status names.
pub const MAX_SUBSCRIBER_PROBLEMS: usize = 20;

/// A subscriber acknowledged or rejected a revision it was never sent.
#[derive(Debug, thiserror::Error)]
#[error(
    "revision {revision} was never sent on this stream (newest sent: {sent}); ack only what you received"
)]
pub struct UnknownRevision {
    /// The revision in the message.
    pub revision: Revision,
    /// The newest revision sent.
    pub sent: Revision,
}

/// The subscribers of one namespace on this replica.
#[derive(Debug, Default)]
pub struct Subscribers {
    next: AtomicU64,
    /// Every stream's record, each behind a lock of its own: a stream
    /// updates its record on every snapshot sent and every ack, and ten
    /// thousand streams woken by one flip would otherwise queue on one lock
    /// (on as many cores as the controller has). The map's lock is taken
    /// to add, remove and read records, never to update one.
    records: Mutex<HashMap<u64, Arc<Mutex<SubscriberRecord>>>>,
}

impl Subscribers {
    /// Records a new stream; dropping the registration removes it.
    pub fn register(
        self: &Arc<Self>,
        subscriber_id: String,
        channel: Channel,
        peer: String,
    ) -> Registration {
        self.register_record(subscriber_id, channel, peer, None)
    }

    /// Records a new stream whose subscriber claimed `claimed`, a revision
    /// never issued; status shows it as a problem while it is connected.
    pub fn register_claiming(
        self: &Arc<Self>,
        subscriber_id: String,
        channel: Channel,
        peer: String,
        claimed: Revision,
    ) -> Registration {
        self.register_record(subscriber_id, channel, peer, Some(claimed))
    }

    fn register_record(
        self: &Arc<Self>,
        subscriber_id: String,
        channel: Channel,
        peer: String,
        claimed_unissued: Option<Revision>,
    ) -> Registration {
        let connection = self.next.fetch_add(1, Ordering::Relaxed);
        let record = SubscriberRecord {
            subscriber_id,
            channel,
            peer,
            connected_at: Timestamp::now(),
            sent_revision: 0,
            acked_revision: 0,
            acked_at: None,
            rejected: None,
            claimed_unissued,
        };
        let record = Arc::new(Mutex::new(record));
        self.lock().insert(connection, record.clone());
        Registration {
            connection,
            record,
            subscribers: self.clone(),
        }
    }

    /// Every connected subscriber, by subscriber id.
    pub fn list(&self) -> Vec<SubscriberRecord> {
        let mut records: Vec<SubscriberRecord> = self
            .lock()
            .values()
            .map(|record| read(record).clone())
            .collect();
        records.sort_by(|a, b| {
            a.subscriber_id
                .cmp(&b.subscriber_id)
                .then(a.connected_at.cmp(&b.connected_at))
        });
        records
    }

    /// Every connected subscriber with its cursor, in page order.
    pub(crate) fn cursors(&self) -> Vec<(SubscriberCursor, SubscriberRecord)> {
        let mut records: Vec<(SubscriberCursor, SubscriberRecord)> = self
            .lock()
            .iter()
            .map(|(stream, record)| {
                let record = read(record).clone();
                let cursor = SubscriberCursor {
                    subscriber_id: record.subscriber_id.clone(),
                    stream: *stream,
                };
                (cursor, record)
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
    }

    /// How many subscribers are in each state against `current`, by
    /// channel (only the pairs that have any), in channel then state order.
    pub fn count_by_state(&self, current: Revision) -> Vec<(Channel, SubscriberState, usize)> {
        let mut counts: std::collections::BTreeMap<(usize, SubscriberState), (Channel, usize)> =
            std::collections::BTreeMap::new();
        for record in self.lock().values() {
            let record = read(record);
            let state = record.state(current);
            counts
                .entry((record.channel.index(), state))
                .or_insert((record.channel, 0))
                .1 += 1;
        }
        counts
            .into_iter()
            .map(|((_, state), (channel, n))| (channel, state, n))
            .collect()
    }

    /// Whether no subscriber is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Mutex<SubscriberRecord>>>> {
        // A panic while holding this lock cannot leave the map half-written,
        // so a poisoned map is still good.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A record, locked. A panic while holding its lock (an update sets a
/// field or two, a revision and the time it was acked) leaves at worst a
/// revision without its time, which status shows as it is, so a poisoned
/// record is still used.
fn read(record: &Mutex<SubscriberRecord>) -> MutexGuard<'_, SubscriberRecord> {
    record.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stream's entry in [`Subscribers`].
#[derive(Debug)]
pub struct Registration {
    connection: u64,
    /// The record, shared with the map, which status reads.
    record: Arc<Mutex<SubscriberRecord>>,
    subscribers: Arc<Subscribers>,
}

impl Registration {
    fn update<T>(&self, f: impl FnOnce(&mut SubscriberRecord) -> T) -> T {
        f(&mut read(&self.record))
    }

    /// Notes that `revision` was sent.
    pub fn sent(&self, revision: Revision) {
        self.update(|r| r.sent_revision = r.sent_revision.max(revision));
    }

    /// Notes an acknowledgement.
    pub fn acked(&self, revision: Revision) -> Result<(), UnknownRevision> {
        self.update(|r| {
            r.check_sent(revision)?;
            if revision >= r.acked_revision {
                r.acked_revision = revision;
                r.acked_at = Some(Timestamp::now());
            }
            Ok(())
        })
    }

    /// Notes a rejection.
    pub fn rejected(&self, revision: Revision, reason: String) -> Result<(), UnknownRevision> {
        self.update(|r| {
            r.check_sent(revision)?;
            r.rejected = Some(Rejection {
                revision,
                reason,
                at: Timestamp::now(),
            });
            Ok(())
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.subscribers.lock().remove(&self.connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        sent: Revision,
        acked: Option<Revision>,
        rejected: Option<Revision>,
    ) -> SubscriberRecord {
        SubscriberRecord {
            subscriber_id: "s".into(),
            channel: Channel::parse("web").unwrap(),
            peer: "127.0.0.1:1".into(),
            connected_at: Timestamp::UNIX_EPOCH,
            sent_revision: sent,
            acked_revision: acked.unwrap_or(0),
            acked_at: acked.map(|_| Timestamp::UNIX_EPOCH),
            rejected: rejected.map(|revision| Rejection {
                revision,
                reason: "bad".into(),
                at: Timestamp::UNIX_EPOCH,
            }),
            claimed_unissued: None,
        }
    }

    #[test]
    fn a_subscriber_state_follows_its_newest_answer_against_the_current_revision() {
        use SubscriberState::*;
        let cases = [
            // (sent, acked, rejected, current, state)
            (5, Some(5), None, 5, Synced),
            (0, Some(0), None, 0, Synced),
            (6, Some(6), None, 5, Synced),
            (5, Some(4), None, 5, NotAcked),
            (5, None, None, 5, NotAcked),
            (0, None, None, 0, NotAcked),
            (4, Some(4), None, 5, Stale),
            (5, Some(4), Some(5), 5, Rejected),
            (5, None, Some(5), 5, Rejected),
            // An older rejection, then an acknowledgement of the current.
            (5, Some(5), Some(4), 5, Synced),
        ];
        for (sent, acked, rejected, current, want) in cases {
            assert_eq!(
                record(sent, acked, rejected).state(current),
                want,
                "sent {sent}, acked {acked:?}, rejected {rejected:?}, current {current}"
            );
        }
    }

    #[test]
    fn a_state_is_named_as_status_prints_it() {
        for state in SubscriberState::ALL {
            assert_eq!(SubscriberState::parse(state.as_str()), Some(state));
        }
        assert_eq!(
            SubscriberState::parse("not-acked"),
            Some(SubscriberState::NotAcked)
        );
        assert_eq!(
            SubscriberState::parse("stale"),
            Some(SubscriberState::Stale)
        );
        assert_eq!(SubscriberState::parse("gone"), None);
    }
}
