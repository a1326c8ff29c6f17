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
//! Hashes only show that the log is consistent, and anyone who can write to
//! the store can compute them. So every entry is also signed by the
//! controller (its hash, with [`Purpose::AuditEntry`]) with a key kept outside
//! the store, and [`Verifier`] names every entry that is unsigned, signed by
//! an unknown key or whose signature does not match: writing to etcd is not
//! enough to forge an entry or re-chain the log.
//!
//! Records can also be changed without touching the log (an activation
//! deleted or rewritten with `etcdctl`). Each entry that changes a namespace
//! therefore commits to a digest of that namespace's activations after the
//! change ([`state_digest`]: sorted ids and the SHA-256 of each stored
//! record). The namespace's meta record lists the same ids and hashes; when
//! that list gives the signed digest it is authentic, and comparing it with
//! the store names each activation deleted, added or edited behind
//! safemode's back. The list lives in the meta record rather than in the
//! entry so that entries stay small whatever a namespace holds, and the
//! follower of a namespace can check it without reading the log.
//!
//! Verification is incremental: [`Verifier`] is fed one entry at a time, in
//! log order, and keeps per entry only the chain position, the previous hash
//! and the newest digest per namespace, so the log can be verified at any
//! size in pages. It reports the first [`MAX_PROBLEMS`] problems and counts
//! the rest.
//!
//! An entry's own size is bounded ([`MAX_REASON_BYTES`], [`MAX_DETAIL_BYTES`],
//! [`MAX_ACTIVATION_IDS`]); longer texts are cut with a visible marker, so a
//! caller can never make one entry large, whatever the edge let through.
//!
//! This module is pure: the controller stores entries under
//! `{prefix}audit/log/{seq}` and the head (`{seq, hash}` of the last entry)
//! under `{prefix}audit/head`, compared in every appending transaction.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine as _;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use safemode_policy::Revision;
use safemode_signing::{Purpose, SignatureError, SigningKey, TrustedKeys};

/// The longest reason an entry keeps, in bytes; the rest is cut with a
/// marker.
pub const MAX_REASON_BYTES: usize = 4096;
/// The longest detail an entry keeps, in bytes.
pub const MAX_DETAIL_BYTES: usize = 4096;
/// The most activation ids an entry lists; the detail says how many more.
pub const MAX_ACTIVATION_IDS: usize = 256;
/// The most problems a verification reports one by one; the rest are
/// counted.
pub const MAX_PROBLEMS: usize = 100;

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
    /// A pending request was withdrawn: nothing it asked for was done.
    Withdraw,
    /// A request was refused for lack of permission.
    Refused,
    /// A replica adopted a new catalogue of modes and runbooks.
    AdoptCatalog,
    /// The log's head was found missing and the log continued after its
    /// last entry.
    HeadRestored,
    /// A proposal to declare an incident was raised (by a runbook trigger
    /// or an external detector): nothing was declared.
    Propose,
    /// A proposal was accepted: its incident was declared.
    Accept,
    /// A proposal was dismissed, with a reason.
    Dismiss,
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
            AuditAction::Withdraw => "withdraw",
            AuditAction::Refused => "refused",
            AuditAction::AdoptCatalog => "adopt_catalog",
            AuditAction::HeadRestored => "head_restored",
            AuditAction::Propose => "propose",
            AuditAction::Accept => "accept",
            AuditAction::Dismiss => "dismiss",
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
    /// For a change to a namespace: the digest of its activations after
    /// the change ([`state_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
    /// The change's id; absent in entries written before change ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// The previous entry's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of every field above.
    pub hash: String,
    /// The id of the key that signed `hash` (empty: unsigned).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// The Ed25519 signature of `hash` for [`Purpose::AuditEntry`], base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
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
    // Skipped when absent, so entries written before digests keep their
    // hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_digest: &'a Option<String>,
    // Hashed only when present, so entries written before change ids keep
    // their hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    change_id: Option<&'a str>,
    prev_hash: &'a str,
}

/// `text` cut to at most `max` bytes (at a character boundary) with a marker
/// that says how much was cut.
fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [cut: {} more bytes]", &text[..end], text.len() - end)
}

