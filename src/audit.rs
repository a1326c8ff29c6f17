//! The tamper-evident audit log. Every change (and every write refused for
//! lack of permission) appends an entry in the same store transaction as the
//! change itself. Each entry carries the SHA-256 of its own contents and of
//! the entry before it, so an edited, removed, reordered or truncated entry
//! breaks the chain and [`verify`] says which.
//!
//! This module is pure: the controller stores entries under
//! `{prefix}audit/log/{seq}` and the head (`{seq, hash}` of the last entry)
//! under `{prefix}audit/head`, compared in every appending transaction.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::Revision;

/// The hash "before" the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// Modes applied.
    Apply,
    /// Activations lifted.
    Lift,
    /// An incident declared.
    Declare,
    /// An incident moved to another severity.
    Escalate,
    /// An incident resolved.
    Resolve,
    /// A change that needs a second approver was requested.
    Request,
    /// A pending request was approved and carried out.
    Approve,
    /// A request was refused for lack of permission.
    Refused,
    /// A replica adopted a new catalogue of modes and runbooks.
    AdoptCatalog,
}

impl AuditAction {
    /// The action's name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Apply => "apply",
            AuditAction::Lift => "lift",
            AuditAction::Declare => "declare",
            AuditAction::Escalate => "escalate",
            AuditAction::Resolve => "resolve",
            AuditAction::Request => "request",
            AuditAction::Approve => "approve",
            AuditAction::Refused => "refused",
            AuditAction::AdoptCatalog => "adopt_catalog",
        }
    }
}

/// What an operation wants recorded; sealed into an [`AuditEntry`] when it
/// is appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditDraft {
    /// What happened.
    pub action: AuditAction,
    /// Who.
    pub principal: String,
    /// With which roles.
    pub roles: Vec<String>,
    /// In which namespace, if any.
    pub namespace: Option<String>,
    /// Why, as given.
    pub reason: Option<String>,
    /// The incident it belongs to.
    pub incident_id: Option<String>,
    /// The approval request it belongs to.
    pub request_id: Option<String>,
    /// Activations created or removed.
    pub activation_ids: Vec<String>,
    /// One line for people: what exactly was done or refused.
    pub detail: String,
}

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When it was appended.
    pub at: Timestamp,
    /// What happened.
    pub action: AuditAction,
    /// Who.
    pub principal: String,
    /// With which roles.
    pub roles: Vec<String>,
    /// In which namespace, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    /// The approval request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Activations created or removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activation_ids: Vec<String>,
    /// What exactly was done or refused.
    pub detail: String,
    /// The previous entry's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of every field above.
    pub hash: String,
    /// Store revision the entry was appended at (from the store, not hashed).
    #[serde(skip)]
    pub revision: Revision,
}

/// The last entry: what the next one follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// The last entry's position (0: the log is empty).
    pub seq: u64,
    /// The last entry's hash.
    pub hash: String,
}

