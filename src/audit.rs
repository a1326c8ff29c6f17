//! The tamper-evident audit log. Every change (and every write refused for
//! lack of permission) appends an entry in the same store transaction as the
//! change itself. Each entry carries the SHA-256 of its own contents and of
//! the entry before it, so an edited, removed, reordered or truncated entry
//! breaks the chain and [`verify`] says which.
//!
//! The store's revisions are a second witness: an entry is created once, in
//! the transaction of the change it records, so every record safemode writes
//! was last written at the revision of some entry, and entries were created
//! in log order. A log whose tail was cut, or rewritten from some entry on,
//! leaves records whose revision has no entry. What the chain cannot show on
//! its own is a rewrite of the whole store by someone with write access to
//! it; comparing the head with one recorded elsewhere (the replica logs each
//! entry's hash; `safemode audit --verify` prints the head) closes that.
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
    /// The log's head was found missing and the log continued after its
    /// last entry.
    HeadRestored,
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
            AuditAction::HeadRestored => "head_restored",
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
    /// The change's id (`Controller::commit` sets it): a retried change is
    /// recognised by it and never applied twice.
    pub change_id: Option<String>,
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
    /// The change's id; absent in entries written before change ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
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
    // Hashed only when present, so entries written before change ids keep
    // their hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    change_id: Option<&'a str>,
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
            change_id: draft.change_id,
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
            change_id: self.change_id.as_deref(),
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

/// The stored head as the verifier sees it.
#[derive(Clone, Debug)]
pub struct StoredHead {
    /// The head.
    pub head: AuditHead,
    /// Revision it was last written at: the last entry's.
    pub mod_revision: Revision,
}

/// A record safemode wrote (activation, namespace meta, incident, request,
/// catalogue), which must have been written together with an entry.
#[derive(Clone, Debug)]
pub struct StoredRecord {
    /// Its key.
    pub key: String,
    /// Revision it was last written at.
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
    /// The head's hash (or revision) is not the last entry's.
    HeadMismatch {
        /// The last entry.
        last: u64,
    },
    /// Entries exist but the head does not.
    HeadMissing {
        /// The last entry present.
        last: u64,
    },
    /// Entries after the one the head names.
    BeyondHead {
        /// The entry the head names.
        head: u64,
        /// The last entry present.
        last: u64,
    },
    /// The entry was created before the one ahead of it in the log.
    OutOfOrder {
        /// Its position.
        position: u64,
    },
    /// A replica found the head missing and continued the log (the entry
    /// that says so).
    HeadWasMissing {
        /// The entry recording it.
        position: u64,
    },
    /// A record was last written at a revision with no entry.
    Unaudited {
        /// The record's key.
        key: String,
        /// Its revision.
        revision: Revision,
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
            Problem::HeadMissing { last } => write!(
                f,
                "the log has entries up to {last} but no head: the head was deleted"
            ),
            Problem::BeyondHead { head, last } if *last == head + 1 => write!(
                f,
                "entry {last} follows entry {head}, the last one the head names: it was added outside safemode"
            ),
            Problem::BeyondHead { head, last } => write!(
                f,
                "entries {} to {last} follow entry {head}, the last one the head names: they were added outside safemode",
                head + 1
            ),
            Problem::OutOfOrder { position } => write!(
                f,
                "entry {position} was stored before the entry ahead of it: entries were re-created"
            ),
            Problem::HeadWasMissing { position } => write!(
                f,
                "entry {position} records that the log's head had been deleted"
            ),
            Problem::Unaudited { key, revision } => write!(
                f,
                "{key} was last written at revision {revision}, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode"
            ),
        }
    }
}