impl AuditEntry {
    /// Seals `draft` as the entry after `head`, at `at`, committing to
    /// `state_digest` (the namespace's activations after a change to it),
    /// and signs it with `key`. Texts and lists beyond an entry's bounds are
    /// cut, with a marker.
    pub fn seal(
        draft: AuditDraft,
        state_digest: Option<String>,
        head: &AuditHead,
        at: Timestamp,
        key: &SigningKey,
    ) -> AuditEntry {
        let mut draft = draft;
        draft.reason = draft.reason.map(|r| bounded(r, MAX_REASON_BYTES));
        if draft.activation_ids.len() > MAX_ACTIVATION_IDS {
            let more = draft.activation_ids.len() - MAX_ACTIVATION_IDS;
            draft.activation_ids.truncate(MAX_ACTIVATION_IDS);
            draft.detail = format!("{} ({more} more activation ids not listed)", draft.detail);
        }
        draft.detail = bounded(draft.detail, MAX_DETAIL_BYTES);
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
            state_digest,
            change_id: draft.change_id,
            prev_hash: head.hash.clone(),
            hash: String::new(),
            key_id: String::new(),
            signature: String::new(),
            revision: 0,
        };
        entry.hash = entry.computed_hash();
        let signature = key.sign(Purpose::AuditEntry, entry.hash.as_bytes());
        entry.key_id = signature.key_id.to_string();
        entry.signature = base64::engine::general_purpose::STANDARD.encode(&signature.bytes);
        entry
    }

    /// Checks the entry's signature of its hash with `trusted`.
    pub fn check_signature(&self, trusted: &TrustedKeys) -> Result<(), SignatureError> {
        let bytes = if self.signature.is_empty() {
            Vec::new()
        } else {
            // Something that is not base64 cannot be a signature: check it as
            // one byte, which fails as a mismatch.
            base64::engine::general_purpose::STANDARD
                .decode(&self.signature)
                .unwrap_or_else(|_| vec![0])
        };
        trusted.verify(
            Purpose::AuditEntry,
            self.hash.as_bytes(),
            &self.key_id,
            &bytes,
        )
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
            state_digest: &self.state_digest,
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
    /// The entry is not signed, or its signature is not one of a trusted
    /// key's over its hash.
    BadSignature {
        /// Its position.
        position: u64,
        /// What is wrong with it.
        error: SignatureError,
    },
    /// Entries `from..=to` are not signed and no signed entry follows them
    /// (entries written before signing are vouched for by the chain of the
    /// first signed entry after them).
    UnsignedTail {
        /// The first of them.
        from: u64,
        /// The last of them.
        to: u64,
    },
    /// An activation the namespace's last change committed to is not in
    /// the store.
    ActivationDeleted {
        /// The namespace.
        namespace: String,
        /// The activation.
        id: String,
        /// The entry that committed to it.
        position: u64,
    },
    /// An activation is in the store that the namespace's last change did
    /// not commit to.
    ActivationAdded {
        /// The namespace.
        namespace: String,
        /// The activation.
        id: String,
        /// The entry of the namespace's last change.
        position: u64,
    },
    /// An activation's stored record is not the one the namespace's last
    /// change committed to.
    ActivationEdited {
        /// The namespace.
        namespace: String,
        /// The activation.
        id: String,
        /// The entry that committed to it.
        position: u64,
    },
    /// The namespace's activations do not give the digest its last change
    /// committed to, and its meta record no longer lists what they were.
    StateMismatch {
        /// The namespace.
        namespace: String,
        /// The entry of the namespace's last change.
        position: u64,
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
            Problem::BadSignature { position, error } => match error {
                SignatureError::Unsigned => write!(
                    f,
                    "entry {position} is not signed: it was written outside safemode (or by a version that did not sign)"
                ),
                SignatureError::UnknownKey { key_id, .. } => write!(
                    f,
                    "entry {position} is signed by key {key_id}, which is not trusted: it was written outside safemode, or add that key with --trusted-keys if it is your controller's"
                ),
                SignatureError::Invalid { key_id } => write!(
                    f,
                    "entry {position} has a signature by key {key_id} that does not match it: it was forged or altered"
                ),
            },
            Problem::UnsignedTail { from, to } if from == to => write!(
                f,
                "entry {from} is not signed: it was written outside safemode (or by a version that did not sign, and no change has been made since)"
            ),
            Problem::UnsignedTail { from, to } => write!(
                f,
                "entries {from} to {to} are not signed and no signed entry follows them: they were written outside safemode (or by a version that did not sign, and no change has been made since)"
            ),
            Problem::ActivationDeleted {
                namespace,
                id,
                position,
            } => write!(
                f,
                "activation {id} of namespace {namespace} was deleted outside safemode: entry {position} committed to it and it is not in the store"
            ),
            Problem::ActivationAdded {
                namespace,
                id,
                position,
            } => write!(
                f,
                "activation {id} of namespace {namespace} was added outside safemode: entry {position}, the namespace's last change, does not include it"
            ),
            Problem::ActivationEdited {
                namespace,
                id,
                position,
            } => write!(
                f,
                "activation {id} of namespace {namespace} was edited outside safemode: it is not the record entry {position} committed to"
            ),
            Problem::StateMismatch {
                namespace,
                position,
            } => write!(
                f,
                "the activations of namespace {namespace} are not those entry {position} committed to, and its meta record was altered too: compare `safemode status` with the log"
            ),
        }
    }
}

