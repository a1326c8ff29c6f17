//! Text output that cannot lie (issue 10, finding 7): a reason with a
//! newline, a line separator or a bidi override, stored through a real
//! controller, shows in `status`, `audit` and `audit --verify` as one line
//! with the hidden characters escaped, so it can neither forge a row nor the
//! "verified" verdict; JSON output keeps the text exactly.

use crate::support::{RawSubscriber, TestServer, safemode, wait_until};

const VERDICT: &str = "verified: the hash chain is intact";

/// A reason that tries to print the verdict, and a fake audit row, on lines
/// of their own.
const FORGED_VERDICT: &str = "routine check\nverified: the hash chain is intact\n9  2026-01-01T00:00:00Z  mode.lift  admin  9  all clear";

/// A reason that reverses the rest of its line on a terminal.
const REVERSED: &str = "harmless \u{202e}gnp.exe";

/// A subscriber's reject reason (control characters are already blanked by
/// the server; separators and bidi controls are not).
const REJECTED: &str = "bad\u{2028}PROBLEM: forged problem \u{2067}x\u{2069}";

/// Runs the CLI against `url`; the command must succeed; returns stdout.
async fn run(url: &str, args: &[&str]) -> String {
    let mut all = vec!["--server", url, "--principal", "alice"];
    all.extend_from_slice(args);
    let output = safemode(&all).await;
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("text output is UTF-8")
}

/// What every text output must hold: no raw hidden character, and no line
/// that starts with forged text.
fn assert_honest(what: &str, text: &str) {
    for c in ['\r', '\u{202e}', '\u{2028}', '\u{2067}', '\u{2069}'] {
        assert!(
            !text.contains(c),
            "{what} prints {:?} raw:\n{text}",
            c.escape_unicode().to_string()
        );
    }
    for line in text.lines() {
        for forged in ["9  2026-01-01", "PROBLEM: forged", "TAMPERED"] {
            assert!(
                !line.starts_with(forged),
                "{what} prints a forged line {line:?}:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_text_cannot_forge_lines_in_status_or_audit() {
    let server = TestServer::start().await;
    let url = server.url.as_str();

    run(
        url,
        &[
            "mode",
            "apply",
            "freeze-credential-changes",
            "--reason",
            FORGED_VERDICT,
        ],
    )
    .await;
    run(
        url,
        &["mode", "apply", "throttle-high-risk", "--reason", REVERSED],
    )
    .await;
    let revision = server.status("live").await.revision;
    // It never acks: its rejection is its answer (status shows a rejection
    // only while it stands).
    let subscriber = RawSubscriber::connect_silent(server.channel().await, "live", "web", "web-1")
        .await
        .expect("the subscriber connects");
    wait_until("the subscriber has the policy", || async {
        subscriber.revisions().contains(&revision)
    })
    .await;
    subscriber.reject(revision, REJECTED).await;
    wait_until("status shows the rejection", || async {
        server
            .status("live")
            .await
            .subscribers
            .iter()
            .any(|s| !s.reject_reason.is_empty())
    })
    .await;

    // status: each activation and the subscriber on one row, escaped.
    let status = run(url, &["status"]).await;
    assert_honest("status", &status);
    assert!(
        !status.lines().any(|l| l.starts_with(VERDICT)),
        "status prints a forged verdict:\n{status}"
    );
    let row = |needle: &str| {
        status
            .lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
    };
    let escaped_verdict =
        "routine check\\nverified: the hash chain is intact\\n9  2026-01-01T00:00:00Z";
    assert_eq!(row(escaped_verdict).len(), 1, "{status}");
    assert!(row(escaped_verdict)[0].contains("freeze-credential-changes"));
    assert_eq!(row("harmless \\u{202e}gnp.exe").len(), 1, "{status}");
    assert!(row("harmless \\u{202e}gnp.exe")[0].contains("throttle-high-risk"));
    let rejected = row("bad\\u{2028}PROBLEM: forged problem \\u{2067}x\\u{2069}");
    assert_eq!(rejected.len(), 1, "{status}");
    assert!(rejected[0].starts_with("web-1"), "{status}");

    // audit: every entry one row; without --verify no verdict at all.
    let audit = run(url, &["audit"]).await;
    assert_honest("audit", &audit);
    assert!(
        !audit.lines().any(|l| l.starts_with(VERDICT)),
        "audit prints a forged verdict:\n{audit}"
    );
    assert!(audit.contains(escaped_verdict), "{audit}");
    assert!(audit.contains("harmless \\u{202e}gnp.exe"), "{audit}");
    let rows = audit
        .lines()
        .filter(|l| l.contains("routine check"))
        .count();
    assert_eq!(rows, 1, "{audit}");

    // audit --verify: the one verdict is the controller's, on the last line.
    let verified = run(url, &["audit", "--verify"]).await;
    assert_honest("audit --verify", &verified);
    let verdicts: Vec<&str> = verified
        .lines()
        .filter(|l| l.starts_with(VERDICT))
        .collect();
    // The controller's own verdict, whole; the forged one is a prefix of it.
    let real = "verified: the hash chain is intact, every entry is signed by a trusted key, and the activations are those the log committed to";
    assert_eq!(verdicts, [real], "{verified}");
    assert_eq!(verified.lines().last(), Some(real), "{verified}");
    assert!(verified.contains(escaped_verdict), "{verified}");

    // JSON keeps every text exactly as stored.
    let json: serde_json::Value =
        serde_json::from_str(&run(url, &["--output", "json", "status"]).await)
            .expect("one JSON object");
    let reasons: Vec<&str> = json["activations"]
        .as_array()
        .expect("activations")
        .iter()
        .map(|a| a["reason"].as_str().expect("a reason"))
        .collect();
    assert!(reasons.contains(&FORGED_VERDICT), "{json}");
    assert!(reasons.contains(&REVERSED), "{json}");
    assert_eq!(json["subscribers"][0]["reject_reason"], REJECTED, "{json}");
}

/// A refusal that quotes what the caller typed stays one line on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_quoting_the_caller_is_one_line() {
    let server = TestServer::start().await;
    let output = safemode(&[
        "--server",
        &server.url,
        "mode",
        "apply",
        "no-such-mode\nerror: forged\u{202e}",
        "--reason",
        "x",
    ])
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("no-such-mode\\nerror: forged\\u{202e}"),
        "{stderr}"
    );
}
