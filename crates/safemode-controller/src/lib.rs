//! The controller: the state machine behind the gRPC API. It applies and
//! lifts modes, runs incidents and four-eyes approvals as store
//! transactions that also append to the audit log, follows each namespace
//! with one store watch, compiles per-channel snapshots, and keeps track of
//! subscribers.
//!
//! It knows nothing of gRPC (safemode-grpc converts at the edge) and
//! nothing of which store is below it. Every write goes through
//! [`change`](self::change)'s commit loop; a dry run prepares the same plan
//! and stops before it ([`preview`](self::preview)).

#![forbid(unsafe_code)]

mod approvals;
pub mod audit;
mod audit_log;
pub mod auth;
mod change;
pub mod counters;
pub mod fleet;
pub mod health;
mod incidents;
pub mod insights;
mod keys;
mod modes;
mod namespace;
mod preview;
mod proposals;
mod records;
mod refusals;
pub mod reports;
mod subscribers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use approvals::{ApproveOutcome, RequestView, WithdrawOutcome};
pub use audit_log::{AuditFilter, AuditPage, AuditReport};
pub use change::{CHANGE_ID_MAX, ChangeId};
pub use health::StoreHealth;
pub use incidents::{
    DeclareRequest, EscalateRequest, IncidentOutcome, ResolveRequest, in_force_in,
};
pub use keys::{CatalogRecord, Layout, NamespaceChange};
pub use modes::{ApplyOutcome, ApplyRequest, LiftOutcome, LiftRequest, LiftTarget};
pub use namespace::{ChannelSnapshot, FollowerHealth, NamespaceHandle, NamespaceView};
pub use preview::{ApprovalPreview, ChannelChange, EffectChange, Preview};
pub use proposals::{
    AcceptOutcome, DismissOutcome, Evidence, MAX_LISTED as MAX_PROPOSALS_LISTED, MAX_SUMMARY_CHARS,
    Proposal, ProposalState, RaiseOutcome, SignalCount, TRIGGER_PRINCIPAL,
};
pub use records::{
    ChangeRequest, Incident, IncidentId, IncidentStatus, ProposalId, RequestId, RequestKind,
    RequestState, RequestStatus, TimelineEvent,
};
pub use subscribers::{
    Registration, Rejection, SubscriberCursor, SubscriberRecord, SubscriberState, Subscribers,
    UnknownRevision,
};

use self::change::Writes;
use crate::audit::{AuditAction, AuditDraft};
use crate::auth::Principal;
use safemode_policy::catalog::Catalog;
use safemode_policy::names::did_you_mean;
use safemode_policy::runbook::RunbookCatalog;
use safemode_policy::{Channel, ModeCatalog, Namespace, Revision};
use safemode_signing::{SigningKey, TrustedKeys};
use safemode_store::{self as store, Compare, Op, Store, Txn, TxnOutcome};

