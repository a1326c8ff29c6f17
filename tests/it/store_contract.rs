//! The store contract: what every [`Store`] implementation must do, written
//! once and run against each implementation through a [`StoreHarness`].
//!
//! The controller relies on exactly these behaviours (revisions, atomic
//! transactions, watch from a revision, compaction, durability), so the
//! embedded store and etcd must agree on all of them. Add an implementation
//! by writing its harness and invoking `store_contract_tests!(name, Harness)`.
//!
//! The cases hard-code no revision numbers: etcd starts at revision 1, the
//! embedded store at 0, so each case compares revisions with the ones the
//! store returned earlier.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};
use safemode_store::{
    Compare, Error, Event, EventKind, KeyValue, Op, Revision, Store, Txn, TxnOutcome, WatchStream,
};

/// How long a case waits for something it expects before it fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// Starts, hands out and restarts one store under test.
#[async_trait::async_trait]
pub trait StoreHarness: Sized + Send {
    /// A fresh, empty store.
    async fn start() -> Self;
    /// A handle to the running store. Cases drop their handles before
    /// [`StoreHarness::restart`].
    fn store(&self) -> Arc<dyn Store>;
    /// Stops the store and starts it again on the same data; durable state
    /// must survive.
    async fn restart(&mut self);
}

/// Expands to one `#[tokio::test]` per contract case, run with `$harness`,
/// in a module named `$module`.
macro_rules! store_contract_tests {
    ($module:ident, $harness:ty) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            $crate::store_contract::store_contract_tests!(@cases $harness;
                empty_store_has_no_keys,
                revisions_increase_and_track_create_and_mod,
                multi_key_txn_is_atomic,
                compare_on_absent_key,
                range_returns_only_the_prefix_in_key_order,
                pages_read_one_revision_in_key_order,
                a_page_at_a_compacted_revision_is_compacted,
                delete_removes_a_key_and_absent_deletes_change_nothing,
                watch_replays_history_then_continues_live,
                watch_on_one_prefix_sees_nothing_of_another,
                concurrent_watchers_both_see_everything,
                compaction_fails_old_watches_and_keeps_values,
                state_and_history_survive_a_restart,
                slow_watcher_receives_every_revision,
            );
        }
    };
    (@cases $harness:ty; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store_contract::$case::<$harness>().await;
            }
        )*
    };
}

// Lets a harness in another module (etcd's) invoke the suite as
// `crate::store_contract::store_contract_tests!(etcd, EtcdHarness);`.
#[allow(unused_imports)]
pub(crate) use store_contract_tests;

store_contract_tests!(embedded, EmbeddedHarness);

// === Harnesses ===

/// The embedded store in a temporary directory; restart drops the store and
/// reopens the same file.
pub struct EmbeddedHarness {
    dir: tempfile::TempDir,
    store: Option<Arc<EmbeddedStore>>,
}

impl EmbeddedHarness {
    fn path(&self) -> PathBuf {
        self.dir.path().join("store.redb")
    }
}

#[async_trait::async_trait]
impl StoreHarness for EmbeddedHarness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let store = EmbeddedStore::open(&dir.path().join("store.redb"), Default::default())
            .expect("open a fresh embedded store");
        EmbeddedHarness {
            dir,
            store: Some(Arc::new(store)),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().expect("the store is running")
    }

    async fn restart(&mut self) {
        let store = self.store.take().expect("the store is running");
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "a case still holds a store handle across restart"
        );
        drop(store);
        // A read a dropped watch stream had started on the blocking pool may
        // still hold the file for a moment; wait for it to let go.
        let path = self.path();
        let reopened = eventually(|| {
            let path = path.clone();
            async move {
                match EmbeddedStore::open(&path, EmbeddedOptions::default()) {
                    Ok(store) => Some(store),
                    Err(Error::Unavailable(_)) => None,
                    Err(err) => panic!("reopen {}: {err}", path.display()),
                }
            }
        })
        .await;
        self.store = Some(Arc::new(reopened));
    }
}

// === Cases ===

/// A fresh store holds no keys, and its first write takes a higher revision.
pub async fn empty_store_has_no_keys<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let all = store.range("").await.unwrap();
    assert_eq!(all.kvs, []);
    assert_eq!(store.range("app/").await.unwrap().kvs, []);
    assert!(all.revision >= 0, "revision {} is negative", all.revision);

    let written = commit(&*store, vec![put("app/a", "1")]).await;
    assert!(written > all.revision);
}

