//! Reading the audit log back from the store, and verifying its chain.

use super::incidents::corrupt;
use super::records::IncidentId;
use super::{Controller, Result};
use crate::audit::{self, AuditEntry, AuditHead, Problem, StoredEntry};

/// The audit log as read.
#[derive(Clone, Debug)]
pub struct AuditReport {
    /// The readable entries (of one incident, if asked), oldest first.
    pub entries: Vec<AuditEntry>,
    /// What verification found (`None`: not verified; empty: intact).
    pub problems: Option<Vec<Problem>>,
}

impl Controller {
    /// The audit log, optionally only one incident's entries, optionally
    /// with the whole chain verified.
    pub async fn audit(&self, incident: Option<&IncidentId>, verify: bool) -> Result<AuditReport> {
        let layout = &self.config.layout;
        let range = self.store.range(&layout.audit_log_prefix()).await?;
        let stored: Vec<StoredEntry> = range
            .kvs
            .iter()
            .filter_map(|kv| {
                let position = layout.audit_position(&kv.key)?;
                let entry = serde_json::from_slice::<AuditEntry>(&kv.value)
                    .map(|entry| AuditEntry {
                        revision: kv.create_revision,
                        ..entry
                    })
                    .map_err(|e| e.to_string());
                Some(StoredEntry {
                    position,
                    entry,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                })
            })
            .collect();
        let problems = if verify {
            let head_key = layout.audit_head_key();
            let head_range = self.store.range(&head_key).await?;
            let head: Option<AuditHead> = head_range
                .kvs
                .iter()
                .find(|kv| kv.key == head_key)
                .map(|kv| serde_json::from_slice(&kv.value).map_err(|e| corrupt(&head_key, e)))
                .transpose()?;
            Some(audit::verify(&stored, head.as_ref()))
        } else {
            None
        };
        let wanted = incident.map(ToString::to_string);
        let entries = stored
            .into_iter()
            .filter_map(|s| s.entry.ok())
            .filter(|e| wanted.is_none() || e.incident_id == wanted)
            .collect();
        Ok(AuditReport { entries, problems })
    }
}
