//! The one way the controller writes. An operation prepares a [`Plan`] from
//! the current state: its writes gathered in [`Writes`], which becomes a
//! plan only with the audit entry that records them, or an answer that
//! writes nothing. [`Controller::commit_change`] (an [`Act`] in a namespace)
//! and [`Controller::commit`] (no namespace) turn it into one store
//! transaction that also
//!
//! - checks the namespace has not moved since the plan was prepared (its meta
//!   key) and records the change as the namespace's last change;
//! - appends the audit entry, chained to the log's head;
//! - for changes that read the mode or runbook catalogue, checks that the
//!   catalogue is still the one this replica serves.
//!
//! A transaction that loses a race is prepared again from fresh state. A plan
//! that writes nothing (a refusal such as "nothing active matches", or "already
//! active") is still committed as a compare-only transaction, so no answer is
//! ever given from a view the store has moved past.
//!
//! ## Change ids: a retry never applies a change twice
//!
//! Every change that writes carries a [`ChangeId`] (the caller's, or one made
//! here). Its transaction records it in the audit entry and writes
//! `{prefix}changes/{id}` (a [`ChangeRecord`]: the operation and what it
//! answered), comparing first that the key is absent. So a change id commits
//! at most once, whatever is retried: etcd checks it, atomically with the
//! change.
//!
//! A store failure can leave the outcome unknown ("leader changed", a timeout,
//! a connection cut after the request was sent). Then, and whenever a
//! transaction of a change id that was retried loses a race, the change key is
//! read: present, the change committed and its recorded answer is returned;
//! absent, the change is prepared and tried again. A request whose change id
//! is already recorded (a client retrying through another replica) is answered
//! the same way, without being applied again.
//!
//! Change records are kept for the latest [`CHANGE_WINDOW`] changes: each
//! change deletes the record of the one that many entries before it (the
//! audit entries keep every id), so a retry is recognised for as long as
//! any client retries, and the records do not grow without bound.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::keys::{Layout, NamespaceChange, NamespaceKey, NamespaceState};
use super::records::{
    ChangeRequest, Incident, RequestId, RequestKind, RequestStatus, TimelineEvent,
};
use super::{Controller, Error, NamespaceHandle, NamespaceView, Result};
use crate::audit::{self, AuditAction, AuditDraft, AuditEntry, AuditHead};
use crate::auth::Principal;
use crate::preview::DryRun;
use safemode_policy::{Activation, ActivationId, Namespace, Revision};
use safemode_store::{Compare, Op, Txn, TxnOutcome};

/// How many times a change is prepared and tried before it gives up.
pub(crate) const COMMIT_ATTEMPTS: u32 = 12;

/// How many of the latest changes are remembered by change id: a change id
/// is answered from its record for this many changes after it, and each
/// change removes the record of the one this many entries before it, so the
/// records stay bounded.
#[cfg(not(test))]
pub(crate) const CHANGE_WINDOW: u64 = 1000;
/// A short window, so a unit test can go past it.
#[cfg(test)]
pub(crate) const CHANGE_WINDOW: u64 = 4;

/// How many of those attempts may end with an unknown outcome before the
/// store's error is returned (each store call already waited through its own
/// failover and deadline).
pub(crate) const UNKNOWN_OUTCOMES: u32 = 3;

/// What one change answers, and what it writes, prepared against one view of
/// the state. A plan that writes is made only by [`Writes::audited`], which
/// takes the audit entry: no plan carries writes without its entry.
pub(crate) struct Plan<T> {
    /// The writes and their audit entry; `None` when nothing is written.
    write: Option<Audited>,
    /// What the caller gets back.
    outcome: T,
}

/// Writes together with the audit entry that records them.
struct Audited {
    /// When the change happens (the audit entry's and records' time).
    at: Timestamp,
    /// Conditions beyond the namespace, audit and catalogue ones.
    compares: Vec<Compare>,
    /// The writes.
    ops: Vec<Op>,
    /// Recorded as the namespace's last change; `None` leaves the namespace
    /// as it is (a pending request, a refusal).
    record: Option<NamespaceChange>,
    /// Whether the change read the mode or runbook catalogue.
    uses_catalog: bool,
    /// The audit entry.
    audit: AuditDraft,
}

/// What a change writes, gathered while it is prepared. It is not a plan:
/// only [`Writes::audited`] turns it into one, with the audit entry that
/// records it.
pub(crate) struct Writes {
    /// When the change happens (the audit entry's and records' time).
    at: Timestamp,
    /// Records the change read (incidents, requests, activations) are
    /// unchanged, or absent.
    compares: Vec<Compare>,
    /// The writes.
    ops: Vec<Op>,
    /// How the namespace's last-change record is made, if the change makes
    /// one.
    record: Option<Recorded>,
    /// Whether the change read the mode or runbook catalogue.
    uses_catalog: bool,
}

/// How a namespace's last-change record is made.
enum Recorded {
    /// From the audit entry (its action, principal and reason), naming these
    /// activations.
    Audited(Vec<ActivationId>),
    /// As given, when it is not the audit entry's (see
    /// [`Writes::record_namespace_as`]).
    As(NamespaceChange),
}

impl Writes {
    /// Nothing yet, for a change at `at`.
    pub fn new(at: Timestamp) -> Self {
        Writes {
            at,
            compares: Vec::new(),
            ops: Vec::new(),
            record: None,
            uses_catalog: false,
        }
    }

    /// When the change happens.
    pub fn at(&self) -> Timestamp {
        self.at
    }

    /// The change commits only if `key` is still at `revision` (0: absent).
    pub fn unchanged(&mut self, key: String, revision: Revision) {
        self.compares.push(Compare::ModRevision { key, revision });
    }

    /// Writes `value` at `key`.
    pub fn put(&mut self, key: String, value: Vec<u8>) {
        self.ops.push(Op::Put { key, value });
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: String) {
        self.ops.push(Op::Delete { key });
    }

    /// The change read the mode or runbook catalogue: it commits only while
    /// the catalogue is the one this replica serves.
    pub fn uses_catalog(&mut self) {
        self.uses_catalog = true;
    }

    /// Records the change as the namespace's last, by its audit entry's
    /// action, principal and reason, naming `activations`.
    pub fn record_namespace(&mut self, activations: impl IntoIterator<Item = ActivationId>) {
        self.record = Some(Recorded::Audited(activations.into_iter().collect()));
    }

    /// Records the change as the namespace's last as `change` says, not as
    /// its audit entry does. Only an approved resolution does this: the
    /// namespace records the resolution that was requested (its action,
    /// requester and reason), the log the approval.
    pub fn record_namespace_as(&mut self, change: NamespaceChange) {
        self.record = Some(Recorded::As(change));
    }

