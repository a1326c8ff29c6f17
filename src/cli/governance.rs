//! The commands that govern incidents and the control plane itself:
//! incidents, approvals, the audit log, runbooks and tokens.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};

use super::Format;
use super::output;
use super::{Caller, control, emit, parse_namespace, parse_reason, refused, retry};
use safemode_controller::auth::{self, Role};
use safemode_controller::{IncidentId, RequestId};
use safemode_policy::runbook::{RunbookName, Severity};
use safemode_policy::{ChannelSet, Namespace};
use safemode_wire::proto;

pub(super) async fn incident(
    servers: &[String],
    caller: &Caller,
    format: Format,
    command: super::IncidentCommand,
) -> anyhow::Result<()> {
    use super::IncidentCommand::*;
    match command {
        Declare {
            runbook,
            severity,
            reason,
            channels,
            namespace,
            dry_run,
        } => {
            let namespace = parse_namespace(&namespace)?;
            RunbookName::parse(&runbook)?;
            Severity::parse(&severity).map_err(|e| anyhow!("--severity: {e}"))?;
            let reason = parse_reason(reason)?;
            let channels = (!channels.is_empty()).then(|| channels.join(","));
            let channels = parse_channels(channels.as_deref())?;
            let request = proto::DeclareIncidentRequest {
                namespace: namespace.to_string(),
                r#type: runbook,
                severity,
                reason: reason.as_str().to_string(),
                channels,
                change_id: String::new(),
                dry_run,
            };
            let response = retry::write(
                servers,
                caller,
                "incident declare",
                |mut client, change_id| {
                    let request = proto::DeclareIncidentRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.declare_incident(request).await })
                },
            )
            .await?;
            if dry_run {
                return emit(output::show(
                    format,
                    &output::Previewed::of_incident(response)?,
                ));
            }
            let pending = response.pending.is_some();
            emit(output::show(
                format,
                &output::IncidentChanged::new("declared", response),
            ))?;
            super::requested_only(pending)
        }
        Escalate {
            id,
            namespace,
            severity,
            reason,
            dry_run,
        } => {
            let id = incident_id(servers, caller, &namespace, &id).await?;
            Severity::parse(&severity).map_err(|e| anyhow!("--severity: {e}"))?;
            let reason = match reason {
                Some(reason) => parse_reason(Some(reason))?.as_str().to_string(),
                None => String::new(),
            };
            let request = proto::EscalateIncidentRequest {
                incident_id: id,
                severity,
                reason,
                change_id: String::new(),
                dry_run,
            };
            let response = retry::write(
                servers,
                caller,
                "incident escalate",
                |mut client, change_id| {
                    let request = proto::EscalateIncidentRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.escalate_incident(request).await })
                },
            )
            .await?;
            if dry_run {
                return emit(output::show(
                    format,
                    &output::Previewed::of_incident(response)?,
                ));
            }
            let pending = response.pending.is_some();
            emit(output::show(
                format,
                &output::IncidentChanged::new("moved", response),
            ))?;
            super::requested_only(pending)
        }
        Resolve {
            id,
            reason,
            namespace,
            dry_run,
        } => {
            let reason = parse_reason(reason)?;
            let id = incident_id(servers, caller, &namespace, &id).await?;
            let request = proto::ResolveIncidentRequest {
                incident_id: id,
                reason: reason.as_str().to_string(),
                change_id: String::new(),
                dry_run,
            };
            let response = retry::write(
                servers,
                caller,
                "incident resolve",
                |mut client, change_id| {
                    let request = proto::ResolveIncidentRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.resolve_incident(request).await })
                },
            )
            .await?;
            if dry_run {
                return emit(output::show(
                    format,
                    &output::Previewed::of_incident(response)?,
                ));
            }
            let pending = response.pending.is_some();
            emit(output::show(
                format,
                &output::IncidentChanged::new("resolved", response),
            ))?;
            super::requested_only(pending)
        }
        List { all, namespace } => {
            let namespace = parse_namespace(&namespace)?;
            let mut client = control(servers, caller).await?;
            let response = client
                .list_incidents(proto::ListIncidentsRequest {
                    namespace: namespace.to_string(),
                    include_resolved: all,
                })
                .await
                .map_err(refused)?;
            emit(output::show(
                format,
                &output::Incidents::from(response.into_inner()),
            ))
        }
        Show { id, namespace } => {
            let id = incident_id(servers, caller, &namespace, &id).await?;
            let mut client = control(servers, caller).await?;
            let response = client
                .get_incident(proto::GetIncidentRequest { incident_id: id })
                .await
                .map_err(refused)?;
            emit(output::show(
                format,
                &output::Incident::from(response.into_inner()),
            ))
        }
    }
}

