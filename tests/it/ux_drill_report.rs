//! Issue 13, item 10: the drill report names modes, says which safemode,
//! catalogue, runbook file and command produced it, who ran it and when,
//! places the fault under the stage it struck with the subscribers it hit,
//! and lists the decisions checked at restoration, in every format (the
//! text and JSON on stdout, report.md, junit.xml and journal.json). A
//! refused drill is one line on stderr and changes nothing.
//!
//! The drill runs against a real controller that requires tokens and
//! serves the drilled runbook file, so the principal is the one the
//! controller authenticated and the fingerprint is the one it computes.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use safemode_policy::catalog::Catalog;
use safemode_wire::proto;

use crate::support::{Control, Principals, TestServer, control_as, safemode};

/// A guarded controller serving the shipped fraud-spike runbook from a
/// directory of its own (and the built-in modes).
struct Setup {
    server: TestServer,
    principals: Principals,
    /// The runbook file the drill is given (the one the controller serves).
    runbook: PathBuf,
    /// Holds the runbook directory and the report directories.
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let runbooks = dir.path().join("runbooks");
        std::fs::create_dir(&runbooks).unwrap();
        let runbook = runbooks.join("fraud-spike.yaml");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/fraud-spike.yaml"),
            &runbook,
        )
        .unwrap();
        let principals = Principals::new();
        let served = runbooks.clone();
        let server = TestServer::with_tokens_and(&principals, move |config| {
            config.runbooks_dir = Some(served);
        })
        .await;
        Setup {
            server,
            principals,
            runbook,
            dir,
        }
    }

    fn runbook(&self) -> &str {
        self.runbook.to_str().unwrap()
    }

    async fn admin(&self) -> Control {
        control_as(&self.server, Some(self.principals.token("admin"))).await
    }

    /// `safemode [-o json] drill run fraud-spike.yaml` up sev3 then sev1,
    /// killing half the subscribers while sev1 is active, writing its report
    /// files into `reports`.
    async fn drill(&self, json: bool, reports: &Path) -> Drilled {
        let mut args = vec![
            "--server",
            self.server.url.as_str(),
            "--token",
            self.principals.token("drill"),
        ];
        if json {
            args.extend(["-o", "json"]);
        }
        args.extend([
            "drill",
            "run",
            self.runbook(),
            "--channels",
            "web=2,mobile=2",
            "--severity-path",
            "sev3,sev1",
            "--fault",
            "kill-subscribers=50%",
            "--approver-token",
            self.principals.token("approver"),
            "--report",
            reports.to_str().unwrap(),
        ]);
        let before = Timestamp::now();
        let output = safemode(&args).await;
        let after = Timestamp::now();
        let read = |name: &str| std::fs::read_to_string(reports.join(name)).unwrap();
        Drilled {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            markdown: read("report.md"),
            junit: read("junit.xml"),
            journal: serde_json::from_str(&read("journal.json")).unwrap(),
            before,
            after,
        }
    }

    /// What a refused command must leave as it was: the live namespace and
    /// the drill namespace a case names (revision and activations), and the
    /// whole audit log.
    async fn snapshot(&self) -> (Vec<(i64, usize)>, Vec<proto::AuditEntry>) {
        let mut admin = self.admin().await;
        let mut namespaces = Vec::new();
        for namespace in ["live", "drill-refused"] {
            let status = admin
                .get_status(proto::GetStatusRequest {
                    namespace: namespace.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            namespaces.push((status.revision, status.activations.len()));
        }
        let audit = admin
            .get_audit(proto::GetAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        (namespaces, audit)
    }
}

/// One drill's outputs.
struct Drilled {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    markdown: String,
    junit: String,
    journal: serde_json::Value,
    /// The drill started after this and finished before `after`.
    before: Timestamp,
    after: Timestamp,
}

impl Drilled {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", self.stdout, self.stderr))
    }
}

/// The number of the first line of `text` that starts with `start`, once
/// indented; `None` when none does.
fn line_of(text: &str, start: &str) -> Option<usize> {
    text.lines().position(|l| l.trim_start().starts_with(start))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_report_names_what_ran_and_where_the_fault_struck() {
    let setup = Setup::start().await;
    let text = setup.drill(false, &setup.dir.path().join("text")).await;
    let json_run = setup.drill(true, &setup.dir.path().join("json")).await;
    assert_eq!(text.code, Some(0), "{}{}", text.stdout, text.stderr);
    assert_eq!(
        json_run.code,
        Some(0),
        "{}{}",
        json_run.stdout,
        json_run.stderr
    );
    assert!(text.stderr.is_empty(), "{}", text.stderr);
    let json = json_run.json();
    let drill = &json["drills"][0];

    // What the controller computes for the files it serves.
    let served = Catalog::load(None, Some(setup.runbook.parent().unwrap()))
        .unwrap()
        .fingerprint;
    let version = env!("CARGO_PKG_VERSION");
    let token = setup.principals.token("drill");
    let approver_token = setup.principals.token("approver");
    let stages = drill["stages"].as_array().expect("stages");
    let fault = &stages[1]["fault"];
    let hit: Vec<String> = fault["hit"]
        .as_array()
        .expect("the subscribers hit")
        .iter()
        .flat_map(|h| h["subscribers"].as_array().unwrap())
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let decisions = drill["restoration"]["decisions"]
        .as_array()
        .expect("the decisions checked at restoration");
    let journal = &text.journal["runbooks"][0];
    let xml = roxmltree::Document::parse(&text.junit).expect("junit.xml is XML");
    let property = |name: &str| {
        xml.descendants()
            .find(|n| n.has_tag_name("property") && n.attribute("name") == Some(name))
            .and_then(|n| n.attribute("value"))
            .unwrap_or_else(|| panic!("no property {name} in {}", text.junit))
            .to_string()
    };

    type Check<'a> = Box<dyn Fn() -> Result<(), String> + 'a>;
    let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    let cases: Vec<(&str, Check)> = vec![
        (
            "modes by name, never an activation id",
            Box::new(|| {
                for (format, output) in [
                    ("text", text.stdout.as_str()),
                    ("report.md", text.markdown.as_str()),
                    ("json", json_run.stdout.as_str()),
                    ("junit.xml", text.junit.as_str()),
                ] {
                    expect(!output.contains("act_"), format!("{format} cites act_ ids"))?;
                }
                expect(
                    line_of(&text.stdout, "sev3 (declare)")
                        .is_some_and(|_| text.stdout.contains("modes throttle-high-risk")),
                    "the text names the stage's modes".into(),
                )?;
                expect(
                    text.markdown.contains("- Modes: throttle-high-risk\n"),
                    "report.md names the stage's modes".into(),
                )?;
                expect(
                    text.markdown.contains("because throttle-high-risk"),
                    "report.md names the modes behind a decision".into(),
                )?;
                expect(
                    stages[0]["modes"] == serde_json::json!(["throttle-high-risk"]),
                    format!("json modes: {}", stages[0]["modes"]),
                )?;
                let sev1: Vec<&str> = stages[1]["modes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap())
                    .collect();
                for mode in [
                    "throttle-high-risk",
                    "review-refunds-payouts",
                    "step-up-account-changes",
                ] {
                    expect(sev1.contains(&mode), format!("{mode} not in {sev1:?}"))?;
                }
                Ok(())
            }),
        ),
        (
            "the safemode version",
            Box::new(|| {
                expect(
                    drill["safemode_version"] == version,
                    format!("json: {}", drill["safemode_version"]),
                )?;
                expect(
                    text.stdout.contains(&format!("safemode {version}, ")),
                    "text".into(),
                )?;
                expect(
                    text.markdown
                        .contains(&format!("- Version: safemode {version}\n")),
                    "report.md".into(),
                )?;
                expect(property("safemode_version") == version, "junit".into())?;
                expect(journal["safemode_version"] == version, "journal".into())
            }),
        ),
        (
            "the catalogue fingerprint, the controller's and stable",
            Box::new(|| {
                expect(served.len() == 64, format!("fingerprint {served}"))?;
                expect(
                    drill["catalog_fingerprint"] == served.as_str(),
                    format!("json: {} (served {served})", drill["catalog_fingerprint"]),
                )?;
                expect(
                    text.stdout.contains(&format!("catalogue {served}")),
                    "text".into(),
                )?;
                expect(
                    text.markdown
                        .contains(&format!("- Catalogue fingerprint: {served}\n")),
                    "report.md".into(),
                )?;
                expect(property("catalog_fingerprint") == served, "junit".into())?;
                expect(
                    json_run.journal["runbooks"][0]["catalog_fingerprint"]
                        == journal["catalog_fingerprint"],
                    "the same across two runs".into(),
                )
            }),
        ),
        (
            "the runbook file",
            Box::new(|| {
                let file = setup.runbook();
                expect(
                    drill["runbook_file"] == file,
                    format!("json: {}", drill["runbook_file"]),
                )?;
                expect(
                    text.stdout.contains(&format!("runbook file {file}")),
                    "text".into(),
                )?;
                expect(property("runbook_file") == file, "junit".into())?;
                expect(journal["runbook_file"] == file, "journal".into())
            }),
        ),
        (
            "the command line, tokens redacted",
            Box::new(|| {
                let command = drill["command_line"].as_str().unwrap_or_default();
                expect(
                    command.contains(&format!("drill run {}", setup.runbook()))
                        && command.contains("--token *** ")
                        && command.contains("--approver-token *** ")
                        && command.contains("--fault kill-subscribers=50%"),
                    format!("json: {command}"),
                )?;
                for (format, output) in [
                    ("text", text.stdout.as_str()),
                    ("json", json_run.stdout.as_str()),
                    ("report.md", text.markdown.as_str()),
                    ("junit.xml", text.junit.as_str()),
                ] {
                    expect(
                        !output.contains(token) && !output.contains(approver_token),
                        format!("{format} shows a token"),
                    )?;
                }
                expect(
                    line_of(&text.stdout, "command: ").is_some()
                        && text.stdout.contains("--token *** "),
                    "text".into(),
                )?;
                expect(
                    property("command_line").contains("drill run"),
                    "junit".into(),
                )
            }),
        ),
        (
            "the principal, as the controller saw it",
            Box::new(|| {
                expect(
                    drill["principal"] == "drill" && drill["principal_from"] == "controller",
                    format!("json: {} {}", drill["principal"], drill["principal_from"]),
                )?;
                expect(
                    text.stdout
                        .contains("run by drill (as the controller saw it)"),
                    "text".into(),
                )?;
                expect(
                    text.markdown
                        .contains("- Run by: drill (as the controller saw it)\n"),
                    "report.md".into(),
                )?;
                expect(property("principal") == "drill", "junit".into())
            }),
        ),
        (
            "the start time",
            Box::new(|| {
                let started: Timestamp = drill["started_at"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or(format!("json: {}", drill["started_at"]))?;
                expect(
                    json_run.before <= started && started <= json_run.after,
                    format!("{started} not within the run"),
                )?;
                let started: Timestamp = property("started_at")
                    .parse()
                    .map_err(|e| format!("junit: {e}"))?;
                expect(
                    text.before <= started && started <= text.after,
                    format!("junit {started} not within the run"),
                )?;
                expect(
                    text.stdout.contains(", started 2") && text.markdown.contains("- Started: 2"),
                    "text and report.md".into(),
                )
            }),
        ),
        (
            "the fault under the stage it struck, with the subscribers hit",
            Box::new(|| {
                // The middle of sev3, sev1 is sev1.
                expect(stages[0]["fault"].is_null(), "sev3 has no fault".into())?;
                expect(
                    fault["kind"] == "kill-subscribers=50%" && fault["severity"] == "sev1",
                    format!("json: {fault}"),
                )?;
                expect(
                    !hit.is_empty()
                        && fault["affected"] == hit.len()
                        && hit.iter().all(|s| s.starts_with("drill-")),
                    format!("hit {hit:?} of {fault}"),
                )?;
                expect(
                    drill["fault"] == *fault,
                    "the top-level fault stays for scripts".into(),
                )?;
                // Text: after the sev1 line, before restoration.
                let sev1 = line_of(&text.stdout, "sev1 (escalate)").ok_or("no sev1 line")?;
                let at = line_of(&text.stdout, "fault kill-subscribers=50%:").ok_or("no fault")?;
                let restored = line_of(&text.stdout, "restoration at").ok_or("no restoration")?;
                expect(sev1 < at && at < restored, text.stdout.clone())?;
                let hit_line = line_of(&text.stdout, "hit ").ok_or("no hit line")?;
                expect(at < hit_line && hit_line < restored, text.stdout.clone())?;
                // report.md: under stage 2, before restoration.
                let md = &text.markdown;
                let stage = md
                    .find("### Stage 2: sev1 (escalate)")
                    .ok_or("no stage 2")?;
                let at = md.find("#### Fault: PASS").ok_or("no fault in report.md")?;
                let restored = md.find("### Restoration").ok_or("no restoration")?;
                expect(stage < at && at < restored, md.clone())?;
                expect(
                    md[at..restored].contains("- Subscribers hit:\n  - "),
                    md.clone(),
                )?;
                // junit.xml: the fault case lists the subscribers it hit.
                let out = xml
                    .descendants()
                    .find(|n| {
                        n.attribute("name") == Some("sev1: fault kill-subscribers=50% recovers")
                    })
                    .and_then(|c| c.children().find(|n| n.has_tag_name("system-out")))
                    .and_then(|o| o.text())
                    .ok_or("no fault output in junit.xml")?;
                expect(out.starts_with("hit "), out.to_string())
            }),
        ),
        (
            "the decisions checked at restoration",
            Box::new(|| {
                let restoration = &drill["restoration"];
                expect(
                    !decisions.is_empty() && restoration["checked"] == decisions.len(),
                    format!("json: {restoration}"),
                )?;
                expect(
                    decisions
                        .iter()
                        .all(|d| d["passed"] == true && d["actual"] == "allow"),
                    format!("json: {restoration}"),
                )?;
                let shown = text
                    .stdout
                    .lines()
                    .filter(|l| l.starts_with("    ok "))
                    .count();
                expect(shown == decisions.len(), text.stdout.clone())?;
                expect(
                    text.stdout
                        .contains(&format!("{0}/{0} decisions back to allow", decisions.len())),
                    text.stdout.clone(),
                )?;
                let rows = text
                    .markdown
                    .lines()
                    .skip_while(|l| {
                        *l != "| restored | channel | action | context | effect | decision |"
                    })
                    .skip(2)
                    .take_while(|l| l.starts_with("| yes |"))
                    .count();
                expect(rows == decisions.len(), text.markdown.clone())
            }),
        ),
    ];
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(what, check)| check().err().map(|e| format!("{what}: {e}")))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_drill_is_one_line_and_changes_nothing() {
    let setup = Setup::start().await;
    let url = setup.server.url.as_str();
    let token = setup.principals.token("drill");
    let approver = setup.principals.token("approver");
    let runbook = setup.runbook();
    let reports = setup.dir.path().join("refused");
    let reports = reports.to_str().unwrap();
    let file = setup.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let not_a_dir = file.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[runbook, "--fault", "kill-subscribers=0%"],
            1,
            "error: --fault: 'kill-subscribers=0%': give a share from 1% to 100%",
        ),
        (
            &[runbook, "--fault", "restart-controller"],
            1,
            "needs --local",
        ),
        (
            &[runbook, "--severity-path", "sev3,sev4"],
            1,
            "has no stage for sev4",
        ),
        (&[runbook, "--namespace", "live"], 1, "drill-* namespaces"),
        (&["fraud-spik"], 1, "did you mean 'fraud-spike'?"),
        (&[runbook, "fraud-spike"], 1, "not both"),
        (&[runbook, "--report", not_a_dir], 1, "not a directory"),
        (&[runbook, "--channels", "web=x"], 1, "--channels: "),
    ];
    for (args, code, expected) in cases {
        let before = setup.snapshot().await;
        let mut full = vec![
            "--server",
            url,
            "--token",
            token,
            "drill",
            "run",
            "--approver-token",
            approver,
        ];
        full.extend_from_slice(args);
        if !args.contains(&"--report") {
            full.extend(["--report", reports]);
        }
        if !args.contains(&"--namespace") {
            full.extend(["--namespace", "drill-refused"]);
        }
        let output = safemode(&full).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed to stdout");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: {expected:?} not in {stderr:?}"
        );
        assert!(!stderr.contains(token), "{args:?} shows the token");
        assert_eq!(
            setup.snapshot().await,
            before,
            "{args:?} changed a namespace or the audit log"
        );
        assert!(!Path::new(reports).exists(), "{args:?} wrote a report");
    }
}

/// A local drill of a built-in runbook: the principal is the one given
/// (the in-process controller knows only the drill's own), the runbook is
/// built in, and the fingerprint is the built-in catalogue's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_drill_names_the_caller_and_the_built_in_runbook() {
    let output = safemode(&[
        "--principal",
        "alice",
        "-o",
        "json",
        "drill",
        "run",
        "--local",
        "fraud-spike",
        "--channels",
        "web=2",
        "--severity-path",
        "sev3,sev2",
        "--fault",
        "kill-subscribers=50%",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let drill = &json["drills"][0];
    let fault = &drill["stages"][1]["fault"];
    let cases: &[(&str, serde_json::Value, serde_json::Value)] = &[
        ("principal", drill["principal"].clone(), "alice".into()),
        (
            "principal_from",
            drill["principal_from"].clone(),
            "caller".into(),
        ),
        (
            "runbook_file",
            drill["runbook_file"].clone(),
            serde_json::Value::Null,
        ),
        (
            "catalog_fingerprint",
            drill["catalog_fingerprint"].clone(),
            Catalog::standard().fingerprint.into(),
        ),
        (
            "safemode_version",
            drill["safemode_version"].clone(),
            env!("CARGO_PKG_VERSION").into(),
        ),
        (
            "the first stage's fault",
            drill["stages"][0]["fault"].clone(),
            serde_json::Value::Null,
        ),
        (
            "the fault's stage",
            fault["severity"].clone(),
            "sev2".into(),
        ),
        (
            "subscribers hit",
            fault["hit"]
                .as_array()
                .map_or(0, |h| {
                    h.iter()
                        .map(|c| c["subscribers"].as_array().unwrap().len())
                        .sum::<usize>()
                })
                .into(),
            fault["affected"].clone(),
        ),
    ];
    for (what, got, expected) in cases {
        assert_eq!(got, expected, "{what}: {drill:#}");
    }
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("act_"),
        "{drill:#}"
    );
}

/// An approver token the controller refuses (here the drill's own: nobody
/// approves their own request) is named as refused, not as missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_approver_token_is_named_as_refused() {
    let setup = Setup::start().await;
    let token = setup.principals.token("drill");
    let output = safemode(&[
        "--server",
        setup.server.url.as_str(),
        "--token",
        token,
        "drill",
        "run",
        setup.runbook(),
        "--channels",
        "web=1",
        "--severity-path",
        "sev3,sev1",
        "--approver-token",
        token,
    ])
    .await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("the --approver-token was refused"), "{said}");
    assert!(!said.contains("give --approver-token"), "{said}");
    assert!(!said.contains(token), "the token is shown: {said}");
}
