//! The controller: the state machine behind the gRPC API. It applies and
//! lifts modes as store transactions, follows each namespace with one store
//! watch, compiles per-channel snapshots, and keeps track of subscribers.
//!
//! It knows nothing of gRPC (the `api` module converts at the edge) and
//! nothing of which store is below it.

mod keys;
mod namespace;
mod subscribers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use keys::{ChangeKind, Layout, NamespaceChange};
pub use namespace::{ChannelSnapshot, FollowerHealth, NamespaceHandle, NamespaceView};
pub use subscribers::{Registration, Rejection, SubscriberRecord, Subscribers, UnknownRevision};

use crate::policy::{
    Activation, ActivationId, Change, Channel, ChannelSet, Effect, Mode, ModeCatalog, ModeName,
    Namespace, Reason, Revision,
};
use crate::store::{self, Compare, Op, Store, Txn, TxnOutcome};

/// Result of controller operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A requested mode is not in the catalogue.
    #[error("unknown mode '{0}'; `safemode mode list` shows the catalogue")]
    UnknownMode(String),
    /// A lift target names nothing active in the namespace.
    #[error(
        "nothing active in namespace {namespace} matches '{target}'; `safemode status --namespace {namespace}` lists activations"
    )]
    NotActive {
        /// The namespace.
        namespace: Namespace,
        /// The target as given.
        target: String,
    },
    /// A lift names a mode that has several activations, without `all`.
    #[error("mode '{target}' has {} activations in namespace {namespace} ({}); name the activation ids to lift, or lift all of them with --all", .matches.len(), .matches.join(", "))]
    Ambiguous {
        /// The namespace.
        namespace: Namespace,
        /// The mode as given.
        target: String,
        /// Each matching activation, described.
        matches: Vec<String>,
    },
    /// The namespace could not be read from the store in time.
    #[error("namespace {namespace} is not available yet{}", .cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
    NotLoaded {
        /// The namespace.
        namespace: Namespace,
        /// The last store error, if any.
        cause: Option<String>,
    },
    /// The subscriber already applied a revision this replica has not reached.
    #[error(
        "this controller is at revision {current} of namespace {namespace}, behind the revision {requested} you already applied; retry (another replica may be ahead)"
    )]
    Behind {
        /// The namespace.
        namespace: Namespace,
        /// The subscriber's revision.
        requested: Revision,
        /// This replica's revision.
        current: Revision,
    },
    /// Concurrent changes kept winning; nothing was written.
    #[error(
        "namespace {0} kept changing while this change was prepared; nothing was written, retry"
    )]
    Conflict(Namespace),
    /// The controller is shutting down.
    #[error("the controller is shutting down; retry against another replica")]
    ShuttingDown,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where keys live in the store.
    pub layout: Layout,
    /// How long a request waits for a namespace's first read from the store.
    pub load_timeout: Duration,
    /// How long a subscriber that is ahead of this replica waits for it to
    /// catch up before it is told to retry.
    pub catch_up_timeout: Duration,
    /// How long a committed change waits to become visible in this replica's
    /// state before the call returns anyway (the change is durable either way).
    pub visibility_timeout: Duration,
    /// A drill namespace nobody used or subscribed to for this long stops
    /// being followed (it is followed again on its next use).
    pub idle_namespace: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            layout: Layout::default(),
            load_timeout: Duration::from_secs(10),
            catch_up_timeout: Duration::from_secs(5),
            visibility_timeout: Duration::from_secs(5),
            idle_namespace: Duration::from_secs(300),
        }
    }
}

/// Apply modes to a namespace.
#[derive(Clone, Debug)]
pub struct ApplyRequest {
    /// The namespace.
    pub namespace: Namespace,
    /// Modes to apply, at least one.
    pub modes: Vec<ModeName>,
    /// Channels the activations cover.
    pub channels: ChannelSet,
    /// Read-only effects serve data as of this time; default: now.
    pub as_of: Option<Timestamp>,
    /// Who.
    pub principal: String,
    /// Why.
    pub reason: Reason,
}

/// What an apply did.
#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    /// Revision of the change (the namespace revision if nothing was new).
    pub revision: Revision,
    /// Activations created.
    pub applied: Vec<Arc<Activation>>,
    /// Requested modes already active with the same channels.
    pub already_active: Vec<Arc<Activation>>,
}

/// What to lift: one activation, or every activation of a mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiftTarget {
    /// One activation.
    Activation(ActivationId),
    /// Every activation of this mode.
    Mode(ModeName),
}