/// The incident id `given` names: an id (`inc_...`) as it is, or an
/// incident type (runbook name) when exactly one incident of that type is
/// active in the namespace, found by listing the active incidents.
async fn incident_id(
    servers: &[String],
    caller: &Caller,
    namespace: &super::NamespaceArg,
    given: &str,
) -> anyhow::Result<String> {
    let not_an_id = match IncidentId::parse(given) {
        Ok(_) => return Ok(given.to_string()),
        Err(e) => e,
    };
    // An id has an underscore, a type never does: a bad `inc_...` is a bad id.
    if given.starts_with("inc_") || RunbookName::parse(given).is_err() {
        bail!("{not_an_id}; or name an active incident by its type (runbook name)");
    }
    let namespace = parse_namespace(namespace)?;
    let mut client = control(servers, caller).await?;
    let response = client
        .list_incidents(proto::ListIncidentsRequest {
            namespace: namespace.to_string(),
            include_resolved: false,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let of_type: Vec<&proto::Incident> = response
        .incidents
        .iter()
        .filter(|i| i.r#type == given)
        .collect();
    match of_type.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => {
            let hint = safemode_policy::names::did_you_mean(
                given,
                response.incidents.iter().map(|i| i.r#type.as_str()),
            );
            bail!(
                "no active incident of type '{given}' in namespace {namespace}; {hint}`safemode incident list --namespace {namespace}` shows them"
            )
        }
        several => {
            let ids: Vec<&str> = several.iter().map(|i| i.id.as_str()).collect();
            bail!(
                "{} active incidents of type '{given}' in namespace {namespace} ({}); name one by its id",
                ids.len(),
                ids.join(", ")
            )
        }
    }
}

fn parse_channels(list: Option<&str>) -> anyhow::Result<Vec<String>> {
    match list {
        None => Ok(Vec::new()),
        Some(list) if list.trim().is_empty() => {
            bail!("--channels is empty; name channels (e.g. chatbot,ivr) or leave it out for all")
        }
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            Ok(ChannelSet::parse_selector(&names)
                .map_err(|e| anyhow!("--channels: {e}"))?
                .to_names()
                .into_iter()
                .filter(|n| n != "*")
                .collect())
        }
    }
}

/// A request id and the optional `--reason` (clap checked it) of `approve`
/// and `withdraw`, as their messages carry them (no reason: empty).
fn named_request(request_id: &str, reason: Option<String>) -> anyhow::Result<(String, String)> {
    RequestId::parse(request_id)?;
    Ok((request_id.to_string(), reason.unwrap_or_default()))
}

pub(super) async fn approve(
    servers: &[String],
    caller: &Caller,
    format: Format,
    request_id: &str,
    reason: Option<String>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let (request_id, reason) = named_request(request_id, reason)?;
    let request = proto::ApproveRequest {
        request_id,
        reason,
        change_id: String::new(),
        dry_run,
    };
    let response = retry::write(servers, caller, "approve", |mut client, change_id| {
        let request = proto::ApproveRequest {
            change_id,
            ..request.clone()
        };
        Box::pin(async move { client.approve(request).await })
    })
    .await?;
    if dry_run {
        let namespace = response
            .request
            .as_ref()
            .map(|r| r.namespace.clone())
            .unwrap_or_default();
        return emit(output::show(
            format,
            &output::Previewed::new(namespace, response.preview)?,
        ));
    }
    emit(output::show(format, &output::Approved::from(response)))
}

pub(super) async fn withdraw(
    servers: &[String],
    caller: &Caller,
    format: Format,
    request_id: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let (request_id, reason) = named_request(request_id, reason)?;
    let request = proto::WithdrawRequest {
        request_id,
        reason,
        change_id: String::new(),
    };
    let response = retry::write(servers, caller, "withdraw", |mut client, change_id| {
        let request = proto::WithdrawRequest {
            change_id,
            ..request.clone()
        };
        Box::pin(async move { client.withdraw(request).await })
    })
    .await?;
    emit(output::show(format, &output::Withdrawn::from(response)))
}

/// `safemode proposals`, and accepting, dismissing and raising one.
pub(super) async fn proposals(
    servers: &[String],
    caller: &Caller,
    format: Format,
    args: super::ProposalsArgs,
) -> anyhow::Result<()> {
    use super::ProposalsCommand::*;
    let proposal_id = |id: &str| {
        safemode_controller::ProposalId::parse(id)
            .map(|id| id.to_string())
            .map_err(|e| anyhow!("{e}; `safemode proposals` lists the open ones"))
    };
    match args.command {
        None => {
            let namespace = parse_namespace(&args.namespace)?;
            let mut client = control(servers, caller).await?;
            let response = client
                .list_proposals(proto::ListProposalsRequest {
                    namespace: namespace.to_string(),
                    include_closed: args.all,
                })
                .await
                .map_err(refused)?;
            emit(output::show(
                format,
                &output::Proposals::new(namespace.to_string(), response.into_inner(), args.all),
            ))
        }
        Some(Accept {
            proposal_id: id,
            reason,
            namespace,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            let request = proto::AcceptProposalRequest {
                namespace: namespace.to_string(),
                proposal_id: proposal_id(&id)?,
                reason,
                change_id: String::new(),
            };
            let response = retry::write(
                servers,
                caller,
                "proposals accept",
                |mut client, change_id| {
                    let request = proto::AcceptProposalRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.accept_proposal(request).await })
                },
            )
            .await?;
            emit(output::show(
                format,
                &output::ProposalAccepted::new(request.proposal_id.clone(), response),
            ))
        }
        Some(Dismiss {
            proposal_id: id,
            reason,
            namespace,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            let request = proto::DismissProposalRequest {
                namespace: namespace.to_string(),
                proposal_id: proposal_id(&id)?,
                reason,
                change_id: String::new(),
            };
            let response = retry::write(
                servers,
                caller,
                "proposals dismiss",
                |mut client, change_id| {
                    let request = proto::DismissProposalRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.dismiss_proposal(request).await })
                },
            )
            .await?;
            emit(output::show(
                format,
                &output::ProposalDismissed::from(response),
            ))
        }
        Some(Raise {
            runbook,
            severity,
            summary,
            reason,
            namespace,
        }) => {
            let namespace = parse_namespace(&namespace)?;
            RunbookName::parse(&runbook).map_err(|e| anyhow!("--type: {e}"))?;
            Severity::parse(&severity).map_err(|e| anyhow!("--severity: {e}"))?;
            let chars = summary.trim().chars().count();
            if chars == 0 || chars > safemode_controller::MAX_SUMMARY_CHARS {
                bail!(
                    "--summary: say what the detector saw in one line of 1 to {} characters",
                    safemode_controller::MAX_SUMMARY_CHARS
                );
            }
            let request = proto::RaiseProposalRequest {
                namespace: namespace.to_string(),
                r#type: runbook,
                severity,
                summary,
                reason,
                change_id: String::new(),
            };
            let response = retry::write(
                servers,
                caller,
                "proposals raise",
                |mut client, change_id| {
                    let request = proto::RaiseProposalRequest {
                        change_id,
                        ..request.clone()
                    };
                    Box::pin(async move { client.raise_proposal(request).await })
                },
            )
            .await?;
            emit(output::show(
                format,
                &output::ProposalRaised::from(response),
            ))
        }
    }
}