/// Each commit takes a strictly higher revision; an overwrite keeps the
/// create revision and moves the mod revision.
pub async fn revisions_increase_and_track_create_and_mod<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let start = store.range("").await.unwrap().revision;

    let r1 = commit(&*store, vec![put("k/a", "a1")]).await;
    let r2 = commit(&*store, vec![put("k/b", "b1")]).await;
    let r3 = commit(&*store, vec![put("k/a", "a2")]).await;
    assert!(start < r1 && r1 < r2 && r2 < r3, "{start} {r1} {r2} {r3}");

    let read = store.range("k/").await.unwrap();
    assert_eq!(read.revision, r3);
    assert_eq!(read.kvs, [kv("k/a", "a2", r1, r3), kv("k/b", "b1", r2, r2)]);
}

/// A txn writes all its ops at one revision, or (when a compare fails)
/// nothing at all and takes no revision.
pub async fn multi_key_txn_is_atomic<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let r1 = commit(
        &*store,
        vec![put("m/x", "1"), put("m/y", "1"), put("m/z", "1")],
    )
    .await;
    let read = store.range("m/").await.unwrap();
    assert_eq!(
        read.kvs,
        [
            kv("m/x", "1", r1, r1),
            kv("m/y", "1", r1, r1),
            kv("m/z", "1", r1, r1)
        ]
    );

    // One compare holds, one does not: nothing is written, no revision taken.
    let failed = store
        .txn(Txn {
            compares: vec![mod_revision("m/x", r1), mod_revision("m/y", r1 - 1)],
            ops: vec![put("m/x", "2"), put("m/new", "2"), delete("m/z")],
        })
        .await
        .unwrap();
    assert_eq!(failed, TxnOutcome::CompareFailed { revision: r1 });
    assert_eq!(store.range("m/").await.unwrap(), read);

    // All compares hold: every op lands at one revision.
    let r2 = match store
        .txn(Txn {
            compares: vec![mod_revision("m/x", r1), mod_revision("m/y", r1)],
            ops: vec![put("m/x", "2"), put("m/new", "2"), delete("m/z")],
        })
        .await
        .unwrap()
    {
        TxnOutcome::Committed { revision } => revision,
        other => panic!("compares on current mod revisions failed: {other:?}"),
    };
    assert!(r2 > r1);
    let read = store.range("m/").await.unwrap();
    assert_eq!(read.revision, r2);
    assert_eq!(
        read.kvs,
        [
            kv("m/new", "2", r2, r2),
            kv("m/x", "2", r1, r2),
            kv("m/y", "1", r1, r1),
        ]
    );
}

/// `ModRevision { revision: 0 }` holds exactly when the key is absent.
pub async fn compare_on_absent_key<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let create = || Txn {
        compares: vec![mod_revision("lock", 0)],
        ops: vec![put("lock", "mine")],
    };
    let created = match store.txn(create()).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        other => panic!("create-if-absent on an absent key failed: {other:?}"),
    };
    assert_eq!(
        store.txn(create()).await.unwrap(),
        TxnOutcome::CompareFailed { revision: created }
    );
    assert_eq!(
        store.range("lock").await.unwrap().kvs,
        [kv("lock", "mine", created, created)]
    );

    // Absent again after a delete.
    let deleted = commit(&*store, vec![delete("lock")]).await;
    let recreated = match store.txn(create()).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        other => panic!("create-if-absent after delete failed: {other:?}"),
    };
    assert!(recreated > deleted && deleted > created);
    assert_eq!(
        store.range("lock").await.unwrap().kvs,
        [kv("lock", "mine", recreated, recreated)]
    );
}