    /// The plan that writes all this, recorded by `audit`, and answers
    /// `outcome`.
    pub fn audited<T>(self, audit: AuditDraft, outcome: T) -> Plan<T> {
        let record = self.record.map(|record| match record {
            Recorded::As(change) => change,
            Recorded::Audited(activation_ids) => NamespaceChange {
                action: audit.action,
                principal: audit.principal.clone(),
                reason: audit.reason.clone().unwrap_or_default(),
                at: self.at,
                activation_ids,
                // Filled in by `Controller::commit`, which knows the whole
                // change.
                state: None,
            },
        });
        Plan {
            write: Some(Audited {
                at: self.at,
                compares: self.compares,
                ops: self.ops,
                record,
                uses_catalog: self.uses_catalog,
                audit,
            }),
            outcome,
        }
    }
}

/// One change a principal makes in a namespace. Its audited action is named
/// here once: it is the operation its change id is kept with, its audit
/// entry's action ([`Act::entry`]) and, through that, the namespace's
/// last-change record's.
#[derive(Clone, Copy)]
pub(crate) struct Act<'a> {
    /// What the change is.
    pub action: AuditAction,
    /// Who makes it.
    pub actor: &'a Principal,
    /// Where.
    pub namespace: &'a Namespace,
    /// The caller's change id, if it gave one (a retry gives the same).
    pub change_id: Option<&'a ChangeId>,
    /// Set for a dry run: the change is prepared as usual, never committed,
    /// and what it would do is left here (see [`crate::preview`]).
    pub dry_run: Option<&'a DryRun>,
}

impl Act<'_> {
    /// The change's audit entry: `detail` says what it did, for `reason`.
    pub fn entry(&self, reason: &str, detail: String) -> AuditDraft {
        self.entry_as(self.action, reason, detail)
    }

    /// An audit entry by this change's actor in its namespace, of `action`.
    fn entry_as(&self, action: AuditAction, reason: &str, detail: String) -> AuditDraft {
        AuditDraft {
            action,
            principal: self.actor.name.clone(),
            roles: self.actor.role_names(),
            namespace: Some(self.namespace.to_string()),
            reason: Some(reason.to_string()),
            incident_id: None,
            request_id: None,
            activation_ids: Vec::new(),
            detail,
            change_id: None,
        }
    }
}

/// The most characters of a change id.
pub const CHANGE_ID_MAX: usize = 64;

/// The id of one change, the same across every retry of it (by the
/// controller, or by a client through another replica): 1 to
/// [`CHANGE_ID_MAX`] of `A-Z a-z 0-9 . _ -`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChangeId {
    id: String,
    /// Made by [`ChangeId::random`] in this process, so it cannot have
    /// committed before: no need to look it up first.
    fresh: bool,
    /// A digest of the request that carried it (who, and exactly what):
    /// the id used again for anything else is refused, not answered with
    /// the first change's outcome.
    request: Option<String>,
}

impl PartialEq for ChangeId {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for ChangeId {}

impl ChangeId {
    /// A new random id, `chg_` and 26 characters of base32 (130 bits).
    pub fn random() -> Self {
        const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
        let bits: u128 = rand::random();
        let extra: u8 = rand::random();
        let mut id = String::from("chg_");
        for i in 0..26 {
            let index = if i < 25 {
                (bits >> (i * 5)) & 31
            } else {
                u128::from(extra & 31)
            };
            id.push(char::from(ALPHABET[index as usize]));
        }
        ChangeId {
            id,
            fresh: true,
            request: None,
        }
    }

    /// Checks a change id given by a caller. The error says what is allowed.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.is_empty() || text.len() > CHANGE_ID_MAX {
            return Err(format!(
                "a change id has 1 to {CHANGE_ID_MAX} characters, not {}; leave it empty and the server makes one",
                text.chars().count()
            ));
        }
        if let Some(bad) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "a change id may hold only A-Z, a-z, 0-9, '.', '_' and '-', not {bad:?}"
            ));
        }
        Ok(ChangeId {
            id: text.to_string(),
            fresh: false,
            request: None,
        })
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The id, bound to `request`: a digest of who asked for exactly what.
    pub fn for_request(mut self, request: String) -> Self {
        self.request = Some(request);
        self
    }

    /// The caller's id, or a new one when it gave none (empty).
    pub fn parse_or_random(text: &str) -> std::result::Result<Self, String> {
        if text.is_empty() {
            Ok(ChangeId::random())
        } else {
            ChangeId::parse(text)
        }
    }
}

impl TryFrom<String> for ChangeId {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        ChangeId::parse(&text)
    }
}

impl From<ChangeId> for String {
    fn from(id: ChangeId) -> String {
        id.id
    }
}

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

/// `{prefix}changes/{change id}`: that a change committed, and what it
/// answered, written in the change's own transaction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChangeRecord {
    /// The operation (`apply`, `lift`, `declare`, ...): a change id used
    /// again for another operation is refused, not answered.
    pub operation: String,
    /// The change's audit entry.
    pub seq: u64,
    /// What the change answered ([`Replay::kept`]).
    pub outcome: serde_json::Value,
    /// The revision it answered with, when that is not the revision it was
    /// written at: a change that leaves its namespace as it was (a pending
    /// request) answers with the namespace's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// The digest of the request ([`ChangeId::for_request`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// An outcome that can be kept with its change id and given again to a
/// retry of the same change.
pub(crate) trait Replay: Sized {
    /// What to keep: only outcomes of changes that write are ever kept.
    fn kept(&self) -> serde_json::Value;
    /// The outcome again; `None` when `kept` is not one of this type's.
    fn replayed(kept: serde_json::Value) -> Option<Self>;
}

