//! Where the controller keeps its state in the store, and the records it
//! writes there. Every durable byte of safemode lives under one prefix
//! (`/safemode/` by default):
//!
//! ```text
//! {prefix}ns/{namespace}/activations/{activation id}   Activation (JSON)
//! {prefix}ns/{namespace}/meta                          NamespaceChange (JSON): the last change
//! {prefix}epoch                                        random id of this store's history
//! ```
//!
//! The epoch is written once, by the first replica to start on an empty
//! store. Revisions count within an epoch: a store that is wiped or replaced
//! gets a new one, and subscribers that remember revisions of the old history
//! start over instead of waiting for revisions that will never come.
//!
//! Every change to a namespace rewrites its `meta` key in the same
//! transaction, so the meta key's mod revision is the namespace revision, and
//! a transaction that compares it detects any concurrent change.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::policy::{ActivationId, Namespace};

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

    /// The key of an activation.
    pub fn activation_key(&self, namespace: &Namespace, id: &ActivationId) -> String {
        format!("{}activations/{}", self.namespace_prefix(namespace), id)
    }

    /// The key of the store's epoch.
    pub fn epoch_key(&self) -> String {
        format!("{}epoch", self.prefix)
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
    /// `apply` or `lift`.
    pub kind: ChangeKind,
    /// Who made it.
    pub principal: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: Timestamp,
    /// Activations it created or removed.
    pub activation_ids: Vec<ActivationId>,
}

/// The kinds of namespace change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Modes applied.
    Apply,
    /// Activations lifted.
    Lift,
}
