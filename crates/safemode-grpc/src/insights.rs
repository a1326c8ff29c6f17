//! Insights at the edge: every replica's report tallies gathered over the
//! fleet (`FleetService.ReplicaReports`, signed like a fleet status),
//! summed, and turned into `GetInsights` with the policy in force.

use std::time::Duration;

use tonic::{Request, Status};

use crate::fleet::{Fleet, FleetQuery, Members, PEER_DEADLINE, in_words};
use crate::invalid;
use safemode_controller::fleet::SubscriberFilter;
use safemode_controller::insights::{self, Insights};
use safemode_controller::reports::{
    DecisionRow, LONGEST_WINDOW, MAX_TALLY_ROWS, NotableRow, Refusal, RefusedRow, Tallies,
};
use safemode_controller::{Controller, SubscriberState};
use safemode_policy::names::{ACTIONS, BOT_INTENT_FAMILY};
use safemode_policy::{Channel, ContextClass, EffectKind, Namespace, SignalName};
use safemode_wire::proto;

/// The fleet's tallies of one namespace over one window.
#[derive(Debug, Default)]
pub(crate) struct FleetTallies {
    /// Summed over every replica that answered.
    pub tallies: Tallies,
    pub replicas: Vec<proto::ReplicaAnswer>,
    /// Some replica did not answer, or rows were left out.
    pub partial: bool,
    pub problems: Vec<String>,
}

/// Signals one insights answer shows, most first (beyond, it is partial).
const MAX_SIGNALS_SHOWN: usize = 200;
/// Senders of refused reports one insights answer names, most first.
const MAX_REFUSED_SHOWN: usize = 50;

