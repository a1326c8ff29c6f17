//! The embedded store: etcd's model (one global revision, atomic multi-key
//! transactions, watch from a revision, compaction) kept in one local redb
//! file, for a single node and for the quickstart.
//!
//! Three redb tables hold everything:
//!
//! - `kv`: the current value of every key, with its create and mod revision;
//! - `log`: the events of every committed transaction, keyed by revision, so
//!   a watch can replay history from any revision that is not compacted;
//! - `meta`: the file format, the current revision and the compacted revision.
//!
//! Every write is one redb write transaction committed with
//! `Durability::Immediate`: when [`Store::txn`] returns, the change is on
//! disk and survives `kill -9`. redb calls block, so they run on tokio's
//! blocking pool.
//!
//! Watches are state, not queues: after each commit the new revision is
//! published on a `tokio::sync::watch` channel, and each watch stream wakes
//! and reads the log from where it is. A slow watcher therefore never loses an
//! event and never lags out; it only fails (with [`Error::Compacted`]) when
//! the history it still needs has been compacted away.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use futures_util::StreamExt;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::watch;

use super::{
    Cause, Compare, Error, Event, EventKind, KeyValue, Op, RangePage, RangeResult, Result,
    Revision, Store, Txn, TxnOutcome, WatchBatch, WatchStream,
};

// === Tables and byte layouts ===
//
// All integers are little-endian; revisions are i64 (etcd's type), lengths u32.
//
// `kv` (key: the key as UTF-8 `&str`; value: bytes):
//
//     offset 0   i64  create_revision
//     offset 8   i64  mod_revision
//     offset 16  ..   the value, verbatim (its length is the rest of the record)
//
// `log` (key: the revision as i64; value: bytes, the events of that txn):
//
//     u32  event count
//     then per event, in the order the txn's ops were given:
//       u8   kind: 0 = put, 1 = delete
//       u32  key length, then the key bytes (UTF-8)
//       put only:
//         i64  create_revision
//         u32  value length, then the value bytes
//
//   An event's mod_revision is the log key. A record with bytes left over, a
//   length running past its end or an unknown kind is damaged.
//
// `meta` (key: `&str`; value: i64):
//
//     "format"     FORMAT_VERSION; a file with another format is refused
//     "revision"   the current revision (0 before the first write)
//     "compacted"  the newest revision whose history was discarded (0: none)

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// The layout described above. Bump it (and migrate) when a layout changes.
const FORMAT_VERSION: i64 = 1;

const KV_HEADER_LEN: usize = 16;
const EVENT_PUT: u8 = 0;
const EVENT_DELETE: u8 = 1;

/// At most this many log entries are read per step of a watch, so a watcher
/// catching up on a long history holds a bounded amount of it in memory.
const WATCH_READ_LIMIT: usize = 256;

/// How an [`EmbeddedStore`] keeps its history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// How many revisions of change history to keep for watches. Each commit
    /// compacts, in the same write transaction, the history older than the
    /// newest `history` revisions; a watcher further behind than that must
    /// re-read and watch again. At least 1. Default: 10 000.
    pub history: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { history: 10_000 }
    }
}

