//! The three files of `--report DIR`, rendered from what the drills found
//! ([`DrillReport`]): `report.md` for a person, `junit.xml` so CI systems
//! show every check as a test, and `journal.json` with every event.
//!
//! Rendering is pure (reports in, text out); only [`write`] touches the file
//! system. One run may drill several runbooks, so every file covers all of
//! them.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};

use safemode_support::files::{self, Existing, Readers};

use jiff::Timestamp;
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use serde::Serialize;

use super::report::{
    Approval, ChannelTiming, DrillReport, ExpectationCheck, FaultReport, JournalEvent,
    PrincipalSource, RestorationReport, StageReport,
};
use safemode_policy::Namespace;
use safemode_policy::runbook::Severity;

/// The summary a person reads.
pub const MARKDOWN_FILE: &str = "report.md";
/// One test case per check, for CI systems.
pub const JUNIT_FILE: &str = "junit.xml";
/// Every event with its timestamp.
pub const JOURNAL_FILE: &str = "journal.json";

/// Writes the three report files into `dir`, creating it if needed, and
/// returns their paths (`report.md`, `junit.xml`, `journal.json`). Each file
/// is replaced atomically: a reader sees the old file or the new one.
pub fn write(dir: &Path, reports: &[DrillReport]) -> io::Result<Vec<PathBuf>> {
    let files = [
        (MARKDOWN_FILE, markdown(reports)),
        (JUNIT_FILE, junit(reports)),
        (JOURNAL_FILE, journal(reports)),
    ];
    std::fs::create_dir_all(dir).map_err(|e| cannot_write(dir, e))?;
    let mut paths = Vec::with_capacity(files.len());
    for (name, text) in files {
        let path = dir.join(name);
        // A report is for whoever reads the directory.
        files::write_atomically(&path, text.as_bytes(), Readers::Anyone, Existing::Replace)
            .map_err(|e| cannot_write(&path, e))?;
        paths.push(path);
    }
    Ok(paths)
}

fn cannot_write(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!(
            "cannot write the drill report {}: {error} (check that the --report directory is writable)",
            path.display()
        ),
    )
}

// === report.md ===

/// `report.md`: the overall verdict first, then each runbook with its
/// failures, stages (timings table, expectations, rejects), fault and
/// restoration.
pub fn markdown(reports: &[DrillReport]) -> String {
    let mut out = String::new();
    markdown_into(&mut out, reports).expect("writing to a String cannot fail");
    out
}

fn markdown_into(out: &mut String, reports: &[DrillReport]) -> fmt::Result {
    let passed = reports.iter().filter(|r| r.passed).count();
    if reports.is_empty() {
        // A run that drilled nothing has proved nothing.
        writeln!(out, "# Drill: **FAIL**: no runbook was drilled")?;
        return Ok(());
    }
    writeln!(
        out,
        "# Drill: {}: {passed} of {} runbooks passed",
        verdict_md(passed == reports.len()),
        reports.len()
    )?;
    writeln!(out)?;
    writeln!(out, "| runbook | verdict | namespace | failures |")?;
    writeln!(out, "|---|---|---|--:|")?;
    for report in reports {
        writeln!(
            out,
            "| {} | {} | {} | {} |",
            md(&report.runbook),
            verdict_md(report.passed),
            md(&report.namespace),
            report.failures.len()
        )?;
    }
    for report in reports {
        writeln!(out)?;
        runbook_md(out, report)?;
    }
    Ok(())
}