/// A range returns the keys under the prefix and no others, in key order.
pub async fn range_returns_only_the_prefix_in_key_order<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let revision = commit(
        &*store,
        vec![
            put("app/b", "b"),
            put("apple", "apple"),
            put("app/c/d", "cd"),
            put("ap", "ap"),
            put("app/a", "a"),
            put("b/app/x", "x"),
        ],
    )
    .await;
    let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();

    let read = store.range("app/").await.unwrap();
    assert_eq!(read.revision, revision);
    assert_eq!(keys(read.kvs), ["app/a", "app/b", "app/c/d"]);
    assert_eq!(
        keys(store.range("app").await.unwrap().kvs),
        ["app/a", "app/b", "app/c/d", "apple"]
    );
    assert_eq!(
        keys(store.range("").await.unwrap().kvs),
        ["ap", "app/a", "app/b", "app/c/d", "apple", "b/app/x"]
    );
    assert_eq!(keys(store.range("app/c/d").await.unwrap().kvs), ["app/c/d"]);
    assert_eq!(
        keys(store.range("zzz").await.unwrap().kvs),
        Vec::<String>::new()
    );
}

/// Paged reads: each page holds at most `limit` keys after `start_after`,
/// says whether more follow, and at a fixed revision shows the keys as they
/// were then, whatever was created, changed or deleted since.
pub async fn pages_read_one_revision_in_key_order<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let keys = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();

    let first = commit(
        &*store,
        vec![
            put("log/1", "one"),
            put("log/2", "two"),
            put("log/3", "three"),
            put("logbook", "not under log/"),
        ],
    )
    .await;
    let at = commit(&*store, vec![put("log/4", "four"), put("log/2", "two b")]).await;

    let page = store.range_page("log/", None, 2, 0).await.unwrap();
    assert_eq!(page.revision, at, "revision 0 reads now and says which");
    assert_eq!(keys(&page.kvs), ["log/1", "log/2"]);
    assert!(page.more);

    // The store moves on: a key created, one changed, one deleted.
    let later = commit(
        &*store,
        vec![
            put("log/0", "zero"),
            put("log/3", "three b"),
            delete("log/4"),
        ],
    )
    .await;
    assert!(later > at);

    let second = store
        .range_page("log/", Some("log/2"), 2, page.revision)
        .await
        .unwrap();
    assert_eq!(second.revision, at);
    assert_eq!(
        second.kvs,
        [
            kv("log/3", "three", first, first),
            kv("log/4", "four", at, at)
        ],
        "the page shows the keys as they were at {at}"
    );
    assert!(!second.more);

    // At the earlier revision, log/2 had its first value and log/4 and
    // log/0 did not exist; one page of everything.
    let whole = store.range_page("log/", None, 10, first).await.unwrap();
    assert_eq!(
        whole.kvs,
        [
            kv("log/1", "one", first, first),
            kv("log/2", "two", first, first),
            kv("log/3", "three", first, first),
        ]
    );
    assert!(!whole.more);

    // Now: the new key, the new values, without the deleted one.
    let now = store.range_page("log/", None, 10, 0).await.unwrap();
    assert_eq!(now.revision, later);
    assert_eq!(keys(&now.kvs), ["log/0", "log/1", "log/2", "log/3"]);
    assert_eq!(now.kvs, store.range("log/").await.unwrap().kvs);

    // One key per page walks every key exactly once.
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .range_page("log/", after.as_deref(), 1, at)
            .await
            .unwrap();
        assert!(page.kvs.len() <= 1);
        walked.extend(keys(&page.kvs));
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(walked, ["log/1", "log/2", "log/3", "log/4"]);

    // Bad requests are refused.
    for (limit, revision) in [(0, 0), (1, later + 1000)] {
        let err = store
            .range_page("log/", None, limit, revision)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    }
}

/// A page at a revision compaction discarded fails with `Error::Compacted`,
/// so the reader starts over at the current revision.
pub async fn a_page_at_a_compacted_revision_is_compacted<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let r1 = commit(&*store, vec![put("c/1", "1")]).await;
    let r2 = commit(&*store, vec![put("c/1", "1b")]).await;
    let r3 = commit(&*store, vec![put("c/2", "2")]).await;
    store.compact(r3).await.unwrap();
    for old in [r1, r2] {
        match store.range_page("c/", None, 10, old).await {
            Err(Error::Compacted { requested, .. }) => assert_eq!(requested, old),
            other => panic!("a page at compacted revision {old} gave {other:?}"),
        }
    }
    let page = store.range_page("c/", None, 10, r3).await.unwrap();
    assert_eq!(page.kvs, [kv("c/1", "1b", r1, r2), kv("c/2", "2", r3, r3)]);
}