/// The [`Store`] in one local redb file. The file is locked while the store
/// is open; dropping the store closes it, and any watch still running then
/// yields [`Error::Unavailable`] and ends.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// What the store handle and its watch streams share. Watch streams hold it
/// weakly, so a forgotten stream never keeps the file open.
struct Inner {
    db: Database,
    path: PathBuf,
    /// `EmbeddedOptions::history`, checked to fit a revision.
    history: Revision,
    /// The newest committed revision; watch streams wake on it.
    committed: watch::Sender<Revision>,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Opens the store in the file at `path`, creating the file (and its
    /// parent directories) when it does not exist.
    ///
    /// This blocks on file I/O (and on crash recovery after an unclean
    /// shutdown); call it at startup or from `spawn_blocking`. Fails with
    /// [`Error::Unavailable`] when another process has the file open, with
    /// [`Error::Corrupt`] when the file is not a readable store, and with
    /// [`Error::InvalidRequest`] when `options` are unusable.
    pub fn open(path: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore> {
        let history = Revision::try_from(options.history)
            .ok()
            .filter(|history| *history >= 1)
            .ok_or_else(|| {
                Error::InvalidRequest(
                    format!(
                        "embedded store history must be between 1 and {} revisions, got {}",
                        Revision::MAX,
                        options.history
                    )
                    .into(),
                )
            })?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| {
                let message = format!(
                    "cannot create the data directory {}: {err}",
                    parent.display()
                );
                Error::Unavailable(Cause::new(message, err))
            })?;
        }
        let db = Database::create(path).map_err(|err| open_error(path, err))?;
        let (revision, compacted) = init(&db, path)?;
        tracing::info!(path = %path.display(), revision, compacted, "embedded store opened");
        let (committed, _) = watch::channel(revision);
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                history,
                committed,
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("history", &self.inner.history)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn range(&self, prefix: &str) -> Result<RangeResult> {
        let prefix = prefix.to_owned();
        blocking(self.inner.clone(), move |inner| inner.range(&prefix)).await
    }

    async fn range_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Revision,
    ) -> Result<RangePage> {
        super::check_page_limit(limit)?;
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        blocking(self.inner.clone(), move |inner| {
            inner.range_page(&prefix, start_after.as_deref(), limit, revision)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        validate(&txn)?;
        blocking(self.inner.clone(), move |inner| inner.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        if from < 1 {
            return Err(Error::InvalidRequest(
                format!(
                    "a watch starts at revision 1 or later, got {from}; to watch from now, \
                 watch from the revision of a range plus one"
                )
                .into(),
            ));
        }
        // Subscribe before reading anything: every commit from here on marks
        // the receiver changed, so none can fall between the history read and
        // the wait for live changes.
        let committed = self.inner.committed.subscribe();
        let (_, compacted) = blocking(self.inner.clone(), Inner::revisions).await?;
        if from <= compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted,
            });
        }
        let state = WatchState {
            store: Arc::downgrade(&self.inner),
            prefix: prefix.to_owned(),
            next: from,
            committed,
            ready: VecDeque::new(),
            done: false,
        };
        Ok(futures_util::stream::unfold(state, WatchState::next_item).boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        blocking(self.inner.clone(), move |inner| inner.compact(revision)).await
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.inner.path.display())
    }

    fn place(&self) -> super::Place {
        super::Place::Embedded {
            path: self.inner.path.display().to_string(),
        }
    }
}

/// Runs blocking redb work on tokio's blocking pool, inside the caller's span.
async fn blocking<T, F>(inner: Arc<Inner>, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> Result<T> + Send + 'static,
{
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(|| work(&inner))).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(Error::Unavailable(
            format!("embedded store work was cancelled (is the runtime shutting down?): {err}")
                .into(),
        )),
    }
}

/// Refuses what etcd refuses too, so both stores accept the same requests.
fn validate(txn: &Txn) -> Result<()> {
    let mut keys = HashSet::with_capacity(txn.ops.len());
    for op in &txn.ops {
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        if key.is_empty() {
            return Err(Error::InvalidRequest(
                "a transaction op has an empty key".to_owned().into(),
            ));
        }
        if !keys.insert(key.as_str()) {
            return Err(Error::InvalidRequest(
                format!(
                    "key {key:?} appears in more than one op of one transaction; \
                 merge them into one op"
                )
                .into(),
            ));
        }
        if let Op::Put { value, .. } = op
            && u32::try_from(value.len()).is_err()
        {
            return Err(Error::InvalidRequest(
                format!(
                    "the value of key {key:?} is {} bytes; values must be under 4 GiB",
                    value.len()
                )
                .into(),
            ));
        }
    }
    if u32::try_from(txn.ops.len()).is_err() {
        return Err(Error::InvalidRequest(
            format!("a transaction has {} ops; split it", txn.ops.len()).into(),
        ));
    }
    Ok(())
}

// === impl Inner ===

/// What one transaction did inside its redb write transaction.
enum Applied {
    /// Ops changed something; commit.
    Changed(Revision),
    /// Compares held but no op changed anything; nothing to commit.
    Unchanged(Revision),
    /// A compare failed; nothing to commit.
    CompareFailed(Revision),
}

/// What one step of a watch read from the log.
enum LogRead {
    /// The watch's next revision was compacted away.
    Compacted(Revision),
    /// The batches found, and the revision to read from next.
    Batches {
        batches: Vec<WatchBatch>,
        next: Revision,
    },
}