impl LiftTarget {
    /// Parses an activation id (`act_...`) or a mode name.
    pub fn parse(text: &str) -> Result<Self, crate::policy::NameError> {
        if ActivationId::looks_like(text) {
            ActivationId::parse(text).map(LiftTarget::Activation)
        } else {
            ModeName::parse(text).map(LiftTarget::Mode)
        }
    }
}

impl std::fmt::Display for LiftTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiftTarget::Activation(id) => id.fmt(f),
            LiftTarget::Mode(name) => name.fmt(f),
        }
    }
}

/// Lift activations in a namespace.
#[derive(Clone, Debug)]
pub struct LiftRequest {
    /// The namespace.
    pub namespace: Namespace,
    /// What to lift, at least one.
    pub targets: Vec<LiftTarget>,
    /// Who.
    pub principal: String,
    /// Why.
    pub reason: Reason,
    /// Lift every activation of a mode named in `targets`, when it has
    /// several (otherwise that is refused, so one commander does not lift
    /// another's scope by accident).
    pub all: bool,
}

/// What a lift did.
#[derive(Clone, Debug)]
pub struct LiftOutcome {
    /// Revision of the change.
    pub revision: Revision,
    /// Activations removed.
    pub lifted: Vec<Arc<Activation>>,
}

/// A namespace's status on this replica.
#[derive(Clone, Debug)]
pub struct Status {
    /// The namespace state.
    pub view: Arc<NamespaceView>,
    /// Subscribers connected to this replica.
    pub subscribers: Vec<SubscriberRecord>,
}

/// A subscriber's stream, once admitted.
pub struct Subscription {
    /// Every newer namespace view.
    pub views: tokio::sync::watch::Receiver<Arc<NamespaceView>>,
    /// Whether the namespace's follower keeps up with the store.
    pub health: Arc<FollowerHealth>,
    /// The subscriber's channel.
    pub channel: Channel,
    /// Its entry in status; dropping it removes the entry.
    pub registration: Registration,
}

/// Whether an active activation's rules are those the catalogue's `mode`
/// would give now: the same mode, unchanged since, and (when the request names
/// one) the same read-only as-of time. Otherwise a new activation is applied
/// beside it, and the merge keeps the safer of the two.
fn same_rules(active: &Mode, mode: &Mode, as_of: Option<Timestamp>) -> bool {
    let with_as_of = |m: &Mode, at: Option<Timestamp>| {
        let mut m = m.clone();
        for rule in &mut m.rules {
            if let Effect::ReadOnly(r) = &mut rule.effect {
                r.as_of = at;
            }
        }
        m
    };
    match as_of {
        // No as-of asked for: any as-of time counts as the same.
        None => with_as_of(active, None) == with_as_of(mode, None),
        Some(at) => *active == with_as_of(mode, Some(at)),
    }
}

/// The activations a lift names, or why it cannot go ahead.
fn resolve_lift(view: &NamespaceView, request: &LiftRequest) -> Result<Vec<Arc<Activation>>> {
    let mut lifted: Vec<Arc<Activation>> = Vec::new();
    for target in &request.targets {
        let matching: Vec<&Arc<Activation>> = view
            .activations
            .iter()
            .filter(|a| match target {
                LiftTarget::Activation(id) => a.id == *id,
                LiftTarget::Mode(name) => a.mode.name == *name,
            })
            .collect();
        if matching.is_empty() {
            return Err(Error::NotActive {
                namespace: request.namespace.clone(),
                target: target.to_string(),
            });
        }
        if matching.len() > 1 && !request.all && matches!(target, LiftTarget::Mode(_)) {
            return Err(Error::Ambiguous {
                namespace: request.namespace.clone(),
                target: target.to_string(),
                matches: matching
                    .iter()
                    .map(|a| format!("{} on {}", a.id, a.channels))
                    .collect(),
            });
        }
        for a in matching {
            if !lifted.iter().any(|l| l.id == a.id) {
                lifted.push(a.clone());
            }
        }
    }
    Ok(lifted)
}

/// How often a change retries after losing a race with a concurrent one.
const CHANGE_ATTEMPTS: usize = 5;

/// The controller of one replica.
pub struct Controller {
    store: Arc<dyn Store>,
    catalog: Arc<ModeCatalog>,
    config: ControllerConfig,
    epoch: String,
    namespaces: Mutex<HashMap<Namespace, Arc<NamespaceHandle>>>,
    shutdown: CancellationToken,
}