/// Result of controller operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A requested mode is not in the catalogue. The second field is a
    /// "did you mean" hint, or empty.
    #[error("unknown mode '{0}'; {1}`safemode mode list` shows the catalogue")]
    UnknownMode(String, String),
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
        "other changes (in namespace {0} or to the audit log) kept committing first, {attempts} times; nothing was written, retry",
        attempts = change::COMMIT_ATTEMPTS
    )]
    Conflict(Namespace),
    /// The change would apply nothing.
    #[error("{0}; nothing was declared")]
    NothingToApply(String),
    /// No runbook for this incident type. The second field is a "did you
    /// mean" hint, or empty.
    #[error("unknown incident type '{0}'; {1}`safemode runbook list` shows the runbooks")]
    UnknownRunbook(String, String),
    /// The runbook has no stage for the severity.
    #[error("runbook {runbook} has no {severity} stage; its stages are {stages}")]
    NoStage {
        /// The runbook.
        runbook: String,
        /// The severity asked for.
        severity: String,
        /// The severities it has.
        stages: String,
    },
    /// No incident with this id.
    #[error("no incident {0}; `safemode incident list` shows them")]
    UnknownIncident(String),
    /// The incident is already resolved.
    #[error("incident {0} is resolved; declare a new one")]
    Resolved(String),
    /// An incident of this type is already active in the namespace.
    #[error(
        "incident {id} ({runbook}) is already active in namespace {namespace}; escalate it instead of declaring another"
    )]
    AlreadyDeclared {
        /// The active incident.
        id: String,
        /// Its type.
        runbook: String,
        /// Where.
        namespace: Namespace,
    },
    /// A lift names activations of an active incident without saying that
    /// is meant: the incident's record would no longer say what is in force.
    #[error(
        "incident {incident} ({runbook}, active in {namespace}) applied {activations}; change its modes through the incident (`safemode incident escalate|resolve {runbook}`), or lift them anyway with --incident-ok, which records the lift on the incident's timeline"
    )]
    IncidentModes {
        /// The activations, by mode name ("bots-faq-only (act_x) on chatbot").
        activations: String,
        /// The incident's id.
        incident: String,
        /// Its type.
        runbook: String,
        /// Where.
        namespace: Namespace,
    },
    /// The incident is already at that severity.
    #[error("incident {id} is already at {severity}")]
    SameSeverity {
        /// The incident.
        id: String,
        /// Its severity.
        severity: String,
    },
    /// No change request with this id.
    #[error("no request {0}; `safemode requests` lists the pending ones")]
    UnknownRequest(String),
    /// The request was already decided or has expired.
    #[error("request {id} is {status}; only a pending request can be approved or withdrawn")]
    NotPending {
        /// The request.
        id: String,
        /// approved or expired.
        status: String,
    },
    /// No proposal with this id in the namespace.
    #[error("no proposal {0}; `safemode proposals` lists the open ones")]
    UnknownProposal(String),
    /// The proposal was already accepted or dismissed.
    #[error("proposal {id} was {state}; only an open proposal can be accepted or dismissed")]
    ProposalClosed {
        /// The proposal.
        id: String,
        /// What became of it, in words ("accepted by bob at ...").
        state: String,
    },
    /// The requester tried to approve their own request.
    #[error("{principal} requested {id} and cannot approve it too; another approver must")]
    OwnRequest {
        /// The request.
        id: String,
        /// Who.
        principal: String,
    },
    /// What the request would do changed after it was made (the incident
    /// moved or was resolved, its activations were lifted), so approving
    /// it would carry out a change nobody was shown.
    #[error(
        "{id} is superseded: {by}, after it was requested; nothing was approved. If the change is still wanted, its requester asks again (`safemode requests` lists what is pending)"
    )]
    Superseded {
        /// The request.
        id: String,
        /// What overtook it, in words.
        by: String,
    },
    /// This replica's catalogue differs from the one every replica serves.
    #[error(
        "this replica's modes and runbooks (fingerprint {ours}) differ from the ones every replica serves (fingerprint {theirs}, adopted by replica {replica} at {at}); deploy the same files, or start this replica with --adopt-catalog to make its files the ones every replica must serve"
    )]
    CatalogMismatch {
        /// This replica's fingerprint (short).
        ours: String,
        /// The adopted fingerprint (short).
        theirs: String,
        /// Who adopted it.
        replica: String,
        /// When.
        at: String,
    },
    /// Another replica adopted a different catalogue since this one started.
    #[error(
        "the modes and runbooks changed since this replica started (replica {replica} adopted fingerprint {theirs} at {at}); restart this replica with those files; nothing was written"
    )]
    CatalogChanged {
        /// The adopted fingerprint (short).
        theirs: String,
        /// Who adopted it.
        replica: String,
        /// When.
        at: String,
    },
    /// A change id that already committed was given for another change
    /// (another kind, another caller, or other contents).
    #[error(
        "change id '{id}' was already used for another change (a {was} with other contents or by another caller), so it cannot name this {now}; nothing was changed: use a new change id (or none: the server makes one)"
    )]
    ChangeIdReused {
        /// The change id.
        id: String,
        /// The operation it committed.
        was: String,
        /// The operation asked for now.
        now: String,
    },
    /// The controller is shutting down.
    #[error("the controller is shutting down; retry against another replica")]
    ShuttingDown,
    /// A subscriber-only caller asked for a drill namespace nothing is
    /// active in, which this replica does not follow.
    #[error(
        "nothing is active in {namespace}, so this replica does not follow it for a subscriber; subscribe once the drill has applied its modes, or with the drill's own token"
    )]
    NotInUse {
        /// The namespace.
        namespace: Namespace,
    },
    /// Following one more namespace would pass the replica's bound.
    #[error(
        "this replica already follows {limit} namespaces, its limit; finish or lift old drills (an idle drill namespace is dropped after a while), use another replica, or raise --max-namespaces"
    )]
    TooManyNamespaces {
        /// The bound.
        limit: usize,
    },
    /// The store could not be reached (or could not serve the request).
    #[error("the store ({store}) is unreachable: {cause}; {outcome}")]
    StoreUnreachable {
        /// What the store is and where, e.g. `etcd at http://10.0.0.5:2379`.
        store: store::Place,
        /// Why, in plain words (`connection refused`).
        cause: String,
        /// What became of the request.
        outcome: StoreOutcome,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// What became of a request that failed because the store was
/// unreachable: exactly what a commander may assume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A read: there was nothing to change.
    Read,
    /// A change that certainly was not applied.
    Unchanged,
    /// A change whose transaction was sent and whose answer was lost: it
    /// may have been applied. Its change id tells, once the store is back.
    Unknown {
        /// The change's id, when it has one.
        change_id: Option<String>,
    },
}