impl Replay for () {
    fn kept(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn replayed(_: serde_json::Value) -> Option<Self> {
        Some(())
    }
}

/// A change that writes never answers with an error (a refusal writes
/// nothing), so only `Ok` is kept.
impl<A: Serialize + DeserializeOwned> Replay for Result<A> {
    fn kept(&self) -> serde_json::Value {
        match self {
            Ok(answer) => serde_json::to_value(answer).expect("outcomes serialize"),
            Err(_) => serde_json::Value::Null,
        }
    }
    fn replayed(kept: serde_json::Value) -> Option<Self> {
        serde_json::from_value(kept).ok().map(Ok)
    }
}

/// Applying modes: what was applied, and what was already active.
impl Replay for (Vec<Activation>, Vec<Arc<Activation>>) {
    fn kept(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("outcomes serialize")
    }
    fn replayed(kept: serde_json::Value) -> Option<Self> {
        serde_json::from_value(kept).ok()
    }
}

/// What a commit loop prepared and did, for the commit counters.
#[derive(Default)]
struct Counted {
    /// The audited action of the last plan with writes.
    kind: Option<AuditAction>,
    /// Whether this call's transaction committed it.
    committed: bool,
}

/// Whose change id: a caller's (maybe retried already, so looked up first),
/// or one made for this call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChangeOf<'a> {
    /// The operation's name, kept with the change.
    pub operation: &'static str,
    /// The audited action the change is, when known before it is planned:
    /// a change the store failed before any plan still counts as failed.
    pub kind: Option<AuditAction>,
    /// The caller's change id, if it gave one.
    pub id: Option<&'a ChangeId>,
}

impl<T> Plan<T> {
    /// What the plan answers, and its writes with their audit entry (none
    /// when it writes nothing): what a dry run reads instead of committing.
    pub(crate) fn into_parts(self) -> (T, Option<(Vec<Op>, AuditDraft)>) {
        (self.outcome, self.write.map(|w| (w.ops, w.audit)))
    }

    /// A plan that writes nothing and answers `outcome` once the store
    /// confirms the view it was prepared from is current.
    pub fn answer(outcome: T) -> Self {
        Plan {
            write: None,
            outcome,
        }
    }
}

/// What a change reads: one namespace, or none.
trait Scope: Send + Sync {
    /// What the change is prepared from.
    type View: Send;
    /// The namespace's handle, if the change is in one.
    fn handle(&self) -> Option<&NamespaceHandle>;
    /// The view to prepare from, and the namespace's view that the commit
    /// checks is still current.
    fn views(&self) -> (Self::View, Option<Arc<NamespaceView>>);
}

/// A change in no namespace (an audited refusal, a catalogue adopted).
struct NoNamespace;

impl Scope for NoNamespace {
    type View = ();
    fn handle(&self) -> Option<&NamespaceHandle> {
        None
    }
    fn views(&self) -> ((), Option<Arc<NamespaceView>>) {
        ((), None)
    }
}

impl Scope for Arc<NamespaceHandle> {
    type View = Arc<NamespaceView>;
    fn handle(&self) -> Option<&NamespaceHandle> {
        Some(self)
    }
    fn views(&self) -> (Arc<NamespaceView>, Option<Arc<NamespaceView>>) {
        let view = NamespaceHandle::current(self);
        (view.clone(), Some(view))
    }
}

/// The namespace's activations after `ops`, for its meta record and the
/// digest its audit entry (at `audit_seq`) signs. It starts from what the
/// last change left as the view trusts it (its signed list), not from what
/// the store holds now: an activation deleted or edited behind safemode's
/// back stays named, and failing closed, until it is lifted, instead of
/// being blessed by the next change. Without a trusted list (a namespace
/// written by a version before digests, or whose list did not check out) it
/// starts from the stored records.
fn namespace_state(
    layout: &Layout,
    view: &NamespaceView,
    ops: &[Op],
    audit_seq: u64,
) -> NamespaceState {
    let mut activations = view
        .listed
        .clone()
        .unwrap_or_else(|| view.stored_hashes.clone());
    for op in ops {
        let (Op::Put { key, .. } | Op::Delete { key }) = op;
        let NamespaceKey::Activation(id) = layout.classify(&view.namespace, key) else {
            continue;
        };
        match op {
            Op::Put { value, .. } => {
                activations.insert(id.to_string(), audit::record_hash(value));
            }
            Op::Delete { .. } => {
                activations.remove(id.as_str());
            }
        }
    }
    let digest = audit::state_digest(activations.iter().map(|(i, h)| (i.as_str(), h.as_str())));
    NamespaceState {
        audit_seq,
        digest,
        activations,
    }
}

impl Controller {
    /// Prepares and commits a change in no namespace (an audited refusal, a
    /// catalogue adopted), with a change id made for this call, retrying
    /// from fresh state when a concurrent change wins.
    pub(crate) async fn commit<'a, T: Replay + Send + 'a>(
        &'a self,
        mut prepare: impl FnMut() -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision)> {
        let change = ChangeOf {
            operation: "internal",
            kind: None,
            id: None,
        };
        self.commit_in(change, NoNamespace, move |()| prepare())
            .await
    }

    /// Prepares and commits `act`'s change in its namespace, retrying from
    /// the namespace's fresh view when a concurrent change wins. Returns the
    /// outcome and the revision committed at (the namespace's current
    /// revision when nothing was written). A change id that already
    /// committed is answered with what it answered then (see the module
    /// doc).
    pub(crate) async fn commit_change<'a, T: Replay + Send + 'a>(
        &'a self,
        act: &Act<'_>,
        prepare: impl FnMut(Arc<NamespaceView>) -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision)> {
        let change = ChangeOf {
            operation: act.action.as_str(),
            kind: Some(act.action),
            id: act.change_id,
        };
        let handle = match self.namespace(act.namespace).await {
            Ok(handle) => handle,
            Err(e) => {
                if act.dry_run.is_none()
                    && matches!(e, Error::Store(_) | Error::StoreUnreachable { .. })
                {
                    self.counters().failed(act.action);
                }
                return Err(e);
            }
        };
        if let Some(dry_run) = act.dry_run {
            // No change id is looked up or kept: nothing commits.
            let (outcome, revision, preview) = self.preview_change(act, handle, prepare).await?;
            dry_run.set(preview);
            return Ok((outcome, revision));
        }
        self.commit_in(change, handle, prepare).await
    }