impl Controller {
    /// A controller over `store` serving `catalog`: reads (or, on an empty
    /// store, creates) the store's epoch. Background tasks stop when
    /// `shutdown` is cancelled.
    pub async fn start(
        store: Arc<dyn Store>,
        catalog: Arc<ModeCatalog>,
        config: ControllerConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>> {
        let epoch = ensure_epoch(&*store, &config.layout).await?;
        let controller = Arc::new(Controller {
            store,
            catalog,
            config,
            epoch,
            namespaces: Mutex::new(HashMap::new()),
            shutdown,
        });
        let sweeper = Arc::downgrade(&controller);
        let stop = controller.shutdown.clone();
        let idle = controller.config.idle_namespace;
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut tick = tokio::time::interval((idle / 10).max(Duration::from_secs(1)));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => match sweeper.upgrade() {
                            Some(controller) => controller.evict_idle(idle),
                            None => return,
                        },
                    }
                }
            },
            tracing::info_span!("namespace-sweeper"),
        ));
        Ok(controller)
    }

    /// The store's epoch: revisions count within it.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Stops following drill namespaces idle for `idle`; `live` is always
    /// followed.
    fn evict_idle(&self, idle: Duration) {
        let mut namespaces = self.namespaces.lock().expect("poisoned");
        namespaces.retain(|namespace, handle| {
            let keep = namespace.as_str() == Namespace::LIVE || !handle.is_idle(idle);
            if !keep {
                handle.stop();
                info!(%namespace, "stopped following an idle namespace");
            }
            keep
        });
    }

    /// The mode catalogue.
    pub fn catalog(&self) -> &ModeCatalog {
        &self.catalog
    }

    /// The store below.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A cancellation token that fires when the controller shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The followed namespace, started on first use, once it has been read.
    pub async fn namespace(&self, namespace: &Namespace) -> Result<Arc<NamespaceHandle>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let handle = {
            let mut namespaces = self.namespaces.lock().expect("poisoned");
            namespaces
                .entry(namespace.clone())
                .or_insert_with(|| {
                    Arc::new(NamespaceHandle::spawn(
                        self.store.clone(),
                        self.config.layout.clone(),
                        namespace.clone(),
                        self.shutdown.child_token(),
                    ))
                })
                .clone()
        };
        handle.touch();
        handle
            .wait_for(self.config.load_timeout, |v| v.loaded)
            .await
            .map_err(|cause| Error::NotLoaded {
                namespace: namespace.clone(),
                cause,
            })?;
        Ok(handle)
    }

    /// Applies modes in one atomic change. A mode already active with the
    /// same channels is reported, not applied twice.
    pub async fn apply(&self, request: ApplyRequest) -> Result<ApplyOutcome> {
        let modes = request
            .modes
            .iter()
            .map(|name| {
                self.catalog
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| Error::UnknownMode(name.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let handle = self.namespace(&request.namespace).await?;
        let layout = &self.config.layout;
        for _ in 0..CHANGE_ATTEMPTS {
            let view = handle.current();
            let change = Change {
                principal: request.principal.clone(),
                reason: request.reason.clone(),
                at: Timestamp::now(),
                incident_id: None,
            };
            let as_of = request.as_of.unwrap_or(change.at);
            let mut already_active = Vec::new();
            let mut applied = Vec::new();
            for mode in &modes {
                let active = view.activations.iter().find(|a| {
                    a.channels == request.channels && same_rules(&a.mode, mode, request.as_of)
                });
                match active {
                    Some(a) => already_active.push(a.clone()),
                    None => applied.push(Activation::new(
                        ActivationId::from_random(rand::random()),
                        mode,
                        request.channels,
                        as_of,
                        &change,
                    )),
                }
            }
            if applied.is_empty() {
                // "Already active" must not come from a view that lags a
                // change just committed through another replica (a lift).
                if self.confirm_current(&handle, &view).await? {
                    return Ok(ApplyOutcome {
                        revision: view.revision,
                        applied: Vec::new(),
                        already_active,
                    });
                }
                continue;
            }
            let mut txn = self.change_txn(&view, ChangeKind::Apply, &change, &applied);
            for activation in &applied {
                let key = layout.activation_key(&request.namespace, &activation.id);
                txn.compares.push(Compare::ModRevision {
                    key: key.clone(),
                    revision: 0,
                });
                txn.ops.push(Op::Put {
                    key,
                    value: serde_json::to_vec(activation).expect("activations serialize"),
                });
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    info!(namespace = %request.namespace, revision, principal = %change.principal,
                        modes = ?applied.iter().map(|a| a.mode.name.as_str()).collect::<Vec<_>>(),
                        reason = %change.reason.as_str(), "modes applied");
                    self.await_visible(&handle, revision).await;
                    let applied = applied
                        .into_iter()
                        .map(|mut a| {
                            a.revision = revision;
                            Arc::new(a)
                        })
                        .collect();
                    return Ok(ApplyOutcome {
                        revision,
                        applied,
                        already_active,
                    });
                }
                TxnOutcome::CompareFailed { .. } => self.await_change(&handle, &view).await,
            }
        }
        Err(Error::Conflict(request.namespace))
    }

    /// Lifts activations in one atomic change.
    pub async fn lift(&self, request: LiftRequest) -> Result<LiftOutcome> {
        let handle = self.namespace(&request.namespace).await?;
        let layout = &self.config.layout;
        for _ in 0..CHANGE_ATTEMPTS {
            let view = handle.current();
            let lifted = match resolve_lift(&view, &request) {
                Ok(lifted) => lifted,
                // Refuse only on a view the store confirms is current.
                Err(refusal) => {
                    if self.confirm_current(&handle, &view).await? {
                        return Err(refusal);
                    }
                    continue;
                }
            };
            let change = Change {
                principal: request.principal.clone(),
                reason: request.reason.clone(),
                at: Timestamp::now(),
                incident_id: None,
            };
            let mut txn = self.change_txn(&view, ChangeKind::Lift, &change, &lifted);
            for activation in &lifted {
                let key = layout.activation_key(&request.namespace, &activation.id);
                txn.compares.push(Compare::ModRevision {
                    key: key.clone(),
                    revision: activation.revision,
                });
                txn.ops.push(Op::Delete { key });
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    info!(namespace = %request.namespace, revision, principal = %change.principal,
                        lifted = ?lifted.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                        reason = %change.reason.as_str(), "activations lifted");
                    self.await_visible(&handle, revision).await;
                    return Ok(LiftOutcome { revision, lifted });
                }
                TxnOutcome::CompareFailed { .. } => self.await_change(&handle, &view).await,
            }
        }
        Err(Error::Conflict(request.namespace))
    }

    /// The namespace's state and this replica's subscribers.
    pub async fn status(&self, namespace: &Namespace) -> Result<Status> {
        let handle = self.namespace(namespace).await?;
        Ok(Status {
            view: handle.current(),
            subscribers: handle.subscribers.list(),
        })
    }

    /// Admits a subscriber that already applied `last_applied` in `epoch`.
    /// It never gets an older snapshot: when this replica is behind, the call
    /// waits for it to catch up, and fails with [`Error::Behind`] if it does
    /// not in time. A revision from another epoch (the store was replaced)
    /// counts for nothing: the subscriber starts over.
    pub async fn subscribe(
        &self,
        namespace: &Namespace,
        channel: Channel,
        subscriber_id: String,
        peer: String,
        last_applied: Revision,
        epoch: &str,
    ) -> Result<Subscription> {
        let last_applied = if epoch.is_empty() || epoch == self.epoch {
            last_applied
        } else {
            info!(%namespace, subscriber = %subscriber_id, "subscriber from another store epoch; it starts over");
            0
        };
        let handle = self.namespace(namespace).await?;
        if let Err(cause) = handle
            .wait_for(self.config.catch_up_timeout, |v| v.revision >= last_applied)
            .await
        {
            if let Some(cause) = cause {
                warn!(%namespace, %cause, "subscriber ahead of this replica");
            }
            return Err(Error::Behind {
                namespace: namespace.clone(),
                requested: last_applied,
                current: handle.current().revision,
            });
        }
        Ok(Subscription {
            views: handle.watch(),
            health: handle.health.clone(),
            channel,
            registration: handle.subscribers.register(subscriber_id, channel, peer),
        })
    }

    /// A transaction that records `change` as the namespace's last change,
    /// provided nothing changed the namespace since `view`.
    fn change_txn(
        &self,
        view: &NamespaceView,
        kind: ChangeKind,
        change: &Change,
        activations: &[impl std::borrow::Borrow<Activation>],
    ) -> Txn {
        let meta_key = self.config.layout.meta_key(&view.namespace);
        let record = NamespaceChange {
            kind,
            principal: change.principal.clone(),
            reason: change.reason.as_str().to_string(),
            at: change.at,
            activation_ids: activations.iter().map(|a| a.borrow().id.clone()).collect(),
        };
        Txn {
            compares: vec![Compare::ModRevision {
                key: meta_key.clone(),
                revision: view.meta_revision,
            }],
            ops: vec![Op::Put {
                key: meta_key,
                value: serde_json::to_vec(&record).expect("changes serialize"),
            }],
        }
    }

    /// Whether `view` is still the namespace's state in the store (a
    /// compare-only transaction on the meta key). If not, waits (bounded) for
    /// the newer state to arrive before the caller retries.
    async fn confirm_current(
        &self,
        handle: &NamespaceHandle,
        view: &NamespaceView,
    ) -> Result<bool> {
        let check = Txn {
            compares: vec![Compare::ModRevision {
                key: self.config.layout.meta_key(&view.namespace),
                revision: view.meta_revision,
            }],
            ops: Vec::new(),
        };
        match self.store.txn(check).await? {
            TxnOutcome::Committed { .. } => Ok(true),
            TxnOutcome::CompareFailed { .. } => {
                self.await_change(handle, view).await;
                Ok(false)
            }
        }
    }

    /// Waits (bounded) until this replica's state includes `revision`, so a
    /// caller reads its own write from this replica.
    async fn await_visible(&self, handle: &NamespaceHandle, revision: Revision) {
        if handle
            .wait_for(self.config.visibility_timeout, |v| v.revision >= revision)
            .await
            .is_err()
        {
            warn!(revision, "committed change not yet visible on this replica");
        }
    }

    /// Waits (bounded) until the namespace moves past `view`, after a change
    /// lost a race with a concurrent one.
    async fn await_change(&self, handle: &NamespaceHandle, view: &NamespaceView) {
        let seen = view.meta_revision;
        let _ = handle
            .wait_for(self.config.visibility_timeout, |v| v.meta_revision != seen)
            .await;
    }
}

