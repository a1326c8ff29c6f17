//! The durable store behind the controller: a key-value space with one
//! monotonically increasing revision, multi-key transactions, and watches that
//! start from a revision. The semantics are etcd's (it is the production
//! store, [`etcd::EtcdStore`]); [`embedded::EmbeddedStore`] gives the same
//! semantics in one local file for a single node and for the quickstart.
//!
//! The controller only talks to [`Store`]; nothing above this module knows
//! which store is below it. The contract every implementation must meet is
//! written as a test suite once (`tests/it/store_contract.rs`) and run against
//! each implementation.
#![forbid(unsafe_code)]

pub mod embedded;
pub mod etcd;

use std::time::Duration;

use futures_util::stream::BoxStream;

/// A store revision. Every committed change that writes something gets the
/// next revision; revision 0 means "nothing written yet".
pub type Revision = i64;

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A watch asked for history that compaction already removed. The caller
    /// must re-read the whole prefix and watch from the revision of that read.
    /// `compacted` is the newest revision whose history is gone.
    #[error(
        "revision {requested} is compacted (history starts after {compacted}); re-read and watch again"
    )]
    Compacted {
        /// The revision the watch asked to start from.
        requested: Revision,
        /// The newest revision that was compacted away.
        compacted: Revision,
    },
    /// The store cannot be reached or cannot serve the request now; retrying
    /// later may succeed. For a transaction it may also mean the outcome is
    /// unknown (the answer was lost after the request was sent): it may have
    /// been applied, and only reading back can tell (`Controller::commit`
    /// does, by change id).
    #[error("store unavailable: {0}")]
    Unavailable(Cause),
    /// The store's data could not be read back (damaged file, bad record).
    #[error("store data is damaged: {0}")]
    Corrupt(String),
    /// The store refused the request as malformed (a bug in the caller).
    #[error("invalid store request: {0}")]
    InvalidRequest(Cause),
}

/// Why a store operation failed, in words, with the error behind it when
/// there is one (etcd's, for [`etcd::EtcdStore`]; redb's or the file
/// system's for [`embedded::EmbeddedStore`]). The error stays an error, not
/// a string: a caller that must tell failures apart matches the variant and
/// looks at its cause (`cause.source()`, downcast to `etcd_client::Error`).
///
/// The message already says what the cause says, in words for people (a
/// gRPC status's message, not its debug form), so [`Error`] does not chain
/// to it: `{:#}` and [`crate::errors::error_chain`] print the store's error
/// once, as they did when the cause was only text.
#[derive(Debug, thiserror::Error)]
#[error("{message}{}", if *.maybe_applied { "; the transaction may or may not have been applied" } else { "" })]
pub struct Cause {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// A transaction that failed this way may have been applied all the
    /// same (the answer was lost after the request was sent).
    maybe_applied: bool,
}

impl Cause {
    /// `message`, caused by `source`.
    pub fn new(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Cause {
            message: message.into(),
            source: Some(source.into()),
            maybe_applied: false,
        }
    }

    /// The same cause, for a transaction that may have been applied all
    /// the same: its outcome is unknown until the store is read back.
    pub fn maybe_applied(mut self) -> Self {
        self.maybe_applied = true;
        self
    }

    /// What went wrong, in words (without the note that a transaction may
    /// have been applied: [`Cause::may_have_applied`] says that).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a transaction that failed this way may have been applied.
    pub fn may_have_applied(&self) -> bool {
        self.maybe_applied
    }
}

impl Error {
    /// Whether this is a failed transaction that may have been applied all
    /// the same (its outcome is unknown); every other failure changed
    /// nothing.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, Error::Unavailable(cause) if cause.may_have_applied())
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause {
            message,
            source: None,
            maybe_applied: false,
        }
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

/// A key with its value and the revisions that created and last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key, including any prefix.
    pub key: String,
    /// Value bytes; empty for a delete event.
    pub value: Vec<u8>,
    /// Revision that created the key (for a delete event: 0).
    pub create_revision: Revision,
    /// Revision of the last change to the key (for a delete event: the
    /// revision of the delete).
    pub mod_revision: Revision,
}

/// A consistent read of every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResult {
    /// Keys in ascending key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read observed. Watching from `revision + 1`
    /// misses nothing and repeats nothing.
    pub revision: Revision,
}