/// Checks the whole log: `entries` in key order, the stored head, and the
/// records that must each have been written with an entry, all read at one
/// revision. Returns every problem found; none means the log is intact.
pub fn verify(
    entries: &[StoredEntry],
    head: Option<&StoredHead>,
    records: &[StoredRecord],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut previous_created: Revision = 0;
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
        if entry.action == AuditAction::HeadRestored {
            problems.push(Problem::HeadWasMissing { position });
        }
        if stored.create_revision <= previous_created {
            problems.push(Problem::OutOfOrder { position });
        }
        previous_created = stored.create_revision;
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
    let last_created = entries.last().map(|e| e.create_revision);
    match head {
        None if last_position > 0 => problems.push(Problem::HeadMissing {
            last: last_position,
        }),
        None => {}
        Some(stored) => {
            let head = &stored.head;
            if head.seq > last_position {
                problems.push(Problem::Truncated {
                    last: last_position,
                    head: head.seq,
                });
            } else if head.seq < last_position {
                problems.push(Problem::BeyondHead {
                    head: head.seq,
                    last: last_position,
                });
            } else if last.is_some_and(|e| e.hash != head.hash)
                || last_created.is_some_and(|r| r != stored.mod_revision)
            {
                problems.push(Problem::HeadMismatch {
                    last: last_position,
                });
            }
        }
    }
    let audited: std::collections::HashSet<Revision> =
        entries.iter().map(|e| e.create_revision).collect();
    // Records older than entry 1 were written before the log began (by a
    // version without one). Without entry 1, every record must be audited.
    let log_began = entries
        .first()
        .filter(|e| e.position == 1)
        .map_or(0, |e| e.create_revision);
    for record in records {
        if record.mod_revision >= log_began && !audited.contains(&record.mod_revision) {
            problems.push(Problem::Unaudited {
                key: record.key.clone(),
                revision: record.mod_revision,
            });
        }
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
            change_id: None,
        }
    }

    /// What the verifier reads from a store holding a chain of entries.
    struct World {
        entries: Vec<StoredEntry>,
        head: Option<StoredHead>,
        records: Vec<StoredRecord>,
    }

    /// A chain of `n` entries as the store would hold them: entry `i`
    /// appended at revision `i` together with the activation it created.
    fn chain(n: u32) -> World {
        let mut head = AuditHead::default();
        let mut entries = Vec::new();
        let mut records = Vec::new();
        for i in 1..=n {
            let entry = AuditEntry::seal(draft(i), &head, Timestamp::UNIX_EPOCH);
            head = entry.head();
            entries.push(StoredEntry {
                position: entry.seq,
                entry: Ok(entry),
                create_revision: i64::from(i),
                mod_revision: i64::from(i),
            });
            records.push(StoredRecord {
                key: format!("/safemode/ns/live/activations/act_{i}"),
                mod_revision: i64::from(i),
            });
        }
        World {
            entries,
            head: Some(StoredHead {
                head,
                mod_revision: i64::from(n),
            }),
            records,
        }
    }

    fn check(name: &str, tamper: impl FnOnce(&mut World), expected: &[&str]) {
        let mut world = chain(6);
        tamper(&mut world);
        let got: Vec<String> = verify(&world.entries, world.head.as_ref(), &world.records)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, expected, "{name}");
    }

    #[test]
    fn verify_names_each_kind_of_tampering() {
        check("intact", |_| {}, &[]);
        check(
            "one field edited",
            |w| w.entries[2].entry.as_mut().unwrap().principal = "mallory".into(),
            &["entry 3 was edited: its contents no longer match its hash"],
        );
        check(
            "edited and the hash recomputed",
            |w| {
                let entry = w.entries[2].entry.as_mut().unwrap();
                entry.reason = Some("nothing to see".into());
                entry.hash = entry.computed_hash();
                w.entries[2].mod_revision = 9;
            },
            &[
                "entry 3 was rewritten at revision 9 after it was appended at revision 3",
                "entry 4 does not follow the entry before it (one before it was removed, replaced or reordered)",
            ],
        );
        check(
            "one entry removed",
            |w| {
                w.entries.remove(3);
            },
            &[
                "entry 4 is missing: it was removed",
                "entry 5 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "/safemode/ns/live/activations/act_4 was last written at revision 4, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
            ],
        );
        check(
            "two entries swapped",
            |w| {
                let e = &mut w.entries;
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
            "two entries deleted and re-created swapped",
            |w| {
                let e = &mut w.entries;
                let (a, b) = (e[1].entry.clone(), e[2].entry.clone());
                e[1].entry = b;
                e[2].entry = a;
                (e[1].create_revision, e[1].mod_revision) = (12, 12);
                (e[2].create_revision, e[2].mod_revision) = (11, 11);
            },
            &[
                "the entry at position 2 is entry 3: entries were reordered",
                "entry 2 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "the entry at position 3 is entry 2: entries were reordered",
                "entry 3 was stored before the entry ahead of it: entries were re-created",
                "entry 3 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "entry 4 was stored before the entry ahead of it: entries were re-created",
                "entry 4 does not follow the entry before it (one before it was removed, replaced or reordered)",
                "/safemode/ns/live/activations/act_2 was last written at revision 2, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
                "/safemode/ns/live/activations/act_3 was last written at revision 3, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
            ],
        );
        check(
            "the last entries removed",
            |w| w.entries.truncate(4),
            &[
                "the log ends at entry 4 but its head names entry 6: the entries after 4 were removed",
                "/safemode/ns/live/activations/act_5 was last written at revision 5, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
                "/safemode/ns/live/activations/act_6 was last written at revision 6, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
            ],
        );
        check(
            "the last entries and the head removed",
            |w| {
                w.entries.truncate(4);
                w.head = None;
            },
            &[
                "the log has entries up to 4 but no head: the head was deleted",
                "/safemode/ns/live/activations/act_5 was last written at revision 5, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
                "/safemode/ns/live/activations/act_6 was last written at revision 6, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
            ],
        );
        check(
            "the tail rewritten with a consistent chain and head",
            |w| {
                w.entries.truncate(3);
                let mut head = w.entries[2].entry.as_ref().unwrap().head();
                for (i, revision) in [(4, 20), (5, 21), (6, 22)] {
                    let mut d = draft(i);
                    d.reason = Some("nothing happened".into());
                    let entry = AuditEntry::seal(d, &head, Timestamp::UNIX_EPOCH);
                    head = entry.head();
                    w.entries.push(StoredEntry {
                        position: entry.seq,
                        entry: Ok(entry),
                        create_revision: revision,
                        mod_revision: revision,
                    });
                }
                w.head = Some(StoredHead {
                    head,
                    mod_revision: 22,
                });
            },
            &[
                "/safemode/ns/live/activations/act_4 was last written at revision 4, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
                "/safemode/ns/live/activations/act_5 was last written at revision 5, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
                "/safemode/ns/live/activations/act_6 was last written at revision 6, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode",
            ],
        );
        check(
            "an entry added after the head",
            |w| {
                let last = w.entries[5].entry.as_ref().unwrap().head();
                let entry = AuditEntry::seal(draft(7), &last, Timestamp::UNIX_EPOCH);
                w.entries.push(StoredEntry {
                    position: 7,
                    entry: Ok(entry),
                    create_revision: 30,
                    mod_revision: 30,
                });
            },
            &[
                "entry 7 follows entry 6, the last one the head names: it was added outside safemode",
            ],
        );
        check(
            "unreadable entry",
            |w| w.entries[0].entry = Err("expected value at line 1 column 1".into()),
            &["entry 1 cannot be read: expected value at line 1 column 1"],
        );
    }

    #[test]
    fn sealing_chains_entries() {
        let world = chain(3);
        let head = world.head.unwrap().head;
        let e: Vec<&AuditEntry> = world
            .entries
            .iter()
            .map(|s| s.entry.as_ref().unwrap())
            .collect();
        assert_eq!(e[0].prev_hash, GENESIS);
        assert_eq!(e[1].prev_hash, e[0].hash);
        assert_eq!(e[2].prev_hash, e[1].hash);
        assert_eq!(head, e[2].head());
        assert_eq!(e[0].hash.len(), 64);
    }
}
