//! One namespace on one replica: a task that follows the namespace in the
//! store (list, then watch from the next revision) and publishes the compiled
//! state through a `tokio::sync::watch` channel.
//!
//! The algorithm is the one Kubernetes informers use: read the namespace at
//! revision R, watch from R+1, drop events at or below the last applied store
//! revision, apply each batch as one unit, and after a compaction re-read the
//! namespace and replace the state in one step. Fan-out is the latest state,
//! not a queue: a slow subscriber skips intermediate revisions and converges
//! on the newest. The published revision never goes backwards.
//!
//! The follower also holds the namespace to what its last change left: the
//! meta record lists the activations (id and record hash), and the list is
//! trusted once the audit entry created with the meta record, signed by a
//! trusted key, commits to its digest. An activation deleted or edited
//! behind safemode's back is then replaced by a stand-in that denies
//! everything, and named under `problems`, until it is lifted; one added
//! behind safemode's back is named.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::keys::{Layout, NamespaceChange, NamespaceKey, NamespaceState};
use crate::audit::{self, AuditEntry};
use safemode_policy::{Activation, ActivationId, Channel, ChannelPolicy, Namespace, Revision};
use safemode_signing::TrustedKeys;
use safemode_store::{self as store, Event, EventKind, KeyValue, Store};
use safemode_support::backoff::Backoff;

/// The compiled policy for one channel at one revision: what a subscriber of
/// that channel receives.
#[derive(Debug)]
pub struct ChannelSnapshot {
    /// The channel.
    pub channel: Channel,
    /// Activations that cover the channel, by (revision, id).
    pub activations: Vec<Arc<Activation>>,
    /// The merged rules.
    pub policy: ChannelPolicy,
}

/// A namespace's state at one revision, compiled for every channel.
#[derive(Debug)]
pub struct NamespaceView {
    /// The namespace.
    pub namespace: Namespace,
    /// Whether the state was read from the store at least once.
    pub loaded: bool,
    /// Revision of the namespace's last change (0: never changed).
    pub revision: Revision,
    /// Mod revision of the namespace's meta key; transactions compare it.
    pub meta_revision: Revision,
    /// When this replica compiled the view.
    pub issued_at: Timestamp,
    /// Active activations by (revision, id).
    pub activations: Vec<Arc<Activation>>,
    /// The last change, if the namespace has one.
    pub last_change: Option<NamespaceChange>,
    /// Records that could not be read, and activations changed behind
    /// safemode's back; shown in status so that neither is dropped
    /// silently.
    pub problems: Vec<String>,
    /// The activations the last change left (id to record hash), when its
    /// signed audit entry vouches for the list.
    pub listed: Option<BTreeMap<String, String>>,
    /// The record hash of every activation as stored now.
    pub stored_hashes: BTreeMap<String, String>,
    channels: Vec<Arc<ChannelSnapshot>>,
}

impl NamespaceView {
    fn unloaded(namespace: Namespace) -> Self {
        NamespaceView {
            namespace,
            loaded: false,
            revision: 0,
            meta_revision: 0,
            issued_at: Timestamp::now(),
            activations: Vec::new(),
            last_change: None,
            problems: Vec::new(),
            listed: None,
            stored_hashes: BTreeMap::new(),
            channels: Vec::new(),
        }
    }

    /// An empty view of `namespace` at `revision`: nothing active (the edge's
    /// tests build snapshots from it).
    pub fn empty_at(namespace: Namespace, revision: Revision) -> Self {
        NamespaceView {
            revision,
            loaded: true,
            ..NamespaceView::unloaded(namespace)
        }
    }

    /// The snapshot for `channel`.
    pub fn channel(&self, channel: Channel) -> &Arc<ChannelSnapshot> {
        &self.channels[channel.index()]
    }
}

/// What checking a meta record's list against its audit entry found: the
/// list (`Ok(None)`: the record has none) or why it is not trusted.
type SealCheck = Result<Option<BTreeMap<String, String>>, String>;