/// A delete removes the key and is watched as a delete event; deleting an
/// absent key changes nothing (no revision, no event).
pub async fn delete_removes_a_key_and_absent_deletes_change_nothing<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let created = commit(&*store, vec![put("d/k", "v"), put("d/other", "o")]).await;
    let mut watch = Watcher::start(&*store, "d/", created + 1).await;

    let deleted = commit(&*store, vec![delete("d/k")]).await;
    assert!(deleted > created);
    let read = store.range("d/").await.unwrap();
    assert_eq!(read.revision, deleted);
    assert_eq!(read.kvs, [kv("d/other", "o", created, created)]);

    // Deleting an absent key alone changes nothing: no revision, no event.
    assert_eq!(
        store.txn(txn(vec![delete("d/k")])).await.unwrap(),
        TxnOutcome::Committed { revision: deleted }
    );
    assert_eq!(store.range("").await.unwrap().revision, deleted);

    // The next change is the next thing the watcher sees after the delete.
    let rewritten = commit(&*store, vec![put("d/k", "again")]).await;
    assert!(rewritten > deleted);
    let events = watch.events_through(rewritten).await;
    assert_eq!(
        events,
        [
            delete_event("d/k", deleted),
            put_event(kv("d/k", "again", rewritten, rewritten)),
        ]
    );
}

/// A watch from a past revision replays the history in order, a txn's
/// events together, then delivers new commits.
pub async fn watch_replays_history_then_continues_live<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let r1 = commit(&*store, vec![put("w/1", "a")]).await;
    let r2 = commit(&*store, vec![put("w/2", "b"), put("w/3", "c")]).await;
    let r3 = commit(&*store, vec![delete("w/1"), put("w/2", "b2")]).await;

    let mut watch = Watcher::start(&*store, "w/", r1).await;
    let history = watch.events_through(r3).await;
    assert_eq!(
        history,
        [
            put_event(kv("w/1", "a", r1, r1)),
            put_event(kv("w/2", "b", r2, r2)),
            put_event(kv("w/3", "c", r2, r2)),
            delete_event("w/1", r3),
            put_event(kv("w/2", "b2", r2, r3)),
        ]
    );

    // A watch from the middle of history starts there.
    let mut from_middle = Watcher::start(&*store, "w/", r2).await;
    assert_eq!(from_middle.events_through(r3).await, history[1..]);

    let r4 = commit(&*store, vec![put("w/4", "d"), put("w/5", "e")]).await;
    let live = [
        put_event(kv("w/4", "d", r4, r4)),
        put_event(kv("w/5", "e", r4, r4)),
    ];
    assert_eq!(watch.events_through(r4).await, live);
    assert_eq!(from_middle.events_through(r4).await, live);
}

/// A watch sees only changes under its prefix (not even keys that merely
/// start with the same characters).
pub async fn watch_on_one_prefix_sees_nothing_of_another<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let start = store.range("").await.unwrap().revision;

    let mut a = Watcher::start(&*store, "a/", start + 1).await;
    let mut b = Watcher::start(&*store, "b/", start + 1).await;

    let only_b = commit(&*store, vec![put("b/1", "b"), put("ab/1", "ab")]).await;
    let both = commit(&*store, vec![put("a/1", "a"), put("b/2", "b")]).await;
    let only_a = commit(&*store, vec![put("a/2", "a")]).await;

    assert_eq!(
        a.events_through(only_a).await,
        [
            put_event(kv("a/1", "a", both, both)),
            put_event(kv("a/2", "a", only_a, only_a)),
        ]
    );
    assert_eq!(
        b.events_through(both).await,
        [
            put_event(kv("b/1", "b", only_b, only_b)),
            put_event(kv("b/2", "b", both, both)),
        ]
    );
}

/// Two watchers on one prefix, racing a writer, each see every change in
/// commit order.
pub async fn concurrent_watchers_both_see_everything<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let start = store.range("").await.unwrap().revision;

    let first = Watcher::start(&*store, "c/", start + 1).await;
    let second = Watcher::start(&*store, "c/", start + 1).await;

    // Writes race with both watchers reading.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut expected = Vec::new();
            for i in 0..20 {
                let key = format!("c/{}", i % 3);
                let revision = commit(&*store, vec![put(&key, &i.to_string())]).await;
                expected.push((key, revision));
            }
            expected
        })
    };
    let read = |mut watcher: Watcher| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 20 {
                let batch = watcher.next_batch().await;
                seen.extend(
                    batch
                        .into_iter()
                        .map(|event| (event.kv.key, event.kv.mod_revision)),
                );
            }
            seen
        })
    };
    let (first, second) = (read(first), read(second));
    let expected = writer.await.unwrap();
    assert_eq!(first.await.unwrap(), expected);
    assert_eq!(second.await.unwrap(), expected);
}