/// SHA-256 (hex) of a stored record's bytes: what a state digest lists for
/// an activation.
pub fn record_hash(value: &[u8]) -> String {
    format!("{:x}", Sha256::digest(value))
}

/// The digest of a namespace's activations: SHA-256 over one line
/// `{id} {record hash}` per activation, in id order. It changes when an
/// activation is added, removed or its stored record changes in any byte.
pub fn state_digest<'a>(activations: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Sha256::new();
    for (id, hash) in activations {
        hasher.update(id.as_bytes());
        hasher.update(b" ");
        hasher.update(hash.as_bytes());
        hasher.update(b"\n");
    }
    format!("{:x}", hasher.finalize())
}

/// A namespace as stored when the log is verified: its activations (id to
/// [`record_hash`]) and the list its meta record keeps (`None`: no meta
/// record, or one without a list).
#[derive(Clone, Debug, Default)]
pub struct StoredNamespace {
    /// The activations in the store.
    pub activations: BTreeMap<String, String>,
    /// The activations the meta record says the last change left.
    pub listed: Option<BTreeMap<String, String>>,
}

/// What a verification found: the first [`MAX_PROBLEMS`] problems and how
/// many there are in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// The first problems, in log order (records and namespaces last).
    pub problems: Vec<Problem>,
    /// How many problems there are in all.
    pub total: u64,
}

impl Findings {
    fn push(&mut self, problem: Problem) {
        self.total += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        }
    }

    /// Whether nothing is wrong.
    pub fn is_intact(&self) -> bool {
        self.total == 0
    }
}

/// Checks the log one entry at a time, in key order, everything read at one
/// revision: first the records that must each have been written with an
/// entry ([`Verifier::new`]), then every entry ([`Verifier::feed`]), then
/// the head and the namespaces ([`Verifier::finish`]). Memory grows with the
/// records and namespaces (the current state), never with the log.
pub struct Verifier<'a> {
    trusted: &'a TrustedKeys,
    findings: Findings,
    /// Records by the revision they were last written at, until an entry
    /// of that revision is fed; `None` once accounted for.
    records: Vec<Option<StoredRecord>>,
    by_revision: HashMap<Revision, Vec<usize>>,
    previous_created: Revision,
    expected: u64,
    /// `None` after an unreadable entry: what follows it cannot be checked.
    previous_hash: Option<String>,
    /// The last entry fed: its hash (when readable) and create revision.
    last: Option<(Option<String>, Revision)>,
    /// Create revision of entry 1, when the log starts there.
    log_began: Option<Revision>,
    /// Per namespace, the newest entry with a state digest.
    digests: BTreeMap<String, (u64, String)>,
    /// Whether a correctly signed entry was fed.
    signed_seen: bool,
    /// Unsigned entries before the first signed one: written by a version
    /// that did not sign, vouched for by the signed entry whose chain
    /// covers them, if one follows.
    unsigned_run: Option<(u64, u64)>,
}

