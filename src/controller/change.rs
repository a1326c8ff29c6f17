//! The one way the controller writes. An operation prepares a [`Plan`] from
//! the current state; [`Controller::commit`] turns it into one store
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

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use tracing::{debug, info, warn};

use super::keys::{Layout, NamespaceChange, NamespaceKey, NamespaceState};
use super::{Controller, Error, NamespaceView, Result};
use crate::audit::{self, AuditAction, AuditDraft, AuditEntry, AuditHead};
use crate::policy::{Namespace, Revision};
use crate::store::{Compare, Op, Txn, TxnOutcome};

/// How many times a change is prepared and tried before it gives up.
pub(crate) const COMMIT_ATTEMPTS: u32 = 12;

/// What one change writes, prepared against one view of the state.
pub(crate) struct Plan<T> {
    /// When the change happens (the audit entry's and records' time).
    pub at: Timestamp,
    /// Conditions beyond the namespace, audit and catalogue ones: records the
    /// plan read (incidents, requests, activations) are unchanged.
    pub compares: Vec<Compare>,
    /// The writes.
    pub ops: Vec<Op>,
    /// Recorded as the namespace's last change; `None` leaves the namespace
    /// as it is (a pending request, a refusal).
    pub record: Option<NamespaceChange>,
    /// Whether the change read the mode or runbook catalogue.
    pub uses_catalog: bool,
    /// The audit entry; `None` only when nothing is written.
    pub audit: Option<AuditDraft>,
    /// What the caller gets back.
    pub outcome: T,
}

impl<T> Plan<T> {
    /// A plan that writes nothing and answers `outcome` once the store
    /// confirms the view it was prepared from is current.
    pub fn answer(outcome: T) -> Self {
        Plan {
            at: Timestamp::now(),
            compares: Vec::new(),
            ops: Vec::new(),
            record: None,
            uses_catalog: false,
            audit: None,
            outcome,
        }
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
    /// Prepares and commits a change, retrying from fresh state when a
    /// concurrent change wins. `namespace` is the namespace the change reads
    /// or writes (`None`: none, as for an audited refusal with no namespace).
    /// Returns the outcome and the revision committed at (the namespace's
    /// current revision when nothing was written).
    pub(crate) async fn commit<'a, T: Send + 'a>(
        &'a self,
        namespace: Option<&Namespace>,
        mut prepare: impl FnMut(Option<Arc<NamespaceView>>) -> BoxFuture<'a, Result<Plan<T>>> + Send,
    ) -> Result<(T, Revision)> {
        let handle = match namespace {
            Some(namespace) => Some(self.namespace(namespace).await?),
            None => None,
        };
        let layout = &self.config.layout;
        for attempt in 0..COMMIT_ATTEMPTS {
            let view = handle.as_ref().map(|h| h.current());
            let plan = prepare(view.clone()).await?;
            debug_assert!(
                plan.ops.is_empty() || plan.audit.is_some(),
                "a change that writes is audited"
            );
            let mut txn = Txn {
                compares: plan.compares,
                ops: plan.ops,
            };
            // The audit head first: the namespace's record names the entry.
            let head = match plan.audit {
                Some(_) => Some(self.audit_head().await?),
                None => None,
            };
            let next_seq = head.as_ref().map_or(0, |(h, _)| h.seq + 1);
            let mut state_digest = None;
            if let Some(view) = &view {
                let meta_key = layout.meta_key(&view.namespace);
                txn.compares.push(Compare::ModRevision {
                    key: meta_key.clone(),
                    revision: view.meta_revision,
                });
                if let Some(mut record) = plan.record.clone() {
                    let state = namespace_state(layout, view, &txn.ops, next_seq);
                    state_digest = Some(state.digest.clone());
                    record.state = Some(state);
                    txn.ops.push(Op::Put {
                        key: meta_key,
                        value: serde_json::to_vec(&record).expect("changes serialize"),
                    });
                }
            }
            if plan.uses_catalog {
                txn.compares.push(Compare::ModRevision {
                    key: layout.catalog_key(),
                    revision: self.catalog_revision,
                });
            }
            let mut appended = None;
            if let (Some(draft), Some((head, head_revision))) = (plan.audit, head) {
                let entry =
                    AuditEntry::seal(draft, state_digest, &head, plan.at, self.signing_key());
                appended = Some((entry.seq, entry.action, entry.hash.clone()));
                txn.compares.push(Compare::ModRevision {
                    key: layout.audit_head_key(),
                    revision: head_revision,
                });
                // Never over an existing entry, whatever the head says.
                txn.compares.push(Compare::ModRevision {
                    key: layout.audit_entry_key(entry.seq),
                    revision: 0,
                });
                txn.ops.push(Op::Put {
                    key: layout.audit_entry_key(entry.seq),
                    value: serde_json::to_vec(&entry).expect("audit entries serialize"),
                });
                txn.ops.push(Op::Put {
                    key: layout.audit_head_key(),
                    value: serde_json::to_vec(&entry.head()).expect("audit heads serialize"),
                });
            }
            let wrote = plan.record.is_some();
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    // Logs shipped elsewhere keep a copy of the chain's hashes.
                    if let Some((seq, action, hash)) = appended {
                        info!(seq, action = action.as_str(), %hash, revision, "audit entry appended");
                    }
                    if let (Some(handle), true) = (&handle, wrote) {
                        self.await_visible(handle, revision).await;
                    }
                    let revision = match (&view, wrote) {
                        (Some(view), false) => view.revision,
                        _ => revision,
                    };
                    return Ok((plan.outcome, revision));
                }
                TxnOutcome::CompareFailed { .. } => {
                    debug!(attempt, "a concurrent change won; preparing again");
                    // Every change appends to the one audit chain, so
                    // changes in other namespaces compete too: spread the
                    // retries out.
                    let most = 1u64 << attempt.min(6);
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=most))).await;
                    if plan.uses_catalog {
                        self.check_catalog().await?;
                    }
                    if let (Some(handle), Some(view)) = (&handle, &view) {
                        self.catch_up(handle, view).await?;
                    }
                }
            }
        }
        Err(Error::Conflict(
            namespace.cloned().unwrap_or_else(Namespace::live),
        ))
    }

    /// The audit log's head and the revision of its key (0: empty log).
    pub(crate) async fn audit_head(&self) -> Result<(AuditHead, Revision)> {
        let key = self.config.layout.audit_head_key();
        let range = self.store.range(&key).await?;
        match range.kvs.into_iter().find(|kv| kv.key == key) {
            None => self.restore_audit_head().await,
            Some(kv) => {
                let head = serde_json::from_slice(&kv.value).map_err(|e| {
                    Error::Store(crate::store::Error::Corrupt(format!(
                        "{key} cannot be read: {e}; `safemode audit --verify` shows the log"
                    )))
                })?;
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
            Error::Store(crate::store::Error::Corrupt(format!(
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
                    Error::Store(crate::store::Error::Corrupt(format!(
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
    async fn last_audit_entry(&self) -> Result<Option<crate::store::KeyValue>> {
        let prefix = self.config.layout.audit_log_prefix();
        let mut revision = 0;
        let mut last = None;
        loop {
            let start_after = last
                .as_ref()
                .map(|kv: &crate::store::KeyValue| kv.key.clone());
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
    async fn catch_up(&self, handle: &super::NamespaceHandle, view: &NamespaceView) -> Result<()> {
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