fn runbook_md(out: &mut String, report: &DrillReport) -> fmt::Result {
    writeln!(
        out,
        "## {}: {}",
        md(&report.runbook),
        verdict_md(report.passed)
    )?;
    writeln!(out)?;
    if !report.title.is_empty() {
        writeln!(out, "{}", md(&report.title))?;
        writeln!(out)?;
    }
    writeln!(out, "- Namespace: {}", md(&report.namespace))?;
    writeln!(out, "- Controller: {}", md(&report.controller))?;
    match &report.incident_id {
        Some(id) => writeln!(out, "- Incident: {}", md(id))?,
        None => writeln!(out, "- Incident: none declared")?,
    }
    writeln!(
        out,
        "- Version: {}",
        md(format!("safemode {}", report.safemode_version))
    )?;
    writeln!(
        out,
        "- Catalogue fingerprint: {}",
        md(&report.catalog_fingerprint)
    )?;
    match &report.runbook_file {
        Some(file) => writeln!(out, "- Runbook file: {}", md(file))?,
        None => writeln!(out, "- Runbook file: built into safemode")?,
    }
    writeln!(out, "- Command line: {}", md(&report.command_line))?;
    writeln!(
        out,
        "- Run by: {} ({})",
        md(&report.principal),
        md(report.principal_from.describe())
    )?;
    writeln!(out, "- Started: {:.3}", report.started_at)?;
    writeln!(
        out,
        "- Time: {:.3} to {:.3} ({})",
        report.started_at,
        report.finished_at,
        ms(report
            .finished_at
            .duration_since(report.started_at)
            .as_secs_f64()
            * 1000.0)
    )?;
    let subscribers = if report.subscribers.is_empty() {
        "none".to_owned()
    } else {
        report
            .subscribers
            .iter()
            .map(|s| {
                format!(
                    "{}: {} ({} simulated, {} attached)",
                    md(s.channel),
                    s.simulated + s.attached,
                    s.simulated,
                    s.attached
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    writeln!(out, "- Subscribers: {subscribers}")?;

    if !report.passed || !report.failures.is_empty() {
        writeln!(out)?;
        writeln!(out, "### Failures")?;
        writeln!(out)?;
        if report.failures.is_empty() {
            writeln!(out, "- The drill failed without saying why.")?;
        }
        for failure in &report.failures {
            writeln!(out, "- **{}**", md(failure))?;
        }
    }

    for (number, stage) in report.stages.iter().enumerate() {
        writeln!(out)?;
        stage_md(out, number + 1, stage)?;
    }
    writeln!(out)?;
    restoration_md(out, report.restoration.as_ref())
}

fn stage_md(out: &mut String, number: usize, stage: &StageReport) -> fmt::Result {
    writeln!(
        out,
        "### Stage {number}: {} ({})",
        md(stage.severity),
        md(stage.step)
    )?;
    writeln!(out)?;
    writeln!(out, "- Revision: {}", stage.revision)?;
    writeln!(out, "- Modes: {}", names_md(&stage.modes))?;
    if let Some(approval) = &stage.approval {
        writeln!(out, "- Approval: {}", approval_md(approval))?;
    }
    writeln!(out, "- Apply limit: {}", ms(stage.apply_within_ms as f64))?;
    writeln!(out)?;

    if stage.channels.is_empty() {
        writeln!(out, "No channel timings.")?;
    } else {
        writeln!(
            out,
            "| channel | subscribers | applied | p50 | p99 | max | limit | within limit |"
        )?;
        writeln!(out, "|---|--:|--:|--:|--:|--:|--:|---|")?;
        for timing in &stage.channels {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                md(timing.channel),
                timing.subscribers,
                timing.applied,
                ms(timing.p50_ms),
                ms(timing.p99_ms),
                ms(timing.max_ms),
                ms(stage.apply_within_ms as f64),
                if applied_in_time(timing) {
                    "yes"
                } else {
                    "**no**"
                }
            )?;
        }
    }
    writeln!(out)?;

    if stage.expectations.is_empty() {
        writeln!(out, "No expectations at this stage.")?;
    } else {
        writeln!(
            out,
            "| result | channel | action | context | expected | actual | decision |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|")?;
        for check in &stage.expectations {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                verdict_md(check.passed),
                md(check.channel),
                md(&check.action),
                md(&check.context),
                md(&check.expected),
                md(&check.actual),
                md(&check.decision)
            )?;
        }
    }
    writeln!(out)?;

    if stage.rejects.is_empty() {
        writeln!(out, "Rejected snapshots: none.")?;
    } else {
        writeln!(out, "Rejected snapshots: **{}**", stage.rejects.len())?;
        writeln!(out)?;
        for reject in &stage.rejects {
            writeln!(
                out,
                "- {} rejected revision {}: {}",
                md(&reject.subscriber),
                reject.revision,
                md(&reject.reason)
            )?;
        }
    }
    if let Some(fault) = &stage.fault {
        writeln!(out)?;
        fault_md(out, fault)?;
    }
    Ok(())
}

/// The fault, under the stage it struck.
fn fault_md(out: &mut String, fault: &FaultReport) -> fmt::Result {
    writeln!(out, "#### Fault: {}", verdict_md(fault.recovered))?;
    writeln!(out)?;
    writeln!(
        out,
        "- Injected: {} during {}",
        md(fault.kind),
        md(fault.severity)
    )?;
    writeln!(out, "- Subscribers affected: {}", fault.affected)?;
    if fault.hit.is_empty() {
        writeln!(out, "- Subscribers hit: none of the drill's")?;
    } else {
        writeln!(out, "- Subscribers hit:")?;
        for hit in &fault.hit {
            writeln!(
                out,
                "  - {}: {}",
                md(hit.channel),
                names_md(&hit.subscribers)
            )?;
        }
    }
    if fault.recovered {
        writeln!(out, "- Recovered: yes, in {}", ms(fault.recovery_ms))?;
    } else {
        writeln!(
            out,
            "- Recovered: **no**, gave up after {}",
            ms(fault.recovery_ms)
        )?;
    }
    Ok(())
}

fn restoration_md(out: &mut String, restoration: Option<&RestorationReport>) -> fmt::Result {
    let Some(restoration) = restoration else {
        writeln!(out, "### Restoration: **FAIL**")?;
        writeln!(out)?;
        return writeln!(out, "- The drill did not get to resolve the incident.");
    };
    writeln!(
        out,
        "### Restoration: {}",
        verdict_md(restored(restoration))
    )?;
    writeln!(out)?;
    writeln!(out, "- Revision: {}", restoration.revision)?;
    if let Some(approval) = &restoration.approval {
        writeln!(out, "- Approval: {}", approval_md(approval))?;
    }
    writeln!(
        out,
        "- Decisions checked: {}, not back to allow: {}",
        restoration.checked,
        restoration.not_restored.len()
    )?;
    for line in &restoration.not_restored {
        writeln!(out, "  - **{}**", md(line))?;
    }
    if restoration.left_active == 0 {
        writeln!(out, "- Activations left after cleanup: 0")?;
    } else {
        writeln!(
            out,
            "- Activations left after cleanup: **{}**",
            restoration.left_active
        )?;
    }
    if !restoration.decisions.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "| restored | channel | action | context | effect | decision |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|")?;
        for check in &restoration.decisions {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                if check.passed { "yes" } else { "**no**" },
                md(check.channel),
                md(&check.action),
                md(&check.context),
                md(&check.actual),
                md(&check.decision)
            )?;
        }
    }
    Ok(())
}

/// Names, comma-separated, or `none`.
fn names_md(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.iter().map(md).collect::<Vec<_>>().join(", ")
    }
}

fn approval_md(approval: &Approval) -> String {
    format!(
        "request {} by {}, approved by {}",
        md(&approval.request_id),
        md(&approval.requested_by),
        md(&approval.approved_by)
    )
}

fn verdict_md(passed: bool) -> &'static str {
    if passed { "PASS" } else { "**FAIL**" }
}

/// Milliseconds with one decimal.
fn ms(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1} ms")
    } else {
        "n/a".to_owned()
    }
}