impl<'a> Verifier<'a> {
    /// A verifier trusting `trusted`, with the records to account for.
    pub fn new(trusted: &'a TrustedKeys, records: Vec<StoredRecord>) -> Self {
        let mut by_revision: HashMap<Revision, Vec<usize>> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            by_revision.entry(record.mod_revision).or_default().push(i);
        }
        Verifier {
            trusted,
            findings: Findings::default(),
            records: records.into_iter().map(Some).collect(),
            by_revision,
            previous_created: 0,
            expected: 1,
            previous_hash: Some(GENESIS.to_string()),
            last: None,
            log_began: None,
            digests: BTreeMap::new(),
            signed_seen: false,
            unsigned_run: None,
        }
    }

    /// Checks the next entry of the log.
    pub fn feed(&mut self, stored: StoredEntry) {
        let position = stored.position;
        if self.last.is_none() {
            self.log_began = Some(if position == 1 {
                stored.create_revision
            } else {
                0
            });
        }
        if position > self.expected {
            self.findings.push(Problem::Missing {
                from: self.expected,
                to: position - 1,
            });
        }
        self.expected = position + 1;
        if let Some(indices) = self.by_revision.remove(&stored.create_revision) {
            for i in indices {
                self.records[i] = None;
            }
        }
        let entry = match stored.entry {
            Ok(entry) => entry,
            Err(error) => {
                self.findings.push(Problem::Unreadable { position, error });
                self.previous_hash = None;
                self.last = Some((None, stored.create_revision));
                return;
            }
        };
        if entry.seq != position {
            self.findings.push(Problem::Moved {
                position,
                claims: entry.seq,
            });
        }
        if entry.hash != entry.computed_hash() {
            self.findings.push(Problem::Edited { position });
        }
        match entry.check_signature(self.trusted) {
            Ok(()) => {
                self.signed_seen = true;
                self.unsigned_run = None;
            }
            Err(SignatureError::Unsigned) if !self.signed_seen => {
                let from = self.unsigned_run.map_or(position, |(from, _)| from);
                self.unsigned_run = Some((from, position));
            }
            Err(error) => self
                .findings
                .push(Problem::BadSignature { position, error }),
        }
        if entry.action == AuditAction::HeadRestored {
            self.findings.push(Problem::HeadWasMissing { position });
        }
        if stored.create_revision <= self.previous_created {
            self.findings.push(Problem::OutOfOrder { position });
        }
        self.previous_created = stored.create_revision;
        if stored.mod_revision != stored.create_revision {
            self.findings.push(Problem::Rewritten {
                position,
                created: stored.create_revision,
                modified: stored.mod_revision,
            });
        }
        if self
            .previous_hash
            .as_ref()
            .is_some_and(|p| *p != entry.prev_hash)
        {
            self.findings.push(Problem::Unchained { position });
        }
        if let (Some(namespace), Some(digest)) = (entry.namespace, entry.state_digest) {
            self.digests.insert(namespace, (position, digest));
        }
        // Follow the stored hash, so one bad entry is reported once rather
        // than breaking every entry after it.
        self.previous_hash = Some(entry.hash.clone());
        self.last = Some((Some(entry.hash), stored.create_revision));
    }

    /// Checks the head, the records no entry accounted for, and each
    /// namespace against the digest of its last change.
    pub fn finish(
        mut self,
        head: Option<&StoredHead>,
        namespaces: &BTreeMap<String, StoredNamespace>,
    ) -> Findings {
        if let Some((from, to)) = self.unsigned_run {
            self.findings.push(Problem::UnsignedTail { from, to });
        }
        let last_position = self.expected - 1;
        match head {
            None if last_position > 0 => self.findings.push(Problem::HeadMissing {
                last: last_position,
            }),
            None => {}
            Some(stored) => {
                let head = &stored.head;
                if head.seq > last_position {
                    self.findings.push(Problem::Truncated {
                        last: last_position,
                        head: head.seq,
                    });
                } else if head.seq < last_position {
                    self.findings.push(Problem::BeyondHead {
                        head: head.seq,
                        last: last_position,
                    });
                } else if let Some((hash, created)) = &self.last
                    && (hash.as_ref().is_some_and(|h| *h != head.hash)
                        || *created != stored.mod_revision)
                {
                    self.findings.push(Problem::HeadMismatch {
                        last: last_position,
                    });
                }
            }
        }
        // Records older than entry 1 were written before the log began (by
        // a version without one). Without entry 1, every record must be
        // audited.
        let log_began = self.log_began.unwrap_or(0);
        for record in self.records.iter().flatten() {
            if record.mod_revision >= log_began {
                self.findings.push(Problem::Unaudited {
                    key: record.key.clone(),
                    revision: record.mod_revision,
                });
            }
        }
        let empty = StoredNamespace::default();
        for (namespace, (position, digest)) in &self.digests {
            let stored = namespaces.get(namespace).unwrap_or(&empty);
            for problem in compare_namespace(namespace, *position, digest, stored) {
                self.findings.push(problem);
            }
        }
        self.findings
    }
}