/// One page of a range read at a fixed revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePage {
    /// At most `limit` keys, in ascending key order.
    pub kvs: Vec<KeyValue>,
    /// The revision the page was read at: pass it to the next page's read so
    /// that every page shows the same moment.
    pub revision: Revision,
    /// Whether keys follow the last one of this page.
    pub more: bool,
}

/// The most keys one page may ask for.
pub const MAX_PAGE_LIMIT: usize = 10_000;

/// Keys per page when [`read_all`] reads a prefix: small enough that a page
/// of records of a few KiB each stays far below gRPC's 4 MiB message limit.
pub const READ_ALL_PAGE: usize = 200;

/// How often [`read_all`] starts over after a compaction overtook it before
/// it gives up.
const READ_ALL_ATTEMPTS: u32 = 5;

/// A condition a transaction checks before it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's last change was at exactly this revision; 0 means the key
    /// must not exist.
    ModRevision {
        /// The key to check.
        key: String,
        /// The expected mod revision (0: absent).
        revision: Revision,
    },
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or replace a key.
    Put {
        /// The key to write.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove a key; removing an absent key changes nothing.
    Delete {
        /// The key to remove.
        key: String,
    },
}

/// An atomic change: when every compare holds, every op is applied at one new
/// revision; otherwise nothing is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions that must all hold.
    pub compares: Vec<Compare>,
    /// Writes applied together when they do.
    pub ops: Vec<Op>,
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The ops were applied; `revision` is the revision they were written at
    /// (or the current revision if no op changed anything).
    Committed {
        /// Revision of the change.
        revision: Revision,
    },
    /// A compare did not hold and nothing was written; `revision` is the store
    /// revision the check saw.
    CompareFailed {
        /// Store revision at the time of the check.
        revision: Revision,
    },
}

/// Whether a watched key was written or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or replaced.
    Put,
    /// The key was removed.
    Delete,
}

/// One change to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: key and `mod_revision` only).
    pub kv: KeyValue,
}

/// A unit of watch output. All events of one transaction arrive in the same
/// batch, never split; a batch may hold several transactions, in revision
/// order. A batch with no events is a progress notification: nothing under the
/// prefix changed up to `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// Every change up to this revision has been delivered.
    pub revision: Revision,
    /// Changes under the watched prefix, in revision order.
    pub events: Vec<Event>,
}

/// The stream a watch returns. It ends, or yields an error and ends, when the
/// watch is over; the caller restarts it from the revision after the last batch
/// it applied.
pub type WatchStream = BoxStream<'static, Result<WatchBatch>>;

/// A revisioned key-value store with transactions and watches (etcd's model).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads every key under `prefix` at one revision.
    async fn range(&self, prefix: &str) -> Result<RangeResult>;

    /// Reads at most `limit` keys under `prefix` that sort after
    /// `start_after` (all of them when `None`), as they were at `revision`
    /// (0: the current revision; the page says which it read). Reading a
    /// prefix page by page at the revision of the first page gives one
    /// consistent read without ever holding the whole prefix in one message.
    /// Fails with [`Error::Compacted`] when `revision` is compacted (the
    /// reader starts over at the current revision), and with
    /// [`Error::InvalidRequest`] for a revision in the future or a `limit`
    /// of 0 or above [`MAX_PAGE_LIMIT`].
    async fn range_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Revision,
    ) -> Result<RangePage>;

    /// Applies `txn` atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Streams every change under `prefix` with revision >= `from`, then every
    /// new one as it commits. Fails with [`Error::Compacted`] (at once or as
    /// the stream's first item) when `from` is at or below the compacted
    /// revision.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// Discards the change history before `revision` (etcd's semantics:
    /// `revision` itself stays watchable); current values are kept. Watches
    /// from an earlier revision fail with [`Error::Compacted`]. Compacting
    /// again at or below an earlier compaction changes nothing; compacting
    /// beyond the current revision is [`Error::InvalidRequest`].
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Puts `value` at `key` for as long as the returned lease is renewed:
    /// `ttl` after the last renewal the store deletes the key (etcd's
    /// leases). A replica keeps its fleet record this way, so a replica that
    /// dies without saying goodbye drops out of the fleet by itself.
    ///
    /// A store that only one process opens has no fleet: by default nothing
    /// is written, and the lease never lapses.
    async fn put_leased(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<Lease> {
        let _ = (key, value, ttl);
        Ok(Lease::Local)
    }

    /// Renews `lease`; `Ok(false)` when it had lapsed and its key is gone
    /// (the holder puts it again).
    async fn renew_lease(&self, lease: Lease) -> Result<bool> {
        let _ = lease;
        Ok(true)
    }

    /// Ends `lease` and deletes its key at once.
    async fn revoke_lease(&self, lease: Lease) -> Result<()> {
        let _ = lease;
        Ok(())
    }

    /// A short description for logs, e.g. `embedded:/var/lib/safemode/store.redb`.
    fn describe(&self) -> String;

    /// What the store is and where, for people (status, errors).
    fn place(&self) -> Place {
        Place::Other {
            description: self.describe(),
        }
    }

    /// Reads `key` (exactly that key) once, for a health check: unlike every
    /// other call it does not wait through an election or a member's
    /// restart, and it fails with [`Error::Unavailable`] when the store has
    /// not answered within `within`. The result's revision is the store's
    /// current revision.
    async fn probe(&self, key: &str, within: Duration) -> Result<RangeResult> {
        match tokio::time::timeout(within, self.range_page(key, None, 1, 0)).await {
            Ok(page) => {
                let page = page?;
                Ok(RangeResult {
                    kvs: page.kvs.into_iter().filter(|kv| kv.key == key).collect(),
                    revision: page.revision,
                })
            }
            Err(_) => Err(Error::Unavailable(
                format!("no answer within {}", seconds(within)).into(),
            )),
        }
    }
}