impl Inner {
    fn range(&self, prefix: &str) -> Result<RangeResult> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| redb_error("begin read", e))?;
        let meta = read
            .open_table(META)
            .map_err(|e| redb_error("open meta table", e))?;
        let kv = read
            .open_table(KV)
            .map_err(|e| redb_error("open kv table", e))?;
        let revision = get_meta(&meta, META_REVISION)?;
        let mut kvs = Vec::new();
        for entry in kv
            .range::<&str>(prefix..)
            .map_err(|e| redb_error("range kv table", e))?
        {
            let (key, record) = entry.map_err(|e| redb_error("range kv table", e))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            let record = KvRecord::decode(key, record.value())?;
            kvs.push(KeyValue {
                key: key.to_owned(),
                value: record.value.to_vec(),
                create_revision: record.create_revision,
                mod_revision: record.mod_revision,
            });
        }
        Ok(RangeResult { kvs, revision })
    }

    /// A page as of revision `at`. The `kv` table holds only current values,
    /// so the keys changed after `at` are taken back to `at` from the change
    /// log: a key first written after `at` did not exist then, and any other
    /// had the value of its last event at or before `at`. When that event was
    /// compacted away, the page cannot be read at `at` any more.
    fn range_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Revision,
    ) -> Result<RangePage> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| redb_error("begin read", e))?;
        let meta = read
            .open_table(META)
            .map_err(|e| redb_error("open meta table", e))?;
        let kv = read
            .open_table(KV)
            .map_err(|e| redb_error("open kv table", e))?;
        let log = read
            .open_table(LOG)
            .map_err(|e| redb_error("open log table", e))?;
        let current = get_meta(&meta, META_REVISION)?;
        let compacted = get_meta(&meta, META_COMPACTED)?;
        let at = if at == 0 { current } else { at };
        if at < 0 || at > current {
            return Err(Error::InvalidRequest(
                format!("cannot read at revision {at}: the store is at revision {current}").into(),
            ));
        }
        if at < current && at <= compacted {
            return Err(Error::Compacted {
                requested: at,
                compacted,
            });
        }
        let wanted = |key: &str| key.starts_with(prefix) && start_after.is_none_or(|a| key > a);

        // Keys changed after `at`, with their state at `at` (`None`: absent)
        // once known.
        let mut changed: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
        let mut unknown: HashSet<String> = HashSet::new();
        if at < current {
            for entry in log
                .range(at + 1..=current)
                .map_err(|e| redb_error("range log table", e))?
            {
                let (revision, record) = entry.map_err(|e| redb_error("range log table", e))?;
                for event in decode_events(revision.value(), record.value())? {
                    let key = event.kv.key;
                    if !wanted(&key) || changed.contains_key(&key) || unknown.contains(&key) {
                        continue;
                    }
                    let created_after =
                        event.kind == EventKind::Put && event.kv.create_revision > at;
                    if created_after {
                        changed.insert(key, None);
                    } else {
                        unknown.insert(key);
                    }
                }
            }
            if !unknown.is_empty() {
                for entry in log
                    .range(compacted + 1..=at)
                    .map_err(|e| redb_error("range log table", e))?
                    .rev()
                {
                    let (revision, record) = entry.map_err(|e| redb_error("range log table", e))?;
                    for event in decode_events(revision.value(), record.value())? {
                        if unknown.remove(&event.kv.key) {
                            let state = (event.kind == EventKind::Put).then(|| event.kv.clone());
                            changed.insert(event.kv.key, state);
                        }
                    }
                    if unknown.is_empty() {
                        break;
                    }
                }
            }
            if !unknown.is_empty() {
                // Their value at `at` was written before the history kept.
                return Err(Error::Compacted {
                    requested: at,
                    compacted,
                });
            }
        }

        // The first `limit + 1` unchanged keys, merged with the changed ones
        // that existed at `at`, hold the page and tell whether more follow.
        let mut kvs: Vec<KeyValue> = Vec::new();
        let start = start_after.filter(|a| *a >= prefix).unwrap_or(prefix);
        for entry in kv
            .range::<&str>(start..)
            .map_err(|e| redb_error("range kv table", e))?
        {
            let (key, record) = entry.map_err(|e| redb_error("range kv table", e))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            if !wanted(key) || changed.contains_key(key) {
                continue;
            }
            let record = KvRecord::decode(key, record.value())?;
            kvs.push(KeyValue {
                key: key.to_owned(),
                value: record.value.to_vec(),
                create_revision: record.create_revision,
                mod_revision: record.mod_revision,
            });
            if kvs.len() > limit {
                break;
            }
        }
        kvs.extend(changed.into_values().flatten());
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        let more = kvs.len() > limit;
        kvs.truncate(limit);
        Ok(RangePage {
            kvs,
            revision: at,
            more,
        })
    }

    fn txn(&self, txn: &Txn) -> Result<TxnOutcome> {
        let mut write = self
            .db
            .begin_write()
            .map_err(|e| redb_error("begin write", e))?;
        write
            .set_durability(Durability::Immediate)
            .map_err(|e| redb_error("set durability", e))?;
        match self.apply(&write, txn)? {
            Applied::Changed(revision) => {
                write.commit().map_err(|e| redb_error("commit", e))?;
                self.publish(revision);
                tracing::debug!(revision, ops = txn.ops.len(), "committed");
                Ok(TxnOutcome::Committed { revision })
            }
            Applied::Unchanged(revision) => {
                write.abort().map_err(|e| redb_error("abort", e))?;
                Ok(TxnOutcome::Committed { revision })
            }
            Applied::CompareFailed(revision) => {
                write.abort().map_err(|e| redb_error("abort", e))?;
                Ok(TxnOutcome::CompareFailed { revision })
            }
        }
    }

    /// Checks the compares and applies the ops inside `write`; the caller
    /// commits or aborts.
    fn apply(&self, write: &WriteTransaction, txn: &Txn) -> Result<Applied> {
        let mut meta = write
            .open_table(META)
            .map_err(|e| redb_error("open meta table", e))?;
        let mut kv = write
            .open_table(KV)
            .map_err(|e| redb_error("open kv table", e))?;
        let mut log = write
            .open_table(LOG)
            .map_err(|e| redb_error("open log table", e))?;
        let current = get_meta(&meta, META_REVISION)?;
        let compacted = get_meta(&meta, META_COMPACTED)?;

        for compare in &txn.compares {
            let Compare::ModRevision { key, revision } = compare;
            let actual = match kv.get(key.as_str()).map_err(|e| redb_error("read kv", e))? {
                Some(record) => KvRecord::decode(key, record.value())?.mod_revision,
                None => 0,
            };
            if actual != *revision {
                return Ok(Applied::CompareFailed(current));
            }
        }

        let revision = current + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            match op {
                Op::Put { key, value } => {
                    let create_revision =
                        match kv.get(key.as_str()).map_err(|e| redb_error("read kv", e))? {
                            Some(record) => KvRecord::decode(key, record.value())?.create_revision,
                            None => revision,
                        };
                    let record = KvRecord {
                        create_revision,
                        mod_revision: revision,
                        value,
                    };
                    kv.insert(key.as_str(), record.encode().as_slice())
                        .map_err(|e| redb_error("write kv", e))?;
                    events.push(Event {
                        kind: EventKind::Put,
                        kv: KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                        },
                    });
                }
                Op::Delete { key } => {
                    let removed = kv
                        .remove(key.as_str())
                        .map_err(|e| redb_error("delete kv", e))?
                        .is_some();
                    if removed {
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: key.clone(),
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: revision,
                            },
                        });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(Applied::Unchanged(current));
        }

        log.insert(revision, encode_events(&events).as_slice())
            .map_err(|e| redb_error("append to log", e))?;
        meta.insert(META_REVISION, revision)
            .map_err(|e| redb_error("write meta", e))?;
        let floor = revision - self.history;
        if floor > compacted {
            discard_history(&mut log, &mut meta, floor)?;
        }
        Ok(Applied::Changed(revision))
    }

    fn compact(&self, revision: Revision) -> Result<()> {
        let mut write = self
            .db
            .begin_write()
            .map_err(|e| redb_error("begin write", e))?;
        write
            .set_durability(Durability::Immediate)
            .map_err(|e| redb_error("set durability", e))?;
        {
            let mut meta = write
                .open_table(META)
                .map_err(|e| redb_error("open meta table", e))?;
            let mut log = write
                .open_table(LOG)
                .map_err(|e| redb_error("open log table", e))?;
            let current = get_meta(&meta, META_REVISION)?;
            let compacted = get_meta(&meta, META_COMPACTED)?;
            if revision > current {
                return Err(Error::InvalidRequest(format!(
                    "cannot compact at revision {revision}: the store is only at revision {current}"
                ).into()));
            }
            // History before `revision` goes; `revision` stays watchable.
            let floor = revision - 1;
            if floor <= compacted {
                // Already discarded; the compacted revision never goes down.
                return Ok(());
            }
            discard_history(&mut log, &mut meta, floor)?;
        }
        write.commit().map_err(|e| redb_error("commit", e))?;
        tracing::debug!(revision, "compacted");
        Ok(())
    }

    /// The current and the compacted revision.
    fn revisions(&self) -> Result<(Revision, Revision)> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| redb_error("begin read", e))?;
        let meta = read
            .open_table(META)
            .map_err(|e| redb_error("open meta table", e))?;
        Ok((
            get_meta(&meta, META_REVISION)?,
            get_meta(&meta, META_COMPACTED)?,
        ))
    }

    /// Reads up to [`WATCH_READ_LIMIT`] log entries from revision `from`,
    /// keeping the events under `prefix`.
    fn read_log(&self, prefix: &str, from: Revision) -> Result<LogRead> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| redb_error("begin read", e))?;
        let meta = read
            .open_table(META)
            .map_err(|e| redb_error("open meta table", e))?;
        let log = read
            .open_table(LOG)
            .map_err(|e| redb_error("open log table", e))?;
        let current = get_meta(&meta, META_REVISION)?;
        let compacted = get_meta(&meta, META_COMPACTED)?;
        if from <= compacted {
            return Ok(LogRead::Compacted(compacted));
        }
        let mut batches = Vec::new();
        // Every revision in (compacted, current] has a log entry, because only
        // a transaction that changes something takes a revision.
        let mut next = from;
        let mut complete = true;
        for (read_count, entry) in log
            .range(from..=current)
            .map_err(|e| redb_error("range log table", e))?
            .enumerate()
        {
            if read_count == WATCH_READ_LIMIT {
                complete = false;
                break;
            }
            let (revision, record) = entry.map_err(|e| redb_error("range log table", e))?;
            let revision = revision.value();
            if revision != next {
                return Err(Error::Corrupt(format!(
                    "the change log is missing revision {next} (next entry is {revision})"
                )));
            }
            let events: Vec<Event> = decode_events(revision, record.value())?
                .into_iter()
                .filter(|event| event.kv.key.starts_with(prefix))
                .collect();
            if !events.is_empty() {
                batches.push(WatchBatch { revision, events });
            }
            next = revision + 1;
        }
        if complete && from <= current && next != current + 1 {
            return Err(Error::Corrupt(format!(
                "the change log ends at revision {} but the store is at revision {current}",
                next - 1
            )));
        }
        Ok(LogRead::Batches { batches, next })
    }

    /// Wakes the watch streams. Commits are serialised by redb, but two
    /// threads may publish out of order, so the value only moves forward.
    fn publish(&self, revision: Revision) {
        self.committed.send_if_modified(|newest| {
            let newer = revision > *newest;
            if newer {
                *newest = revision;
            }
            newer
        });
    }
}

