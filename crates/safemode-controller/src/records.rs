//! Records the controller keeps in the store beside activations: incidents
//! (a runbook applied at a severity, with its timeline) and change requests
//! (a lift, de-escalation or resolution waiting for a second approver).
//!
//! ```text
//! {prefix}incidents/{incident id}    Incident (JSON)
//! {prefix}requests/{request id}      ChangeRequest (JSON)
//! ```

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use safemode_policy::activation::{is_id, random_id};
use safemode_policy::runbook::{RunbookName, Severity};
use safemode_policy::{ActivationId, ChannelSet, NameError, Namespace, Revision};

/// Defines an id type: a prefix and 12 characters of base32.
macro_rules! record_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new random id.
            pub fn random() -> Self {
                $name(random_id($prefix, rand::random()))
            }

            /// Parses an id.
            pub fn parse(text: &str) -> Result<Self, NameError> {
                if is_id($prefix, text) {
                    Ok($name(text.to_string()))
                } else {
                    Err(NameError(format!(
                        concat!("bad ", $what, " id '{}': ids look like ", $prefix, "5mj2k0q8c1xv")
                        , text
                    )))
                }
            }

            /// The id.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $name::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

record_id!(
    /// An incident's id, `inc_...`.
    IncidentId,
    "inc_",
    "incident"
);
record_id!(
    /// A change request's id, `req_...`.
    RequestId,
    "req_",
    "request"
);

record_id!(
    /// A proposal's id, `prp_...`.
    ProposalId,
    "prp_",
    "proposal"
);

/// Whether an incident is still being handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    /// Its stage is applied.
    Active,
    /// Its modes were lifted.
    Resolved,
}

/// One thing that happened to an incident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEvent {
    /// When.
    pub at: Timestamp,
    /// declared, escalated, deescalated, resolved, requested, approved,
    /// lifted.
    pub event: String,
    /// Who.
    pub principal: String,
    /// The severity after the event.
    pub severity: Severity,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request involved, for requested and approved events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    /// What changed in force, by mode name ("lifted bots-faq-only on
    /// chatbot").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Store revision of the change; filled when the record is read back (the
    /// revision is not known while the change is being written).
    #[serde(default)]
    pub revision: Revision,
}

impl TimelineEvent {
    /// `what` happened at `at`, by `actor`, at `severity`; its revision is
    /// filled in when the incident is read back.
    pub(crate) fn new(
        at: Timestamp,
        what: &str,
        actor: &Principal,
        severity: Severity,
        reason: Option<&str>,
        request: Option<&RequestId>,
    ) -> Self {
        TimelineEvent {
            at,
            event: what.to_string(),
            principal: actor.name.clone(),
            severity,
            reason: reason.map(str::to_string),
            request_id: request.cloned(),
            detail: None,
            revision: 0,
        }
    }

    /// The event, saying what changed in force.
    pub(crate) fn with_detail(mut self, detail: String) -> Self {
        self.detail = (!detail.is_empty()).then_some(detail);
        self
    }
}

/// A runbook applied in a namespace at a severity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Its id.
    pub id: IncidentId,
    /// The runbook: the incident type.
    pub runbook: RunbookName,
    /// The runbook's title when declared.
    pub title: String,
    /// Where it applies.
    pub namespace: Namespace,
    /// Its current severity.
    pub severity: Severity,
    /// The channels the commander limited it to (all: as the runbook says).
    pub channels: ChannelSet,
    /// Active or resolved.
    pub status: IncidentStatus,
    /// The activations its current stage created.
    pub activation_ids: Vec<ActivationId>,
    /// Whether lifting its modes needs a second approver (the runbook's
    /// setting when declared).
    pub lift_requires_approval: bool,
    /// How often the commander must review it, in seconds.
    pub review_interval_seconds: u64,
    /// When it may be resolved (the runbook's, when declared).
    pub exit_criteria: Vec<String>,
    /// Who declared it.
    pub declared_by: String,
    /// When.
    pub declared_at: Timestamp,
    /// Everything that happened to it, oldest first.
    pub timeline: Vec<TimelineEvent>,
}

impl Incident {
    /// When the commander should next review the incident: a review interval
    /// after its last event.
    pub fn review_due(&self) -> Timestamp {
        let last = self.timeline.last().map_or(self.declared_at, |e| e.at);
        last.saturating_add(jiff::SignedDuration::from_secs(
            self.review_interval_seconds as i64,
        ))
        .unwrap_or(last)
    }
}