    /// The loop behind [`Controller::commit`] and
    /// [`Controller::commit_change`], for a change that reads `scope`. When
    /// the store cannot be reached, the error says so and exactly what
    /// became of the change: nothing changed, or (its transaction was sent
    /// and the answer lost, and reading back could not tell) that it may
    /// have been applied, to be retried with its change id.
    async fn commit_in<'a, S: Scope, T: Replay + Send + 'a>(
        &'a self,
        change: ChangeOf<'_>,
        scope: S,
        prepare: impl FnMut(S::View) -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision)> {
        let id = change.id.cloned().unwrap_or_else(ChangeId::random);
        let mut unresolved = false;
        let mut counted = Counted::default();
        // Every commit is a span (exported as an OpenTelemetry span when
        // traces are on), a child of the call that asked for it.
        let span = tracing::info_span!(
            "commit",
            otel.name = %format_args!("commit {}", change.operation),
            operation = change.operation,
            change_id = %id,
            kind = tracing::field::Empty,
            revision = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            self.commit_attempts(change, &id, &mut unresolved, &mut counted, scope, prepare),
            span.clone(),
        )
        .await;
        if let Some(kind) = counted.kind {
            span.record("kind", kind.as_str());
            match &result {
                Ok((_, revision)) if counted.committed => {
                    span.record("revision", revision);
                    self.counters().committed(kind);
                }
                Ok(_) => {}
                Err(_) => self.counters().failed(kind),
            }
        } else if let (Some(kind), Err(Error::Store(_) | Error::StoreUnreachable { .. })) =
            (change.kind, &result)
        {
            // The store failed before the change could be planned (its
            // reads): failed all the same, and what an outage alert needs.
            span.record("kind", kind.as_str());
            self.counters().failed(kind);
        }
        match result {
            Err(Error::Store(safemode_store::Error::Unavailable(cause))) if unresolved => {
                Err(Error::StoreUnreachable {
                    store: self.store.place(),
                    cause: cause.message().to_string(),
                    outcome: super::StoreOutcome::Unknown {
                        change_id: Some(id.to_string()),
                    },
                })
            }
            Err(e) => Err(self.in_words(e, super::StoreOutcome::Unchanged)),
            Ok(done) => Ok(done),
        }
    }

    /// [`Controller::commit_in`]'s attempts. `unresolved` is set while a
    /// transaction of this change may have been applied and no read of its
    /// change id has said whether.
    async fn commit_attempts<'a, S: Scope, T: Replay + Send + 'a>(
        &'a self,
        change: ChangeOf<'_>,
        id: &ChangeId,
        unresolved: &mut bool,
        counted: &mut Counted,
        scope: S,
        mut prepare: impl FnMut(S::View) -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision)> {
        let id = id.clone();
        // A caller's id may have committed through another replica already.
        let mut maybe_committed = !id.fresh;
        if maybe_committed && let Some(done) = self.committed(change, &id, scope.handle()).await? {
            return Ok(done);
        }
        let layout = &self.config.layout;
        let mut unknown = 0;
        let mut last_namespace = None;
        for attempt in 0..COMMIT_ATTEMPTS {
            let (prepared_from, view) = scope.views();
            let Plan { write, outcome } = prepare(prepared_from).await?;
            counted.kind = write.as_ref().map(|w| w.audit.action);
            let (at, compares, ops, record, uses_catalog, audit) = match write {
                Some(w) => (
                    w.at,
                    w.compares,
                    w.ops,
                    w.record,
                    w.uses_catalog,
                    Some(w.audit),
                ),
                None => (Timestamp::now(), Vec::new(), Vec::new(), None, false, None),
            };
            let mut txn = Txn { compares, ops };
            // The audit head first: the namespace's record names the entry.
            let head = match audit {
                Some(_) => Some(self.audit_head().await?),
                None => None,
            };
            let next_seq = head.as_ref().map_or(0, |(h, _)| h.seq + 1);
            let mut state_digest = None;
            if let Some(view) = &view {
                last_namespace = Some(view.namespace.clone());
                let meta_key = layout.meta_key(&view.namespace);
                txn.compares.push(Compare::ModRevision {
                    key: meta_key.clone(),
                    revision: view.meta_revision,
                });
                if let Some(mut record) = record.clone() {
                    let state = namespace_state(layout, view, &txn.ops, next_seq);
                    state_digest = Some(state.digest.clone());
                    record.state = Some(state);
                    txn.ops.push(Op::Put {
                        key: meta_key,
                        value: serde_json::to_vec(&record).expect("changes serialize"),
                    });
                }
            }
            if uses_catalog {
                txn.compares.push(Compare::ModRevision {
                    key: layout.catalog_key(),
                    revision: self.catalog_revision,
                });
            }
            let mut appended = None;
            if let (Some(mut draft), Some((head, head_revision))) = (audit, head) {
                // A refusal is recorded in the log, never as a change that
                // committed: it changes nothing and no caller retries it, and
                // so it takes no place among the kept change records.
                let keeps_record = draft.action != AuditAction::Refused;
                draft.change_id = keeps_record.then(|| id.to_string());
                let entry = AuditEntry::seal(draft, state_digest, &head, at, self.signing_key());
                appended = Some((entry.seq, entry.action, entry.hash.clone()));
                if let Some(old) = self.expiring_change(entry.seq).await? {
                    txn.ops.push(Op::Delete {
                        key: layout.change_key(&old),
                    });
                }
                txn.compares.push(Compare::ModRevision {
                    key: layout.audit_head_key(),
                    revision: head_revision,
                });
                // Never over an existing entry, whatever the head says.
                txn.compares.push(Compare::ModRevision {
                    key: layout.audit_entry_key(entry.seq),
                    revision: 0,
                });
                // A change id commits once.
                if keeps_record {
                    txn.compares.push(Compare::ModRevision {
                        key: layout.change_key(&id),
                        revision: 0,
                    });
                }
                let record = ChangeRecord {
                    operation: change.operation.to_string(),
                    seq: entry.seq,
                    outcome: outcome.kept(),
                    revision: match (&view, record.is_some()) {
                        (Some(view), false) => Some(view.revision),
                        _ => None,
                    },
                    request: change.id.and_then(|id| id.request.clone()),
                };
                if keeps_record {
                    txn.ops.push(Op::Put {
                        key: layout.change_key(&id),
                        value: serde_json::to_vec(&record).expect("change records serialize"),
                    });
                }
                txn.ops.push(Op::Put {
                    key: layout.audit_entry_key(entry.seq),
                    value: serde_json::to_vec(&entry).expect("audit entries serialize"),
                });
                txn.ops.push(Op::Put {
                    key: layout.audit_head_key(),
                    value: serde_json::to_vec(&entry.head()).expect("audit heads serialize"),
                });
            }
            let wrote = record.is_some();
            let committed = match self.store.txn(txn).await {
                Ok(outcome) => outcome,
                Err(safemode_store::Error::Unavailable(why)) => {
                    // Perhaps applied: the change key says whether. Reading
                    // it fails over like every store call.
                    warn!(attempt, change_id = %id, %why, "a change's outcome is unknown; checking whether it committed");
                    maybe_committed = true;
                    *unresolved |= why.may_have_applied();
                    if let Some(done) = self.committed(change, &id, scope.handle()).await? {
                        return Ok(done);
                    }
                    // Read back: it did not commit.
                    *unresolved = false;
                    unknown += 1;
                    if unknown >= UNKNOWN_OUTCOMES {
                        return Err(safemode_store::Error::Unavailable(why).into());
                    }
                    pause(attempt).await;
                    continue;
                }
                Err(other) => return Err(other.into()),
            };
            match committed {
                TxnOutcome::Committed { revision } => {
                    // Logs shipped elsewhere keep a copy of the chain's hashes.
                    if let Some((seq, action, hash)) = appended {
                        counted.committed = true;
                        self.saw_audit_head(seq);
                        info!(seq, action = action.as_str(), %hash, revision, change_id = %id, "audit entry appended");
                    }
                    if let (Some(handle), true) = (scope.handle(), wrote) {
                        self.await_visible(handle, revision).await;
                    }
                    let revision = match (&view, wrote) {
                        (Some(view), false) => view.revision,
                        _ => revision,
                    };
                    return Ok((outcome, revision));
                }
                TxnOutcome::CompareFailed { .. } => {
                    // An earlier attempt, or a client's earlier call, may
                    // be what moved the store.
                    if maybe_committed
                        && let Some(done) = self.committed(change, &id, scope.handle()).await?
                    {
                        return Ok(done);
                    }
                    debug!(attempt, "a concurrent change won; preparing again");
                    pause(attempt).await;
                    if uses_catalog {
                        self.check_catalog().await?;
                    }
                    if let (Some(handle), Some(view)) = (scope.handle(), &view) {
                        self.catch_up(handle, view).await?;
                    }
                }
            }
        }
        Err(Error::Conflict(
            last_namespace.unwrap_or_else(Namespace::live),
        ))
    }