/// The mutable state the task folds store events into.
struct State {
    namespace: Namespace,
    activations: BTreeMap<ActivationId, Arc<Activation>>,
    /// Undecodable records, by key.
    problems: BTreeMap<String, String>,
    revision: Revision,
    meta_revision: Revision,
    last_change: Option<NamespaceChange>,
    /// The record hash of each stored activation.
    hashes: BTreeMap<ActivationId, String>,
    /// The meta revision whose list was checked, and the result.
    seal: Option<(Revision, SealCheck)>,
    /// The meta record was deleted (or went missing on a re-read) while a
    /// signed list was trusted: every change safemode makes rewrites it and
    /// none deletes it, so this was done behind safemode's back, and the
    /// last trusted list stays what is enforced until the next change.
    meta_deleted: bool,
    /// Every store change up to here has been applied.
    store_revision: Revision,
}

impl State {
    fn new(namespace: Namespace) -> Self {
        State {
            namespace,
            activations: BTreeMap::new(),
            problems: BTreeMap::new(),
            revision: 0,
            meta_revision: 0,
            last_change: None,
            hashes: BTreeMap::new(),
            seal: None,
            meta_deleted: false,
            store_revision: 0,
        }
    }

    fn put(&mut self, layout: &Layout, kv: &KeyValue) {
        self.revision = self.revision.max(kv.mod_revision);
        match layout.classify(&self.namespace, &kv.key) {
            NamespaceKey::Activation(id) => {
                let activation = match serde_json::from_slice::<Activation>(&kv.value) {
                    Ok(activation) if activation.id == id => {
                        self.problems.remove(&kv.key);
                        activation
                    }
                    read => {
                        let error = match read {
                            Ok(_) => "its id does not match its key".to_string(),
                            Err(e) => e.to_string(),
                        };
                        self.problem(kv, &error);
                        Activation::unreadable(
                            id.clone(),
                            kv.mod_revision,
                            &error,
                            Timestamp::now(),
                        )
                    }
                };
                self.hashes
                    .insert(id.clone(), audit::record_hash(&kv.value));
                self.activations.insert(
                    id,
                    // The change that last wrote it: the one that applied it,
                    // or an escalation that gave it a new stage's texts.
                    // A lift compares it, so it must be the mod revision.
                    Arc::new(Activation {
                        revision: kv.mod_revision,
                        ..activation
                    }),
                );
            }
            NamespaceKey::Meta => {
                self.meta_revision = kv.mod_revision;
                self.meta_deleted = false;
                match serde_json::from_slice(&kv.value) {
                    Ok(change) => self.last_change = Some(change),
                    Err(e) => self.problem(kv, &e.to_string()),
                }
            }
            NamespaceKey::Unknown => debug!(key = %kv.key, "ignoring unknown key"),
        }
    }

    fn problem(&mut self, kv: &KeyValue, error: &str) {
        warn!(key = %kv.key, %error, "cannot read a stored record; failing closed for it");
        self.problems.insert(
            kv.key.clone(),
            format!("{} (revision {}): {error}", kv.key, kv.mod_revision),
        );
    }

    fn delete(&mut self, layout: &Layout, kv: &KeyValue) {
        self.revision = self.revision.max(kv.mod_revision);
        self.problems.remove(&kv.key);
        match layout.classify(&self.namespace, &kv.key) {
            NamespaceKey::Activation(id) => {
                self.activations.remove(&id);
                self.hashes.remove(&id);
            }
            NamespaceKey::Meta => {
                self.meta_deleted = self.trusted_list().is_some();
                if self.meta_deleted {
                    warn!(namespace = %self.namespace, "the namespace's last-change record was deleted outside safemode; enforcing what it listed");
                }
                self.meta_revision = 0;
                self.last_change = None;
            }
            NamespaceKey::Unknown => {}
        }
    }