/// What differs between a namespace in the store and the digest its last
/// change (entry `position`) committed to. When the meta record's list gives
/// that digest, it says which activations differ; otherwise only that they
/// do.
pub fn compare_namespace(
    namespace: &str,
    position: u64,
    digest: &str,
    stored: &StoredNamespace,
) -> Vec<Problem> {
    let digest_of = |list: &BTreeMap<String, String>| {
        state_digest(list.iter().map(|(i, h)| (i.as_str(), h.as_str())))
    };
    if digest_of(&stored.activations) == digest {
        return Vec::new();
    }
    let Some(listed) = stored.listed.as_ref().filter(|l| digest_of(l) == digest) else {
        return vec![Problem::StateMismatch {
            namespace: namespace.to_string(),
            position,
        }];
    };
    let mut problems = Vec::new();
    for (id, hash) in listed {
        match stored.activations.get(id) {
            None => problems.push(Problem::ActivationDeleted {
                namespace: namespace.to_string(),
                id: id.clone(),
                position,
            }),
            Some(actual) if actual != hash => problems.push(Problem::ActivationEdited {
                namespace: namespace.to_string(),
                id: id.clone(),
                position,
            }),
            Some(_) => {}
        }
    }
    for id in stored.activations.keys() {
        if !listed.contains_key(id) {
            problems.push(Problem::ActivationAdded {
                namespace: namespace.to_string(),
                id: id.clone(),
                position,
            });
        }
    }
    problems
}

