//! Where the controller keeps its state in the store, and the records it
//! writes there. Every durable byte of safemode lives under one prefix
//! (`/safemode/` by default):
//!
//! ```text
//! {prefix}ns/{namespace}/activations/{activation id}   Activation (JSON)
//! {prefix}ns/{namespace}/meta                          NamespaceChange (JSON): the last change
//! {prefix}epoch                                        random id of this store's history
//! {prefix}catalog                                      CatalogRecord (JSON): the modes and runbooks every replica serves
//! {prefix}incidents/{incident id}                      Incident (JSON)
//! {prefix}active/{namespace}/{incident type}           the id of the type's active incident there
//! {prefix}requests/{request id}                        ChangeRequest (JSON)
//! {prefix}proposals/{namespace}/{proposal id}           Proposal (JSON)
//! {prefix}triggers/{namespace}/{type}/{severity}/{signal or -external}
//!                                                       the id of the trigger's last proposal
//! {prefix}changes/{change id}                          ChangeRecord (JSON): that the change committed, and its answer
//! {prefix}audit/head                                   AuditHead (JSON): the last entry's position and hash
//! {prefix}audit/log/{position, 20 digits}              AuditEntry (JSON)
//! {prefix}replicas/{replica}                           ReplicaRecord (JSON), under the replica's lease
//! ```
//!
//! The epoch is written once, by the first replica to start on an empty
//! store. Revisions count within an epoch: a store that is wiped or replaced
//! gets a new one, and subscribers that remember revisions of the old history
//! start over instead of waiting for revisions that will never come.
//!
//! Every change to a namespace rewrites its `meta` key in the same
//! transaction, so the meta key's mod revision is the namespace revision, and
//! a transaction that compares it detects any concurrent change. The meta
//! record also lists the namespace's activations after the change (id and
//! record hash) with the position of the change's audit entry, which signs
//! their digest ([`NamespaceState`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::records::{IncidentId, ProposalId, RequestId};
use crate::audit::AuditAction;
use safemode_policy::runbook::RunbookName;
use safemode_policy::{ActivationId, Namespace};

/// The key layout under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// A key inside a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceKey {
    /// An activation record.
    Activation(ActivationId),
    /// The namespace's last-change record.
    Meta,
    /// Something this version does not know (written by a newer one).
    Unknown,
}

impl Layout {
    /// The default prefix.
    pub const DEFAULT_PREFIX: &'static str = "/safemode/";