    /// Replaces the state with a fresh read of the whole namespace.
    fn replace(&mut self, layout: &Layout, kvs: &[KeyValue], store_revision: Revision) {
        let previous = self.revision;
        let before = self.contents();
        let seal = self.seal.take();
        let had_list = self.trusted_list().is_some();
        *self = State::new(self.namespace.clone());
        self.seal = seal;
        for kv in kvs {
            self.put(layout, kv);
        }
        // A re-read that finds no meta record where a signed one was.
        if had_list && self.meta_revision == 0 {
            warn!(namespace = %self.namespace, "the namespace's last-change record is gone; enforcing what it listed");
            self.meta_deleted = true;
        }
        if self.revision <= previous {
            // A re-read after compaction does not see a delete's revision
            // (the key is gone). The revision never goes backwards, and
            // when something did go, it moves to the read's revision:
            // otherwise subscribers, which only take newer revisions, would
            // keep the old contents.
            self.revision = if self.contents() == before {
                previous
            } else {
                // Every change safemode makes rewrites the meta record, so
                // this is a record deleted behind safemode's back (say with
                // etcdctl). Replicas that saw the delete itself count it at
                // its own, lower revision.
                warn!(
                    namespace = %self.namespace,
                    revision = store_revision,
                    "records went missing without a change through safemode; publishing what is stored now"
                );
                store_revision.max(previous)
            };
        }
        self.store_revision = store_revision;
    }

    /// What a subscriber's snapshot is made of, by identity: the
    /// activations (with their revisions), the unreadable records and the
    /// meta record.
    fn contents(&self) -> (Vec<(ActivationId, Revision)>, Vec<String>, Revision) {
        (
            self.activations
                .iter()
                .map(|(id, a)| (id.clone(), a.revision))
                .collect(),
            self.problems.keys().cloned().collect(),
            self.meta_revision,
        )
    }

    /// The trusted list of what the last change left, if it checked out
    /// for the current meta record.
    fn listed(&self) -> Option<&BTreeMap<String, String>> {
        match &self.seal {
            Some((revision, Ok(Some(listed))))
                if *revision == self.meta_revision || self.meta_deleted =>
            {
                Some(listed)
            }
            _ => None,
        }
    }

    /// The list of the meta record checked last, if it checked out.
    fn trusted_list(&self) -> Option<&BTreeMap<String, String>> {
        match &self.seal {
            Some((revision, Ok(Some(listed)))) if *revision == self.meta_revision => Some(listed),
            _ => None,
        }
    }

    /// The activations as they should be enforced, and what differs from
    /// the signed list of the last change: a listed activation that is gone
    /// or whose record changed is replaced by a stand-in that denies
    /// everything (a protection removed behind safemode's back stays on).
    fn enforced(&self) -> (BTreeMap<ActivationId, Arc<Activation>>, Vec<String>) {
        let mut activations = self.activations.clone();
        let mut problems = Vec::new();
        if self.meta_deleted {
            problems.push(format!(
                "{}: the namespace's last-change record was deleted outside safemode; what the last signed change left is enforced",
                self.namespace
            ));
        }
        if let Some((revision, Err(why))) = &self.seal
            && *revision == self.meta_revision
        {
            problems.push(format!(
                "{}: the namespace's last-change record is not the one safemode signed: {why}",
                self.namespace
            ));
        }
        let Some(listed) = self.listed() else {
            return (activations, problems);
        };
        for (id, hash) in listed {
            let Ok(parsed) = ActivationId::parse(id) else {
                continue;
            };
            let what = match self.hashes.get(&parsed) {
                None => "was deleted outside safemode",
                Some(stored) if stored != hash => "was edited outside safemode",
                Some(_) => continue,
            };
            let error = format!("activation {id} {what}; it fails closed until it is lifted");
            warn!(namespace = %self.namespace, activation = %id, "{what}; failing closed for it");
            problems.push(format!("{}: {error}", self.namespace));
            let revision = activations
                .get(&parsed)
                .map_or(self.meta_revision, |a| a.revision);
            activations.insert(
                parsed.clone(),
                Arc::new(Activation::unreadable(
                    parsed,
                    revision,
                    &error,
                    Timestamp::now(),
                )),
            );
        }
        for id in self.hashes.keys() {
            if !listed.contains_key(id.as_str()) {
                let suffix = format!("/activations/{id}");
                // One line per record: an unreadable one says both.
                if self.problems.keys().any(|key| key.ends_with(&suffix)) {
                    continue;
                }
                problems.push(format!(
                    "{}: activation {id} was added outside safemode (the last change did not leave it)",
                    self.namespace
                ));
            }
        }
        (activations, problems)
    }