impl Default for AuditHead {
    fn default() -> Self {
        AuditHead {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

/// The hashed fields, in a fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
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

impl AuditEntry {
    /// Seals `draft` as the entry after `head`, at `at`.
    pub fn seal(draft: AuditDraft, head: &AuditHead, at: Timestamp) -> AuditEntry {
        let mut entry = AuditEntry {
            seq: head.seq + 1,
            at,
            action: draft.action,
            principal: draft.principal,
            roles: draft.roles,
            namespace: draft.namespace,
            reason: draft.reason,
            incident_id: draft.incident_id,
            request_id: draft.request_id,
            activation_ids: draft.activation_ids,
            detail: draft.detail,
            prev_hash: head.hash.clone(),
            hash: String::new(),
            revision: 0,
        };
        entry.hash = entry.computed_hash();
        entry
    }

    /// The hash the entry's contents give now.
    pub fn computed_hash(&self) -> String {
        let hashed = Hashed {
            seq: self.seq,
            at: &self.at,
            action: self.action,
            principal: &self.principal,
            roles: &self.roles,
            namespace: &self.namespace,
            reason: &self.reason,
            incident_id: &self.incident_id,
            request_id: &self.request_id,
            activation_ids: &self.activation_ids,
            detail: &self.detail,
            prev_hash: &self.prev_hash,
        };
        let bytes = serde_json::to_vec(&hashed).expect("audit fields serialize");
        format!("{:x}", Sha256::digest(bytes))
    }

    /// The head that follows this entry.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// One stored entry as the verifier sees it.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// The position its key says (`audit/log/{position}`).
    pub position: u64,
    /// The entry, or why it cannot be read.
    pub entry: Result<AuditEntry, String>,
    /// Revision the key was created at.
    pub create_revision: Revision,
    /// Revision the key was last written at.
    pub mod_revision: Revision,
}

/// Something wrong with the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The entry at `position` does not parse.
    Unreadable {
        /// Its position.
        position: u64,
        /// Why.
        error: String,
    },
    /// Its contents no longer give its hash.
    Edited {
        /// Its position.
        position: u64,
    },
    /// Written again after it was appended.
    Rewritten {
        /// Its position.
        position: u64,
        /// Revision it was appended at.
        created: Revision,
        /// Revision it was rewritten at.
        modified: Revision,
    },
    /// Positions `from..=to` have no entry.
    Missing {
        /// First missing position.
        from: u64,
        /// Last missing position.
        to: u64,
    },
    /// The entry at `position` says it is entry `claims`.
    Moved {
        /// Where it is.
        position: u64,
        /// Where it says it belongs.
        claims: u64,
    },
    /// The entry does not name the entry before it as its predecessor.
    Unchained {
        /// Its position.
        position: u64,
    },
    /// The head names entries beyond the last one.
    Truncated {
        /// The last entry present.
        last: u64,
        /// The last entry the head names.
        head: u64,
    },
    /// The head's hash is not the last entry's.
    HeadMismatch {
        /// The last entry.
        last: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable { position, error } => {
                write!(f, "entry {position} cannot be read: {error}")
            }
            Problem::Edited { position } => write!(
                f,
                "entry {position} was edited: its contents no longer match its hash"
            ),
            Problem::Rewritten {
                position,
                created,
                modified,
            } => write!(
                f,
                "entry {position} was rewritten at revision {modified} after it was appended at revision {created}"
            ),
            Problem::Missing { from, to } if from == to => {
                write!(f, "entry {from} is missing: it was removed")
            }
            Problem::Missing { from, to } => {
                write!(f, "entries {from} to {to} are missing: they were removed")
            }
            Problem::Moved { position, claims } => write!(
                f,
                "the entry at position {position} is entry {claims}: entries were reordered"
            ),
            Problem::Unchained { position } => write!(
                f,
                "entry {position} does not follow the entry before it (one before it was removed, replaced or reordered)"
            ),
            Problem::Truncated { last, head } => write!(
                f,
                "the log ends at entry {last} but its head names entry {head}: the entries after {last} were removed"
            ),
            Problem::HeadMismatch { last } => write!(
                f,
                "the head does not name entry {last}, the last entry: the log's end was replaced"
            ),
        }
    }
}

/// Checks the whole log: `entries` in key order, and the stored head.
/// Returns every problem found; none means the chain is intact.
pub fn verify(entries: &[StoredEntry], head: Option<&AuditHead>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut expected = 1u64;
    // `None` after an unreadable entry: what follows it cannot be checked.
    let mut previous_hash = Some(GENESIS.to_string());
    let mut last: Option<&AuditEntry> = None;
    for stored in entries {
        let position = stored.position;
        if position > expected {
            problems.push(Problem::Missing {
                from: expected,
                to: position - 1,
            });
        }
        expected = position + 1;
        let entry = match &stored.entry {
            Ok(entry) => entry,
            Err(error) => {
                problems.push(Problem::Unreadable {
                    position,
                    error: error.clone(),
                });
                previous_hash = None;
                last = None;
                continue;
            }
        };
        if entry.seq != position {
            problems.push(Problem::Moved {
                position,
                claims: entry.seq,
            });
        }
        if entry.hash != entry.computed_hash() {
            problems.push(Problem::Edited { position });
        }
        if stored.mod_revision != stored.create_revision {
            problems.push(Problem::Rewritten {
                position,
                created: stored.create_revision,
                modified: stored.mod_revision,
            });
        }
        if previous_hash
            .as_ref()
            .is_some_and(|p| *p != entry.prev_hash)
        {
            problems.push(Problem::Unchained { position });
        }
        // Follow the stored hash, so one bad entry is reported once rather
        // than breaking every entry after it.
        previous_hash = Some(entry.hash.clone());
        last = Some(entry);
    }
    let last_position = expected - 1;
    match head {
        Some(head) if head.seq > last_position => problems.push(Problem::Truncated {
            last: last_position,
            head: head.seq,
        }),
        Some(head) if head.seq == last_position && last.is_some_and(|e| e.hash != head.hash) => {
            problems.push(Problem::HeadMismatch {
                last: last_position,
            });
        }
        _ => {}
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: u32) -> AuditDraft {
        AuditDraft {
            action: AuditAction::Apply,
            principal: "alice".into(),
            roles: vec!["commander".into()],
            namespace: Some("live".into()),
            reason: Some(format!("change {n}")),
            incident_id: None,
            request_id: None,
            activation_ids: vec![],
            detail: format!("applied mode {n}"),
        }
    }

    /// A chain of `n` entries as the store would hold them.
    fn chain(n: u32) -> (Vec<StoredEntry>, AuditHead) {
        let mut head = AuditHead::default();
        let mut stored = Vec::new();
        for i in 1..=n {
            let entry = AuditEntry::seal(draft(i), &head, Timestamp::UNIX_EPOCH);
            head = entry.head();
            stored.push(StoredEntry {
                position: entry.seq,
                entry: Ok(entry),
                create_revision: i64::from(i),
                mod_revision: i64::from(i),
            });
        }
        (stored, head)
    }

    fn check(
        name: &str,
        tamper: impl FnOnce(&mut Vec<StoredEntry>, &mut AuditHead),
        expected: &[&str],
    ) {
        let (mut entries, mut head) = chain(6);
        tamper(&mut entries, &mut head);
        let got: Vec<String> = verify(&entries, Some(&head))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, expected, "{name}");
    }