/// Creates the tables on first open and checks the metadata; returns the
/// current and the compacted revision.
fn init(db: &Database, path: &Path) -> Result<(Revision, Revision)> {
    let what = |step: &str| format!("initialise {} ({step})", path.display());
    let write = db
        .begin_write()
        .map_err(|e| redb_error(&what("begin"), e))?;
    let revisions = {
        let mut meta = write
            .open_table(META)
            .map_err(|e| redb_error(&what("meta table"), e))?;
        write
            .open_table(KV)
            .map_err(|e| redb_error(&what("kv table"), e))?;
        write
            .open_table(LOG)
            .map_err(|e| redb_error(&what("log table"), e))?;
        let format = meta
            .get(META_FORMAT)
            .map_err(|e| redb_error(&what("read format"), e))?
            .map(|format| format.value());
        match format {
            None => {
                for (name, value) in [
                    (META_FORMAT, FORMAT_VERSION),
                    (META_REVISION, 0),
                    (META_COMPACTED, 0),
                ] {
                    meta.insert(name, value)
                        .map_err(|e| redb_error(&what("write meta"), e))?;
                }
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(Error::Corrupt(format!(
                    "{} has store format {other}, this safemode reads format {FORMAT_VERSION}; \
                     use the safemode version that wrote it",
                    path.display()
                )));
            }
        }
        let revision = get_meta(&meta, META_REVISION)?;
        let compacted = get_meta(&meta, META_COMPACTED)?;
        if compacted > revision {
            return Err(Error::Corrupt(format!(
                "metadata: compacted revision {compacted} is beyond the current revision {revision}"
            )));
        }
        (revision, compacted)
    };
    write.commit().map_err(|e| redb_error(&what("commit"), e))?;
    Ok(revisions)
}

