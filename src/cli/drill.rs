//! `safemode drill run`: rehearse runbooks and get a verdict.

use std::path::PathBuf;

use anyhow::{anyhow, bail};

use super::{Caller, Format, emit, output, parse_namespace};
use crate::drill::{self, DrillOptions, Fault, RunbookSource, Target};
use crate::sim::parse_channels;
use safemode_policy::runbook::Severity;

/// Runs the drills, prints a summary of each, writes the reports, and fails
/// (exit 1) unless every drill passed.
pub(super) async fn run(
    servers: &[String],
    caller: &Caller,
    format: Format,
    args: super::DrillRunArgs,
) -> anyhow::Result<()> {
    let source = match (&args.all, args.runbooks.is_empty()) {
        (Some(dir), true) => RunbookSource::directory(dir),
        (Some(_), false) => Err("give runbooks or --all DIR, not both".into()),
        (None, _) => RunbookSource::given(&args.runbooks),
    }
    .map_err(|e| anyhow!("{e}"))?;
    let channels = parse_channels(&args.channels).map_err(|e| anyhow!("--channels: {e}"))?;
    let severity_path = if args.severity_path.is_empty() {
        None
    } else {
        Some(
            args.severity_path
                .iter()
                .map(|s| Severity::parse(s).map_err(|e| anyhow!("--severity-path: {}", e.0)))
                .collect::<anyhow::Result<Vec<_>>>()?,
        )
    };
    let fault = args
        .fault
        .as_deref()
        .map(Fault::parse)
        .transpose()
        .map_err(|e| anyhow!("--fault: {e}"))?;
    let namespace = args
        .namespace
        .as_ref()
        .map(|n| {
            let namespace = parse_namespace(&super::NamespaceArg {
                namespace: n.clone(),
            })?;
            if !namespace.is_drill() {
                bail!("--namespace {namespace}: drills run only in drill-* namespaces");
            }
            Ok(namespace)
        })
        .transpose()?;
    if let Some(dir) = &args.report
        && dir.exists()
        && !dir.is_dir()
    {
        bail!("--report {}: not a directory", dir.display());
    }
    let approver_token = match &args.approver_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow!("--approver-token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => args.approver_token.clone(),
    };
    if args.converge_within.is_zero() {
        bail!("--converge-within must be longer than zero");
    }
    let target = if args.local {
        Target::Local
    } else {
        Target::Remote {
            servers: servers.to_vec(),
            token: caller.token.clone(),
            approver_token,
            ca_cert: caller.ca_cert.clone(),
            insecure: caller.insecure,
            trusted_keys: super::trusted_keys(&args.trusted)?,
        }
    };
    let reports = drill::run(DrillOptions {
        target,
        source,
        channels,
        severity_path,
        fault,
        namespace,
        converge_within: args.converge_within,
    })
    .await?;
    let written: Vec<PathBuf> = match &args.report {
        // The error names the file and what to do.
        Some(dir) => drill::render::write(dir, &reports)?,
        None => Vec::new(),
    };
    emit(output::show(
        format,
        &output::Drills::new(&reports, &written),
    ))?;
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.runbook.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} drills failed: {}",
            failed.len(),
            reports.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