    /// A layout under `prefix`, which must start and end with `/`.
    pub fn new(prefix: &str) -> Result<Self, String> {
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(format!(
                "store prefix '{prefix}' must start and end with '/', e.g. /safemode/"
            ));
        }
        Ok(Layout {
            prefix: prefix.to_string(),
        })
    }

    /// Every key of `namespace` starts with this.
    pub fn namespace_prefix(&self, namespace: &Namespace) -> String {
        format!("{}ns/{}/", self.prefix, namespace)
    }

    /// Where the namespace's activations live.
    pub fn activations_prefix(&self, namespace: &Namespace) -> String {
        format!("{}activations/", self.namespace_prefix(namespace))
    }

    /// The key of an activation.
    pub fn activation_key(&self, namespace: &Namespace, id: &ActivationId) -> String {
        format!("{}activations/{}", self.namespace_prefix(namespace), id)
    }

    /// The key of the store's epoch.
    pub fn epoch_key(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    /// The key of the catalogue record.
    pub fn catalog_key(&self) -> String {
        format!("{}catalog", self.prefix)
    }

    /// Every incident key starts with this.
    pub fn incidents_prefix(&self) -> String {
        format!("{}incidents/", self.prefix)
    }

    /// The key of an incident.
    pub fn incident_key(&self, id: &IncidentId) -> String {
        format!("{}{id}", self.incidents_prefix())
    }

    /// The key naming the active incident of `runbook` in `namespace` (at
    /// most one at a time).
    pub fn active_incident_key(&self, namespace: &Namespace, runbook: &RunbookName) -> String {
        format!("{}active/{namespace}/{runbook}", self.prefix)
    }

    /// Every change request key starts with this.
    pub fn requests_prefix(&self) -> String {
        format!("{}requests/", self.prefix)
    }

    /// The key of a change request.
    pub fn request_key(&self, id: &RequestId) -> String {
        format!("{}{id}", self.requests_prefix())
    }

    /// Every proposal of `namespace` starts with this.
    pub fn proposals_prefix(&self, namespace: &Namespace) -> String {
        format!("{}proposals/{namespace}/", self.prefix)
    }

    /// The key of a proposal.
    pub fn proposal_key(&self, namespace: &Namespace, id: &ProposalId) -> String {
        format!("{}{id}", self.proposals_prefix(namespace))
    }

    /// The key naming the last proposal one firing condition raised: a
    /// runbook trigger on `source` (a signal name), or an external detector
    /// (`source` is `-external`, which no signal name can be). Raising
    /// compares it, so two replicas that see the same condition raise one
    /// proposal.
    pub fn trigger_key(
        &self,
        namespace: &Namespace,
        runbook: &RunbookName,
        severity: safemode_policy::runbook::Severity,
        source: &str,
    ) -> String {
        format!(
            "{}triggers/{namespace}/{runbook}/{severity}/{source}",
            self.prefix
        )
    }

    /// The key recording that a change id committed (a `ChangeRecord`).
    pub fn change_key(&self, id: &super::change::ChangeId) -> String {
        format!("{}changes/{id}", self.prefix)
    }

    /// Every replica's fleet record starts with this.
    pub fn replicas_prefix(&self) -> String {
        format!("{}replicas/", self.prefix)
    }

    /// The fleet record of `replica` (its name escaped, so that no name
    /// reaches another key).
    pub fn replica_key(&self, replica: &str) -> String {
        format!(
            "{}{}",
            self.replicas_prefix(),
            crate::fleet::replica_key_segment(replica)
        )
    }

    /// The key of the audit log's head.
    pub fn audit_head_key(&self) -> String {
        format!("{}audit/head", self.prefix)
    }

    /// Every audit entry key starts with this.
    pub fn audit_log_prefix(&self) -> String {
        format!("{}audit/log/", self.prefix)
    }

    /// The key of the audit entry at `position`; zero-padded so that key
    /// order is log order.
    pub fn audit_entry_key(&self, position: u64) -> String {
        format!("{}{position:020}", self.audit_log_prefix())
    }

    /// The position an audit entry key names.
    pub fn audit_position(&self, key: &str) -> Option<u64> {
        key.strip_prefix(&self.audit_log_prefix())?.parse().ok()
    }

    /// Every key of this layout starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether `key` holds a record that is only ever written together with
    /// an audit entry (everything but the epoch, the audit log itself and
    /// the fleet's replica records).
    pub fn is_audited_record(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && key != self.epoch_key()
            && !key.starts_with(&format!("{}audit/", self.prefix))
            // The fleet's records say which replicas live, not what is in
            // force: leased, rewritten when a lease lapses, never audited.
            && !key.starts_with(&self.replicas_prefix())
    }

    /// The key of the namespace's last-change record.
    pub fn meta_key(&self, namespace: &Namespace) -> String {
        format!("{}meta", self.namespace_prefix(namespace))
    }

    /// What a key under `namespace` holds.
    pub fn classify(&self, namespace: &Namespace, key: &str) -> NamespaceKey {
        let Some(rest) = key.strip_prefix(&self.namespace_prefix(namespace)) else {
            return NamespaceKey::Unknown;
        };
        if rest == "meta" {
            return NamespaceKey::Meta;
        }
        rest.strip_prefix("activations/")
            .and_then(|id| ActivationId::parse(id).ok())
            .map_or(NamespaceKey::Unknown, NamespaceKey::Activation)
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            prefix: Self::DEFAULT_PREFIX.to_string(),
        }
    }
}

/// What the last change to a namespace was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceChange {
    /// What was done.
    #[serde(alias = "kind")]
    pub action: AuditAction,
    /// Who made it.
    pub principal: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: Timestamp,
    /// Activations it created or removed.
    pub activation_ids: Vec<ActivationId>,
    /// The activations the change left, committed to by its signed audit
    /// entry (absent in records of versions before digests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NamespaceState>,
}

/// What a change left in its namespace: written by `Controller::commit`
/// into the meta record, and trusted only
/// when the audit entry at `audit_seq`, created in the same transaction and
/// signed by the controller, commits to the same digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceState {
    /// Position of the change's audit entry.
    pub audit_seq: u64,
    /// `audit::state_digest` of `activations`, as in the entry.
    pub digest: String,
    /// Activation id to `audit::record_hash` of its stored record.
    pub activations: BTreeMap<String, String>,
}

/// The modes and runbooks every replica serves, by fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRecord {
    /// SHA-256 of the mode and runbook files.
    pub fingerprint: String,
    /// The replica that adopted it.
    pub replica: String,
    /// When.
    pub at: Timestamp,
}