/// Deletes the log entries at and below `revision` and records it as the
/// compacted revision.
fn discard_history(
    log: &mut Table<'_, i64, &[u8]>,
    meta: &mut Table<'_, &str, i64>,
    revision: Revision,
) -> Result<()> {
    log.retain_in(..=revision, |_, _| false)
        .map_err(|e| redb_error("compact log", e))?;
    meta.insert(META_COMPACTED, revision)
        .map_err(|e| redb_error("write meta", e))?;
    Ok(())
}

fn get_meta(table: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<Revision> {
    match table.get(name).map_err(|e| redb_error("read meta", e))? {
        Some(value) if value.value() >= 0 => Ok(value.value()),
        Some(value) => Err(Error::Corrupt(format!(
            "metadata {name:?} is negative ({})",
            value.value()
        ))),
        None => Err(Error::Corrupt(format!("metadata {name:?} is missing"))),
    }
}

// === Errors ===

fn open_error(path: &Path, err: redb::DatabaseError) -> Error {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::Unavailable(
            format!(
                "the data directory is in use by another safemode process ({} is locked); \
             stop that process, or give this one its own data directory",
                path.display()
            )
            .into(),
        ),
        err => redb_error(&format!("open {}", path.display()), err),
    }
}

/// Maps a redb failure during `what` to the store's error.
fn redb_error(what: &str, err: impl Into<redb::Error>) -> Error {
    match err.into() {
        redb::Error::Corrupted(message) => {
            Error::Corrupt(format!("embedded store: {what}: {message}"))
        }
        err @ (redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }) => Error::Corrupt(format!(
            "embedded store: {what}: {err}; the file was not written by this safemode version"
        )),
        // redb reports a file that is not a database (bad magic number) this way.
        redb::Error::Io(err) if err.kind() == std::io::ErrorKind::InvalidData => Error::Corrupt(
            format!("embedded store: {what}: {err}; is this a safemode store file?"),
        ),
        redb::Error::ValueTooLarge(len) => Error::InvalidRequest(
            format!(
                "embedded store: {what}: a record of {len} bytes is larger than the store allows"
            )
            .into(),
        ),
        err => Error::Unavailable(Cause::new(format!("embedded store: {what}: {err}"), err)),
    }
}

