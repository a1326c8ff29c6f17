//! What a replica counts and what it can say about its namespaces at any
//! moment, for its metrics: commits and failed commits by kind, refused
//! calls by operation (plain atomic counters), and [`NamespaceGauges`], read
//! from the followed namespaces when metrics are collected.
//!
//! The controller knows no metrics library: `safemode-grpc`'s `telemetry.rs`
//! turns these into OpenTelemetry instruments. Counting here, next to the
//! commit loop, keeps the kinds exactly the audit log's action names.

use std::sync::atomic::{AtomicU64, Ordering};

use safemode_policy::{Channel, Namespace, Revision};

use crate::audit::AuditAction;
use crate::auth::Operation;
use crate::subscribers::SubscriberState;

/// Every audited action, in the order the counters keep them.
pub const KINDS: [AuditAction; 14] = [
    AuditAction::Apply,
    AuditAction::Lift,
    AuditAction::Declare,
    AuditAction::Escalate,
    AuditAction::Resolve,
    AuditAction::Request,
    AuditAction::Approve,
    AuditAction::Withdraw,
    AuditAction::Refused,
    AuditAction::AdoptCatalog,
    AuditAction::HeadRestored,
    AuditAction::Propose,
    AuditAction::Accept,
    AuditAction::Dismiss,
];

/// Every operation a call can be refused, in the order the counters keep
/// them.
pub const OPERATIONS: [Operation; 7] = [
    Operation::Subscribe,
    Operation::Read,
    Operation::ReadAudit,
    Operation::Change,
    Operation::Approve,
    Operation::Report,
    Operation::Propose,
];

/// An operation's name in metrics.
pub fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Subscribe => "subscribe",
        Operation::Read => "read",
        Operation::ReadAudit => "read_audit",
        Operation::Change => "change",
        Operation::Approve => "approve",
        Operation::Report => "report",
        Operation::Propose => "propose",
    }
}

fn kind_index(kind: AuditAction) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .expect("KINDS lists every action")
}

fn operation_index(operation: Operation) -> usize {
    OPERATIONS
        .iter()
        .position(|o| *o == operation)
        .expect("OPERATIONS lists every operation")
}

/// Counts since this replica started.
#[derive(Debug, Default)]
pub struct Counters {
    commits: [AtomicU64; KINDS.len()],
    failed: [AtomicU64; KINDS.len()],
    refused: [AtomicU64; OPERATIONS.len()],
    unauthenticated: [AtomicU64; Unauthenticated::ALL.len()],
}

/// Why a call was refused before any permission check: its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No bearer token.
    Missing,
    /// A token the tokens file does not hold (a guess, or one revoked).
    Unknown,
}

impl Unauthenticated {
    /// Every reason, in label order.
    pub const ALL: [Unauthenticated; 2] = [Unauthenticated::Missing, Unauthenticated::Unknown];

    /// The reason's label: `missing` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unauthenticated::Missing => "missing",
            Unauthenticated::Unknown => "unknown",
        }
    }
}

impl Counters {
    /// A change of `kind` committed, with its audit entry.
    pub(crate) fn committed(&self, kind: AuditAction) {
        self.commits[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// A change of `kind`, prepared with its writes, did not commit (the
    /// store failed, or concurrent changes kept winning).
    pub(crate) fn failed(&self, kind: AuditAction) {
        self.failed[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// A call was refused for lack of permission to do `operation`.
    pub fn refused(&self, operation: Operation) {
        self.refused[operation_index(operation)].fetch_add(1, Ordering::Relaxed);
    }

    /// A call was refused for its token (missing or unknown), before any
    /// work: counted, not audited (a guesser must not fill the log).
    pub fn unauthenticated(&self, why: Unauthenticated) {
        let slot = Unauthenticated::ALL
            .iter()
            .position(|w| *w == why)
            .expect("ALL lists every reason");
        self.unauthenticated[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls refused for their token, by reason.
    pub fn unauthenticated_calls(&self) -> impl Iterator<Item = (Unauthenticated, u64)> + '_ {
        Unauthenticated::ALL
            .iter()
            .zip(&self.unauthenticated)
            .map(|(w, n)| (*w, n.load(Ordering::Relaxed)))
    }

    /// Commits of each kind.
    pub fn commits(&self) -> impl Iterator<Item = (AuditAction, u64)> + '_ {
        KINDS
            .iter()
            .zip(&self.commits)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
    }

    /// Failed commits of each kind.
    pub fn failed_commits(&self) -> impl Iterator<Item = (AuditAction, u64)> + '_ {
        KINDS
            .iter()
            .zip(&self.failed)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
    }

    /// Refused calls of each operation.
    pub fn refusals(&self) -> impl Iterator<Item = (Operation, u64)> + '_ {
        OPERATIONS
            .iter()
            .zip(&self.refused)
            .map(|(o, n)| (*o, n.load(Ordering::Relaxed)))
    }
}

/// One followed namespace as this replica holds it now.
#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceGauges {
    /// The namespace.
    pub namespace: Namespace,
    /// The revision of its last change that this replica applied.
    pub revision: Revision,
    /// Activations in force.
    pub activations: usize,
    /// Whether this replica's watch of it works.
    pub follower_healthy: bool,
    /// Connected subscribers by channel and state (only the pairs that have
    /// any), against `revision`.
    pub subscribers: Vec<(Channel, SubscriberState, usize)>,
}

/// What needs a store read: pending requests and the lag, per followed
/// namespace. Read in the background (never by a scrape), bounded by the
/// store probe.
#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceStoreGauges {
    /// The namespace.
    pub namespace: Namespace,
    /// Change requests waiting for an approver; `None` when the store did
    /// not answer.
    pub pending_requests: Option<usize>,
    /// Proposals waiting for a commander; `None` when the store did not
    /// answer.
    pub open_proposals: Option<usize>,
    /// The namespace's last change in the store minus this replica's;
    /// `None` when the store did not answer.
    pub lag_revisions: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_and_operation_counts_apart() {
        let counters = Counters::default();
        for (i, kind) in KINDS.iter().enumerate() {
            for _ in 0..=i {
                counters.committed(*kind);
            }
            counters.failed(*kind);
        }
        for (i, operation) in OPERATIONS.iter().enumerate() {
            for _ in 0..=i {
                counters.refused(*operation);
            }
        }
        for (i, (_, n)) in counters.commits().enumerate() {
            assert_eq!(n, i as u64 + 1);
        }
        assert!(counters.failed_commits().all(|(_, n)| n == 1));
        for (i, (operation, n)) in counters.refusals().enumerate() {
            assert_eq!(n, i as u64 + 1, "{}", operation_name(operation));
        }
    }
}
