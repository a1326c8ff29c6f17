//! `safemode sim`: simulated channel services from the command line.

use std::time::Duration;

use anyhow::{Context as _, anyhow};

use super::{Caller, Format, emit, output, parse_namespace, subscriber_base};
use crate::sim::{Sim, SimConfig, parse_channels};
use safemode_policy::{Action, Context};

/// Starts the sim, prints where it starts, then one report per revision
/// until Ctrl-C (or `revisions` reports).
pub(super) async fn run(
    servers: &[String],
    caller: &Caller,
    format: Format,
    args: super::SimArgs,
) -> anyhow::Result<()> {
    let channels =
        parse_channels(&args.channels.join(",")).map_err(|e| anyhow!("--channels: {e}"))?;
    let namespace = parse_namespace(&args.namespace)?;
    let actions = args
        .decide
        .iter()
        .map(|a| Action::parse(a).map_err(|e| anyhow!("--decide: {e}")))
        .collect::<anyhow::Result<Vec<Action>>>()?;
    let trusted = super::trusted_keys(&args.trusted)?;
    let base = subscriber_base(
        servers,
        caller,
        namespace.clone(),
        channels[0].0,
        "sim",
        trusted,
    )?;
    let mut sim = Sim::start(SimConfig {
        base,
        channels: channels.clone(),
        id_prefix: format!("sim-{}", std::process::id()),
        complete_within: Duration::from_secs(30),
    })
    .await?;
    let mut reports = sim.reports().context("the sim's reports were taken")?;
    emit(output::show(
        format,
        &output::SimStarted::new(&namespace, &channels, sim.len()),
    ))?;
    let ctx = Context::default();
    let mut printed = 0usize;
    loop {
        let report = tokio::select! {
            report = reports.recv() => report.context("the sim stopped")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let decisions: Vec<_> = sim
            .channels()
            .into_iter()
            .flat_map(|channel| {
                actions
                    .iter()
                    .filter_map(|action| sim.decide(channel, action, &ctx))
                    .collect::<Vec<_>>()
            })
            .collect();
        emit(output::show(
            format,
            &output::SimRevision::new(&report, &decisions),
        ))?;
        printed += 1;
        if args.revisions.is_some_and(|n| printed >= n) {
            return Ok(());
        }
    }
}