    /// A read problem of `key`, saying also when the record is not one the
    /// last change left.
    fn with_origin(&self, key: &str, problem: &str) -> String {
        let added = self.listed().is_some_and(|listed| {
            key.rsplit_once("/activations/")
                .is_some_and(|(_, id)| !listed.contains_key(id))
        });
        if added {
            format!("{problem}; it was added outside safemode (the last change did not leave it)")
        } else {
            problem.to_string()
        }
    }

    fn view(&self) -> NamespaceView {
        let (enforced, integrity) = self.enforced();
        let mut activations: Vec<Arc<Activation>> = enforced.values().cloned().collect();
        activations.sort_by(|a, b| (a.revision, &a.id).cmp(&(b.revision, &b.id)));
        let channels = Channel::all()
            .map(|channel| {
                let covering: Vec<Arc<Activation>> = activations
                    .iter()
                    .filter(|a| a.covers(channel))
                    .cloned()
                    .collect();
                Arc::new(ChannelSnapshot {
                    channel,
                    policy: ChannelPolicy::compile(channel, covering.iter().map(|a| &**a)),
                    activations: covering,
                })
            })
            .collect();
        NamespaceView {
            namespace: self.namespace.clone(),
            loaded: true,
            revision: self.revision,
            meta_revision: self.meta_revision,
            issued_at: Timestamp::now(),
            activations,
            last_change: self.last_change.clone(),
            problems: self
                .problems
                .iter()
                .map(|(key, problem)| self.with_origin(key, problem))
                .chain(integrity)
                .collect(),
            listed: self.listed().cloned(),
            stored_hashes: self
                .hashes
                .iter()
                .map(|(id, hash)| (id.to_string(), hash.clone()))
                .collect(),
            channels,
        }
    }
}

/// Whether a namespace follower is keeping up with the store.
#[derive(Debug, Default)]
pub struct FollowerHealth {
    failing: Mutex<Option<Failing>>,
}

/// A follower's store errors since its last success.
#[derive(Debug)]
struct Failing {
    /// The last one.
    error: String,
    /// When the first one came.
    since: std::time::Instant,
}

impl FollowerHealth {
    /// Whether the follower has a working read of the store. Heartbeats are
    /// only sent while it does: a heartbeat promises subscribers that their
    /// policy is current.
    pub fn is_healthy(&self) -> bool {
        self.lock().is_none()
    }

    /// The last store error, while unhealthy.
    pub fn last_error(&self) -> Option<String> {
        self.lock().as_ref().map(|f| f.error.clone())
    }

    /// The last store error and how long the follower has been failing
    /// (since its last success), while unhealthy.
    pub fn failing(&self) -> Option<(String, Duration)> {
        self.lock()
            .as_ref()
            .map(|f| (f.error.clone(), f.since.elapsed()))
    }

    fn failed(&self, error: String) {
        let mut failing = self.lock();
        let since = failing
            .as_ref()
            .map_or_else(std::time::Instant::now, |f| f.since);
        *failing = Some(Failing { error, since });
    }

