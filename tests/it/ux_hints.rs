//! A misspelt name gets "did you mean" and changes nothing; an active
//! incident can be named by its type. Every case runs the real `safemode`
//! binary against a real in-process controller.

use safemode_wire::proto;

use crate::support::{TestServer, observed_state, safemode};

/// Runs `args` against `server`: it must exit 1, print nothing on stdout,
/// one line on stderr starting with "error: " and containing every one of
/// `expected`, and change nothing.
async fn check_refused(server: &TestServer, args: &[&str], expected: &[&str]) {
    let before = observed_state(server).await;
    let mut full = vec!["--server", server.url.as_str()];
    full.extend_from_slice(args);
    let output = safemode(&full).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(output.stdout.is_empty(), "{args:?} printed to stdout");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    for part in expected {
        assert!(
            stderr.contains(part),
            "{args:?}: {part:?} not in {stderr:?}"
        );
    }
    assert_eq!(
        observed_state(server).await,
        before,
        "{args:?} changed the namespace or the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_miss_is_refused_with_the_name_meant() {
    let server = TestServer::start().await;
    server.apply(&["freeze-credential-changes"]).await;

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["mode", "apply", "freez-credential-changes", "--reason", "x"],
            &["unknown mode 'freez-credential-changes'; did you mean 'freeze-credential-changes'?"],
        ),
        (
            &["mode", "lift", "freez-credential-changes", "--reason", "x"],
            &["unknown mode 'freez-credential-changes'; did you mean 'freeze-credential-changes'?"],
        ),
        (
            &["mode", "lift", "no-such-mode-at-all", "--reason", "x"],
            &["unknown mode 'no-such-mode-at-all'; `safemode mode list`"],
        ),
        // A real mode that is simply not active keeps today's answer.
        (
            &["mode", "lift", "step-up-account-changes", "--reason", "x"],
            &["nothing active in namespace live matches 'step-up-account-changes'"],
        ),
        (
            &["decide", "--channel", "chatbto", "--action", "order.view"],
            &["unknown channel 'chatbto'; did you mean 'chatbot'?"],
        ),
        (
            &["decide", "--channel", "web", "--action", "order.veiw"],
            &["unknown action 'order.veiw'; did you mean 'order.view'?"],
        ),
        (
            &[
                "incident",
                "declare",
                "credential-stufing",
                "--severity",
                "sev2",
                "--reason",
                "x",
            ],
            &["unknown incident type 'credential-stufing'; did you mean 'credential-stuffing'?"],
        ),
        (
            &[
                "incident",
                "declare",
                "credential-stuffing",
                "--severity",
                "sev 2",
                "--reason",
                "x",
            ],
            &["--severity: unknown severity 'sev 2'; did you mean 'sev2'?"],
        ),
        // One edit from every severity: no suggestion.
        (
            &[
                "incident",
                "declare",
                "credential-stuffing",
                "--severity",
                "sev0",
                "--reason",
                "x",
            ],
            &["unknown severity 'sev0'; severities are sev4"],
        ),
        (
            &["drill", "run", "fraud-spik"],
            &["no built-in runbook 'fraud-spik' and no such file; did you mean 'fraud-spike'?"],
        ),
    ];
    for (args, expected) in cases {
        check_refused(&server, args, expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_incident_can_be_named_by_its_type() {
    let server = TestServer::start().await;
    let declared = server
        .control()
        .await
        .declare_incident(proto::DeclareIncidentRequest {
            namespace: "live".into(),
            r#type: "credential-stuffing".into(),
            severity: "sev3".into(),
            reason: "login failures climbing".into(),
            ..Default::default()
        })
        .await
        .expect("the incident is declared")
        .into_inner()
        .incident
        .expect("the incident is in the answer");

    let url = server.url.as_str();
    let shown = safemode(&["--server", url, "incident", "show", "credential-stuffing"]).await;
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(
        shown.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(stdout.contains(&declared.id), "{stdout}");

    // The audit log of the incident, by type, is the one by id.
    let by_type = safemode(&[
        "--server",
        url,
        "audit",
        "--incident",
        "credential-stuffing",
    ])
    .await;
    let by_id = safemode(&["--server", url, "audit", "--incident", &declared.id]).await;
    assert_eq!(
        by_type.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_type.stderr)
    );
    assert!(!by_id.stdout.is_empty());
    assert_eq!(by_type.stdout, by_id.stdout);

    // Absent: no active incident of that type, and the near one is offered.
    check_refused(
        &server,
        &["incident", "show", "credential-stufing"],
        &[
            "no active incident of type 'credential-stufing' in namespace live; did you mean 'credential-stuffing'?",
        ],
    )
    .await;
    check_refused(
        &server,
        &["incident", "resolve", "fraud-spike", "--reason", "x"],
        &["no active incident of type 'fraud-spike' in namespace live"],
    )
    .await;
    check_refused(
        &server,
        &["audit", "--incident", "fraud-spike"],
        &["no active incident of type 'fraud-spike' in namespace live"],
    )
    .await;
    // Neither an id nor a type.
    check_refused(
        &server,
        &["incident", "show", "Credential_Stuffing"],
        &["or name an active incident by its type"],
    )
    .await;
    // The type is looked up in the namespace asked for.
    check_refused(
        &server,
        &[
            "incident",
            "escalate",
            "credential-stuffing",
            "--severity",
            "sev2",
            "--namespace",
            "drill-elsewhere",
        ],
        &["no active incident of type 'credential-stuffing' in namespace drill-elsewhere"],
    )
    .await;

    // Named by type, the incident moves like it does by id.
    let moved = safemode(&[
        "--server",
        url,
        "incident",
        "escalate",
        "credential-stuffing",
        "--severity",
        "sev2",
    ])
    .await;
    assert_eq!(
        moved.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let incident = server
        .control()
        .await
        .get_incident(proto::GetIncidentRequest {
            incident_id: declared.id.clone(),
        })
        .await
        .expect("the incident reads")
        .into_inner();
    assert_eq!(incident.severity, "sev2");
}