impl std::fmt::Display for StoreOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreOutcome::Read => f.write_str("retry when it is back"),
            StoreOutcome::Unchanged => f.write_str("nothing changed, retry when it is back"),
            StoreOutcome::Unknown {
                change_id: Some(change_id),
            } => write!(
                f,
                "the change was sent but its answer was lost, so it may or may not have been applied: when the store is back, run the command again with --change-id {change_id} (it is applied at most once)"
            ),
            StoreOutcome::Unknown { change_id: None } => f.write_str(
                "the change was sent but its answer was lost, so it may or may not have been applied: when the store is back, `safemode audit` shows whether it was",
            ),
        }
    }
}

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where keys live in the store.
    pub layout: Layout,
    /// This replica's name (in the catalogue record and logs).
    pub replica: String,
    /// Make this replica's catalogue the one every replica must serve, when
    /// the store holds another.
    pub adopt_catalog: bool,
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
    /// How long a change request waits for its approver before it expires.
    pub request_ttl: Duration,
    /// The most namespaces (`live` included) this replica follows at once,
    /// each with a store watch; reads never start following one.
    pub max_namespaces: usize,
    /// How long status waits for the store to answer its health probe.
    pub store_probe_timeout: Duration,
    /// The key this replica signs snapshots, heartbeats and audit entries
    /// with (the default, a fresh key, suits one replica in a test).
    pub signing_key: SigningKey,
    /// Whose signatures verify: this replica's key and any kept from before
    /// a rotation.
    pub trusted_keys: TrustedKeys,
}

/// How many drill namespaces `namespaces` follows (`live` is always served).
fn followed_drills(namespaces: &HashMap<Namespace, Arc<NamespaceHandle>>) -> usize {
    namespaces.keys().filter(|n| n.is_drill()).count()
}

/// How many namespaces a replica follows at most unless told otherwise:
/// `live` and a few dozen drills at once.
pub const DEFAULT_MAX_NAMESPACES: usize = 64;

impl Default for ControllerConfig {
    fn default() -> Self {
        let (signing_key, _) = SigningKey::generate();
        ControllerConfig {
            layout: Layout::default(),
            replica: format!("safemode-{}", std::process::id()),
            adopt_catalog: false,
            load_timeout: Duration::from_secs(10),
            catch_up_timeout: Duration::from_secs(5),
            visibility_timeout: Duration::from_secs(5),
            idle_namespace: Duration::from_secs(300),
            request_ttl: Duration::from_secs(3600),
            max_namespaces: DEFAULT_MAX_NAMESPACES,
            store_probe_timeout: Duration::from_secs(2),
            trusted_keys: TrustedKeys::new([signing_key.public_key().clone()])
                .expect("one key is a valid set"),
            signing_key,
        }
    }
}

/// A namespace's status on this replica.
#[derive(Clone, Debug)]
pub struct Status {
    /// The namespace state.
    pub view: Arc<NamespaceView>,
    /// Problems of the replica itself (an audit log that went back).
    pub replica: Vec<String>,
    /// The store's health, and this replica's lag behind it.
    pub store: StoreHealth,
}

impl Status {
    /// What a commander must look at: the store's health, the replica's
    /// own problems, then the namespace's. (Subscribers' problems come
    /// with each replica's part of a fleet status: [`fleet::ReplicaPart`].)
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.store.problems(&self.view.namespace);
        problems.extend(self.replica.iter().cloned());
        problems.extend(self.view.problems.iter().cloned());
        problems
    }
}

