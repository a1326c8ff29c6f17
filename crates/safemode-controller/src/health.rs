//! The store's health as one replica sees it, for `status`: which store,
//! whether it answers now, and how far this replica's copy of a namespace
//! is behind it.
//!
//! Lag is measured on the namespace itself, not on the store's revision:
//! every change safemode makes rewrites the namespace's meta key, so the
//! key's revision in the store is the namespace's last change as the store
//! has it, and the follower's view says which one this replica applied. The
//! store's own revision moves with every write anywhere (the audit log,
//! other namespaces), so comparing it with a quiet namespace's revision
//! would show a lag that is not there.
//!
//! The check is bounded by one probe of the store within
//! [`ControllerConfig::store_probe_timeout`](crate::ControllerConfig), and
//! never waits for the replica to catch up: the lag describes exactly the
//! view the same answer shows (a change committed through another replica
//! a moment ago can show as a lag of a revision, which is true).

use std::time::Duration;

use safemode_policy::{Namespace, Revision};
use safemode_store::Place;

/// The store's health, and this replica's lag behind it in one namespace.
#[derive(Clone, Debug)]
pub struct StoreHealth {
    /// What the store is and where.
    pub place: Place,
    /// Why the store did not answer the probe, in plain words; `None`: it
    /// answered.
    pub error: Option<String>,
    /// The store's revision when it answered (0 when it did not).
    pub store_revision: Revision,
    /// The namespace's last change as the store has it (its meta key's
    /// revision); `None` when the store did not answer.
    pub namespace_revision: Option<Revision>,
    /// The namespace's last change as this replica applied it.
    pub applied_revision: Revision,
    /// The store's revision of the namespace's last change minus this
    /// replica's; 0 when caught up or unknown.
    pub lag_revisions: i64,
    /// This replica's watch of the namespace: its last error and how long
    /// it has been failing, while it fails.
    pub follower: Option<(String, Duration)>,
}

impl StoreHealth {
    /// Whether the store answered.
    pub fn reachable(&self) -> bool {
        self.error.is_none()
    }

    /// What a commander must know about the store, one line each.
    pub fn problems(&self, namespace: &Namespace) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(error) = &self.error {
            problems.push(format!(
                "the store ({}) is unreachable: {error}; this replica shows what it last read (revision {}), and every change fails, changing nothing, until the store is back",
                self.place, self.applied_revision
            ));
            return problems;
        }
        if self.lag_revisions > 0 {
            let why = self
                .follower
                .as_ref()
                .map(|(error, _)| format!(" (its watch fails: {error})"))
                .unwrap_or_default();
            problems.push(format!(
                "this replica is behind the store in namespace {namespace}: it applied revision {}, the store has revision {}{why}; what it shows is out of date",
                self.applied_revision,
                self.namespace_revision.unwrap_or_default()
            ));
        } else if let Some((error, since)) = &self.follower {
            problems.push(format!(
                "this replica's watch of namespace {namespace} has been failing for {}s ({error}); it may miss the next change",
                since.as_secs()
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> StoreHealth {
        StoreHealth {
            place: Place::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into()],
            },
            error: None,
            store_revision: 40,
            namespace_revision: Some(12),
            applied_revision: 12,
            lag_revisions: 0,
            follower: None,
        }
    }

    #[test]
    fn each_state_of_the_store_reads_as_one_problem_or_none() {
        let live = Namespace::live();
        let cases = [
            (health(), vec![]),
            (
                StoreHealth {
                    error: Some("connection refused".into()),
                    namespace_revision: None,
                    store_revision: 0,
                    ..health()
                },
                vec![
                    "the store (etcd at http://127.0.0.1:2379) is unreachable: connection refused; this replica shows what it last read (revision 12), and every change fails, changing nothing, until the store is back",
                ],
            ),
            (
                StoreHealth {
                    namespace_revision: Some(15),
                    lag_revisions: 3,
                    follower: Some((
                        "store unavailable: the etcd watch stream ended".into(),
                        Duration::from_secs(4),
                    )),
                    ..health()
                },
                vec![
                    "this replica is behind the store in namespace live: it applied revision 12, the store has revision 15 (its watch fails: store unavailable: the etcd watch stream ended); what it shows is out of date",
                ],
            ),
            (
                StoreHealth {
                    follower: Some((
                        "store unavailable: connection refused".into(),
                        Duration::from_secs(7),
                    )),
                    ..health()
                },
                vec![
                    "this replica's watch of namespace live has been failing for 7s (store unavailable: connection refused); it may miss the next change",
                ],
            ),
        ];
        for (health, expected) in cases {
            assert_eq!(health.problems(&live), expected, "{health:?}");
        }
    }
}
