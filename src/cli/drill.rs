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
    let channels =
        parse_channels(&args.channels.join(",")).map_err(|e| anyhow!("--channels: {e}"))?;
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
        principal: caller.principal.clone().filter(|p| !p.trim().is_empty()),
        command_line: command_line(std::env::args()),
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

/// The flags whose values are secrets: a report shows them as `***`.
const SECRET_FLAGS: [&str; 2] = ["--token", "--approver-token"];

/// The command line as a report shows it: each argument as a shell would
/// read it back (quoted where needed), and the value of every secret flag
/// (`--token T`, `--token=T`, `--approver-token T`) replaced by `***`.
fn command_line(args: impl IntoIterator<Item = String>) -> String {
    let mut words = Vec::new();
    let mut secret_next = false;
    for arg in args {
        if std::mem::take(&mut secret_next) {
            words.push("***".to_string());
            continue;
        }
        if SECRET_FLAGS.contains(&arg.as_str()) {
            secret_next = true;
            words.push(arg);
        } else if let Some(flag) = SECRET_FLAGS.iter().find(|flag| {
            arg.strip_prefix(**flag)
                .is_some_and(|rest| rest.starts_with('='))
        }) {
            words.push(format!("{flag}=***"));
        } else {
            words.push(shell_word(&arg));
        }
    }
    words.join(" ")
}

/// `word` as a POSIX shell reads it back: as it is when it holds nothing
/// the shell would split or expand, else in single quotes. Written by hand:
/// a dozen lines do not warrant a dependency.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,%@+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::command_line;

    #[test]
    fn the_command_line_hides_tokens_and_quotes_what_a_shell_would_split() {
        #[track_caller]
        fn check(args: &[&str], expected: &str) {
            let args = args.iter().map(|a| a.to_string());
            assert_eq!(command_line(args), expected);
        }
        check(
            &[
                "safemode",
                "--token",
                "s3cret",
                "drill",
                "run",
                "fraud-spike",
            ],
            "safemode --token *** drill run fraud-spike",
        );
        check(
            &[
                "safemode",
                "--token=s3cret",
                "drill",
                "run",
                "--approver-token",
                "t2",
            ],
            "safemode --token=*** drill run --approver-token ***",
        );
        check(
            &[
                "safemode",
                "drill",
                "run",
                "--approver-token=t2",
                "--approver-token-file",
                "f",
            ],
            "safemode drill run --approver-token=*** --approver-token-file f",
        );
        check(
            &["safemode", "drill", "run", "my runbooks/x.yaml", "it's", ""],
            r"safemode drill run 'my runbooks/x.yaml' 'it'\''s' ''",
        );
        check(
            &[
                "safemode",
                "drill",
                "run",
                "--fault",
                "kill-subscribers=10%",
                "a\nb",
            ],
            "safemode drill run --fault kill-subscribers=10% 'a\nb'",
        );
    }
}