    /// The change id of the audit entry [`CHANGE_WINDOW`] before position
    /// `seq`, whose record the change at `seq` removes. An entry that is
    /// gone, unreadable or without a change id has nothing to remove.
    async fn expiring_change(&self, seq: u64) -> Result<Option<ChangeId>> {
        let Some(old) = seq.checked_sub(CHANGE_WINDOW).filter(|&old| old > 0) else {
            return Ok(None);
        };
        let key = self.config.layout.audit_entry_key(old);
        let range = self.store.range(&key).await?;
        Ok(range
            .kvs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| serde_json::from_slice::<AuditEntry>(&kv.value).ok())
            .and_then(|entry| entry.change_id)
            .and_then(|id| ChangeId::parse(&id).ok()))
    }

    /// Whether change `id` committed: its recorded answer and revision, or
    /// `None`. The answer waits (bounded) until this replica's view shows the
    /// change, as a fresh commit's does.
    async fn committed<T: Replay>(
        &self,
        change: ChangeOf<'_>,
        id: &ChangeId,
        handle: Option<&NamespaceHandle>,
    ) -> Result<Option<(T, Revision)>> {
        let key = self.config.layout.change_key(id);
        let range = self.store.range(&key).await?;
        let Some(kv) = range.kvs.into_iter().find(|kv| kv.key == key) else {
            return Ok(None);
        };
        let record: ChangeRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            Error::Store(safemode_store::Error::Corrupt(format!(
                "{key} cannot be read: {e}; `safemode audit --verify` shows the log"
            )))
        })?;
        let reused = || Error::ChangeIdReused {
            id: id.to_string(),
            was: record.operation.clone(),
            now: change.operation.to_string(),
        };
        let asked = change.id.and_then(|id| id.request.as_deref());
        if record.operation != change.operation
            || record.request.is_some() && asked.is_some() && record.request.as_deref() != asked
        {
            return Err(reused());
        }
        let outcome = T::replayed(record.outcome.clone()).ok_or_else(reused)?;
        info!(change_id = %id, seq = record.seq, revision = kv.mod_revision, "change already committed; answering as it did");
        if let Some(handle) = handle {
            self.await_visible(handle, kv.mod_revision).await;
        }
        Ok(Some((outcome, record.revision.unwrap_or(kv.mod_revision))))
    }

    /// The audit log's head and the revision of its key (0: empty log).
    pub(crate) async fn audit_head(&self) -> Result<(AuditHead, Revision)> {
        let key = self.config.layout.audit_head_key();
        let range = self.store.range(&key).await?;
        match range.kvs.into_iter().find(|kv| kv.key == key) {
            None => self.restore_audit_head().await,
            Some(kv) => {
                let head: AuditHead = serde_json::from_slice(&kv.value).map_err(|e| {
                    Error::Store(safemode_store::Error::Corrupt(format!(
                        "{key} cannot be read: {e}; `safemode audit --verify` shows the log"
                    )))
                })?;
                self.saw_audit_head(head.seq);
                Ok((head, kv.mod_revision))
            }
        }
    }

    /// With no head: an empty log, or one whose head was deleted. Changes go
    /// on either way (an incident cannot wait for a repair), but a deleted
    /// head is never silently recreated: an entry saying so continues the
    /// log from its last entry.
    async fn restore_audit_head(&self) -> Result<(AuditHead, Revision)> {
        let layout = &self.config.layout;
        let Some(kv) = self.last_audit_entry().await? else {
            return Ok((AuditHead::default(), 0));
        };
        let last: AuditEntry = serde_json::from_slice(&kv.value).map_err(|e| {
            Error::Store(safemode_store::Error::Corrupt(format!(
                "the audit log has no head and its last entry {} cannot be read: {e}; `safemode audit --verify` shows the log",
                kv.key
            )))
        })?;
        let draft = AuditDraft {
            action: AuditAction::HeadRestored,
            principal: self.config.replica.clone(),
            roles: Vec::new(),
            namespace: None,
            reason: None,
            incident_id: None,
            request_id: None,
            activation_ids: Vec::new(),
            detail: format!(
                "the log's head was missing; replica {} continued the log after entry {} (hash {})",
                self.config.replica, last.seq, last.hash
            ),
            change_id: None,
        };
        let entry = AuditEntry::seal(
            draft,
            None,
            &last.head(),
            Timestamp::now(),
            self.signing_key(),
        );
        let txn = Txn {
            compares: vec![
                Compare::ModRevision {
                    key: layout.audit_head_key(),
                    revision: 0,
                },
                Compare::ModRevision {
                    key: layout.audit_entry_key(entry.seq),
                    revision: 0,
                },
            ],
            ops: vec![
                Op::Put {
                    key: layout.audit_entry_key(entry.seq),
                    value: serde_json::to_vec(&entry).expect("audit entries serialize"),
                },
                Op::Put {
                    key: layout.audit_head_key(),
                    value: serde_json::to_vec(&entry.head()).expect("audit heads serialize"),
                },
            ],
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision } => {
                warn!(
                    after = last.seq,
                    entry = entry.seq,
                    "the audit log's head was missing; recorded that and continued the log"
                );
                Ok((entry.head(), revision))
            }
            // Another replica restored it, or the log moved: read again.
            TxnOutcome::CompareFailed { .. } => {
                let key = layout.audit_head_key();
                let range = self.store.range(&key).await?;
                let kv = range
                    .kvs
                    .into_iter()
                    .find(|kv| kv.key == key)
                    .ok_or_else(|| Error::Conflict(Namespace::live()))?;
                let head = serde_json::from_slice(&kv.value).map_err(|e| {
                    Error::Store(safemode_store::Error::Corrupt(format!(
                        "{key} cannot be read: {e}; `safemode audit --verify` shows the log"
                    )))
                })?;
                Ok((head, kv.mod_revision))
            }
        }
    }

    /// The log's last stored entry, read page by page at one revision (the
    /// log can be larger than one store message). Only a missing head needs
    /// it.
    async fn last_audit_entry(&self) -> Result<Option<safemode_store::KeyValue>> {
        let prefix = self.config.layout.audit_log_prefix();
        let mut revision = 0;
        let mut last = None;
        loop {
            let start_after = last
                .as_ref()
                .map(|kv: &safemode_store::KeyValue| kv.key.clone());
            let page = self
                .store
                .range_page(&prefix, start_after.as_deref(), 100, revision)
                .await?;
            revision = page.revision;
            let more = page.more;
            if let Some(kv) = page.kvs.into_iter().last() {
                last = Some(kv);
            } else {
                return Ok(last);
            }
            if !more {
                return Ok(last);
            }
        }
    }

    /// After a lost race: waits (bounded) until this replica's view of the
    /// namespace has the meta revision the store has now, so the next plan is
    /// prepared from it.
    pub(crate) async fn catch_up(
        &self,
        handle: &NamespaceHandle,
        view: &NamespaceView,
    ) -> Result<()> {
        let key = self.config.layout.meta_key(&view.namespace);
        let range = self.store.range(&key).await?;
        let current = range
            .kvs
            .iter()
            .find(|kv| kv.key == key)
            .map_or(0, |kv| kv.mod_revision);
        if current != view.meta_revision {
            let _ = handle
                .wait_for(self.config.visibility_timeout, |v| {
                    v.meta_revision >= current
                })
                .await;
        }
        Ok(())
    }
}