/// What a change request will do when approved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestKind {
    /// Lift these activations.
    Lift,
    /// Move the incident to this severity (a move that lifts protections
    /// without putting them back: usually down, rarely up).
    #[serde(alias = "deescalate")]
    Move {
        /// The severity to go to.
        severity: Severity,
    },
    /// Lift the incident's modes and close it.
    Resolve,
}

impl RequestKind {
    /// The kind's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            RequestKind::Lift => "lift",
            RequestKind::Move { .. } => "move",
            RequestKind::Resolve => "resolve",
        }
    }
}

/// What was decided about a request, as its record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RequestStatus {
    /// Waiting for an approver.
    Pending,
    /// Approved and carried out.
    Approved {
        /// Who approved it.
        by: String,
        /// When.
        at: Timestamp,
    },
    /// Taken back before anyone approved it: nothing was done.
    Withdrawn {
        /// Who withdrew it.
        by: String,
        /// When.
        at: Timestamp,
    },
}

/// Where a request stands now: its record's decision, or, while it is
/// pending, whether time or the incident overtook it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// It can be approved.
    Pending,
    /// Approved and carried out.
    Approved {
        /// Who approved it.
        by: String,
        /// When.
        at: Timestamp,
    },
    /// What it would do changed after it was requested (the incident moved
    /// or was resolved, its activations were lifted): approving it would
    /// carry out a change nobody was shown.
    Superseded {
        /// What overtook it, in words ("incident inc_x was escalated to
        /// sev1 by carol at ...").
        by: String,
    },
    /// Nobody approved it in time.
    Expired,
    /// Its requester (or a commander) took it back.
    Withdrawn {
        /// Who withdrew it.
        by: String,
        /// When.
        at: Timestamp,
    },
}

impl RequestState {
    /// `pending`, `approved`, `superseded`, `expired` or `withdrawn`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved { .. } => "approved",
            RequestState::Superseded { .. } => "superseded",
            RequestState::Expired => "expired",
            RequestState::Withdrawn { .. } => "withdrawn",
        }
    }

    /// The decision or the reason, in words ("approved by bob at ...").
    pub fn describe(&self) -> String {
        match self {
            RequestState::Pending => "pending".to_string(),
            RequestState::Approved { by, at } => format!("approved by {by} at {at}"),
            RequestState::Superseded { by } => format!("superseded: {by}"),
            RequestState::Expired => "expired".to_string(),
            RequestState::Withdrawn { by, at } => format!("withdrawn by {by} at {at}"),
        }
    }
}

/// A change that removes protections and needs a second, different
/// principal with the approver role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRequest {
    /// Its id.
    pub id: RequestId,
    /// Where.
    pub namespace: Namespace,
    /// What approval will do.
    #[serde(flatten)]
    pub kind: RequestKind,
    /// The incident it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<IncidentId>,
    /// The activations it lifts (for an incident: as they were requested).
    pub activation_ids: Vec<ActivationId>,
    /// Who asked.
    pub requested_by: String,
    /// Why.
    pub reason: String,
    /// When.
    pub requested_at: Timestamp,
    /// After this, it can no longer be approved.
    pub expires_at: Timestamp,
    /// Pending, approved or withdrawn.
    #[serde(flatten)]
    pub status: RequestStatus,
    /// What approving it will do, in words.
    pub summary: String,
}

impl ChangeRequest {
    /// Whether the request can still be approved at `now`.
    pub fn is_open(&self, now: Timestamp) -> bool {
        self.status == RequestStatus::Pending && now < self.expires_at
    }

    /// Where the request stands at `now`, given what overtook it, if
    /// anything (see `Controller::superseded`).
    pub fn state(&self, now: Timestamp, overtaken: Option<String>) -> RequestState {
        match &self.status {
            RequestStatus::Approved { by, at } => RequestState::Approved {
                by: by.clone(),
                at: *at,
            },
            RequestStatus::Withdrawn { by, at } => RequestState::Withdrawn {
                by: by.clone(),
                at: *at,
            },
            RequestStatus::Pending => match overtaken {
                Some(by) => RequestState::Superseded { by },
                None if now >= self.expires_at => RequestState::Expired,
                None => RequestState::Pending,
            },
        }
    }
}