/// Checks a whole log held in memory (for tests and small logs): the same
/// checks as [`Verifier`], without namespaces.
pub fn verify(
    trusted: &TrustedKeys,
    entries: &[StoredEntry],
    head: Option<&StoredHead>,
    records: &[StoredRecord],
) -> Vec<Problem> {
    let mut verifier = Verifier::new(trusted, records.to_vec());
    for entry in entries {
        verifier.feed(entry.clone());
    }
    verifier.finish(head, &BTreeMap::new()).problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller's key in these tests, and one an attacker made.
    fn keys() -> &'static (SigningKey, SigningKey, TrustedKeys) {
        static KEYS: std::sync::OnceLock<(SigningKey, SigningKey, TrustedKeys)> =
            std::sync::OnceLock::new();
        KEYS.get_or_init(|| {
            let (ours, _) = SigningKey::generate();
            let (rogue, _) = SigningKey::generate();
            let trusted = TrustedKeys::new([ours.public_key().clone()]).unwrap();
            (ours, rogue, trusted)
        })
    }

    fn seal(draft: AuditDraft, head: &AuditHead) -> AuditEntry {
        AuditEntry::seal(draft, None, head, Timestamp::UNIX_EPOCH, &keys().0)
    }

    fn rogue_seal(draft: AuditDraft, head: &AuditHead) -> AuditEntry {
        AuditEntry::seal(draft, None, head, Timestamp::UNIX_EPOCH, &keys().1)
    }

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
            let entry = seal(draft(i), &head);
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

    fn check<S: AsRef<str>>(name: &str, tamper: impl FnOnce(&mut World), expected: &[S]) {
        let mut world = chain(6);
        tamper(&mut world);
        let got: Vec<String> = verify(
            &keys().2,
            &world.entries,
            world.head.as_ref(),
            &world.records,
        )
        .iter()
        .map(ToString::to_string)
        .collect();
        let expected: Vec<&str> = expected.iter().map(AsRef::as_ref).collect();
        assert_eq!(got, expected, "{name}");
    }

    #[test]
    fn verify_names_each_kind_of_tampering() {
        let rogue = keys().1.key_id().to_string();
        check::<&str>("intact", |_| {}, &[]);
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
                "entry 3 has a signature by key KEY that does not match it: it was forged or altered".replace("KEY", keys().0.key_id().as_str()).as_str(),
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
                    let entry = rogue_seal(d, &head);
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
                format!("entry 4 is signed by key {rogue}, which is not trusted: it was written outside safemode, or add that key with --trusted-keys if it is your controller's"),
                format!("entry 5 is signed by key {rogue}, which is not trusted: it was written outside safemode, or add that key with --trusted-keys if it is your controller's"),
                format!("entry 6 is signed by key {rogue}, which is not trusted: it was written outside safemode, or add that key with --trusted-keys if it is your controller's"),
                "/safemode/ns/live/activations/act_4 was last written at revision 4, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode".to_string(),
                "/safemode/ns/live/activations/act_5 was last written at revision 5, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode".to_string(),
                "/safemode/ns/live/activations/act_6 was last written at revision 6, which has no audit entry: the log was cut or rewritten, or the store was written outside safemode".to_string(),
            ],
        );
        check(
            "an entry added after the head",
            |w| {
                let last = w.entries[5].entry.as_ref().unwrap().head();
                let entry = rogue_seal(draft(7), &last);
                w.entries.push(StoredEntry {
                    position: 7,
                    entry: Ok(entry),
                    create_revision: 30,
                    mod_revision: 30,
                });
            },
            &[
                format!("entry 7 is signed by key {rogue}, which is not trusted: it was written outside safemode, or add that key with --trusted-keys if it is your controller's"),
                "entry 7 follows entry 6, the last one the head names: it was added outside safemode".to_string(),
            ],
        );
        check(
            "unreadable entry",
            |w| w.entries[0].entry = Err("expected value at line 1 column 1".into()),
            &["entry 1 cannot be read: expected value at line 1 column 1"],
        );
    }

    #[test]
    fn unsigned_and_forged_entries_are_named() {
        let (ours, _, trusted) = keys();
        check(
            "unsigned, correctly chained and hashed",
            |w| {
                let entry = w.entries[3].entry.as_mut().unwrap();
                entry.key_id.clear();
                entry.signature.clear();
            },
            &[
                "entry 4 is not signed: it was written outside safemode (or by a version that did not sign)",
            ],
        );
        check(
            "a signature copied from another entry",
            |w| {
                let other = w.entries[0].entry.clone().unwrap();
                let entry = w.entries[3].entry.as_mut().unwrap();
                entry.signature = other.signature;
            },
            &[format!(
                "entry 4 has a signature by key {} that does not match it: it was forged or altered",
                ours.key_id()
            )],
        );
        check(
            "a signature that is not base64",
            |w| w.entries[3].entry.as_mut().unwrap().signature = "!!".into(),
            &[format!(
                "entry 4 has a signature by key {} that does not match it: it was forged or altered",
                ours.key_id()
            )],
        );
        check(
            "unsigned at the end, as a forgery appended after signed entries",
            |w| {
                for stored in &mut w.entries[3..] {
                    let entry = stored.entry.as_mut().unwrap();
                    entry.key_id.clear();
                    entry.signature.clear();
                }
            },
            &[
                "entry 4 is not signed: it was written outside safemode (or by a version that did not sign)",
                "entry 5 is not signed: it was written outside safemode (or by a version that did not sign)",
                "entry 6 is not signed: it was written outside safemode (or by a version that did not sign)",
            ],
        );
        check::<&str>(
            "unsigned entries of an older version, followed by signed ones",
            |w| {
                for stored in &mut w.entries[..3] {
                    let entry = stored.entry.as_mut().unwrap();
                    entry.key_id.clear();
                    entry.signature.clear();
                }
            },
            &[],
        );
        check(
            "no entry signed",
            |w| {
                for stored in &mut w.entries {
                    let entry = stored.entry.as_mut().unwrap();
                    entry.key_id.clear();
                    entry.signature.clear();
                }
            },
            &[
                "entries 1 to 6 are not signed and no signed entry follows them: they were written outside safemode (or by a version that did not sign, and no change has been made since)",
            ],
        );
        // The signature is the controller's over the hash.
        let entry = seal(draft(1), &AuditHead::default());
        assert_eq!(entry.check_signature(trusted), Ok(()));
    }

    #[test]
    fn long_texts_are_cut_with_a_marker() {
        let mut d = draft(1);
        d.reason = Some("r".repeat(100_000));
        d.detail = "d".repeat(100_000);
        d.activation_ids = (0..1000).map(|i| format!("act_{i}")).collect();
        let entry = seal(d, &AuditHead::default());
        let reason = entry.reason.as_deref().unwrap();
        assert!(reason.len() <= MAX_REASON_BYTES, "{}", reason.len());
        assert!(reason.ends_with("more bytes]"), "{reason:.60}");
        assert!(entry.detail.len() <= MAX_DETAIL_BYTES);
        assert!(entry.detail.contains("[cut: "));
        assert_eq!(entry.activation_ids.len(), MAX_ACTIVATION_IDS);
        assert_eq!(entry.check_signature(&keys().2), Ok(()));
        assert!(serde_json::to_vec(&entry).unwrap().len() < 32 * 1024);
        // A cut never splits a character.
        assert!(bounded("é".repeat(5000), 101).len() <= 101);
    }

    #[test]
    fn namespaces_are_compared_with_the_digest_of_their_last_change() {
        let list = |items: &[(&str, &str)]| -> BTreeMap<String, String> {
            items
                .iter()
                .map(|(i, h)| (i.to_string(), h.to_string()))
                .collect()
        };
        let committed = list(&[("act_a", "h1"), ("act_b", "h2")]);
        let digest = state_digest(committed.iter().map(|(i, h)| (i.as_str(), h.as_str())));
        let names = |stored: StoredNamespace| -> Vec<String> {
            compare_namespace("live", 7, &digest, &stored)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert!(
            names(StoredNamespace {
                activations: committed.clone(),
                listed: Some(committed.clone()),
            })
            .is_empty()
        );
        assert_eq!(
            names(StoredNamespace {
                activations: list(&[("act_b", "h2x"), ("act_c", "h3")]),
                listed: Some(committed.clone()),
            }),
            [
                "activation act_a of namespace live was deleted outside safemode: entry 7 committed to it and it is not in the store",
                "activation act_b of namespace live was edited outside safemode: it is not the record entry 7 committed to",
                "activation act_c of namespace live was added outside safemode: entry 7, the namespace's last change, does not include it",
            ]
        );
        assert_eq!(
            names(StoredNamespace {
                activations: list(&[("act_a", "h1")]),
                listed: Some(list(&[("act_a", "h1")])),
            }),
            [
                "the activations of namespace live are not those entry 7 committed to, and its meta record was altered too: compare `safemode status` with the log"
            ]
        );
    }

    #[test]
    fn problems_beyond_the_bound_are_counted() {
        let (_, _, trusted) = keys();
        let mut verifier = Verifier::new(trusted, Vec::new());
        let mut head = AuditHead::default();
        for i in 1..=(MAX_PROBLEMS as u32 + 50) {
            // Signed by a key that is not trusted: one problem each.
            let entry = rogue_seal(draft(i), &head);
            head = entry.head();
            verifier.feed(StoredEntry {
                position: u64::from(i),
                entry: Ok(entry),
                create_revision: i64::from(i),
                mod_revision: i64::from(i),
            });
        }
        let findings = verifier.finish(None, &BTreeMap::new());
        assert_eq!(findings.problems.len(), MAX_PROBLEMS);
        assert_eq!(findings.total, MAX_PROBLEMS as u64 + 51);
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