pub(super) async fn requests(
    servers: &[String],
    caller: &Caller,
    format: Format,
    namespace: &Namespace,
    all: bool,
) -> anyhow::Result<()> {
    let mut client = control(servers, caller).await?;
    let response = client
        .list_requests(proto::ListRequestsRequest {
            namespace: namespace.to_string(),
            include_decided: all,
        })
        .await
        .map_err(refused)?;
    emit(output::show(
        format,
        &output::Requests::new(response.into_inner(), all),
    ))
}

/// The log; with --verify, any problem makes the command fail (after
/// printing every problem).
pub(super) async fn audit(
    servers: &[String],
    caller: &Caller,
    format: Format,
    incident: Option<String>,
    namespace: Option<String>,
    verify: bool,
) -> anyhow::Result<()> {
    if let Some(namespace) = &namespace {
        Namespace::parse(namespace)?;
    }
    // An incident named by its type is looked up in the namespace asked
    // for, `live` if none was.
    let incident = match incident {
        Some(given) => {
            let lookup = super::NamespaceArg {
                namespace: namespace.clone().unwrap_or_else(|| Namespace::LIVE.into()),
            };
            Some(incident_id(servers, caller, &lookup, &given).await?)
        }
        None => None,
    };
    let mut client = control(servers, caller).await?;
    let request = |verify: bool, after_seq: u64| proto::GetAuditRequest {
        incident_id: incident.clone().unwrap_or_default(),
        verify,
        after_seq,
        limit: 0,
        namespace: namespace.clone().unwrap_or_default(),
    };
    // The first page carries the verification and the head. Text is
    // printed page by page, so the log is never held whole; JSON is one
    // document, so its pages are gathered.
    let first = client
        .get_audit(request(verify, 0))
        .await
        .map_err(refused)?
        .into_inner();
    let mut next = first.next_after_seq;
    let mut audit = output::Audit::from(first);
    if format == Format::Text {
        emit(audit.rows(true))?;
    }
    while next != 0 {
        let page = client
            .get_audit(request(false, next))
            .await
            .map_err(refused)?
            .into_inner();
        // Pages only move forward; a server that says otherwise would
        // keep this loop going forever.
        if page.next_after_seq != 0 && page.next_after_seq <= next {
            bail!(
                "the server answered the page after entry {next} with an earlier page; try again"
            );
        }
        next = page.next_after_seq;
        let page = output::Audit::from(page);
        match format {
            Format::Text => emit(page.rows(false))?,
            Format::Json => audit.extend(page),
        }
    }
    match format {
        Format::Text => emit(audit.summary())?,
        Format::Json => emit(output::show(format, &audit))?,
    }
    if verify && audit.problems_total() > 0 {
        bail!(
            "the audit log has been tampered with: {} problem(s), listed above",
            audit.problems_total()
        );
    }
    Ok(())
}