// === Records ===

/// A `kv` record, borrowing its value from the table.
struct KvRecord<'a> {
    create_revision: Revision,
    mod_revision: Revision,
    value: &'a [u8],
}

impl<'a> KvRecord<'a> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(KV_HEADER_LEN + self.value.len());
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.mod_revision.to_le_bytes());
        out.extend_from_slice(self.value);
        out
    }

    fn decode(key: &str, bytes: &'a [u8]) -> Result<KvRecord<'a>> {
        let damaged = |why: String| Error::Corrupt(format!("the record of key {key:?} {why}"));
        let mut reader = Reader::new(bytes);
        let (Some(create_revision), Some(mod_revision)) = (reader.i64(), reader.i64()) else {
            return Err(damaged(format!(
                "is {} bytes, shorter than its {KV_HEADER_LEN}-byte header",
                bytes.len()
            )));
        };
        if create_revision < 1 || mod_revision < create_revision {
            return Err(damaged(format!(
                "has impossible revisions (create {create_revision}, mod {mod_revision})"
            )));
        }
        Ok(KvRecord {
            create_revision,
            mod_revision,
            value: reader.rest(),
        })
    }
}

/// Encodes a txn's events; lengths were checked by [`validate`].
fn encode_events(events: &[Event]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&len(events.len()));
    for event in events {
        match event.kind {
            EventKind::Put => out.push(EVENT_PUT),
            EventKind::Delete => out.push(EVENT_DELETE),
        }
        out.extend_from_slice(&len(event.kv.key.len()));
        out.extend_from_slice(event.kv.key.as_bytes());
        if event.kind == EventKind::Put {
            out.extend_from_slice(&event.kv.create_revision.to_le_bytes());
            out.extend_from_slice(&len(event.kv.value.len()));
            out.extend_from_slice(&event.kv.value);
        }
    }
    out
}

fn decode_events(revision: Revision, bytes: &[u8]) -> Result<Vec<Event>> {
    let damaged =
        |why: &str| Error::Corrupt(format!("the change log entry of revision {revision} {why}"));
    let truncated = || damaged("is truncated");
    let mut reader = Reader::new(bytes);
    let count = reader.u32().ok_or_else(truncated)?;
    // Each event takes at least 5 bytes, so a damaged count cannot make us
    // allocate more than the record could hold.
    let mut events = Vec::with_capacity((count as usize).min(bytes.len() / 5));
    for _ in 0..count {
        let kind = match reader.u8().ok_or_else(truncated)? {
            EVENT_PUT => EventKind::Put,
            EVENT_DELETE => EventKind::Delete,
            _ => return Err(damaged("has an unknown event kind")),
        };
        let key_len = reader.u32().ok_or_else(truncated)?;
        let key = reader.take(key_len as usize).ok_or_else(truncated)?;
        let key = std::str::from_utf8(key)
            .map_err(|_| damaged("has a key that is not UTF-8"))?
            .to_owned();
        let kv = match kind {
            EventKind::Put => {
                let create_revision = reader.i64().ok_or_else(truncated)?;
                let value_len = reader.u32().ok_or_else(truncated)?;
                let value = reader.take(value_len as usize).ok_or_else(truncated)?;
                KeyValue {
                    key,
                    value: value.to_vec(),
                    create_revision,
                    mod_revision: revision,
                }
            }
            EventKind::Delete => KeyValue {
                key,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
            },
        };
        events.push(Event { kind, kv });
    }
    if !reader.rest().is_empty() {
        return Err(damaged("has bytes after its last event"));
    }
    Ok(events)
}

