//! Issue 13, item 8 (part): the audit log by namespace. `audit --namespace`
//! keeps one namespace's entries (drill entries no longer sit among live
//! ones), the text shows each entry's namespace, and a bad namespace is one
//! line that changes nothing.

use crate::support::{TestServer, safemode};

/// `safemode audit -o json [args]` against `server`: the entries'
/// namespaces, in order.
async fn namespaces(server: &TestServer, args: &[&str]) -> Vec<String> {
    let mut full = vec!["--server", server.url.as_str(), "-o", "json", "audit"];
    full.extend_from_slice(args);
    let output = safemode(&full).await;
    assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
    let audit: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["namespace"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_read_one_namespace_at_a_time() {
    let server = TestServer::start().await;
    let url = server.url.as_str();
    for namespace in ["live", "drill-audit"] {
        let applied = safemode(&[
            "--server",
            url,
            "mode",
            "apply",
            "incident-notice",
            "--namespace",
            namespace,
            "--reason",
            "rehearsal, INC-7",
        ])
        .await;
        assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    }

    let all = namespaces(&server, &[]).await;
    assert!(all.iter().any(|n| n == "live") && all.iter().any(|n| n == "drill-audit"));
    for (namespace, expected) in [("live", "live"), ("drill-audit", "drill-audit")] {
        let kept = namespaces(&server, &["--namespace", namespace]).await;
        assert!(!kept.is_empty(), "no entries for {namespace}");
        assert!(kept.iter().all(|n| n == expected), "{namespace}: {kept:?}");
    }

    // The text shows the namespace of every entry.
    let text = safemode(&["--server", url, "audit", "--namespace", "drill-audit"]).await;
    assert_eq!(text.status.code(), Some(0), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().contains("NAMESPACE"), "{text}");
    assert!(
        lines
            .filter(|l| l.contains("apply"))
            .all(|l| l.contains("drill-audit")),
        "{text}"
    );

    // A namespace that cannot exist: one line, exit 1, and nothing changed.
    let before = all.len();
    let bad = safemode(&["--server", url, "audit", "--namespace", "staging"]).await;
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("staging"),
        "{stderr}"
    );
    assert_eq!(namespaces(&server, &[]).await.len(), before);
}