/// After compaction, watches at or below the compacted revision fail with
/// `Error::Compacted`, newer ones work, and current values stay. The
/// compacted revision never goes down; the future cannot be compacted.
pub async fn compaction_fails_old_watches_and_keeps_values<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();

    let r1 = commit(&*store, vec![put("x/1", "1")]).await;
    let r2 = commit(&*store, vec![put("x/2", "2")]).await;
    let r3 = commit(&*store, vec![put("x/2", "2b")]).await;
    let before = store.range("x/").await.unwrap();

    store.compact(r2).await.unwrap();

    // History before r2 is gone; r2 itself stays watchable (etcd's
    // semantics).
    expect_compacted(store.watch("x/", r1).await, r1).await;
    let mut after = Watcher::start(&*store, "x/", r2).await;
    assert_eq!(
        after.events_through(r3).await,
        [
            put_event(kv("x/2", "2", r2, r2)),
            put_event(kv("x/2", "2b", r2, r3))
        ]
    );

    // Current values and their revisions are untouched.
    assert_eq!(store.range("x/").await.unwrap(), before);
    assert_eq!(
        before.kvs,
        [kv("x/1", "1", r1, r1), kv("x/2", "2b", r2, r3)]
    );

    // Compacting again below the compacted revision changes nothing.
    store.compact(r1).await.unwrap();
    expect_compacted(store.watch("x/", r1).await, r1).await;
    Watcher::start(&*store, "x/", r2).await;

    // The future cannot be compacted.
    let err = store.compact(r3 + 100).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
}

/// Keys, values, revisions, uncompacted history and the compacted revision
/// all survive a restart; new writes continue above the old revisions.
pub async fn state_and_history_survive_a_restart<H: StoreHarness>() {
    let mut harness = H::start().await;
    let store = harness.store();

    let r1 = commit(&*store, vec![put("s/gone", "0")]).await;
    let r2 = commit(&*store, vec![put("s/a", "1"), put("s/b", "1")]).await;
    let r3 = commit(&*store, vec![put("s/a", "2"), delete("s/gone")]).await;
    store.compact(r2).await.unwrap();
    let before = store.range("").await.unwrap();
    let history = Watcher::start(&*store, "s/", r2)
        .await
        .events_through(r3)
        .await;
    drop(store);

    harness.restart().await;
    let store = harness.store();

    assert_eq!(store.range("").await.unwrap(), before);
    assert_eq!(before.kvs, [kv("s/a", "2", r2, r3), kv("s/b", "1", r2, r2)]);
    assert_eq!(before.revision, r3);

    // History that was not compacted still replays; compacted history
    // stays compacted.
    let mut replay = Watcher::start(&*store, "s/", r2).await;
    assert_eq!(replay.events_through(r3).await, history);
    expect_compacted(store.watch("s/", r1).await, r1).await;

    // New writes continue above the old revisions, and reach the watcher.
    let r4 = commit(&*store, vec![put("s/c", "1")]).await;
    assert!(r4 > r3, "revision after restart {r4} is not above {r3}");
    assert_eq!(
        replay.events_through(r4).await,
        [put_event(kv("s/c", "1", r4, r4))]
    );
}

/// A watcher that does not poll while 200 txns commit still receives every
/// one of them, in order.
pub async fn slow_watcher_receives_every_revision<H: StoreHarness>() {
    let harness = H::start().await;
    let store = harness.store();
    let start = store.range("").await.unwrap().revision;

    // Not polled until all 200 txns are committed.
    let mut watch = Watcher::start(&*store, "slow/", start + 1).await;
    let mut expected = Vec::new();
    for i in 0..200 {
        let key = format!("slow/{:03}", i % 7);
        let revision = commit(&*store, vec![put(&key, &i.to_string())]).await;
        expected.push((key, revision));
    }
    let last = expected.last().unwrap().1;
    let seen: Vec<_> = watch
        .events_through(last)
        .await
        .into_iter()
        .map(|event| (event.kv.key, event.kv.mod_revision))
        .collect();
    assert_eq!(seen, expected);
}