    fn recovered(&self) {
        self.lock().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Failing>> {
        // Each update is one assignment; a poisoned value is still whole.
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A namespace followed by this replica.
pub struct NamespaceHandle {
    view: watch::Receiver<Arc<NamespaceView>>,
    /// Whether the follower keeps up with the store.
    pub health: Arc<FollowerHealth>,
    /// Subscribers connected to this replica for the namespace.
    pub subscribers: Arc<super::subscribers::Subscribers>,
    /// Stops the follower.
    stop: CancellationToken,
    /// When a request last used the namespace (seconds since the Unix epoch).
    last_used: AtomicI64,
}

/// The namespace as stored now, read once without following it: how a
/// replica answers a read of a namespace it does not follow, so that reads
/// never make it start a watch.
pub(crate) async fn read_once(
    store: Arc<dyn Store>,
    layout: Layout,
    trusted: TrustedKeys,
    namespace: Namespace,
) -> store::Result<NamespaceView> {
    let prefix = layout.namespace_prefix(&namespace);
    let (tx, _) = watch::channel(Arc::new(NamespaceView::unloaded(namespace.clone())));
    // The follower's own load, once: the same checks of what it reads
    // (unreadable records, the signed list of the last change).
    let mut follower = Follower {
        store,
        layout,
        trusted,
        tx,
        health: Arc::default(),
        state: State::new(namespace),
    };
    let range = store::read_all(&*follower.store, &prefix).await?;
    follower
        .state
        .replace(&follower.layout, &range.kvs, range.revision);
    follower.check_seal().await;
    Ok(follower.state.view())
}

impl NamespaceHandle {
    /// Starts following `namespace`; the task stops when `shutdown` fires.
    pub fn spawn(
        store: Arc<dyn Store>,
        layout: Layout,
        trusted: TrustedKeys,
        namespace: Namespace,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, view) = watch::channel(Arc::new(NamespaceView::unloaded(namespace.clone())));
        let health = Arc::new(FollowerHealth::default());
        let follower = Follower {
            store,
            layout,
            trusted,
            tx,
            health: health.clone(),
            state: State::new(namespace.clone()),
        };
        let stop = shutdown.clone();
        // A root: the follower outlives the call that started it, and a
        // child span would keep that call's span (and its trace) open.
        let span = tracing::info_span!(parent: None, "namespace", %namespace);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                tokio::select! {
                    () = follower.run() => {}
                    () = shutdown.cancelled() => debug!("namespace follower stopped"),
                }
            },
            span,
        ));
        NamespaceHandle {
            view,
            health,
            subscribers: Arc::default(),
            stop,
            last_used: AtomicI64::new(Timestamp::now().as_second()),
        }
    }

    /// Notes that a request used the namespace now.
    pub fn touch(&self) {
        self.last_used
            .store(Timestamp::now().as_second(), Ordering::Relaxed);
    }

    /// Whether nobody used the namespace for `idle` and nobody subscribes.
    pub fn is_idle(&self, idle: Duration) -> bool {
        let unused = Timestamp::now().as_second() - self.last_used.load(Ordering::Relaxed);
        self.subscribers.is_empty() && unused >= idle.as_secs() as i64
    }

    /// Stops the follower.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The latest view.
    pub fn current(&self) -> Arc<NamespaceView> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every newer view.
    pub fn watch(&self) -> watch::Receiver<Arc<NamespaceView>> {
        self.view.clone()
    }

    /// Waits until the view satisfies `ready`, for at most `timeout`. On
    /// timeout returns the last store error, if any.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        ready: impl FnMut(&Arc<NamespaceView>) -> bool,
    ) -> Result<Arc<NamespaceView>, Option<String>> {
        let mut rx = self.view.clone();
        match tokio::time::timeout(timeout, rx.wait_for(ready)).await {
            Ok(Ok(view)) => Ok(view.clone()),
            _ => Err(self.health.last_error()),
        }
    }
}

/// The task's side of a [`NamespaceHandle`].
struct Follower {
    store: Arc<dyn Store>,
    layout: Layout,
    /// The keys whose audit entries vouch for a meta record's list.
    trusted: TrustedKeys,
    tx: watch::Sender<Arc<NamespaceView>>,
    health: Arc<FollowerHealth>,
    state: State,
}

/// Retry pacing after a store error.
fn store_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
}