/// A lease of [`Store::put_leased`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// An etcd lease.
    Etcd(i64),
    /// No lease: the store serves one process, which has no fleet.
    Local,
}

/// What a store is and where, as [`Store::place`] says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The embedded store, in one local file.
    Embedded {
        /// The file.
        path: String,
    },
    /// An etcd cluster.
    Etcd {
        /// The members' client URLs.
        endpoints: Vec<String>,
    },
    /// Another store (a test's wrapper).
    Other {
        /// Its [`Store::describe`].
        description: String,
    },
}

impl Place {
    /// `embedded`, `etcd` or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            Place::Embedded { .. } => "embedded",
            Place::Etcd { .. } => "etcd",
            Place::Other { .. } => "other",
        }
    }

    /// Where: the file, the endpoints, or the description.
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            Place::Embedded { path } => vec![path.clone()],
            Place::Etcd { endpoints } => endpoints.clone(),
            Place::Other { description } => vec![description.clone()],
        }
    }
}

/// `etcd at http://10.0.0.5:2379,http://10.0.0.6:2379`, `the embedded
/// store at /var/lib/safemode/store.redb`.
impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Embedded { path } => write!(f, "embedded store at {path}"),
            Place::Etcd { endpoints } => write!(f, "etcd at {}", endpoints.join(",")),
            Place::Other { description } => f.write_str(description),
        }
    }
}

/// A duration in seconds for people: `2s`, `0.5s`.
pub(crate) fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Checks a page request the same way for every store.
pub(crate) fn check_page_limit(limit: usize) -> Result<()> {
    if limit == 0 || limit > MAX_PAGE_LIMIT {
        return Err(Error::InvalidRequest(
            format!("a page holds 1 to {MAX_PAGE_LIMIT} keys, not {limit}").into(),
        ));
    }
    Ok(())
}

/// Reads every key under `prefix` at one revision, in pages of
/// [`READ_ALL_PAGE`] keys, so that no single store response grows with the
/// prefix. For prefixes whose contents are bounded (a namespace, the open
/// incidents); a reader of something unbounded (the audit log) pages itself
/// with [`Store::range_page`]. When a compaction overtakes the read, it
/// starts over at the current revision.
pub async fn read_all(store: &dyn Store, prefix: &str) -> Result<RangeResult> {
    let mut attempt = 0;
    'read: loop {
        let mut kvs = Vec::new();
        let mut revision = 0;
        let mut start_after: Option<String> = None;
        loop {
            let page = match store
                .range_page(prefix, start_after.as_deref(), READ_ALL_PAGE, revision)
                .await
            {
                Ok(page) => page,
                Err(Error::Compacted { .. }) if attempt + 1 < READ_ALL_ATTEMPTS => {
                    attempt += 1;
                    continue 'read;
                }
                Err(e) => return Err(e),
            };
            revision = page.revision;
            start_after = page.kvs.last().map(|kv| kv.key.clone());
            kvs.extend(page.kvs);
            if !page.more || start_after.is_none() {
                return Ok(RangeResult { kvs, revision });
            }
        }
    }
}