// === Helpers ===

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

fn mod_revision(key: &str, revision: Revision) -> Compare {
    Compare::ModRevision {
        key: key.to_owned(),
        revision,
    }
}

fn txn(ops: Vec<Op>) -> Txn {
    Txn {
        compares: Vec::new(),
        ops,
    }
}

fn kv(key: &str, value: &str, create_revision: Revision, mod_revision: Revision) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        create_revision,
        mod_revision,
    }
}

fn put_event(kv: KeyValue) -> Event {
    Event {
        kind: EventKind::Put,
        kv,
    }
}

fn delete_event(key: &str, revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_owned(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
        },
    }
}

/// Commits `ops` without compares and returns the revision.
async fn commit(store: &dyn Store, ops: Vec<Op>) -> Revision {
    match store.txn(txn(ops)).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        other => panic!("a txn without compares did not commit: {other:?}"),
    }
}

/// Asserts a watch from `from` fails with [`Error::Compacted`], either at
/// once or as the stream's first item.
async fn expect_compacted(watch: Result<WatchStream, Error>, from: Revision) {
    let err = match watch {
        Err(err) => err,
        Ok(mut stream) => match tokio::time::timeout(DEADLINE, stream.next()).await {
            Ok(Some(Err(err))) => err,
            other => panic!("watch from compacted revision {from} gave {other:?}"),
        },
    };
    match err {
        Error::Compacted {
            requested,
            compacted,
        } => {
            assert_eq!(requested, from);
            assert!(
                compacted >= from,
                "compacted {compacted} < requested {from}"
            );
        }
        other => panic!("watch from compacted revision {from} failed with {other:?}"),
    }
}

/// Calls `attempt` until it returns `Some`, failing after [`DEADLINE`].
async fn eventually<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A watch stream that checks, for every batch, what the contract promises
/// about batches: revisions only go up, and a transaction's events are never
/// split across batches.
struct Watcher {
    stream: WatchStream,
    /// The revision of the last batch received.
    revision: Revision,
    /// Highest event revision delivered so far; a later batch may not carry
    /// an event at or below it.
    last_event: Revision,
}

impl Watcher {
    async fn start(store: &dyn Store, prefix: &str, from: Revision) -> Watcher {
        let stream = store
            .watch(prefix, from)
            .await
            .unwrap_or_else(|err| panic!("watch {prefix:?} from {from}: {err}"));
        Watcher {
            stream,
            revision: 0,
            last_event: from - 1,
        }
    }

    /// The events of the next batch that has any.
    async fn next_batch(&mut self) -> Vec<Event> {
        loop {
            let batch = match tokio::time::timeout(DEADLINE, self.stream.next()).await {
                Ok(Some(Ok(batch))) => batch,
                Ok(Some(Err(err))) => panic!("watch failed: {err}"),
                Ok(None) => panic!("watch ended"),
                Err(_) => panic!(
                    "no watch batch within {DEADLINE:?} (last revision {})",
                    self.revision
                ),
            };
            assert!(
                batch.revision >= self.revision,
                "batch revision went back from {} to {}",
                self.revision,
                batch.revision
            );
            self.revision = batch.revision;
            let mut revisions = BTreeMap::new();
            for event in &batch.events {
                *revisions.entry(event.kv.mod_revision).or_insert(0) += 1;
            }
            if let (Some((&first, _)), Some((&last, _))) =
                (revisions.first_key_value(), revisions.last_key_value())
            {
                assert!(
                    first > self.last_event,
                    "revision {first} arrived after revision {} (split or reordered txn)",
                    self.last_event
                );
                assert!(
                    last <= batch.revision,
                    "batch at {} carries an event of revision {last}",
                    batch.revision
                );
                self.last_event = last;
            }
            if !batch.events.is_empty() {
                return batch.events;
            }
        }
    }

    /// Every event up to and including `revision`. Fails if a batch brings
    /// events beyond it: cases write nothing more before they call this.
    async fn events_through(&mut self, revision: Revision) -> Vec<Event> {
        let mut events = Vec::new();
        while self.last_event < revision && self.revision < revision {
            events.extend(self.next_batch().await);
        }
        assert!(
            self.last_event <= revision,
            "watch delivered revision {} beyond {revision}",
            self.last_event
        );
        events
    }
}