/// Reads little-endian fields off a byte slice; `None` when it runs out.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < len {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

// === Watch ===

/// The state a watch stream carries between items.
struct WatchState {
    store: Weak<Inner>,
    prefix: String,
    /// The first revision not read from the log yet.
    next: Revision,
    /// The newest committed revision, as published after each commit.
    committed: watch::Receiver<Revision>,
    /// Batches read but not yet yielded.
    ready: VecDeque<WatchBatch>,
    /// Set once the stream has yielded its final error.
    done: bool,
}

impl WatchState {
    async fn next_item(mut self) -> Option<(Result<WatchBatch>, WatchState)> {
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Some((Ok(batch), self));
            }
            if self.done {
                return None;
            }
            // Mark the notification seen before reading, so a commit that
            // lands during the read wakes the wait below.
            let newest = *self.committed.borrow_and_update();
            if newest >= self.next {
                let Some(store) = self.store.upgrade() else {
                    return Some(self.closed());
                };
                let prefix = self.prefix.clone();
                let from = self.next;
                match blocking(store, move |inner| inner.read_log(&prefix, from)).await {
                    Ok(LogRead::Batches { batches, next }) => {
                        self.next = next;
                        self.ready.extend(batches);
                    }
                    Ok(LogRead::Compacted(compacted)) => {
                        self.done = true;
                        let err = Error::Compacted {
                            requested: from,
                            compacted,
                        };
                        return Some((Err(err), self));
                    }
                    Err(err) => {
                        self.done = true;
                        return Some((Err(err), self));
                    }
                }
                continue;
            }
            if self.committed.changed().await.is_err() {
                return Some(self.closed());
            }
        }
    }

    fn closed(mut self) -> (Result<WatchBatch>, WatchState) {
        self.done = true;
        let err = Error::Unavailable(
            "the embedded store was closed; reopen it and watch again"
                .to_owned()
                .into(),
        );
        (Err(err), self)
    }
}

#[cfg(test)]
mod tests {
    //! Behaviour only the embedded store has (file locking, options,
    //! auto-compaction, record decoding); the shared contract lives in
    //! `tests/it/store_contract.rs`.

