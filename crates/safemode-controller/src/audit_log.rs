//! Reading the audit log back from the store in pages, and verifying it
//! with bounded memory: every read is a page of the store at one revision,
//! and verification feeds entries one at a time to [`audit::Verifier`].

use std::collections::BTreeMap;

use super::keys::NamespaceChange;
use super::records::IncidentId;
use super::{Controller, Error, Result, corrupt};
use crate::audit::{
    self, AuditEntry, AuditHead, Findings, StoredEntry, StoredHead, StoredNamespace, StoredRecord,
};
use safemode_policy::{Namespace, Revision};
use safemode_store::{self as store, KeyValue, RangePage};

/// Which part of the log to return.
#[derive(Clone, Copy, Debug)]
pub struct AuditPage {
    /// Entries after this position (0: from the first).
    pub after: u64,
    /// At most this many.
    pub limit: usize,
}

impl AuditPage {
    /// Entries per page unless asked otherwise.
    pub const DEFAULT_LIMIT: usize = 500;
    /// The most entries one page holds.
    pub const MAX_LIMIT: usize = 5000;
    /// A page stops growing once its entries hold this many bytes (an
    /// entry is at most a few KiB, so a page stays far below gRPC's 4 MiB).
    pub const MAX_BYTES: usize = 1024 * 1024;
    /// The most positions one page looks at when it keeps only one
    /// incident's entries; the next page goes on from there.
    pub const MAX_SCANNED: u64 = 20_000;
}

/// Entries (or records) per store read: at most a few KiB each, so one read
/// stays far below the store's message limit.
const STORE_PAGE: usize = 100;

/// How often a read starts over when a compaction overtook it.
const ATTEMPTS: u32 = 5;

/// The audit log as read.
#[derive(Clone, Debug)]
pub struct AuditReport {
    /// The page's readable entries (of one incident, if asked), oldest
    /// first.
    pub entries: Vec<AuditEntry>,
    /// The `after` of the next page; `None`: this page is the last.
    pub next_after: Option<u64>,
    /// The log's head when it was read.
    pub head: Option<AuditHead>,
    /// What verification of the whole log found (`None`: not verified).
    pub findings: Option<Findings>,
}

/// Which entries of the audit log a page holds: all, or those of one
/// incident, of one namespace, or both.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only this incident's entries.
    pub incident: Option<IncidentId>,
    /// Only this namespace's entries.
    pub namespace: Option<Namespace>,
}

impl AuditFilter {
    fn keeps(&self, entry: &AuditEntry) -> bool {
        let incident = self
            .incident
            .as_ref()
            .is_none_or(|id| entry.incident_id.as_deref() == Some(id.as_str()));
        let namespace = self
            .namespace
            .as_ref()
            .is_none_or(|ns| entry.namespace.as_deref() == Some(ns.as_str()));
        incident && namespace
    }
}

impl Controller {
    /// One page of the audit log, optionally only the entries `filter`
    /// keeps, optionally with the whole log verified. Verification reads the whole
    /// store at one revision, page by page, so a log that grows while it is
    /// read is never mistaken for a tampered one, and its memory does not
    /// grow with the log.
    pub async fn audit(
        &self,
        filter: &AuditFilter,
        verify: bool,
        page: AuditPage,
    ) -> Result<AuditReport> {
        let (findings, verified_head) = if verify {
            let (findings, head) = self.verify_audit().await?;
            (Some(findings), Some(head))
        } else {
            (None, None)
        };
        let (entries, next_after) = self.audit_entries(filter, page).await?;
        let head = match verified_head {
            Some(head) => head,
            None => self.read_head(0).await?.map(|h| h.head),
        };
        Ok(AuditReport {
            entries,
            next_after,
            head,
            findings,
        })
    }