    #[test]
    fn verify_names_each_kind_of_tampering() {
        check("intact", |_, _| {}, &[]);
        check(
            "one field edited",
            |e, _| e[2].entry.as_mut().unwrap().principal = "mallory".into(),
            &["entry 3 was edited: its contents no longer match its hash"],
        );
        check(
            "edited and the hash recomputed",
            |e, _| {
                let entry = e[2].entry.as_mut().unwrap();
                entry.reason = Some("nothing to see".into());
                entry.hash = entry.computed_hash();
                e[2].mod_revision = 9;
            },
            &[
                "entry 3 was rewritten at revision 9 after it was appended at revision 3",
                "entry 4 does not follow the entry before it (one before it was removed, replaced or reordered)",
            ],
        );
        check(
            "one entry removed",
            |e, _| {
                e.remove(3);
            },
            &[
                "entry 4 is missing: it was removed",
                "entry 5 does not follow the entry before it (one before it was removed, replaced or reordered)",
            ],
        );
        check(
            "two entries swapped",
            |e, _| {
                let (a, b) = (e[1].entry.clone(), e[2].entry.clone());
                e[1].entry = b;
                e[2].entry = a;
            },
            &[
                "the entry at position 2 is entry 3: entries were reordered",
                "entry 2 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "the entry at position 3 is entry 2: entries were reordered",
                "entry 3 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "entry 4 does not follow the entry before it (one before it was removed, replaced or reordered)",
            ],
        );
        check(
            "the last entries removed",
            |e, _| e.truncate(4),
            &[
                "the log ends at entry 4 but its head names entry 6: the entries after 4 were removed",
            ],
        );
        check(
            "unreadable entry",
            |e, _| e[0].entry = Err("expected value at line 1 column 1".into()),
            &["entry 1 cannot be read: expected value at line 1 column 1"],
        );
    }

    #[test]
    fn sealing_chains_entries() {
        let (entries, head) = chain(3);
        let e: Vec<&AuditEntry> = entries.iter().map(|s| s.entry.as_ref().unwrap()).collect();
        assert_eq!(e[0].prev_hash, GENESIS);
        assert_eq!(e[1].prev_hash, e[0].hash);
        assert_eq!(e[2].prev_hash, e[1].hash);
        assert_eq!(head, e[2].head());
        assert_eq!(e[0].hash.len(), 64);
    }
}