/// A change that waits for a second approver instead of being carried out.
pub(crate) struct ApprovalNeeded<'a> {
    /// What approving it will do.
    pub kind: RequestKind,
    /// Why.
    pub reason: &'a str,
    /// The activations it will lift.
    pub activation_ids: Vec<ActivationId>,
    /// The incident it belongs to, and the revision its record was read at;
    /// its timeline records the request.
    pub incident: Option<(&'a mut Incident, Revision)>,
    /// What it will do, for people ("lift freeze-... on all channels").
    pub summary: String,
}

/// The writes that operations share, on [`Writes`] (they need the key
/// layout).
impl Controller {
    /// Puts new activations (each key must be absent).
    pub(crate) fn put_activations(
        &self,
        writes: &mut Writes,
        namespace: &Namespace,
        activations: &[Activation],
    ) {
        for activation in activations {
            let key = self.config.layout.activation_key(namespace, &activation.id);
            writes.unchanged(key.clone(), 0);
            writes.put(
                key,
                serde_json::to_vec(activation).expect("activations serialize"),
            );
        }
    }

    /// Rewrites activations in place, each `(before, after)` with the same
    /// id (each must be unchanged since it was read).
    pub(crate) fn rewrite_activations(
        &self,
        writes: &mut Writes,
        namespace: &Namespace,
        activations: &[(Arc<Activation>, Activation)],
    ) {
        for (before, after) in activations {
            debug_assert_eq!(before.id, after.id);
            let key = self.config.layout.activation_key(namespace, &after.id);
            writes.unchanged(key.clone(), before.revision);
            writes.put(
                key,
                serde_json::to_vec(after).expect("activations serialize"),
            );
        }
    }

    /// Deletes activations (each must be unchanged since it was read).
    pub(crate) fn delete_activations(
        &self,
        writes: &mut Writes,
        namespace: &Namespace,
        activations: &[Arc<Activation>],
    ) {
        for activation in activations {
            let key = self.config.layout.activation_key(namespace, &activation.id);
            writes.unchanged(key.clone(), activation.revision);
            writes.delete(key);
        }
    }

    /// Writes `incident`, provided its record is still at `revision` (0: new).
    pub(crate) fn put_incident(
        &self,
        writes: &mut Writes,
        incident: &Incident,
        revision: Revision,
    ) {
        let key = self.config.layout.incident_key(&incident.id);
        writes.unchanged(key.clone(), revision);
        writes.put(
            key,
            serde_json::to_vec(incident).expect("incidents serialize"),
        );
    }

    /// Adds to `writes` a pending request for `needed` (and the incident's
    /// timeline event) in place of `act`'s change itself. Returns the
    /// request and the audit entry that records it.
    pub(crate) fn request_approval(
        &self,
        act: &Act<'_>,
        writes: &mut Writes,
        needed: ApprovalNeeded<'_>,
    ) -> (ChangeRequest, AuditDraft) {
        let at = writes.at();
        let pending = ChangeRequest {
            id: RequestId::random(),
            namespace: act.namespace.clone(),
            kind: needed.kind,
            incident_id: needed.incident.as_ref().map(|(i, _)| i.id.clone()),
            activation_ids: needed.activation_ids,
            requested_by: act.actor.name.clone(),
            reason: needed.reason.to_string(),
            requested_at: at,
            expires_at: expiry(at, self.config.request_ttl),
            status: RequestStatus::Pending,
            summary: needed.summary,
        };
        let key = self.config.layout.request_key(&pending.id);
        writes.unchanged(key.clone(), 0);
        writes.put(
            key,
            serde_json::to_vec(&pending).expect("requests serialize"),
        );
        let mut audit = act.entry_as(
            AuditAction::Request,
            needed.reason,
            format!("requested approval to {}", pending.summary),
        );
        audit.request_id = Some(pending.id.to_string());
        audit.activation_ids = pending
            .activation_ids
            .iter()
            .map(ToString::to_string)
            .collect();
        if let Some((incident, revision)) = needed.incident {
            incident.timeline.push(TimelineEvent::new(
                at,
                "requested",
                act.actor,
                incident.severity,
                Some(needed.reason),
                Some(&pending.id),
            ));
            self.put_incident(writes, incident, revision);
            audit.incident_id = Some(incident.id.to_string());
        }
        (pending, audit)
    }
}