    use super::*;
    use std::time::Duration;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
        }
    }

    async fn commit(store: &EmbeddedStore, ops: Vec<Op>) -> Revision {
        match store
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await
            .unwrap()
        {
            TxnOutcome::Committed { revision } => revision,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    async fn next(stream: &mut WatchStream) -> Option<Result<WatchBatch>> {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("no watch item within 10s")
    }

    fn open(dir: &tempfile::TempDir, history: u64) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions { history }).unwrap()
    }

    #[test]
    fn default_history_is_ten_thousand() {
        assert_eq!(EmbeddedOptions::default().history, 10_000);
    }

    #[tokio::test]
    async fn second_open_of_the_same_file_says_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(&dir, 10);
        let err = EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("in use by another safemode process"),
            "{err}"
        );
    }

    #[test]
    fn zero_history_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = EmbeddedStore::open(&dir.path().join("s.redb"), EmbeddedOptions { history: 0 })
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    }

    #[test]
    fn open_creates_parent_directories_and_describes_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/store.redb");
        let store = EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap();
        assert_eq!(store.describe(), format!("embedded:{}", path.display()));
        assert_eq!(store.path(), path);
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let err = EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("store.redb"), "{err}");
    }

    #[tokio::test]
    async fn requests_etcd_refuses_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 10);
        for (ops, what) in [
            (vec![put("a", "1"), put("a", "2")], "duplicate key"),
            (
                vec![put("a", "1"), Op::Delete { key: "a".into() }],
                "put and delete of one key",
            ),
            (vec![put("", "1")], "empty key"),
        ] {
            let err = store
                .txn(Txn {
                    compares: vec![],
                    ops,
                })
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidRequest(_)), "{what}: {err:?}");
        }
        let err = store.watch("", 0).await.err().expect("watch from 0");
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
        assert_eq!(store.range("").await.unwrap().revision, 0);
    }

    #[tokio::test]
    async fn history_is_compacted_automatically() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 3);
        for i in 1..=5 {
            assert_eq!(commit(&store, vec![put("k", &i.to_string())]).await, i);
        }
        // Revisions 3, 4, 5 are kept; 1 and 2 are compacted.
        let err = store.watch("", 2).await.err().expect("watch from 2");
        assert!(
            matches!(
                err,
                Error::Compacted {
                    requested: 2,
                    compacted: 2
                }
            ),
            "{err:?}"
        );
        let mut stream = store.watch("", 3).await.unwrap();
        let revisions: Vec<_> = [
            next(&mut stream).await,
            next(&mut stream).await,
            next(&mut stream).await,
        ]
        .into_iter()
        .map(|item| item.unwrap().unwrap().revision)
        .collect();
        assert_eq!(revisions, [3, 4, 5]);

        drop(stream);
        drop(store);
        let store = open(&dir, 3);
        assert!(matches!(
            store.watch("", 2).await.err(),
            Some(Error::Compacted { compacted: 2, .. })
        ));
    }

    #[tokio::test]
    async fn a_watcher_whose_history_is_compacted_under_it_fails_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 100);
        for i in 1..=3 {
            commit(&store, vec![put("k", &i.to_string())]).await;
        }
        // Created before the compaction, first polled after it.
        let mut stream = store.watch("", 1).await.unwrap();
        store.compact(3).await.unwrap();
        let err = next(&mut stream).await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Compacted {
                    requested: 1,
                    compacted: 2
                }
            ),
            "{err:?}"
        );
        assert!(next(&mut stream).await.is_none());
    }

    #[tokio::test]
    async fn a_watch_catches_up_on_more_history_than_one_read_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 10_000);
        let total = WATCH_READ_LIMIT as i64 * 2 + 10;
        for i in 0..total {
            let key = if i % 2 == 0 { "even" } else { "odd" };
            commit(&store, vec![put(key, &i.to_string())]).await;
        }
        let mut stream = store.watch("even", 1).await.unwrap();
        let mut seen = Vec::new();
        while seen.last() != Some(&(total - 1)) {
            seen.push(next(&mut stream).await.unwrap().unwrap().revision);
        }
        let expected: Vec<_> = (1..=total).step_by(2).collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn dropping_the_store_ends_its_watches() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 10);
        let mut stream = store.watch("", 1).await.unwrap();
        drop(store);
        let err = next(&mut stream).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        assert!(next(&mut stream).await.is_none());
        // The file is free again.
        open(&dir, 10);
    }

    #[test]
    fn damaged_records_are_corrupt_and_say_what_is_damaged() {
        let check = |result: Result<()>, expected: &str| match result {
            Err(Error::Corrupt(message)) => {
                assert!(message.contains(expected), "{message:?} lacks {expected:?}")
            }
            other => panic!("expected Corrupt mentioning {expected:?}, got {other:?}"),
        };
        check(
            KvRecord::decode("app/x", &[1, 2, 3]).map(drop),
            "record of key \"app/x\"",
        );
        let events = encode_events(&[Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: "k".into(),
                value: b"v".to_vec(),
                create_revision: 4,
                mod_revision: 7,
            },
        }]);
        assert_eq!(decode_events(7, &events).unwrap()[0].kv.create_revision, 4);
        check(
            decode_events(7, &events[..events.len() - 1]).map(drop),
            "revision 7 is truncated",
        );
        let mut extra = events.clone();
        extra.push(0);
        check(decode_events(7, &extra).map(drop), "bytes after");
        let mut kind = events;
        kind[4] = 9;
        check(decode_events(7, &kind).map(drop), "unknown event kind");
    }

    #[test]
    fn kv_records_round_trip() {
        let record = KvRecord {
            create_revision: 3,
            mod_revision: 9,
            value: b"hello",
        };
        let bytes = record.encode();
        assert_eq!(&bytes[..8], &3i64.to_le_bytes());
        assert_eq!(&bytes[8..16], &9i64.to_le_bytes());
        let back = KvRecord::decode("k", &bytes).unwrap();
        assert_eq!(
            (back.create_revision, back.mod_revision, back.value),
            (3, 9, &b"hello"[..])
        );
    }
}