pub(super) async fn runbooks(
    servers: &[String],
    caller: &Caller,
    format: Format,
) -> anyhow::Result<()> {
    let mut client = control(servers, caller).await?;
    let response = client
        .list_runbooks(proto::ListRunbooksRequest {})
        .await
        .map_err(refused)?;
    emit(output::show(
        format,
        &output::Runbooks::from(response.into_inner()),
    ))
}

/// Lints runbook files locally: every error on its own line, exit 1 if any.
pub(super) fn lint(
    format: Format,
    paths: Vec<PathBuf>,
    modes: Option<&Path>,
) -> anyhow::Result<()> {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("runbooks")]
    } else {
        paths
    };
    // Runbook files given one by one are checked against the modes/
    // directory beside them, as a directory's runbooks are.
    let beside = match paths.as_slice() {
        [first, ..] if paths.iter().all(|p| p.is_file()) => {
            first.parent().map(|dir| dir.join("modes")).filter(|modes| {
                modes.is_dir()
                    && paths
                        .iter()
                        .all(|p| p.parent().map(|d| d.join("modes")).as_ref() == Some(modes))
            })
        }
        _ => None,
    };
    let catalog = match modes.or(beside.as_deref()) {
        Some(dir) => safemode_policy::catalog::load_modes_dir(dir)?,
        None => safemode_policy::catalog::standard_modes(),
    };
    let result = safemode_policy::catalog::lint(&paths, &catalog);
    emit(output::show(format, &output::Lint::from(&result)))?;
    match result {
        Ok(_) => Ok(()),
        Err(errors) => bail!("{} error(s) in the runbooks, listed above", errors.len()),
    }
}

pub(super) fn create_token(
    format: Format,
    principal: &str,
    roles: &[String],
) -> anyhow::Result<()> {
    let roles = roles
        .iter()
        .map(|r| Role::parse(r).map_err(|e| anyhow!("--role: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let new = auth::create_token(principal, &roles)?;
    emit(output::show(format, &output::Token::new(&roles, &new)))
}
