//! Reading the audit log back from the store, and verifying its chain.

use super::incidents::corrupt;
use super::records::IncidentId;
use super::{Controller, Result};
use crate::audit::{self, AuditEntry, AuditHead, Problem, StoredEntry, StoredHead, StoredRecord};

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
}

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
    /// What verification of the whole log found (`None`: not verified;
    /// empty: intact).
    pub problems: Option<Vec<Problem>>,
}

impl Controller {
    /// The audit log, optionally only one incident's entries, optionally
    /// with the whole log verified. Everything is read at one revision, so
    /// a log that grows while it is read is never mistaken for a tampered
    /// one.
    pub async fn audit(
        &self,
        incident: Option<&IncidentId>,
        verify: bool,
        page: AuditPage,
    ) -> Result<AuditReport> {
        let layout = &self.config.layout;
        let read_from = if verify {
            layout.prefix().to_string()
        } else {
            format!("{}audit/", layout.prefix())
        };
        let range = self.store.range(&read_from).await?;
        let head_key = layout.audit_head_key();
        let mut stored = Vec::new();
        let mut head = None;
        let mut records = Vec::new();
        for kv in &range.kvs {
            if let Some(position) = layout.audit_position(&kv.key) {
                let entry = serde_json::from_slice::<AuditEntry>(&kv.value)
                    .map(|entry| AuditEntry {
                        revision: kv.create_revision,
                        ..entry
                    })
                    .map_err(|e| e.to_string());
                stored.push(StoredEntry {
                    position,
                    entry,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                });
            } else if kv.key == head_key {
                let parsed: AuditHead =
                    serde_json::from_slice(&kv.value).map_err(|e| corrupt(&head_key, e))?;
                head = Some(StoredHead {
                    head: parsed,
                    mod_revision: kv.mod_revision,
                });
            } else if layout.is_audited_record(&kv.key) {
                records.push(StoredRecord {
                    key: kv.key.clone(),
                    mod_revision: kv.mod_revision,
                });
            }
        }
        let problems = verify.then(|| audit::verify(&stored, head.as_ref(), &records));
        let wanted = incident.map(ToString::to_string);
        // Positions, not the entries' own (perhaps tampered) sequence
        // numbers, carry the paging, so that it always moves forward.
        let mut matching = stored
            .into_iter()
            .filter(|s| s.position > page.after)
            .filter_map(|s| Some((s.position, s.entry.ok()?)))
            .filter(|(_, e)| wanted.is_none() || e.incident_id == wanted);
        let mut entries = Vec::new();
        let mut last_position = page.after;
        for (position, entry) in matching.by_ref().take(page.limit) {
            entries.push(entry);
            last_position = position;
        }
        let next_after = matching.next().is_some().then_some(last_position);
        Ok(AuditReport {
            entries,
            next_after,
            head: head.map(|h| h.head),
            problems,
        })
    }
}