/// `text` as inline Markdown that shows as written: on one line (line breaks
/// become `<br>`, so a table row stays one row), without control characters,
/// and with every character Markdown would read as markup escaped (`|` too,
/// so a cell cannot split). Written by hand: no maintained crate escapes
/// for GitHub-flavoured tables.
fn md(text: impl fmt::Display) -> String {
    let text = text.to_string();
    let chars: Vec<char> = text.chars().collect();
    // "1. x" or "3) x" at the start of a list item would open a nested list.
    let digits = chars.iter().take_while(|c| c.is_ascii_digit()).count();
    let ordinal = ((1..=9).contains(&digits) && matches!(chars.get(digits), Some('.' | ')')))
        .then_some(digits);
    let mut out = String::with_capacity(text.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word = |at: Option<&char>| at.is_some_and(|c| c.is_alphanumeric());
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.get(i + 1) == Some(&'\n') {
                    i += 1;
                }
                out.push_str("<br>");
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            '\\' | '`' | '*' | '[' | ']' | '<' | '|' | '&' | '~' => {
                out.push('\\');
                out.push(c);
            }
            // Inside a word (`password_reset`) an underscore is no emphasis.
            '_' if word(i.checked_sub(1).and_then(|p| chars.get(p))) && word(chars.get(i + 1)) => {
                out.push('_')
            }
            '_' => out.push_str("\\_"),
            // `>` closes no markup once `<` is escaped; only a line's
            // first one opens a quote.
            '#' | '+' | '-' | '=' | '>' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            '.' | ')' if ordinal == Some(i) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

// === junit.xml ===

/// `junit.xml`: one `<testsuite>` per runbook, one `<testcase>` per
/// expectation, per channel apply limit and per stage's rejects, one for
/// the fault (if any), one for restoration and one for the runbook's
/// verdict.
pub fn junit(reports: &[DrillReport]) -> String {
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    junit_into(&mut writer, reports).expect("writing to a Vec cannot fail");
    let mut out =
        String::from_utf8(writer.into_inner()).expect("XML written from strings is UTF-8");
    out.push('\n');
    out
}

fn junit_into(writer: &mut Writer<Vec<u8>>, reports: &[DrillReport]) -> io::Result<()> {
    let suites: Vec<(&DrillReport, Vec<Case>)> = reports.iter().map(|r| (r, cases(r))).collect();
    let count = |cases: &[Case]| {
        (
            cases.len(),
            cases.iter().filter(|c| c.failure.is_some()).count(),
        )
    };
    let (tests, failures) = suites.iter().fold((0, 0), |(t, f), (_, cases)| {
        let (tests, failures) = count(cases);
        (t + tests, f + failures)
    });
    let total_seconds: f64 = reports.iter().map(seconds_drilled).sum();

    writer.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    let root = element(
        "testsuites",
        [
            ("name", "safemode drill".to_owned()),
            ("tests", tests.to_string()),
            ("failures", failures.to_string()),
            ("errors", "0".to_owned()),
            ("time", seconds(total_seconds)),
        ],
    );
    writer.write_event(Event::Start(root.borrow()))?;
    for (report, cases) in &suites {
        let (tests, failures) = count(cases);
        let suite = element(
            "testsuite",
            [
                ("name", format!("drill: {}", report.runbook)),
                ("tests", tests.to_string()),
                ("failures", failures.to_string()),
                ("errors", "0".to_owned()),
                ("skipped", "0".to_owned()),
                ("time", seconds(seconds_drilled(report))),
                // JUnit's schema wants a timestamp without a zone; it is UTC.
                (
                    "timestamp",
                    report.started_at.strftime("%Y-%m-%dT%H:%M:%S").to_string(),
                ),
            ],
        );
        writer.write_event(Event::Start(suite.borrow()))?;
        writer.write_event(Event::Start(BytesStart::new("properties")))?;
        let mut properties = vec![
            ("title", report.title.clone()),
            ("namespace", report.namespace.to_string()),
            ("controller", report.controller.clone()),
        ];
        if let Some(id) = &report.incident_id {
            properties.push(("incident_id", id.clone()));
        }
        properties.extend([
            ("safemode_version", report.safemode_version.clone()),
            ("catalog_fingerprint", report.catalog_fingerprint.clone()),
            (
                "runbook_file",
                report
                    .runbook_file
                    .clone()
                    .unwrap_or_else(|| "built into safemode".to_owned()),
            ),
            ("command_line", report.command_line.clone()),
            ("principal", report.principal.clone()),
            (
                "principal_from",
                report.principal_from.describe().to_owned(),
            ),
            ("started_at", report.started_at.to_string()),
        ]);
        for (name, value) in properties {
            let property = element("property", [("name", name.to_owned()), ("value", value)]);
            writer.write_event(Event::Empty(property))?;
        }
        writer.write_event(Event::End(BytesEnd::new("properties")))?;
        for case in cases {
            let mut attributes = vec![
                ("name", case.name.clone()),
                ("classname", case.classname.clone()),
            ];
            if let Some(time) = case.seconds {
                attributes.push(("time", seconds(time)));
            }
            let testcase = element("testcase", attributes);
            if case.failure.is_none() && case.output.is_none() {
                writer.write_event(Event::Empty(testcase))?;
                continue;
            }
            writer.write_event(Event::Start(testcase.borrow()))?;
            // The schema's order: the failure, then what the case printed.
            if let Some(failure) = &case.failure {
                let tag = element("failure", [("message", failure.message.clone())]);
                writer.write_event(Event::Start(tag.borrow()))?;
                writer.write_event(Event::Text(BytesText::new(&allowed_in_xml(
                    &failure.details,
                ))))?;
                writer.write_event(Event::End(tag.to_end()))?;
            }
            if let Some(output) = &case.output {
                writer.write_event(Event::Start(BytesStart::new("system-out")))?;
                writer.write_event(Event::Text(BytesText::new(&allowed_in_xml(output))))?;
                writer.write_event(Event::End(BytesEnd::new("system-out")))?;
            }
            writer.write_event(Event::End(testcase.to_end()))?;
        }
        writer.write_event(Event::End(suite.to_end()))?;
    }
    writer.write_event(Event::End(root.to_end()))
}

/// A start tag with `attributes`, in order. The writer escapes the values
/// (line breaks and tabs as character references, so they survive
/// attribute-value normalisation); what XML 1.0 does not allow at all is
/// dropped first.
fn element<'a>(
    name: &'a str,
    attributes: impl IntoIterator<Item = (&'a str, String)>,
) -> BytesStart<'a> {
    let mut start = BytesStart::new(name);
    for (key, value) in attributes {
        start.push_attribute((key, allowed_in_xml(&value).as_ref()));
    }
    start
}

/// One JUnit test case.
struct Case {
    name: String,
    classname: String,
    seconds: Option<f64>,
    failure: Option<Failure>,
    /// What the case found, one line each (`<system-out>`): the subscribers
    /// a fault hit, the decisions checked at restoration.
    output: Option<String>,
}

struct Failure {
    /// One line.
    message: String,
    /// As many lines as it takes.
    details: String,
}

impl Failure {
    fn new(message: impl Into<String>, details: impl Into<String>) -> Option<Self> {
        Some(Self {
            message: message.into(),
            details: details.into(),
        })
    }
}

/// The checks of one drilled runbook, in the order they happened.
fn cases(report: &DrillReport) -> Vec<Case> {
    let runbook_class = format!("drill.{}", report.runbook);
    let stage_class = |severity: Severity| format!("{runbook_class}.{severity}");
    let mut cases = Vec::new();
    for stage in &report.stages {
        let sev = stage.severity;
        for check in &stage.expectations {
            cases.push(Case {
                name: format!("{sev}: {}", expectation_name(check)),
                classname: stage_class(sev),
                seconds: None,
                output: None,
                failure: if check.passed {
                    None
                } else {
                    Failure::new(
                        format!("expected {}, decided {}", check.expected, check.actual),
                        format!("decision: {}", check.decision),
                    )
                },
            });
        }
        for timing in &stage.channels {
            cases.push(Case {
                name: format!(
                    "{sev}: {} applies within {} ms",
                    timing.channel, stage.apply_within_ms
                ),
                classname: stage_class(sev),
                seconds: timing.max_ms.is_finite().then_some(timing.max_ms / 1000.0),
                output: None,
                failure: if applied_in_time(timing) {
                    None
                } else {
                    Failure::new(
                        format!(
                            "{} of {} subscribers applied; slowest {} (limit {} ms)",
                            timing.applied,
                            timing.subscribers,
                            ms(timing.max_ms),
                            stage.apply_within_ms
                        ),
                        format!(
                            "p50 {}, p99 {}, max {}",
                            ms(timing.p50_ms),
                            ms(timing.p99_ms),
                            ms(timing.max_ms)
                        ),
                    )
                },
            });
        }
        cases.push(Case {
            name: format!("{sev}: no snapshot rejected"),
            classname: stage_class(sev),
            seconds: None,
            output: None,
            failure: if stage.rejects.is_empty() {
                None
            } else {
                Failure::new(
                    format!("{} snapshot(s) rejected", stage.rejects.len()),
                    stage
                        .rejects
                        .iter()
                        .map(|r| {
                            format!(
                                "{} rejected revision {}: {}",
                                r.subscriber, r.revision, r.reason
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            },
        });
        // The fault, with the stage it struck.
        if let Some(fault) = &stage.fault {
            cases.push(Case {
                name: format!("{}: fault {} recovers", fault.severity, fault.kind),
                classname: stage_class(fault.severity),
                seconds: fault
                    .recovery_ms
                    .is_finite()
                    .then_some(fault.recovery_ms / 1000.0),
                output: Some(
                    fault
                        .hit
                        .iter()
                        .map(|h| format!("hit {}: {}", h.channel, h.subscribers.join(", ")))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
                .filter(|o| !o.is_empty()),
                failure: if fault.recovered {
                    None
                } else {
                    Failure::new(
                        format!("not recovered after {}", ms(fault.recovery_ms)),
                        format!("subscribers affected: {}", fault.affected),
                    )
                },
            });
        }
    }
    cases.push(Case {
        name: "restoration: every channel back to allow".to_owned(),
        classname: runbook_class.clone(),
        seconds: None,
        output: report
            .restoration
            .as_ref()
            .map(|r| {
                r.decisions
                    .iter()
                    .map(|d| {
                        format!(
                            "{}: {} {} ({}) -> {}",
                            if d.passed { "restored" } else { "NOT restored" },
                            d.channel,
                            d.action,
                            d.context,
                            d.decision
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .filter(|o| !o.is_empty()),
        failure: match &report.restoration {
            None => Failure::new("the drill did not get to resolve the incident", ""),
            Some(r) if restored(r) => None,
            Some(r) => Failure::new(
                format!(
                    "{} of {} decisions not back to allow, {} activation(s) left after cleanup",
                    r.not_restored.len(),
                    r.checked,
                    r.left_active
                ),
                r.not_restored.join("\n"),
            ),
        },
    });
    // Some failures are no check above (a subscriber that never started, a
    // namespace that could not be cleaned up): without this case a failed
    // drill could show green in CI.
    cases.push(Case {
        name: "verdict".to_owned(),
        classname: runbook_class,
        seconds: None,
        output: None,
        failure: if report.passed {
            None
        } else if report.failures.is_empty() {
            Failure::new("the drill failed without saying why", "")
        } else {
            Failure::new(report.failures.join("; "), report.failures.join("\n"))
        },
    });
    cases
}

/// `web account.password_reset (confidence 0.9, methods push) -> deny`.
fn expectation_name(check: &ExpectationCheck) -> String {
    format!(
        "{} {} ({}) -> {}",
        check.channel, check.action, check.context, check.expected
    )
}

fn seconds_drilled(report: &DrillReport) -> f64 {
    report
        .finished_at
        .duration_since(report.started_at)
        .as_secs_f64()
}

/// Seconds with millisecond precision, never negative (JUnit's schema).
fn seconds(value: f64) -> String {
    let value = if value.is_finite() {
        value.max(0.0)
    } else {
        0.0
    };
    format!("{value:.3}")
}

/// `text` without the characters XML 1.0 does not allow at all (most
/// control characters): no writer may put them in a file a parser must
/// accept, and escaping cannot help (`&#27;` is not allowed either).
fn allowed_in_xml(text: &str) -> Cow<'_, str> {
    let allowed = |c: char| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..);
    if text.chars().all(allowed) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.chars().filter(|c| allowed(*c)).collect())
    }
}

// === journal.json ===

/// `journal.json`: per runbook, every journal event with its time.
pub fn journal(reports: &[DrillReport]) -> String {
    #[derive(Serialize)]
    struct Journal<'a> {
        runbooks: Vec<Runbook<'a>>,
    }
    #[derive(Serialize)]
    struct Runbook<'a> {
        runbook: &'a str,
        namespace: &'a Namespace,
        passed: bool,
        safemode_version: &'a str,
        catalog_fingerprint: &'a str,
        runbook_file: &'a Option<String>,
        command_line: &'a str,
        principal: &'a str,
        principal_from: PrincipalSource,
        started_at: Timestamp,
        events: &'a [JournalEvent],
    }
    let journal = Journal {
        runbooks: reports
            .iter()
            .map(|r| Runbook {
                runbook: &r.runbook,
                namespace: &r.namespace,
                passed: r.passed,
                safemode_version: &r.safemode_version,
                catalog_fingerprint: &r.catalog_fingerprint,
                runbook_file: &r.runbook_file,
                command_line: &r.command_line,
                principal: &r.principal,
                principal_from: r.principal_from,
                started_at: r.started_at,
                events: &r.journal,
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&journal)
        .expect("strings, timestamps and JSON values always serialize");
    text.push('\n');
    text
}

// === shared verdicts ===

/// Every subscriber of the channel applied the stage within its limit: one
/// that never applied it did not.
fn applied_in_time(timing: &ChannelTiming) -> bool {
    timing.within_limit && timing.applied >= timing.subscribers
}

fn restored(restoration: &RestorationReport) -> bool {
    restoration.not_restored.is_empty() && restoration.left_active == 0
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::drill::Fault;
    use crate::drill::report::{ChannelSubscribers, FaultHit, Reject, Step};
    use safemode_policy::Channel;

    /// Everything a renderer must keep as written: markup, quotes, a table
    /// separator, a line break and a control character (ESC).
    const NASTY: &str = "amount <100> & \"EUR\" 'x' | y\nnext\u{1b}line";
    /// `NASTY` after XML: the control character is gone, nothing else.
    const NASTY_XML: &str = "amount <100> & \"EUR\" 'x' | y\nnextline";
    /// `NASTY` in Markdown.
    const NASTY_MD: &str = r#"amount \<100> \& "EUR" 'x' \| y<br>nextline"#;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millisecond(1_714_557_600_000 + millis).unwrap()
    }

    fn timing(
        channel: &str,
        subscribers: usize,
        applied: usize,
        max_ms: f64,
        ok: bool,
    ) -> ChannelTiming {
        ChannelTiming {
            channel: Channel::parse(channel).unwrap(),
            subscribers,
            applied,
            p50_ms: 12.34,
            p99_ms: 30.0,
            max_ms,
            within_limit: ok,
        }
    }

    fn expectation(
        channel: &str,
        action: &str,
        context: &str,
        expected: &str,
        actual: &str,
        decision: &str,
    ) -> ExpectationCheck {
        ExpectationCheck {
            channel: Channel::parse(channel).unwrap(),
            action: action.to_owned(),
            context: context.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
            decision: decision.to_owned(),
            modes: Vec::new(),
            passed: expected == actual,
        }
    }

    fn event(millis: i64, name: &str, detail: serde_json::Value) -> JournalEvent {
        JournalEvent {
            at: at(millis),
            event: name.to_owned(),
            detail,
        }
    }

    /// A drill that passed (two stages, an approval, a fault it recovered
    /// from) and one that failed nearly everything, with nasty text.
    fn reports() -> Vec<DrillReport> {
        let passing = DrillReport {
            runbook: "login_storm".to_owned(),
            title: "Login storm".to_owned(),
            namespace: Namespace::parse("drill-0001").unwrap(),
            controller: "local".to_owned(),
            incident_id: Some("inc-1".to_owned()),
            safemode_version: "1.2.3".to_owned(),
            catalog_fingerprint: "f1e2d3".to_owned(),
            runbook_file: Some("runbooks/login_storm.yaml".to_owned()),
            command_line: "safemode drill run --local runbooks/login_storm.yaml".to_owned(),
            principal: "alice".to_owned(),
            principal_from: PrincipalSource::Caller,
            started_at: at(0),
            finished_at: at(12_500),
            passed: true,
            subscribers: vec![
                ChannelSubscribers {
                    channel: Channel::parse("web").unwrap(),
                    simulated: 3,
                    attached: 0,
                },
                ChannelSubscribers {
                    channel: Channel::parse("chatbot").unwrap(),
                    simulated: 2,
                    attached: 1,
                },
            ],
            stages: vec![
                StageReport {
                    severity: Severity::Sev3,
                    step: Step::Declare,
                    revision: 5,
                    modes: vec!["lockdown".to_owned()],
                    approval: None,
                    apply_within_ms: 5000,
                    channels: vec![
                        timing("web", 3, 3, 31.04, true),
                        timing("chatbot", 3, 3, 40.0, true),
                    ],
                    expectations: vec![expectation(
                        "web",
                        "account.password_reset",
                        "confidence 0.9, methods push",
                        "deny",
                        "deny",
                        "deny because lockdown",
                    )],
                    rejects: vec![],
                    fault: Some(FaultReport {
                        kind: Fault::KillSubscribers { percent: 10 },
                        severity: Severity::Sev3,
                        affected: 1,
                        hit: vec![FaultHit {
                            channel: Channel::parse("chatbot").unwrap(),
                            subscribers: vec!["drill-0001-chatbot-1".to_owned()],
                        }],
                        recovered: true,
                        recovery_ms: 850.0,
                    }),
                },
                StageReport {
                    severity: Severity::Sev2,
                    step: Step::Escalate,
                    revision: 6,
                    modes: vec!["lockdown".to_owned(), "refund-freeze".to_owned()],
                    approval: Some(Approval {
                        request_id: "req-7".to_owned(),
                        requested_by: "alice".to_owned(),
                        approved_by: "bob".to_owned(),
                    }),
                    apply_within_ms: 5000,
                    channels: vec![
                        timing("web", 3, 3, 20.0, true),
                        timing("chatbot", 3, 3, 25.0, true),
                    ],
                    expectations: vec![expectation(
                        "chatbot",
                        "refund.issue",
                        "default",
                        "deny",
                        "deny",
                        "deny because refund-freeze",
                    )],
                    rejects: vec![],
                    fault: None,
                },
            ],
            restoration: Some(RestorationReport {
                revision: 7,
                approval: Some(Approval {
                    request_id: "req-8".to_owned(),
                    requested_by: "alice".to_owned(),
                    approved_by: "carol".to_owned(),
                }),
                checked: 2,
                decisions: vec![
                    expectation(
                        "web",
                        "account.password_reset",
                        "confidence 0.9, methods push",
                        "allow",
                        "allow",
                        "allow",
                    ),
                    expectation(
                        "chatbot",
                        "refund.issue",
                        "default",
                        "allow",
                        "allow",
                        "allow",
                    ),
                ],
                not_restored: vec![],
                left_active: 0,
            }),
            failures: vec![],
            journal: vec![
                event(
                    0,
                    "declared",
                    json!({"incident": "inc-1", "severity": "sev3"}),
                ),
                event(40, "stage_applied", json!({"revision": 5})),
                event(12_500, "resolved", json!({"revision": 7})),
            ],
        };
        let failing = DrillReport {
            runbook: "fraud_wave".to_owned(),
            title: NASTY.to_owned(),
            namespace: Namespace::parse("drill-0002").unwrap(),
            controller: "https://staging:7443".to_owned(),
            incident_id: Some("inc-2".to_owned()),
            safemode_version: "1.2.3".to_owned(),
            catalog_fingerprint: "a0b1c2".to_owned(),
            runbook_file: None,
            command_line: format!("safemode --token *** drill run fraud_wave '{NASTY}'"),
            principal: "drill-bot".to_owned(),
            principal_from: PrincipalSource::Controller,
            started_at: at(0),
            finished_at: at(45_000),
            passed: false,
            subscribers: vec![ChannelSubscribers {
                channel: Channel::parse("ivr").unwrap(),
                simulated: 2,
                attached: 0,
            }],
            stages: vec![StageReport {
                severity: Severity::Sev3,
                step: Step::Declare,
                revision: 3,
                modes: vec![NASTY.to_owned()],
                approval: None,
                apply_within_ms: 2000,
                channels: vec![ChannelTiming {
                    channel: Channel::parse("ivr").unwrap(),
                    subscribers: 2,
                    applied: 1,
                    p50_ms: 150.0,
                    p99_ms: 2600.0,
                    max_ms: 2600.0,
                    within_limit: false,
                }],
                expectations: vec![
                    expectation("ivr", "payment.refund", NASTY, "deny", "allow", NASTY),
                    expectation(
                        "ivr",
                        "account.lookup",
                        "default",
                        "allow",
                        "allow",
                        "allow",
                    ),
                ],
                rejects: vec![Reject {
                    subscriber: "ivr-1".to_owned(),
                    revision: 3,
                    reason: NASTY.to_owned(),
                }],
                fault: Some(FaultReport {
                    kind: Fault::RestartController,
                    severity: Severity::Sev3,
                    affected: 2,
                    hit: vec![FaultHit {
                        channel: Channel::parse("ivr").unwrap(),
                        subscribers: vec!["ivr-0".to_owned(), "ivr-1".to_owned()],
                    }],
                    recovered: false,
                    recovery_ms: 30_000.0,
                }),
            }],
            restoration: Some(RestorationReport {
                revision: 4,
                approval: None,
                checked: 2,
                decisions: vec![
                    expectation(
                        "ivr",
                        "payment.refund",
                        NASTY,
                        "allow",
                        "deny",
                        &format!("deny because {NASTY}"),
                    ),
                    expectation(
                        "ivr",
                        "account.lookup",
                        "default",
                        "allow",
                        "allow",
                        "allow",
                    ),
                ],
                not_restored: vec!["ivr payment.refund: deny".to_owned()],
                left_active: 1,
            }),
            failures: vec![
                format!("sev3: ivr payment.refund ({NASTY}) -> deny: decided allow"),
                "sev3: ivr applied in 2600.0 ms, limit 2000 ms".to_owned(),
            ],
            journal: vec![
                event(0, "declared", json!({"incident": "inc-2"})),
                event(
                    2_600,
                    "reject",
                    json!({"subscriber": "ivr-1", "reason": NASTY}),
                ),
            ],
        };
        vec![passing, failing]
    }

    // === escaping ===

    #[test]
    fn markdown_escapes_text() {
        #[track_caller]
        fn check(text: &str, expected: &str) {
            assert_eq!(md(text), expected, "md({text:?})");
        }
        check("a|b", r"a\|b");
        check("one\ntwo\r\nthree\rfour", "one<br>two<br>three<br>four");
        check("<b>&", r"\<b>\&");
        check("> quote -> x", r"\> quote -> x");
        check("account.password_reset", "account.password_reset");
        check(
            "_em_ *strong* `code` [link]",
            r"\_em\_ \*strong\* \`code\` \[link\]",
        );
        check(r"back\slash|", r"back\\slash\|");
        check("# heading", r"\# heading");
        check("- item", r"\- item");
        check("drill-0001", "drill-0001");
        check("12. item", r"12\. item");
        check("v1.2", "v1.2");
        check("bell\u{7}\u{1b}\ttab", "bell tab");
        check(NASTY, NASTY_MD);
    }

    /// What the junit writer makes of `text` in an attribute value and in
    /// element content.
    fn xml(text: &str) -> (String, String) {
        let mut writer = Writer::new(Vec::new());
        let start = element("a", [("v", text.to_owned())]);
        writer.write_event(Event::Start(start.borrow())).unwrap();
        writer
            .write_event(Event::Text(BytesText::new(&allowed_in_xml(text))))
            .unwrap();
        writer.write_event(Event::End(start.to_end())).unwrap();
        let written = String::from_utf8(writer.into_inner()).unwrap();
        let (attribute, content) = written
            .strip_prefix("<a v=\"")
            .and_then(|w| w.strip_suffix("</a>"))
            .and_then(|w| w.split_once("\">"))
            .unwrap_or_else(|| panic!("{written}"));
        (attribute.to_owned(), content.to_owned())
    }

    #[test]
    fn xml_escapes_text() {
        #[track_caller]
        fn check(text: &str, expected: &str) {
            assert_eq!(xml(text).0, expected, "xml({text:?})");
        }
        check(
            r#"a<b>&"c"'d'"#,
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;d&apos;",
        );
        check("x\u{0}y\u{1b}z\u{fffe}\u{ffff}!", "xyz!");
        check("line\nnext\r\tend", "line&#10;next&#13;&#9;end");
        assert_eq!(xml("line\nnext\r\tend<").1, "line\nnext&#13;\tend&lt;");
        assert_eq!(xml("x\u{0}y\u{1b}z\u{fffe}\u{ffff}!").1, "xyz!");
        check(
            "é \u{d7ff} \u{e000} \u{10ffff}",
            "é \u{d7ff} \u{e000} \u{10ffff}",
        );
    }

    // === junit.xml ===

    #[test]
    fn junit_has_one_case_per_check() {
        let xml = junit(&reports());
        assert!(
            xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
            "{xml}"
        );
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let root = doc.root_element();
        assert!(root.has_tag_name("testsuites"));
        assert_eq!(
            (root.attribute("tests"), root.attribute("failures")),
            (Some("18"), Some("6"))
        );

        let suites: Vec<_> = root
            .children()
            .filter(|n| n.has_tag_name("testsuite"))
            .map(|s| {
                let attr = |name| s.attribute(name).unwrap_or_default().to_owned();
                (attr("name"), attr("tests"), attr("failures"), attr("time"))
            })
            .collect();
        let suite = |name: &str, tests: &str, failures: &str, time: &str| {
            (
                name.to_owned(),
                tests.to_owned(),
                failures.to_owned(),
                time.to_owned(),
            )
        };
        assert_eq!(
            suites,
            [
                suite("drill: login_storm", "11", "0", "12.500"),
                suite("drill: fraud_wave", "7", "6", "45.000"),
            ]
        );

        // (classname, name, failure message)
        let cases: Vec<(String, String, Option<String>)> = doc
            .descendants()
            .filter(|n| n.has_tag_name("testcase"))
            .map(|case| {
                let failure = case.children().find(|n| n.has_tag_name("failure"));
                (
                    case.attribute("classname").unwrap_or_default().to_owned(),
                    case.attribute("name").unwrap_or_default().to_owned(),
                    failure.map(|f| f.attribute("message").unwrap_or_default().to_owned()),
                )
            })
            .collect();
        let pass = |class: &str, name: &str| (class.to_owned(), name.to_owned(), None);
        let fail = |class: &str, name: &str, message: &str| {
            (class.to_owned(), name.to_owned(), Some(message.to_owned()))
        };
        let expected = vec![
            pass(
                "drill.login_storm.sev3",
                "sev3: web account.password_reset (confidence 0.9, methods push) -> deny",
            ),
            pass("drill.login_storm.sev3", "sev3: web applies within 5000 ms"),
            pass(
                "drill.login_storm.sev3",
                "sev3: chatbot applies within 5000 ms",
            ),
            pass("drill.login_storm.sev3", "sev3: no snapshot rejected"),
            // The fault, with the stage it struck.
            pass(
                "drill.login_storm.sev3",
                "sev3: fault kill-subscribers=10% recovers",
            ),
            pass(
                "drill.login_storm.sev2",
                "sev2: chatbot refund.issue (default) -> deny",
            ),
            pass("drill.login_storm.sev2", "sev2: web applies within 5000 ms"),
            pass(
                "drill.login_storm.sev2",
                "sev2: chatbot applies within 5000 ms",
            ),
            pass("drill.login_storm.sev2", "sev2: no snapshot rejected"),
            pass(
                "drill.login_storm",
                "restoration: every channel back to allow",
            ),
            pass("drill.login_storm", "verdict"),
            fail(
                "drill.fraud_wave.sev3",
                &format!("sev3: ivr payment.refund ({NASTY_XML}) -> deny"),
                "expected deny, decided allow",
            ),
            pass(
                "drill.fraud_wave.sev3",
                "sev3: ivr account.lookup (default) -> allow",
            ),
            fail(
                "drill.fraud_wave.sev3",
                "sev3: ivr applies within 2000 ms",
                "1 of 2 subscribers applied; slowest 2600.0 ms (limit 2000 ms)",
            ),
            fail(
                "drill.fraud_wave.sev3",
                "sev3: no snapshot rejected",
                "1 snapshot(s) rejected",
            ),
            fail(
                "drill.fraud_wave.sev3",
                "sev3: fault restart-controller recovers",
                "not recovered after 30000.0 ms",
            ),
            fail(
                "drill.fraud_wave",
                "restoration: every channel back to allow",
                "1 of 2 decisions not back to allow, 1 activation(s) left after cleanup",
            ),
            fail(
                "drill.fraud_wave",
                "verdict",
                &format!(
                    "sev3: ivr payment.refund ({NASTY_XML}) -> deny: decided allow; \
                     sev3: ivr applied in 2600.0 ms, limit 2000 ms"
                ),
            ),
        ];
        assert_eq!(cases, expected);

        // Failure details keep the text as written, minus what XML forbids.
        let details: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("failure"))
            .map(|f| f.text().unwrap_or_default())
            .collect();
        assert_eq!(details[0], format!("decision: {NASTY_XML}"));
        assert_eq!(
            details[2],
            format!("ivr-1 rejected revision 3: {NASTY_XML}")
        );
        let title = doc
            .descendants()
            .find(|n| n.has_tag_name("property") && n.attribute("name") == Some("title"))
            .and_then(|n| n.attribute("value"));
        assert_eq!(title, Some("Login storm"));

        // Each suite says what ran it, and on what.
        let properties: Vec<Vec<(&str, &str)>> = doc
            .descendants()
            .filter(|n| n.has_tag_name("properties"))
            .map(|p| {
                p.children()
                    .filter(|n| n.has_tag_name("property"))
                    .map(|n| (n.attribute("name").unwrap(), n.attribute("value").unwrap()))
                    .filter(|(name, _)| {
                        !matches!(*name, "title" | "namespace" | "controller" | "incident_id")
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            properties[0],
            [
                ("safemode_version", "1.2.3"),
                ("catalog_fingerprint", "f1e2d3"),
                ("runbook_file", "runbooks/login_storm.yaml"),
                (
                    "command_line",
                    "safemode drill run --local runbooks/login_storm.yaml"
                ),
                ("principal", "alice"),
                ("principal_from", "from --principal or $USER"),
                ("started_at", "2024-05-01T10:00:00Z"),
            ]
        );
        assert_eq!(properties[1][2], ("runbook_file", "built into safemode"));
        assert_eq!(
            properties[1][3],
            (
                "command_line",
                format!("safemode --token *** drill run fraud_wave '{NASTY_XML}'").as_str()
            )
        );
        assert_eq!(
            properties[1][5],
            ("principal_from", "as the controller saw it")
        );

        // What the fault hit and the decisions restored, as the cases'
        // output.
        let outputs: Vec<(&str, &str)> = doc
            .descendants()
            .filter(|n| n.has_tag_name("system-out"))
            .map(|o| {
                (
                    o.parent().unwrap().attribute("name").unwrap_or_default(),
                    o.text().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            outputs,
            [
                (
                    "sev3: fault kill-subscribers=10% recovers",
                    "hit chatbot: drill-0001-chatbot-1"
                ),
                (
                    "restoration: every channel back to allow",
                    "restored: web account.password_reset (confidence 0.9, methods push) -> allow\n\
                     restored: chatbot refund.issue (default) -> allow"
                ),
                (
                    "sev3: fault restart-controller recovers",
                    "hit ivr: ivr-0, ivr-1"
                ),
                (
                    "restoration: every channel back to allow",
                    &format!(
                        "NOT restored: ivr payment.refund ({NASTY_XML}) -> deny because {NASTY_XML}\n\
                         restored: ivr account.lookup (default) -> allow"
                    )
                ),
            ]
        );
        // A failure comes before the output, as the schema orders them.
        let failed_fault = doc
            .descendants()
            .find(|n| n.attribute("name") == Some("sev3: fault restart-controller recovers"))
            .unwrap();
        let children: Vec<&str> = failed_fault
            .children()
            .filter(|n| n.is_element())
            .map(|n| n.tag_name().name())
            .collect();
        assert_eq!(children, ["failure", "system-out"]);
    }

    /// The engine says "within limit" but not every subscriber applied the
    /// stage: one that never applied it did not apply it in time.
    #[test]
    fn a_channel_that_did_not_fully_apply_misses_its_limit() {
        let mut report = reports().swap_remove(0);
        report.stages[0].channels[0].applied = 2;
        let xml = junit(std::slice::from_ref(&report));
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let failed: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("failure"))
            .map(|f| {
                let case = f.parent().unwrap().attribute("name").unwrap_or_default();
                (case, f.attribute("message").unwrap_or_default())
            })
            .collect();
        assert_eq!(
            failed,
            [(
                "sev3: web applies within 5000 ms",
                "2 of 3 subscribers applied; slowest 31.0 ms (limit 5000 ms)"
            )]
        );
        let md = markdown(&[report]);
        assert!(
            md.contains("| web | 3 | 2 | 12.3 ms | 30.0 ms | 31.0 ms | 5000.0 ms | **no** |"),
            "{md}"
        );
    }

    #[test]
    fn junit_without_runbooks_is_an_empty_suite_list() {
        let xml = junit(&[]);
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        assert_eq!(doc.root_element().attribute("tests"), Some("0"));
        assert_eq!(
            doc.root_element()
                .children()
                .filter(|n| n.is_element())
                .count(),
            0
        );
    }

    // === report.md ===

    /// The cells of a table row, split on unescaped `|` as GitHub does.
    fn cells(row: &str) -> Vec<String> {
        let mut cells = vec![String::new()];
        let mut chars = row.trim().chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    let cell = cells.last_mut().unwrap();
                    cell.push(c);
                    cell.extend(chars.next());
                }
                '|' => cells.push(String::new()),
                c => cells.last_mut().unwrap().push(c),
            }
        }
        // A row starts and ends with `|`: drop the empty ends.
        cells[1..cells.len() - 1]
            .iter()
            .map(|c| c.trim().to_owned())
            .collect()
    }

    /// Rows of every table whose header is `header`, header excluded.
    fn table_rows(md: &str, header: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut lines = md.lines();
        while let Some(line) = lines.next() {
            if line == header {
                let width = cells(header).len();
                let separator = lines.next().unwrap_or_default();
                assert_eq!(cells(separator).len(), width, "{separator}");
                for row in lines.by_ref().take_while(|l| l.starts_with('|')) {
                    let row = cells(row);
                    assert_eq!(
                        row.len(),
                        width,
                        "a row of {header} has the wrong width: {row:?}"
                    );
                    rows.push(row);
                }
            }
        }
        rows
    }

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn markdown_report_has_verdicts_timings_and_expectations() {
        let report = markdown(&reports());
        assert_eq!(
            report.lines().next(),
            Some("# Drill: **FAIL**: 1 of 2 runbooks passed")
        );
        assert!(
            !report.chars().any(|c| c.is_control() && c != '\n'),
            "{report}"
        );

        assert_eq!(
            table_rows(&report, "| runbook | verdict | namespace | failures |"),
            [
                row(&["login_storm", "PASS", "drill-0001", "0"]),
                row(&["fraud_wave", "**FAIL**", "drill-0002", "2"]),
            ]
        );
        assert!(report.contains("\n## login_storm: PASS\n"), "{report}");
        assert!(report.contains("\n## fraud_wave: **FAIL**\n"), "{report}");

        let timings = table_rows(
            &report,
            "| channel | subscribers | applied | p50 | p99 | max | limit | within limit |",
        );
        assert_eq!(
            timings,
            [
                row(&[
                    "web",
                    "3",
                    "3",
                    "12.3 ms",
                    "30.0 ms",
                    "31.0 ms",
                    "5000.0 ms",
                    "yes"
                ]),
                row(&[
                    "chatbot",
                    "3",
                    "3",
                    "12.3 ms",
                    "30.0 ms",
                    "40.0 ms",
                    "5000.0 ms",
                    "yes"
                ]),
                row(&[
                    "web",
                    "3",
                    "3",
                    "12.3 ms",
                    "30.0 ms",
                    "20.0 ms",
                    "5000.0 ms",
                    "yes"
                ]),
                row(&[
                    "chatbot",
                    "3",
                    "3",
                    "12.3 ms",
                    "30.0 ms",
                    "25.0 ms",
                    "5000.0 ms",
                    "yes"
                ]),
                row(&[
                    "ivr",
                    "2",
                    "1",
                    "150.0 ms",
                    "2600.0 ms",
                    "2600.0 ms",
                    "2000.0 ms",
                    "**no**"
                ]),
            ]
        );

        let expectations = table_rows(
            &report,
            "| result | channel | action | context | expected | actual | decision |",
        );
        assert_eq!(expectations.len(), 4, "{expectations:?}");
        assert_eq!(
            expectations[2],
            row(&[
                "**FAIL**",
                "ivr",
                "payment.refund",
                NASTY_MD,
                "deny",
                "allow",
                NASTY_MD
            ])
        );
        assert_eq!(expectations[3][0], "PASS");

        for expected in [
            // Failures, prominently, before the stages.
            "### Failures\n\n- **sev3: ivr payment.refund (amount \\<100> \\& \"EUR\" 'x' \\| y<br>nextline) -> deny: decided allow**\n",
            "- Approval: request req-7 by alice, approved by bob\n",
            "- Approval: request req-8 by alice, approved by carol\n",
            "- Subscribers: web: 3 (3 simulated, 0 attached); chatbot: 3 (2 simulated, 1 attached)\n",
            "- Time: 2024-05-01T10:00:00.000Z to 2024-05-01T10:00:12.500Z (12500.0 ms)\n",
            "#### Fault: PASS\n\n- Injected: kill-subscribers=10% during sev3\n",
            "- Subscribers hit:\n  - chatbot: drill-0001-chatbot-1\n- Recovered: yes, in 850.0 ms\n",
            "#### Fault: **FAIL**\n",
            "  - ivr: ivr-0, ivr-1\n",
            // What ran the drill, and on what.
            "- Version: safemode 1.2.3\n- Catalogue fingerprint: f1e2d3\n\
             - Runbook file: runbooks/login_storm.yaml\n\
             - Command line: safemode drill run --local runbooks/login_storm.yaml\n\
             - Run by: alice (from --principal or $USER)\n\
             - Started: 2024-05-01T10:00:00.000Z\n",
            "- Runbook file: built into safemode\n",
            "- Run by: drill-bot (as the controller saw it)\n",
            // The modes, by name.
            "- Revision: 5\n- Modes: lockdown\n",
            "- Revision: 6\n- Modes: lockdown, refund-freeze\n",
            "- Recovered: **no**, gave up after 30000.0 ms\n",
            "Rejected snapshots: **1**\n\n- ivr-1 rejected revision 3: amount \\<100>",
            "### Restoration: **FAIL**\n",
            "  - **ivr payment.refund: deny**\n",
            "- Activations left after cleanup: **1**\n",
        ] {
            assert!(
                report.contains(expected),
                "missing {expected:?} in\n{report}"
            );
        }
        let failures = report.find("### Failures").unwrap();
        assert!(
            failures
                < report
                    .find("### Stage 1: sev3 (declare)\n\n- Revision: 3")
                    .unwrap()
        );
        assert_eq!(
            report.matches("### Failures").count(),
            1,
            "only the failed drill lists failures"
        );
        // The fault sits under the stage it struck, before the next one.
        let stage_1 = report.find("### Stage 1: sev3 (declare)").unwrap();
        let fault = report.find("#### Fault: PASS").unwrap();
        let stage_2 = report.find("### Stage 2: sev2 (escalate)").unwrap();
        assert!(stage_1 < fault && fault < stage_2, "{report}");

        // Every decision checked at restoration, with the modes behind it.
        assert_eq!(
            table_rows(
                &report,
                "| restored | channel | action | context | effect | decision |"
            ),
            [
                row(&[
                    "yes",
                    "web",
                    "account.password_reset",
                    "confidence 0.9, methods push",
                    "allow",
                    "allow"
                ]),
                row(&[
                    "yes",
                    "chatbot",
                    "refund.issue",
                    "default",
                    "allow",
                    "allow"
                ]),
                row(&[
                    "**no**",
                    "ivr",
                    "payment.refund",
                    NASTY_MD,
                    "deny",
                    &format!("deny because {NASTY_MD}")
                ]),
                row(&["yes", "ivr", "account.lookup", "default", "allow", "allow"]),
            ]
        );
    }

    #[test]
    fn markdown_without_runbooks_fails() {
        assert_eq!(markdown(&[]), "# Drill: **FAIL**: no runbook was drilled\n");
    }

    // === journal.json ===

    #[test]
    fn journal_lists_every_event_per_runbook() {
        let text = journal(&reports());
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let runbooks = parsed["runbooks"].as_array().unwrap();
        let summary: Vec<_> = runbooks
            .iter()
            .map(|r| {
                (
                    r["runbook"].clone(),
                    r["namespace"].clone(),
                    r["passed"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (json!("login_storm"), json!("drill-0001"), json!(true)),
                (json!("fraud_wave"), json!("drill-0002"), json!(false)),
            ]
        );
        assert_eq!(
            runbooks[0]["events"],
            json!([
                {"at": "2024-05-01T10:00:00Z", "event": "declared",
                 "detail": {"incident": "inc-1", "severity": "sev3"}},
                {"at": "2024-05-01T10:00:00.04Z", "event": "stage_applied", "detail": {"revision": 5}},
                {"at": "2024-05-01T10:00:12.5Z", "event": "resolved", "detail": {"revision": 7}},
            ])
        );
        let parsed: Timestamp = runbooks[0]["events"][1]["at"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed, at(40));
        assert_eq!(runbooks[1]["events"][1]["detail"]["reason"], json!(NASTY));
        // Each runbook says what ran it, and on what.
        let header: Vec<_> = [
            "safemode_version",
            "catalog_fingerprint",
            "runbook_file",
            "command_line",
            "principal",
            "principal_from",
            "started_at",
        ]
        .iter()
        .map(|field| runbooks[0][field].clone())
        .collect();
        assert_eq!(
            header,
            [
                json!("1.2.3"),
                json!("f1e2d3"),
                json!("runbooks/login_storm.yaml"),
                json!("safemode drill run --local runbooks/login_storm.yaml"),
                json!("alice"),
                json!("caller"),
                json!("2024-05-01T10:00:00Z"),
            ]
        );
        assert_eq!(runbooks[1]["runbook_file"], json!(null));
        assert_eq!(runbooks[1]["principal_from"], json!("controller"));
        assert!(
            text.contains("\n  \"runbooks\": ["),
            "pretty-printed: {text}"
        );
    }

    // === writing ===

    #[test]
    fn write_creates_the_directory_and_replaces_the_files() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("reports/run-1");
        let reports = reports();
        let expected = [
            (dir.join(MARKDOWN_FILE), markdown(&reports)),
            (dir.join(JUNIT_FILE), junit(&reports)),
            (dir.join(JOURNAL_FILE), journal(&reports)),
        ];
        // Twice: the second run replaces the files of the first.
        for reports in [&reports[1..], &reports[..]] {
            let paths = write(&dir, reports).unwrap();
            assert_eq!(
                paths,
                expected.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
            );
        }
        for (path, text) in &expected {
            assert_eq!(
                &std::fs::read_to_string(path).unwrap(),
                text,
                "{}",
                path.display()
            );
        }
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["journal.json", "junit.xml", "report.md"],
            "no temporary files left"
        );
    }

    #[test]
    fn write_says_which_path_failed() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let error = write(&file.join("reports"), &reports()).unwrap_err();
        assert!(error.to_string().contains("not-a-dir"), "{error}");
    }
}