/// The largest tallies answer one replica takes from another.
const MAX_REPORTS_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A window a caller may ask for: whole multiples of 10 s up to 15 min.
pub(crate) fn window(seconds: u32, field: &str) -> Result<Duration, Status> {
    let longest = LONGEST_WINDOW.as_secs() as u32;
    if seconds == 0 || seconds > longest || !seconds.is_multiple_of(10) {
        return Err(invalid(
            field,
            format!("{seconds}s is not a window: give a multiple of 10 seconds, at most {longest}"),
        ));
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

impl Fleet {
    /// Every replica's tallies of `namespace` over `window`, summed: this
    /// replica's from here, the others' asked in parallel within
    /// [`PEER_DEADLINE`].
    pub(crate) async fn tallies(&self, namespace: &Namespace, window: Duration) -> FleetTallies {
        let Members {
            members,
            mut problems,
            partial,
        } = self.members().await;
        let asks = members.iter().map(|member| async move {
            let part = if member.replica == self.replica() {
                Ok(self
                    .controller()
                    .reports()
                    .tallies(namespace, window, jiff::Timestamp::now()))
            } else {
                self.ask_reports(member, namespace, window).await
            };
            (member, part)
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut out = FleetTallies {
            partial,
            ..FleetTallies::default()
        };
        let mut parts = Vec::new();
        for (member, part) in answers {
            let mut named = proto::ReplicaAnswer {
                replica: member.replica.clone(),
                address: member.address.clone(),
                ..proto::ReplicaAnswer::default()
            };
            match part {
                Ok(tallies) => {
                    named.answered = true;
                    parts.push(tallies);
                }
                Err(why) => {
                    out.partial = true;
                    problems.push(format!(
                        "replica {} ({}) did not answer: {why}; its subscribers' reports are missing",
                        member.replica, member.address
                    ));
                    named.error = why;
                }
            }
            out.replicas.push(named);
        }
        out.tallies = Tallies::sum(parts);
        if out.tallies.truncated {
            out.partial = true;
            problems.push(format!(
                "some report rows were left out (a sender's share of the report book was full, or an answer holds more than {MAX_TALLY_ROWS} rows; see the refused reports): counts are low"
            ));
        }
        out.problems = problems;
        out
    }

    async fn ask_reports(
        &self,
        member: &safemode_controller::fleet::ReplicaRecord,
        namespace: &Namespace,
        window: Duration,
    ) -> Result<Tallies, String> {
        let channel = self.peer_channel(member)?;
        let mut request = proto::ReplicaReportsRequest {
            namespace: namespace.to_string(),
            window_seconds: window.as_secs() as u32,
            asker: self.replica().to_string(),
            target: member.replica.clone(),
            issued_at: Some(safemode_wire::timestamp_to_wire(jiff::Timestamp::now())),
            key_id: String::new(),
            signature: Vec::new(),
        };
        safemode_wire::signed::sign(&mut request, self.controller().signing_key());
        let request_signature = request.signature.clone();
        let mut client = proto::fleet_service_client::FleetServiceClient::new(channel)
            .max_decoding_message_size(MAX_REPORTS_RESPONSE_BYTES);
        let mut call = Request::new(request);
        crate::telemetry::send_trace(call.metadata_mut());
        let mut answer =
            match tokio::time::timeout(PEER_DEADLINE, client.replica_reports(call)).await {
                Ok(Ok(answer)) => answer.into_inner(),
                Ok(Err(status)) => return Err(in_words(&status)),
                Err(_) => {
                    return Err(format!("no answer within {}s", PEER_DEADLINE.as_secs_f64()));
                }
            };
        safemode_wire::signed::verify(&mut answer, self.controller().trusted_keys())
            .map_err(|e| format!("its answer is not signed by this fleet's key ({e})"))?;
        if answer.request_signature != request_signature || answer.replica != member.replica {
            return Err(format!(
                "it answered another request, as replica {:?}",
                answer.replica
            ));
        }
        tallies_from_wire(&answer)
    }
}

fn class_to_wire(class: ContextClass) -> proto::ReportedClass {
    proto::ReportedClass {
        confidence: class.confidence.as_str().to_string(),
        method: class.method.as_str().to_string(),
        handoff: class.handoff,
        attempts_exhausted: class.attempts_exhausted,
    }
}

/// A replica's tallies as it answers another.
pub(crate) fn tallies_to_wire(replica: &str, tallies: Tallies) -> proto::ReplicaReportsResponse {
    proto::ReplicaReportsResponse {
        replica: replica.to_string(),
        decisions: tallies
            .decisions
            .into_iter()
            .map(|(row, count)| proto::DecisionTally {
                channel: row.channel.as_str().to_string(),
                revision: row.revision,
                action: row.action.to_string(),
                context: Some(class_to_wire(row.class)),
                effect: row.effect.as_str().to_string(),
                stale: row.stale,
                failed_closed: row.failed_closed,
                count,
            })
            .collect(),
        signals: tallies
            .signals
            .into_iter()
            .map(|((channel, name), count)| proto::SignalTally {
                channel: channel.as_str().to_string(),
                name: name.to_string(),
                count,
            })
            .collect(),
        notable: tallies
            .notable
            .into_iter()
            .map(|(row, count)| proto::NotableTally {
                channel: row.channel.as_str().to_string(),
                subscriber: row.subscriber.to_string(),
                revision: row.revision,
                stale: row.stale,
                failed_closed: row.failed_closed,
                count,
            })
            .collect(),
        refused: tallies
            .refused_by
            .into_iter()
            .map(|(row, count)| refused_to_wire(&row, count))
            .collect(),
        truncated: tallies.truncated,
        refusals_cut: tallies.refusals_cut,
        refused_reports: tallies.refused,
        ..proto::ReplicaReportsResponse::default()
    }
}

fn refused_to_wire(row: &RefusedRow, count: u64) -> proto::RefusedTally {
    proto::RefusedTally {
        principal: row.principal.to_string(),
        channel: row.channel.as_str().to_string(),
        subscriber: row.subscriber.to_string(),
        why: row.why.as_str().to_string(),
        count,
    }
}

/// A peer's tallies, checked as a report is (a peer holds the fleet's key,
/// but its answer is still only data).
fn tallies_from_wire(answer: &proto::ReplicaReportsResponse) -> Result<Tallies, String> {
    let too_many = answer.decisions.len() > MAX_TALLY_ROWS
        || answer.notable.len() > MAX_TALLY_ROWS
        || answer.signals.len() > MAX_TALLY_ROWS
        || answer.refused.len() > MAX_TALLY_ROWS;
    if too_many {
        return Err(format!("it answered more than {MAX_TALLY_ROWS} rows"));
    }
    let channel = |name: &str| Channel::parse(name).map_err(|e| format!("a row's channel: {e}"));
    let mut tallies = Tallies {
        truncated: answer.truncated,
        refusals_cut: answer.refusals_cut,
        refused: answer.refused_reports,
        ..Tallies::default()
    };
    for d in &answer.decisions {
        let action = ACTIONS
            .iter()
            .copied()
            .chain([BOT_INTENT_FAMILY])
            .find(|a| *a == d.action)
            .ok_or_else(|| format!("a row's action {:?} is not known", d.action))?;
        let context = d.context.as_ref().ok_or("a row has no context")?;
        let class = ContextClass::parse(
            &context.confidence,
            &context.method,
            context.handoff,
            context.attempts_exhausted,
        )
        .map_err(|e| e.to_string())?;
        let effect = EffectKind::parse(&d.effect)
            .ok_or_else(|| format!("a row's effect {:?} is not known", d.effect))?;
        tallies.decisions.push((
            DecisionRow {
                channel: channel(&d.channel)?,
                revision: d.revision,
                action: action.into(),
                class,
                effect,
                stale: d.stale,
                failed_closed: d.failed_closed,
            },
            d.count,
        ));
    }
    for n in &answer.notable {
        safemode_wire::check_subscriber_id(&n.subscriber)
            .map_err(|e| format!("a row's subscriber: {e}"))?;
        tallies.notable.push((
            NotableRow {
                channel: channel(&n.channel)?,
                subscriber: n.subscriber.as_str().into(),
                revision: n.revision,
                stale: n.stale,
                failed_closed: n.failed_closed,
            },
            n.count,
        ));
    }
    for s in &answer.signals {
        let name = SignalName::parse(&s.name).map_err(|e| e.to_string())?;
        tallies
            .signals
            .push(((channel(&s.channel)?, name), s.count));
    }
    for r in &answer.refused {
        if !r.subscriber.is_empty() {
            safemode_wire::check_subscriber_id(&r.subscriber)
                .map_err(|e| format!("a row's subscriber: {e}"))?;
        }
        let printable = |c: char| !c.is_control();
        if r.principal.is_empty() || r.principal.len() > 128 || !r.principal.chars().all(printable)
        {
            return Err(
                "a row's principal is empty, longer than 128 bytes, or not printable".into(),
            );
        }
        let why = Refusal::parse(&r.why)
            .ok_or_else(|| format!("a row's reason {:?} is not known", r.why))?;
        tallies.refused_by.push((
            RefusedRow {
                principal: r.principal.as_str().into(),
                channel: channel(&r.channel)?,
                subscriber: r.subscriber.as_str().into(),
                why,
            },
            r.count,
        ));
    }
    Ok(tallies)
}

/// Everything `GetInsights` answers for `namespace` over `window`.
pub(crate) async fn gather(
    controller: &Controller,
    fleet: &Fleet,
    namespace: &Namespace,
    window: Duration,
) -> Result<proto::GetInsightsResponse, safemode_controller::Error> {
    let status = controller.status(namespace).await?;
    let current = status
        .view
        .revision
        .max(status.store.namespace_revision.unwrap_or_default());
    let policy = safemode_policy::EffectivePolicy::compile(
        status.view.activations.iter().map(AsRef::as_ref),
    );
    // Subscriber states by channel, across the fleet (counts only).
    let states_of = fleet
        .gather(&FleetQuery {
            namespace: namespace.clone(),
            current,
            filter: SubscriberFilter::default(),
            limit: 0,
            after: None,
        })
        .await;
    let mut states = Vec::new();
    for summary in &states_of.channels {
        let Ok(channel) = Channel::parse(&summary.channel) else {
            continue;
        };
        for (state, n) in [
            (SubscriberState::Synced, summary.synced),
            (SubscriberState::Stale, summary.stale),
            (SubscriberState::NotAcked, summary.not_acked),
            (SubscriberState::Rejected, summary.rejected),
        ] {
            states.push((channel, state, n));
        }
    }
    let gathered = fleet.tallies(namespace, window).await;
    let Insights {
        static_map,
        live,
        soft_downtime,
        dead_ends,
        decisions,
    } = insights::insights(&policy, current, &gathered.tallies, &states);
    let mut problems = gathered.problems;
    if gathered.tallies.refusals_cut {
        problems.push(
            "more senders had reports refused than are named: the refusals are counted, some senders are not named".into(),
        );
    }
    let signals = gathered.tallies.signals.len();
    if signals > MAX_SIGNALS_SHOWN {
        problems.push(format!(
            "{signals} signals were reported in the window; the {MAX_SIGNALS_SHOWN} most counted are shown"
        ));
    }
    for problem in states_of.problems {
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    }
    Ok(proto::GetInsightsResponse {
        namespace: namespace.to_string(),
        revision: current,
        window_seconds: window.as_secs() as u32,
        static_map: static_map
            .into_iter()
            .map(|m| proto::ActionMap {
                action: m.action.to_string(),
                differs: m.differs,
                easiest_channel: m
                    .easiest
                    .map(|c| c.as_str().to_string())
                    .unwrap_or_default(),
                channels: m
                    .channels
                    .iter()
                    .map(|(channel, outcome)| proto::ChannelOutcome {
                        channel: channel.as_str().to_string(),
                        effect: outcome.kind().as_str().to_string(),
                        detail: crate::control::outcome_in_words(outcome),
                    })
                    .collect(),
            })
            .collect(),
        live: live
            .into_iter()
            .map(|d| proto::LiveDifference {
                action: d.action,
                context: Some(class_to_wire(d.class)),
                context_text: d.class.to_string(),
                outcomes: d
                    .outcomes
                    .into_iter()
                    .map(|o| proto::OutcomeTally {
                        channel: o.channel.as_str().to_string(),
                        subscriber: o.subscribers.join(", "),
                        revision: o.revision,
                        effect: o.effect.as_str().to_string(),
                        count: o.count,
                        stale: o.stale,
                        failed_closed: o.failed_closed,
                        old_revision: o.old_revision,
                    })
                    .collect(),
                total: d.total,
                across_channels: d.across_channels,
            })
            .collect(),
        soft_downtime: soft_downtime
            .into_iter()
            .map(|s| proto::SoftDowntime {
                channel: s.channel.as_str().to_string(),
                kind: s.kind.to_string(),
                detail: s.detail,
            })
            .collect(),
        dead_ends: dead_ends
            .iter()
            .map(|d| proto::DeadEndInsight {
                action: d.action.to_string(),
                channels: d
                    .channels
                    .iter()
                    .map(|(channel, blocked)| format!("{channel} {blocked}"))
                    .collect(),
            })
            .collect(),
        refused_reports: gathered.tallies.refused,
        refused: gathered
            .tallies
            .refused_by
            .iter()
            .take(MAX_REFUSED_SHOWN)
            .map(|(row, count)| refused_to_wire(row, *count))
            .collect(),
        signals: gathered
            .tallies
            .signals
            .iter()
            .take(MAX_SIGNALS_SHOWN)
            .map(|((channel, name), count)| proto::SignalTally {
                channel: channel.as_str().to_string(),
                name: name.to_string(),
                count: *count,
            })
            .collect(),
        replicas: gathered.replicas,
        partial: gathered.partial || states_of.partial || signals > MAX_SIGNALS_SHOWN,
        problems,
        decisions,
    })
}