impl Follower {
    async fn run(mut self) {
        let prefix = self.layout.namespace_prefix(&self.state.namespace);
        let mut backoff = store_backoff();
        let mut needs_list = true;
        loop {
            if needs_list {
                match store::read_all(&*self.store, &prefix).await {
                    Ok(range) => {
                        self.state.replace(&self.layout, &range.kvs, range.revision);
                        self.health.recovered();
                        self.check_seal().await;
                        self.publish();
                        needs_list = false;
                        info!(revision = self.state.revision, "namespace loaded");
                    }
                    Err(e) => {
                        self.failed(&e, &mut backoff).await;
                        continue;
                    }
                }
            }
            let from = self.state.store_revision + 1;
            let mut stream = match self.store.watch(&prefix, from).await {
                Ok(stream) => {
                    self.health.recovered();
                    stream
                }
                Err(store::Error::Compacted { .. }) => {
                    needs_list = true;
                    continue;
                }
                Err(e) => {
                    self.failed(&e, &mut backoff).await;
                    continue;
                }
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(batch) => {
                        backoff.reset();
                        self.health.recovered();
                        if self.apply(&batch.events) {
                            self.check_seal().await;
                            self.publish();
                        }
                        self.state.store_revision = self.state.store_revision.max(batch.revision);
                    }
                    Err(store::Error::Compacted { .. }) => {
                        info!("watch history compacted; re-reading the namespace");
                        needs_list = true;
                        break;
                    }
                    Err(e) => {
                        self.failed(&e, &mut backoff).await;
                        break;
                    }
                }
            }
        }
    }

    /// Applies one batch; returns whether anything changed.
    fn apply(&mut self, events: &[Event]) -> bool {
        let mut changed = false;
        for event in events {
            if event.kv.mod_revision <= self.state.store_revision {
                continue;
            }
            match event.kind {
                EventKind::Put => self.state.put(&self.layout, &event.kv),
                EventKind::Delete => self.state.delete(&self.layout, &event.kv),
            }
            changed = true;
        }
        changed
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.state.view()));
    }

    /// Checks the meta record's list against the audit entry it names, once
    /// per meta revision. A store error leaves it unchecked (and the list
    /// untrusted) until the next change.
    async fn check_seal(&mut self) {
        // Deleted: the last trusted list stays, until a change writes anew.
        if self.state.meta_deleted {
            return;
        }
        let revision = self.state.meta_revision;
        if self
            .state
            .seal
            .as_ref()
            .is_some_and(|(r, _)| *r == revision)
        {
            return;
        }
        let state = self
            .state
            .last_change
            .as_ref()
            .and_then(|c| c.state.clone());
        let verdict = match state {
            None => Ok(None),
            Some(state) => match self.check_state(&state, revision).await {
                Ok(()) => Ok(Some(state.activations)),
                Err(Some(why)) => Err(why),
                Err(None) => return,
            },
        };
        self.state.seal = Some((revision, verdict));
    }

    /// Whether the audit entry at `state.audit_seq` was created with the
    /// meta record (at `meta_revision`), is signed by a trusted key and
    /// commits to the list's digest. `Err(None)`: the store could not say.
    async fn check_state(
        &self,
        state: &NamespaceState,
        meta_revision: Revision,
    ) -> Result<(), Option<String>> {
        let digest = audit::state_digest(
            state
                .activations
                .iter()
                .map(|(i, h)| (i.as_str(), h.as_str())),
        );
        if digest != state.digest {
            return Err(Some(
                "its list of activations does not give its digest".into(),
            ));
        }
        let key = self.layout.audit_entry_key(state.audit_seq);
        let range = self.store.range(&key).await.map_err(|e| {
            warn!(error = %e, "cannot read the audit entry of the namespace's last change");
            None
        })?;
        let seq = state.audit_seq;
        let Some(kv) = range.kvs.into_iter().find(|kv| kv.key == key) else {
            return Err(Some(format!(
                "audit entry {seq}, which it names, is missing"
            )));
        };
        if kv.create_revision != meta_revision {
            return Err(Some(format!(
                "it was written at revision {meta_revision}, not with audit entry {seq} (revision {}): it was rewritten outside safemode",
                kv.create_revision
            )));
        }
        let entry: AuditEntry = serde_json::from_slice(&kv.value)
            .map_err(|e| Some(format!("audit entry {seq} cannot be read: {e}")))?;
        if entry.hash != entry.computed_hash() {
            return Err(Some(format!("audit entry {seq} was edited")));
        }
        entry
            .check_signature(&self.trusted)
            .map_err(|e| Some(format!("audit entry {seq}: {e}")))?;
        if entry.namespace.as_deref() != Some(self.state.namespace.as_str())
            || entry.state_digest.as_deref() != Some(state.digest.as_str())
        {
            return Err(Some(format!(
                "audit entry {seq} does not commit to its list of activations"
            )));
        }
        Ok(())
    }

    async fn failed(&self, error: &store::Error, backoff: &mut Backoff) {
        let pause = backoff.next_delay();
        warn!(%error, retry_in = ?pause, "store read failed");
        self.health.failed(error.to_string());
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(layout: &Layout, namespace: &Namespace, revision: Revision) -> KeyValue {
        let id = ActivationId::from_random(rand::random());
        KeyValue {
            key: layout.activation_key(namespace, &id),
            // Unreadable records count too (they fail closed).
            value: b"not json".to_vec(),
            create_revision: revision,
            mod_revision: revision,
        }
    }

    #[test]
    fn a_reread_that_lost_a_record_moves_the_revision_forward() {
        let layout = Layout::new("/safemode/").unwrap();
        let namespace = Namespace::live();
        let kept = put(&layout, &namespace, 5);
        let gone = put(&layout, &namespace, 7);
        let mut state = State::new(namespace.clone());
        state.replace(&layout, &[kept.clone(), gone], 7);
        assert_eq!(state.revision, 7);

        // The newer record was deleted while the watch was away, and the
        // delete compacted: the re-read sees only the older one.
        state.replace(&layout, std::slice::from_ref(&kept), 20);
        assert_eq!(state.activations.len(), 1);
        assert_eq!(state.revision, 20, "new contents need a newer revision");

        // Nothing changed: the revision stays.
        state.replace(&layout, std::slice::from_ref(&kept), 30);
        assert_eq!(state.revision, 20);
        assert_eq!(state.store_revision, 30);
    }

    #[test]
    fn activations_changed_behind_safemodes_back_fail_closed_and_are_named() {
        let layout = Layout::new("/safemode/").unwrap();
        let namespace = Namespace::live();
        let kept = put(&layout, &namespace, 5);
        let edited = put(&layout, &namespace, 6);
        let added = put(&layout, &namespace, 7);
        let id = |kv: &KeyValue| kv.key.rsplit_once('/').unwrap().1.to_string();
        let gone = ActivationId::from_random(rand::random());
        let mut state = State::new(namespace.clone());
        state.replace(&layout, &[kept.clone(), edited.clone(), added.clone()], 8);
        state.meta_revision = 4;
        let listed: BTreeMap<String, String> = [
            (id(&kept), audit::record_hash(&kept.value)),
            (id(&edited), audit::record_hash(b"what the change wrote")),
            (
                gone.to_string(),
                audit::record_hash(b"a record deleted since"),
            ),
        ]
        .into_iter()
        .collect();
        state.seal = Some((4, Ok(Some(listed))));

        let view = state.view();
        let ids: Vec<String> = view.activations.iter().map(|a| a.id.to_string()).collect();
        assert!(
            ids.contains(&gone.to_string()),
            "a stand-in for the deleted one: {ids:?}"
        );
        assert_eq!(view.activations.len(), 4);
        let problem = |what: &str, of: &str| {
            view.problems
                .iter()
                .any(|p| p.contains(of) && p.contains(what))
        };
        assert!(
            problem("was deleted outside safemode", &gone.to_string()),
            "{:?}",
            view.problems
        );
        assert!(
            problem("was edited outside safemode", &id(&edited)),
            "{:?}",
            view.problems
        );
        assert!(
            problem("added outside safemode", &id(&added)),
            "{:?}",
            view.problems
        );
        assert!(
            !problem("outside safemode", &id(&kept)),
            "{:?}",
            view.problems
        );

        // A list that did not check out is named, and trusted for nothing.
        state.seal = Some((4, Err("audit entry 3 was edited".into())));
        let view = state.view();
        assert_eq!(view.activations.len(), 3);
        assert!(view.listed.is_none());
        assert!(
            view.problems
                .iter()
                .any(|p| p.contains("not the one safemode signed: audit entry 3 was edited")),
            "{:?}",
            view.problems
        );
    }

    #[test]
    fn a_first_read_of_an_empty_namespace_is_revision_zero() {
        let layout = Layout::new("/safemode/").unwrap();
        let mut state = State::new(Namespace::live());
        state.replace(&layout, &[], 42);
        assert_eq!(state.revision, 0);
    }
}