/// A subscriber's stream, once admitted.
pub struct Subscription {
    /// Every newer namespace view.
    pub views: tokio::sync::watch::Receiver<Arc<NamespaceView>>,
    /// Whether the namespace's follower keeps up with the store.
    pub health: Arc<FollowerHealth>,
    /// The subscriber's channel.
    pub channel: Channel,
    /// The revision the subscriber claimed in its hello when the store never
    /// reached it: its first snapshot must tell it to start over.
    pub start_over_from: Option<Revision>,
    /// Its entry in status; dropping it removes the entry.
    pub registration: Registration,
}

/// How often a change retries after losing a race with a concurrent one.
const CHANGE_ATTEMPTS: usize = 5;

/// The controller of one replica.
pub struct Controller {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    config: ControllerConfig,
    epoch: String,
    /// Revision of the catalogue record this replica joined or adopted;
    /// catalogue-dependent changes compare it.
    catalog_revision: Revision,
    namespaces: Mutex<HashMap<Namespace, Arc<NamespaceHandle>>>,
    refusals: refusals::RefusalBudget,
    /// Commits, failed commits and refusals, for metrics.
    counters: counters::Counters,
    /// What this replica's subscribers reported.
    reports: reports::ReportBook,
    /// The highest audit position this replica appended or saw at the
    /// head; the log's head never goes back through safemode.
    audit_seen: std::sync::atomic::AtomicU64,
    /// What this replica saw go wrong with the audit log itself (its head
    /// went back), shown in every status.
    audit_problem: Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl Controller {
    /// A controller over `store` serving `catalog`: reads (or, on an empty
    /// store, creates) the store's epoch, and joins the catalogue every
    /// replica serves (or adopts this one's, with `config.adopt_catalog`).
    /// Background tasks stop when `shutdown` is cancelled.
    pub async fn start(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        config: ControllerConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>> {
        let epoch = ensure_epoch(&*store, &config.layout).await?;
        let mut controller = Controller {
            store,
            catalog,
            config,
            epoch,
            catalog_revision: 0,
            namespaces: Mutex::new(HashMap::new()),
            refusals: refusals::RefusalBudget::default(),
            counters: counters::Counters::default(),
            reports: reports::ReportBook::default(),
            audit_seen: std::sync::atomic::AtomicU64::new(0),
            audit_problem: Mutex::new(None),
            shutdown,
        };
        controller.catalog_revision = controller.join_catalog().await?;
        let controller = Arc::new(controller);
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
        &self.catalog.modes
    }

    /// The key this replica signs with.
    pub fn signing_key(&self) -> &SigningKey {
        &self.config.signing_key
    }

    /// The keys whose signatures this replica accepts.
    pub fn trusted_keys(&self) -> &TrustedKeys {
        &self.config.trusted_keys
    }

    /// The runbooks.
    pub fn runbooks(&self) -> &RunbookCatalog {
        &self.catalog.runbooks
    }

    /// The refusal for a mode name not in the catalogue, with the nearest
    /// name when one is close.
    pub(crate) fn unknown_mode(&self, name: &str) -> Error {
        let hint = did_you_mean(name, self.catalog().iter().map(|m| m.name.as_str()));
        Error::UnknownMode(name.to_string(), hint)
    }

    /// The refusal for an incident type with no runbook, with the nearest
    /// runbook name when one is close.
    pub(crate) fn unknown_runbook(&self, name: &str) -> Error {
        let hint = did_you_mean(name, self.runbooks().iter().map(|r| r.name.as_str()));
        Error::UnknownRunbook(name.to_string(), hint)
    }

    /// The store below.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// `error`, said for people when it is the store being unreachable:
    /// which store, why in plain words, and `outcome` (for a change that
    /// failed before its transaction was sent: [`StoreOutcome::Unchanged`]).
    /// A change whose transaction may have been applied already says so
    /// ([`Controller::commit`] tells them apart); other errors pass as
    /// they are.
    pub fn in_words(&self, error: Error, outcome: StoreOutcome) -> Error {
        match error {
            Error::Store(store::Error::Unavailable(cause)) => Error::StoreUnreachable {
                store: self.store.place(),
                cause: cause.message().to_string(),
                outcome: if cause.may_have_applied() {
                    // The commit loop names the change itself; this is a
                    // transaction sent without a change id.
                    StoreOutcome::Unknown { change_id: None }
                } else {
                    outcome
                },
            },
            other => other,
        }
    }

    /// A cancellation token that fires when the controller shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The names of the namespaces this replica follows now (`live`
    /// always), in order.
    pub fn followed_namespaces(&self) -> Vec<Namespace> {
        let mut names: Vec<Namespace> = self
            .all_followed()
            .iter()
            .map(|handle| handle.current().namespace.clone())
            .collect();
        if !names.contains(&Namespace::live()) {
            names.push(Namespace::live());
        }
        names.sort();
        names
    }

    /// The namespaces this replica follows now.
    fn all_followed(&self) -> Vec<Arc<NamespaceHandle>> {
        self.namespaces
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// What this replica's subscribers reported, over sliding windows.
    pub fn reports(&self) -> &reports::ReportBook {
        &self.reports
    }

    /// What this replica counted since it started (metrics).
    pub fn counters(&self) -> &counters::Counters {
        &self.counters
    }

    /// Every followed namespace as this replica holds it now: revision,
    /// activations, the follower's health, and its subscribers by channel
    /// and state. No store read and no waiting: metrics call it at
    /// collection time.
    pub fn gauges(&self) -> Vec<counters::NamespaceGauges> {
        let mut gauges: Vec<counters::NamespaceGauges> = self
            .all_followed()
            .iter()
            .map(|handle| {
                let view = handle.current();
                counters::NamespaceGauges {
                    namespace: view.namespace.clone(),
                    revision: view.revision,
                    activations: view.activations.len(),
                    follower_healthy: handle.health.is_healthy(),
                    subscribers: handle.subscribers.count_by_state(view.revision),
                }
            })
            .collect();
        gauges.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        gauges
    }

    /// Pending change requests and the lag behind the store of every
    /// followed namespace: one read of the requests and one probe per
    /// namespace, each bounded by `store_probe_timeout`. A store that does
    /// not answer leaves both unknown (`None`).
    pub async fn store_gauges(&self) -> Vec<counters::NamespaceStoreGauges> {
        // Read without touching the handles: a scrape must not keep an idle
        // drill namespace followed.
        let mut followed = self.all_followed();
        followed.sort_by(|a, b| a.current().namespace.cmp(&b.current().namespace));
        let pending = tokio::time::timeout(
            self.config.store_probe_timeout,
            self.pending_requests_by_namespace(),
        )
        .await
        .ok()
        .and_then(|r| r.ok());
        let pending = &pending;
        // All namespaces at once: a dead store costs a scrape one probe
        // timeout, not one per namespace.
        let probes = followed.iter().map(|handle| async move {
            let view = handle.current();
            let meta_key = self.config.layout.meta_key(&view.namespace);
            let lag = match self
                .store
                .probe(&meta_key, self.config.store_probe_timeout)
                .await
            {
                Ok(range) => {
                    let stored = range
                        .kvs
                        .iter()
                        .find(|kv| kv.key == meta_key)
                        .map_or(0, |kv| kv.mod_revision);
                    Some((stored - view.meta_revision).max(0))
                }
                Err(_) => None,
            };
            let open_proposals = tokio::time::timeout(
                self.config.store_probe_timeout,
                self.open_proposals(&view.namespace),
            )
            .await
            .ok()
            .and_then(|r| r.ok());
            counters::NamespaceStoreGauges {
                open_proposals,
                pending_requests: pending
                    .as_ref()
                    .map(|p| p.get(&view.namespace).copied().unwrap_or(0)),
                namespace: view.namespace.clone(),
                lag_revisions: lag,
            }
        });
        futures_util::future::join_all(probes).await
    }

    /// The followed namespace, started on first use, once it has been read.
    pub async fn namespace(&self, namespace: &Namespace) -> Result<Arc<NamespaceHandle>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let handle = {
            let mut namespaces = self.namespaces.lock().expect("poisoned");
            // `live` is always served; drills share the rest.
            let drills = followed_drills(&namespaces);
            if namespace.is_drill()
                && !namespaces.contains_key(namespace)
                && drills + 1 >= self.config.max_namespaces
            {
                return Err(Error::TooManyNamespaces {
                    limit: self.config.max_namespaces,
                });
            }
            namespaces
                .entry(namespace.clone())
                .or_insert_with(|| {
                    Arc::new(NamespaceHandle::spawn(
                        self.store.clone(),
                        self.config.layout.clone(),
                        self.trusted_keys().clone(),
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

    /// Notes the audit log's head at `seq`: a head behind one this replica
    /// already appended or saw means entries were removed behind
    /// safemode's back (the log's end cut, the head set back). The change
    /// still goes on (an incident cannot wait for a repair), and every
    /// status says so from then on.
    pub(crate) fn saw_audit_head(&self, seq: u64) {
        let seen = self
            .audit_seen
            .fetch_max(seq, std::sync::atomic::Ordering::SeqCst);
        if seq < seen {
            let problem = format!(
                "the audit log went back from entry {seen} to entry {seq}: entries were removed outside safemode (compare the head `safemode audit --verify` printed before); changes continue after entry {seq}"
            );
            tracing::error!(%problem, "audit log rolled back");
            *self.audit_problem.lock().expect("poisoned") = Some(problem);
        }
    }

    /// Problems of this replica itself, for status.
    fn replica_problems(&self) -> Vec<String> {
        self.audit_problem
            .lock()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Whether a caller may make this replica follow `namespace` by
    /// subscribing to it. Whoever may change a namespace may (up to
    /// `max_namespaces`); a caller who may only subscribe there makes a
    /// replica follow a drill namespace only while it is in use (it holds an
    /// activation), and only within half the bound, so subscriber and
    /// viewer tokens can never lock the drills out.
    pub async fn check_follow(&self, namespace: &Namespace, may_change: bool) -> Result<()> {
        if !namespace.is_drill() || may_change {
            return Ok(());
        }
        {
            let namespaces = self.namespaces.lock().expect("poisoned");
            if namespaces.contains_key(namespace) {
                return Ok(());
            }
            let drills = followed_drills(&namespaces);
            if drills + 1 >= self.config.max_namespaces / 2 {
                return Err(Error::TooManyNamespaces {
                    limit: self.config.max_namespaces,
                });
            }
        }
        let activations = self
            .store
            .range_page(
                &self.config.layout.activations_prefix(namespace),
                None,
                1,
                0,
            )
            .await?;
        if activations.kvs.is_empty() {
            return Err(Error::NotInUse {
                namespace: namespace.clone(),
            });
        }
        Ok(())
    }

    /// Whether this replica is ready to serve: it has read namespace
    /// `live`, the store answers, and its watch of `live` is not failing.
    /// The reason, in one line, when it is not. (Lag is not unreadiness: a
    /// replica is a moment behind after every change made elsewhere.)
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        let live = Namespace::live();
        let status = self.status(&live).await.map_err(|e| e.to_string())?;
        if !status.view.loaded {
            return Err("namespace live is not read yet".into());
        }
        if let Some(error) = &status.store.error {
            return Err(format!(
                "the store ({}) is unreachable: {error}",
                status.store.place
            ));
        }
        if let Some((error, since)) = &status.store.follower {
            return Err(format!(
                "the watch of namespace live has been failing for {}s: {error}",
                since.as_secs()
            ));
        }
        Ok(())
    }

    /// The namespace's state as this replica has it: followed, or read once
    /// when this replica does not follow the namespace (a reader can never
    /// make a replica take on a watch).
    /// Unlike [`Controller::status`], it does not probe the store for its
    /// health: a followed namespace answers from memory.
    pub async fn view(&self, namespace: &Namespace) -> Result<Arc<NamespaceView>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let followed = self
            .namespaces
            .lock()
            .expect("poisoned")
            .contains_key(namespace);
        // `live` is always followed once the replica serves it.
        if followed || namespace.as_str() == Namespace::LIVE {
            return Ok(self.namespace(namespace).await?.current());
        }
        self.read_once(namespace)
            .await
            .map_err(|e| self.in_words(e.into(), StoreOutcome::Read))
    }

    /// The namespace's state and a page of this replica's subscribers. A
    /// namespace this replica does not follow is read once, not followed
    /// (it then has no subscribers here): a reader can never make a replica
    /// take on a watch.
    pub async fn status(&self, namespace: &Namespace) -> Result<Status> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let followed = self.followed(namespace);
        // The store first, within a short bound: on a dead store, status
        // answers at once with what this replica last read, and says so.
        let meta_key = self.config.layout.meta_key(namespace);
        let probe = self
            .store
            .probe(&meta_key, self.config.store_probe_timeout)
            .await;
        let unreachable = |e: store::Error| self.in_words(e.into(), StoreOutcome::Read);
        let handle = match (followed, &probe) {
            (Some(handle), Err(_)) if handle.current().loaded => {
                handle.touch();
                Some(handle)
            }
            // Nothing read yet, nothing to show: say why.
            (Some(_), Err(_)) => return Err(unreachable(probe.unwrap_err())),
            (Some(_), Ok(_)) => Some(self.namespace(namespace).await?),
            // `live` is always followed once the replica serves it.
            (None, Ok(_)) if namespace.as_str() == Namespace::LIVE => {
                Some(self.namespace(namespace).await?)
            }
            (None, Ok(_)) => None,
            (None, Err(_)) => return Err(unreachable(probe.unwrap_err())),
        };
        let view = match &handle {
            Some(handle) => handle.current(),
            None => self.read_once(namespace).await.map_err(unreachable)?,
        };
        let mut health = StoreHealth {
            place: self.store.place(),
            error: None,
            store_revision: 0,
            namespace_revision: None,
            applied_revision: view.meta_revision,
            lag_revisions: 0,
            follower: handle.as_ref().and_then(|h| h.health.failing()),
        };
        match probe {
            Err(store::Error::Unavailable(cause)) => {
                health.error = Some(cause.message().to_string());
            }
            Err(other) => health.error = Some(other.to_string()),
            Ok(range) => {
                let stored = range
                    .kvs
                    .iter()
                    .find(|kv| kv.key == meta_key)
                    .map_or(0, |kv| kv.mod_revision);
                health.store_revision = range.revision;
                health.namespace_revision = Some(stored);
                // The view shown, against the store now: no waiting, so
                // the numbers describe exactly what this answer shows.
                health.lag_revisions = (stored - view.meta_revision).max(0);
            }
        }
        Ok(Status {
            view,
            replica: self.replica_problems(),
            store: health,
        })
    }

    /// `namespace` read from the store once, for a replica that does not
    /// follow it.
    async fn read_once(&self, namespace: &Namespace) -> store::Result<Arc<NamespaceView>> {
        namespace::read_once(
            self.store.clone(),
            self.config.layout.clone(),
            self.config.trusted_keys.clone(),
            namespace.clone(),
        )
        .await
        .map(Arc::new)
    }

    /// The handle of `namespace` if this replica follows it; asking does not
    /// make it follow one.
    fn followed(&self, namespace: &Namespace) -> Option<Arc<NamespaceHandle>> {
        self.namespaces
            .lock()
            .expect("poisoned")
            .get(namespace)
            .cloned()
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
        // A revision the store itself never reached was never issued (by
        // this controller, in this epoch): the subscriber holds a rogue's
        // policy, or the store was restored from an older backup. Waiting
        // would not help; it starts over from what is current, and status
        // shows it. A replica that is merely behind still waits, then
        // answers UNAVAILABLE.
        if last_applied > handle.current().revision
            && let Some(reached) = self.store_revision().await
            && last_applied > reached
        {
            warn!(%namespace, subscriber = %subscriber_id, claimed = last_applied, store = reached,
                "subscriber holds a revision this controller never issued; it starts over");
            return Ok(Subscription {
                views: handle.watch(),
                health: handle.health.clone(),
                channel,
                start_over_from: Some(last_applied),
                registration: handle.subscribers.register_claiming(
                    subscriber_id,
                    channel,
                    peer,
                    last_applied,
                ),
            });
        }
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
            start_over_from: None,
            registration: handle.subscribers.register(subscriber_id, channel, peer),
        })
    }

    /// The store's current revision (`None`: the store cannot be read now).
    async fn store_revision(&self) -> Option<Revision> {
        match self.store.range(&self.config.layout.epoch_key()).await {
            Ok(range) => Some(range.revision),
            Err(e) => {
                warn!(error = %e, "cannot read the store's revision");
                None
            }
        }
    }

    /// Records that `actor` was refused the write `what` for lack of
    /// permission: the refusal changes nothing but is audited (past a burst,
    /// once a second per principal; the refusals in between are counted in
    /// the next entry).
    pub async fn record_refusal(
        &self,
        actor: &Principal,
        namespace: Option<&Namespace>,
        what: String,
    ) -> Result<()> {
        let what = match self.refusals.take(&actor.name, std::time::Instant::now()) {
            refusals::Verdict::Count => {
                warn!(principal = %actor.name, %what, "refusal counted, not audited one by one: too many");
                return Ok(());
            }
            refusals::Verdict::Audit {
                unaudited_before: 0,
            } => what,
            refusals::Verdict::Audit { unaudited_before } => format!(
                "{what} (after {unaudited_before} more refusals of {} that were counted, not audited one by one)",
                actor.name
            ),
        };
        let what = &what;
        self.commit(|| {
            Box::pin(async move {
                let audit = AuditDraft {
                    action: AuditAction::Refused,
                    principal: actor.name.clone(),
                    roles: actor.role_names(),
                    namespace: namespace.map(ToString::to_string),
                    reason: None,
                    incident_id: None,
                    request_id: None,
                    activation_ids: Vec::new(),
                    detail: what.clone(),
                    change_id: None,
                };
                // Writes nothing but its entry.
                Ok(Writes::new(Timestamp::now()).audited(audit, ()))
            })
        })
        .await?;
        Ok(())
    }

    /// The record of the catalogue every replica serves, and its revision.
    async fn catalog_record(&self) -> Result<Option<(CatalogRecord, Revision)>> {
        let key = self.config.layout.catalog_key();
        let range = self.store.range(&key).await?;
        let Some(kv) = range.kvs.into_iter().find(|kv| kv.key == key) else {
            return Ok(None);
        };
        let record = serde_json::from_slice(&kv.value).map_err(|e| {
            Error::Store(store::Error::Corrupt(format!("{key} cannot be read: {e}")))
        })?;
        Ok(Some((record, kv.mod_revision)))
    }

    /// Joins the catalogue the store records, records this replica's on an
    /// empty store, or adopts this one's when configured to. Returns the
    /// record's revision.
    async fn join_catalog(&self) -> Result<Revision> {
        let ours = &self.catalog.fingerprint;
        for _ in 0..CHANGE_ATTEMPTS {
            let existing = self.catalog_record().await?;
            let detail = match &existing {
                Some((record, revision)) if record.fingerprint == *ours => return Ok(*revision),
                Some((record, _)) if !self.config.adopt_catalog => {
                    return Err(Error::CatalogMismatch {
                        ours: short(ours),
                        theirs: short(&record.fingerprint),
                        replica: record.replica.clone(),
                        at: record.at.to_string(),
                    });
                }
                Some((record, _)) => format!(
                    "replica {} adopted modes and runbooks {} in place of {}",
                    self.config.replica,
                    short(ours),
                    short(&record.fingerprint)
                ),
                None => format!(
                    "replica {} recorded the modes and runbooks {} on an empty store",
                    self.config.replica,
                    short(ours)
                ),
            };
            let key = self.config.layout.catalog_key();
            let record = CatalogRecord {
                fingerprint: ours.clone(),
                replica: self.config.replica.clone(),
                at: Timestamp::now(),
            };
            let seen = existing.as_ref().map_or(0, |(_, revision)| *revision);
            let (key, record, detail) = (&key, &record, &detail);
            let adopted = self
                .commit(|| {
                    Box::pin(async move {
                        let mut writes = Writes::new(Timestamp::now());
                        writes.unchanged(key.clone(), seen);
                        writes.put(
                            key.clone(),
                            serde_json::to_vec(&record).expect("records serialize"),
                        );
                        let audit = AuditDraft {
                            action: AuditAction::AdoptCatalog,
                            principal: self.config.replica.clone(),
                            roles: Vec::new(),
                            namespace: None,
                            reason: None,
                            incident_id: None,
                            request_id: None,
                            activation_ids: Vec::new(),
                            detail: detail.clone(),
                            change_id: None,
                        };
                        Ok(writes.audited(audit, ()))
                    })
                })
                .await;
            match adopted {
                Ok(((), revision)) => {
                    info!(fingerprint = %short(ours), "{detail}");
                    return Ok(revision);
                }
                // Another replica wrote the record first: look again.
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(Namespace::live()))
    }

    /// Fails with [`Error::CatalogChanged`] when another replica adopted a
    /// different catalogue since this one joined.
    async fn check_catalog(&self) -> Result<()> {
        match self.catalog_record().await? {
            Some((record, revision)) if revision != self.catalog_revision => {
                Err(Error::CatalogChanged {
                    theirs: short(&record.fingerprint),
                    replica: record.replica,
                    at: record.at.to_string(),
                })
            }
            _ => Ok(()),
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
}

/// A record in the store that cannot be read.
pub(crate) fn corrupt(key: &str, error: impl std::fmt::Display) -> Error {
    Error::Store(store::Error::Corrupt(format!(
        "{key} cannot be read: {error}"
    )))
}

/// The first 12 characters of a fingerprint, enough for people.
fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(12).collect()
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
    use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};

    async fn controller(dir: &tempfile::TempDir) -> Arc<Controller> {
        let store = EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
            .unwrap();
        Controller::start(
            Arc::new(store),
            Arc::new(Catalog::standard()),
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