/// Reads the store's epoch, creating it on an empty store (a concurrent
/// replica may win the creation; then its epoch is read).
async fn ensure_epoch(store: &dyn Store, layout: &Layout) -> Result<String> {
    let key = layout.epoch_key();
    for _ in 0..CHANGE_ATTEMPTS {
        let range = store.range(&key).await?;
        if let Some(kv) = range.kvs.iter().find(|kv| kv.key == key) {
            return String::from_utf8(kv.value.clone())
                .map_err(|_| Error::Store(store::Error::Corrupt(format!("{key} is not UTF-8"))));
        }
        let epoch = format!("{:032x}", rand::random::<u128>());
        let create = Txn {
            compares: vec![Compare::ModRevision {
                key: key.clone(),
                revision: 0,
            }],
            ops: vec![Op::Put {
                key: key.clone(),
                value: epoch.clone().into_bytes(),
            }],
        };
        if let TxnOutcome::Committed { .. } = store.txn(create).await? {
            info!(%epoch, "created the store epoch");
            return Ok(epoch);
        }
    }
    Err(Error::Store(store::Error::Unavailable(
        "the store epoch kept changing while it was read".into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::{EmbeddedOptions, EmbeddedStore};

    async fn controller(dir: &tempfile::TempDir) -> Arc<Controller> {
        let store = EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
            .unwrap();
        Controller::start(
            Arc::new(store),
            Arc::new(crate::catalog::standard_modes()),
            ControllerConfig::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    fn followed(controller: &Controller) -> Vec<String> {
        let mut names: Vec<String> = controller
            .namespaces
            .lock()
            .unwrap()
            .keys()
            .map(|n| n.to_string())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn idle_drill_namespaces_stop_being_followed_and_live_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(&dir).await;
        for name in ["live", "drill-a", "drill-b"] {
            controller
                .namespace(&Namespace::parse(name).unwrap())
                .await
                .unwrap();
        }
        // drill-b has a subscriber: it stays while the subscriber does.
        let subscription = controller
            .subscribe(
                &Namespace::parse("drill-b").unwrap(),
                Channel::parse("ivr").unwrap(),
                "s".into(),
                "p".into(),
                0,
                "",
            )
            .await
            .unwrap();
        controller.evict_idle(Duration::ZERO);
        assert_eq!(followed(&controller), ["drill-b", "live"]);
        drop(subscription);
        controller.evict_idle(Duration::ZERO);
        assert_eq!(followed(&controller), ["live"]);
        // A later use follows it again.
        let again = controller
            .namespace(&Namespace::parse("drill-a").unwrap())
            .await
            .unwrap();
        assert!(again.current().loaded);
    }

    #[tokio::test]
    async fn the_epoch_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = controller(&dir).await.epoch().to_string();
        assert_eq!(first.len(), 32);
        // Restarted on the same store: the same history.
        assert_eq!(controller(&dir).await.epoch(), first);
        // A new store: a new history.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(controller(&other).await.epoch(), first);
    }
}