    /// The entries of one page: after `page.after`, at most `page.limit`
    /// and [`AuditPage::MAX_BYTES`], looking at no more than
    /// [`AuditPage::MAX_SCANNED`] positions.
    async fn audit_entries(
        &self,
        filter: &AuditFilter,
        page: AuditPage,
    ) -> Result<(Vec<AuditEntry>, Option<u64>)> {
        let layout = &self.config.layout;
        let prefix = layout.audit_log_prefix();
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        // Positions, not the entries' own (perhaps tampered) sequence
        // numbers, carry the paging, so that it always moves forward.
        let mut last_position = page.after;
        let mut scanned = 0u64;
        let mut revision = 0;
        let mut attempts = 0;
        loop {
            let start_after = (last_position > 0).then(|| layout.audit_entry_key(last_position));
            let read = match self
                .store
                .range_page(&prefix, start_after.as_deref(), STORE_PAGE, revision)
                .await
            {
                Ok(read) => read,
                // Entries are never rewritten: going on at a newer revision
                // from the same position misses nothing.
                Err(store::Error::Compacted { .. }) if attempts < ATTEMPTS => {
                    attempts += 1;
                    revision = 0;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            revision = read.revision;
            let count = read.kvs.len();
            for kv in read.kvs {
                let Some(position) = layout.audit_position(&kv.key) else {
                    continue;
                };
                let full = entries.len() >= page.limit
                    || bytes >= AuditPage::MAX_BYTES
                    || scanned >= AuditPage::MAX_SCANNED;
                if full {
                    return Ok((entries, Some(last_position)));
                }
                scanned += 1;
                last_position = position;
                let Ok(entry) = parse_entry(&kv) else {
                    continue;
                };
                if !filter.keeps(&entry) {
                    continue;
                }
                bytes += kv.value.len();
                entries.push(entry);
            }
            if !read.more || count == 0 {
                return Ok((entries, None));
            }
        }
    }

    /// The stored head at `revision` (0: now).
    async fn read_head(&self, revision: Revision) -> Result<Option<StoredHead>> {
        let key = self.config.layout.audit_head_key();
        let read = self.store.range_page(&key, None, 1, revision).await?;
        match read.kvs.into_iter().find(|kv| kv.key == key) {
            None => Ok(None),
            Some(kv) => {
                let head: AuditHead =
                    serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?;
                Ok(Some(StoredHead {
                    head,
                    mod_revision: kv.mod_revision,
                }))
            }
        }
    }

    /// Verifies the whole log and every record against it at one revision,
    /// starting over when a compaction overtakes the read. Returns what it
    /// found and the head it read.
    pub(crate) async fn verify_audit(&self) -> Result<(Findings, Option<AuditHead>)> {
        let mut attempts = 0;
        loop {
            match self.verify_once().await {
                Err(Error::Store(store::Error::Compacted { .. })) if attempts < ATTEMPTS => {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn verify_once(&self) -> Result<(Findings, Option<AuditHead>)> {
        let layout = &self.config.layout;
        let audit_prefix = format!("{}audit/", layout.prefix());
        // Every key under audit/ is ASCII, so this sorts after all of them.
        let past_audit = format!("{audit_prefix}\u{10FFFF}");
        let mut revision: Revision = 0;
        let mut records = Vec::new();
        let mut namespaces: BTreeMap<String, StoredNamespace> = BTreeMap::new();

        // The records first: the verifier accounts for them as entries pass.
        let mut start_after: Option<String> = None;
        let mut jumped = false;
        loop {
            let read: RangePage = self
                .store
                .range_page(
                    layout.prefix(),
                    start_after.as_deref(),
                    STORE_PAGE,
                    revision,
                )
                .await?;
            revision = read.revision;
            start_after = read.kvs.last().map(|kv| kv.key.clone());
            let mut more = read.more;
            for kv in read.kvs {
                if kv.key.starts_with(&audit_prefix) {
                    if jumped {
                        // A key sorting past the jump (no key safemode writes).
                        continue;
                    }
                    jumped = true;
                    // The log is read next, on its own; the keys after it
                    // (this page's too) come with the next page.
                    start_after = Some(past_audit.clone());
                    more = true;
                    break;
                }
                if !layout.is_audited_record(&kv.key) {
                    continue;
                }
                note_namespace_record(layout, &kv, &mut namespaces);
                records.push(StoredRecord {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                });
            }
            if !more || start_after.is_none() {
                break;
            }
        }

        let head = self.read_head(revision).await?;
        let mut verifier = audit::Verifier::new(self.trusted_keys(), records);
        let prefix = layout.audit_log_prefix();
        let mut start_after: Option<String> = None;
        loop {
            let read = self
                .store
                .range_page(&prefix, start_after.as_deref(), STORE_PAGE, revision)
                .await?;
            start_after = read.kvs.last().map(|kv| kv.key.clone());
            for kv in read.kvs {
                let Some(position) = layout.audit_position(&kv.key) else {
                    continue;
                };
                verifier.feed(StoredEntry {
                    position,
                    entry: parse_entry(&kv).map_err(|e| e.to_string()),
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                });
            }
            if !read.more || start_after.is_none() {
                break;
            }
        }
        let findings = verifier.finish(head.as_ref(), &namespaces);
        Ok((findings, head.map(|h| h.head)))
    }
}

fn parse_entry(kv: &KeyValue) -> serde_json::Result<AuditEntry> {
    serde_json::from_slice::<AuditEntry>(&kv.value).map(|entry| AuditEntry {
        revision: kv.create_revision,
        ..entry
    })
}

/// Keeps what the namespace check needs of a record under `ns/`: an
/// activation's hash, or the meta record's list.
fn note_namespace_record(
    layout: &super::keys::Layout,
    kv: &KeyValue,
    namespaces: &mut BTreeMap<String, StoredNamespace>,
) {
    let Some(rest) = kv.key.strip_prefix(&format!("{}ns/", layout.prefix())) else {
        return;
    };
    let Some((namespace, rest)) = rest.split_once('/') else {
        return;
    };
    if let Some(id) = rest.strip_prefix("activations/") {
        namespaces
            .entry(namespace.to_string())
            .or_default()
            .activations
            .insert(id.to_string(), audit::record_hash(&kv.value));
    } else if rest == "meta" {
        let listed = serde_json::from_slice::<NamespaceChange>(&kv.value)
            .ok()
            .and_then(|c| c.state)
            .map(|s| s.activations);
        namespaces.entry(namespace.to_string()).or_default().listed = listed;
    }
}