/// When a request made at `at` expires.
fn expiry(at: Timestamp, ttl: Duration) -> Timestamp {
    at.saturating_add(jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// Before another attempt: every change appends to the one audit chain, so
/// changes in other namespaces compete too, and a store that just failed may
/// be electing a leader: spread the retries out.
pub(crate) async fn pause(attempt: u32) {
    let most = 1u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=most))).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::auth::Principal;
    use crate::{ApplyRequest, ControllerConfig};
    use safemode_policy::catalog::Catalog;
    use safemode_policy::{ChannelSet, ModeName, Reason};
    use safemode_store::embedded::{EmbeddedOptions, EmbeddedStore};
    use safemode_store::{self as store, RangeResult, Store, WatchStream};

    /// The real embedded store, whose next `lose` writing transactions are
    /// applied but answered with an error, as when etcd's answer is lost
    /// ("leader changed" after the proposal committed, a connection cut
    /// after sending).
    ///
    /// Once `down`, every call fails as on an etcd that refuses
    /// connections (nothing sent); `down_after_loss` takes it down right
    /// after it loses an answer, so nothing can read the change back.
    struct LostAnswers {
        inner: EmbeddedStore,
        lose: AtomicUsize,
        down: AtomicBool,
        down_after_loss: AtomicBool,
    }

    impl LostAnswers {
        fn refused(&self) -> store::Result<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(store::Error::Unavailable("connection refused".into()));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Store for LostAnswers {
        async fn range(&self, prefix: &str) -> store::Result<RangeResult> {
            self.refused()?;
            self.inner.range(prefix).await
        }
        async fn range_page(
            &self,
            prefix: &str,
            start_after: Option<&str>,
            limit: usize,
            revision: Revision,
        ) -> store::Result<store::RangePage> {
            self.refused()?;
            self.inner
                .range_page(prefix, start_after, limit, revision)
                .await
        }
        async fn txn(&self, txn: Txn) -> store::Result<TxnOutcome> {
            self.refused()?;
            let writes = !txn.ops.is_empty();
            let outcome = self.inner.txn(txn).await?;
            if writes
                && self
                    .lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                if self.down_after_loss.load(Ordering::SeqCst) {
                    self.down.store(true, Ordering::SeqCst);
                }
                return Err(store::Error::Unavailable(
                    store::Cause::from("etcdserver: leader changed").maybe_applied(),
                ));
            }
            Ok(outcome)
        }
        async fn watch(&self, prefix: &str, from: Revision) -> store::Result<WatchStream> {
            self.inner.watch(prefix, from).await
        }
        async fn compact(&self, revision: Revision) -> store::Result<()> {
            self.inner.compact(revision).await
        }
        fn describe(&self) -> String {
            "lost-answers".into()
        }
    }

    async fn controller(dir: &tempfile::TempDir) -> (Arc<Controller>, Arc<LostAnswers>) {
        let inner = EmbeddedStore::open(&dir.path().join("store.redb"), EmbeddedOptions::default())
            .unwrap();
        let store = Arc::new(LostAnswers {
            inner,
            lose: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            down_after_loss: AtomicBool::new(false),
        });
        let controller = Controller::start(
            store.clone(),
            Arc::new(Catalog::standard()),
            ControllerConfig::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        (controller, store)
    }

    fn apply(change_id: &str) -> ApplyRequest {
        ApplyRequest {
            namespace: Namespace::live(),
            modes: vec![ModeName::parse("throttle-high-risk").unwrap()],
            channels: ChannelSet::ALL,
            as_of: None,
            actor: Principal::local(),
            reason: Reason::parse("test").unwrap(),
            change_id: Some(ChangeId::parse(change_id).unwrap()),
            dry_run: false,
        }
    }

    /// The audit entries that carry `change_id`.
    async fn entries_of(controller: &Controller, change_id: &str) -> usize {
        let log = controller
            .store
            .range(&controller.config.layout.audit_log_prefix())
            .await
            .unwrap();
        log.kvs
            .iter()
            .map(|kv| serde_json::from_slice::<AuditEntry>(&kv.value).unwrap())
            .filter(|e| e.change_id.as_deref() == Some(change_id))
            .count()
    }

    #[tokio::test]
    async fn a_change_whose_answer_was_lost_is_applied_once_and_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, store) = controller(&dir).await;
        store.lose.store(1, Ordering::SeqCst);
        let outcome = controller.apply(apply("lost-1")).await.unwrap();
        assert_eq!(store.lose.load(Ordering::SeqCst), 0, "the answer was lost");
        assert_eq!(
            outcome.applied.len(),
            1,
            "the change is reported as applied"
        );
        let view = controller.namespace(&Namespace::live()).await.unwrap();
        assert_eq!(view.current().activations.len(), 1, "applied exactly once");
        assert_eq!(entries_of(&controller, "lost-1").await, 1);
    }

    /// With the store unreachable, a change says which store, why, and
    /// exactly what became of it: nothing, when nothing was sent; "may have
    /// been applied" with its change id, when its answer was lost and
    /// nothing could read it back.
    #[tokio::test]
    async fn a_change_on_an_unreachable_store_says_whether_anything_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, store) = controller(&dir).await;
        controller.namespace(&Namespace::live()).await.unwrap();
        let place = "lost-answers";

        store.down.store(true, Ordering::SeqCst);
        let refused = controller.apply(apply("refused-1")).await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!(
                "the store ({place}) is unreachable: connection refused; nothing changed, retry when it is back"
            )
        );

        store.down.store(false, Ordering::SeqCst);
        store.down_after_loss.store(true, Ordering::SeqCst);
        store.lose.store(1, Ordering::SeqCst);
        let lost = controller.apply(apply("lost-2")).await.unwrap_err();
        assert_eq!(
            lost.to_string(),
            format!(
                "the store ({place}) is unreachable: connection refused; the change was sent but its answer was lost, so it may or may not have been applied: when the store is back, run the command again with --change-id lost-2 (it is applied at most once)"
            )
        );
        // It was applied: the retry the message asks for says so, once.
        store.down.store(false, Ordering::SeqCst);
        let again = controller.apply(apply("lost-2")).await.unwrap();
        assert_eq!(again.applied.len(), 1);
        assert_eq!(entries_of(&controller, "lost-2").await, 1);
        assert_eq!(entries_of(&controller, "refused-1").await, 0);
    }

    #[tokio::test]
    async fn a_change_id_that_committed_is_answered_as_then_and_not_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _) = controller(&dir).await;
        let first = controller.apply(apply("once")).await.unwrap();
        let again = controller.apply(apply("once")).await.unwrap();
        assert_eq!(again.revision, first.revision);
        assert_eq!(
            again
                .applied
                .iter()
                .map(|a| a.id.clone())
                .collect::<Vec<_>>(),
            first
                .applied
                .iter()
                .map(|a| a.id.clone())
                .collect::<Vec<_>>(),
        );
        assert_eq!(entries_of(&controller, "once").await, 1);
        // The same id for another kind of change is refused.
        let lift = crate::LiftRequest {
            namespace: Namespace::live(),
            targets: vec![crate::LiftTarget::parse("throttle-high-risk").unwrap()],
            actor: Principal::local(),
            reason: Reason::parse("test").unwrap(),
            all: false,
            incident_ok: false,
            change_id: Some(ChangeId::parse("once").unwrap()),
            dry_run: false,
        };
        let refused = controller.lift(lift).await.unwrap_err();
        assert!(matches!(refused, Error::ChangeIdReused { .. }), "{refused}");
        let view = controller.namespace(&Namespace::live()).await.unwrap();
        assert_eq!(view.current().activations.len(), 1, "nothing was lifted");
    }

    #[tokio::test]
    async fn change_records_are_kept_for_the_latest_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _) = controller(&dir).await;
        let records = || async {
            let prefix = format!("{}changes/", controller.config.layout.prefix());
            controller.store.range(&prefix).await.unwrap().kvs.len()
        };
        let lift = |id: String| crate::LiftRequest {
            namespace: Namespace::live(),
            targets: vec![crate::LiftTarget::parse("throttle-high-risk").unwrap()],
            actor: Principal::local(),
            reason: Reason::parse("test").unwrap(),
            all: false,
            incident_ok: false,
            change_id: Some(ChangeId::parse(&id).unwrap()),
            dry_run: false,
        };
        for i in 0..CHANGE_WINDOW {
            controller.apply(apply(&format!("a{i}"))).await.unwrap();
            controller.lift(lift(format!("l{i}"))).await.unwrap();
        }
        // The catalogue's entry and eight changes: the last four remembered.
        assert_eq!(records().await as u64, CHANGE_WINDOW);
        // The oldest ids are forgotten (applied again), the latest answered.
        let latest = controller
            .lift(lift(format!("l{}", CHANGE_WINDOW - 1)))
            .await
            .unwrap();
        assert_eq!(latest.lifted.len(), 1, "answered as then");
        assert_eq!(entries_of(&controller, "a0").await, 1);
        let forgotten = controller.apply(apply("a0")).await.unwrap();
        assert_eq!(forgotten.applied.len(), 1, "past the window: applied again");
        assert_eq!(entries_of(&controller, "a0").await, 2);
    }

    #[test]
    fn change_ids_are_checked() {
        for good in ["a", "chg_0123", "deploy-42.retry_1", &"x".repeat(64)] {
            assert!(ChangeId::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "semi;colon", "ümlaut", &"x".repeat(65)] {
            assert!(ChangeId::parse(bad).is_err(), "{bad:?}");
        }
        let made = ChangeId::random();
        assert!(ChangeId::parse(made.as_str()).is_ok(), "{made}");
        assert_ne!(made, ChangeId::random());
    }

    #[test]
    fn an_entry_without_a_change_id_keeps_its_hash() {
        let draft = |change_id: Option<&str>| AuditDraft {
            action: AuditAction::Apply,
            principal: "alice".into(),
            roles: vec!["commander".into()],
            namespace: Some("live".into()),
            reason: Some("r".into()),
            incident_id: None,
            request_id: None,
            activation_ids: Vec::new(),
            detail: "applied".into(),
            change_id: change_id.map(String::from),
        };
        let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let (key, _) = safemode_signing::SigningKey::generate();
        let without = AuditEntry::seal(draft(None), None, &AuditHead::default(), at, &key);
        // The fields hashed before change ids existed, in their order.
        #[derive(Serialize)]
        struct Before<'a> {
            seq: u64,
            at: &'a Timestamp,
            action: AuditAction,
            principal: &'a str,
            roles: &'a [String],
            namespace: &'a Option<String>,
            reason: &'a Option<String>,
            incident_id: &'a Option<String>,
            request_id: &'a Option<String>,
            activation_ids: &'a [String],
            detail: &'a str,
            prev_hash: &'a str,
        }
        let before = serde_json::to_vec(&Before {
            seq: without.seq,
            at: &without.at,
            action: without.action,
            principal: &without.principal,
            roles: &without.roles,
            namespace: &without.namespace,
            reason: &without.reason,
            incident_id: &without.incident_id,
            request_id: &without.request_id,
            activation_ids: &without.activation_ids,
            detail: &without.detail,
            prev_hash: &without.prev_hash,
        })
        .unwrap();
        use sha2::Digest;
        assert_eq!(
            without.hash,
            format!("{:x}", sha2::Sha256::digest(before)),
            "an entry without a change id hashes as before"
        );
        assert!(
            !serde_json::to_string(&without)
                .unwrap()
                .contains("change_id")
        );
        let with = AuditEntry::seal(draft(Some("c1")), None, &AuditHead::default(), at, &key);
        assert_ne!(with.hash, without.hash, "the change id is hashed");
        assert_eq!(with.computed_hash(), with.hash);
    }

    #[tokio::test]
    async fn a_dry_run_prepares_the_change_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _) = controller(&dir).await;
        let everything = || async {
            let prefix = controller.config.layout.prefix().to_string();
            controller.store.range(&prefix).await.unwrap().kvs
        };
        let before = everything().await;
        let outcome = controller
            .apply(ApplyRequest {
                dry_run: true,
                ..apply("dry")
            })
            .await
            .unwrap();
        assert_eq!(everything().await, before, "a dry run wrote");
        assert_eq!(entries_of(&controller, "dry").await, 0);
        let preview = outcome.preview.expect("a dry run answers a preview");
        assert_eq!(preview.summary, "apply throttle-high-risk on all channels");
        assert!(preview.approval.is_none());
        assert_eq!(
            preview.channels.len(),
            safemode_policy::names::CHANNELS.len()
        );
        for channel in &preview.channels {
            let account = channel
                .effects
                .iter()
                .find(|e| e.action == "account.*")
                .expect("account changes are throttled");
            assert_eq!(
                (account.before.as_str(), account.after.as_str()),
                ("allow", "throttle 3 per 3600s")
            );
        }
        // The change itself still applies: its id was not taken.
        let applied = controller.apply(apply("dry")).await.unwrap();
        assert_eq!(applied.applied.len(), 1);
        assert!(applied.preview.is_none());
    }
}
