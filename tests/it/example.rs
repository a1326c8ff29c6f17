//! The example channel service (examples/password_reset.rs), as the README's
//! tour runs it: a password reset goes ahead, then is refused with the
//! policy's message once credential changes are frozen, and asks for
//! verification under step-up.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{DEADLINE, TestServer, wait_for};

/// Posts `body` to the example's reset endpoint; returns the status code and
/// the JSON body.
async fn reset(addr: &str, body: &str) -> (u16, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /password-reset HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("the service answers")
        .unwrap();
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let json = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (
        status,
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {response}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_password_reset_service_follows_the_policy() {
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/password_reset");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --examples`)",
        binary.display()
    );
    let server = TestServer::start().await;
    let files = tempfile::tempdir().unwrap();
    let mut service = tokio::process::Command::new(&binary)
        .args([
            "--server",
            &server.url,
            "--listen",
            "127.0.0.1:0",
            "--last-known-good",
        ])
        .arg(files.path().join("web.lkg"))
        .arg("--trusted-keys")
        .arg(server.trusted_keys_file())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(service.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("it says where it listens")
        .unwrap()
        .expect("a line");
    let addr = line.strip_prefix("listening on ").expect(&line).to_string();

    let body = r#"{"account": "a-1001", "confidence": 0.9, "methods": ["push"]}"#;
    let (status, allowed) = wait_for("the service follows the controller", || async {
        let (status, body) = reset(&addr, body).await;
        (body["policy"]["stale"] == false).then_some((status, body))
    })
    .await;
    assert_eq!(
        (status, allowed["status"].as_str()),
        (200, Some("reset_link_sent"))
    );

    // Step-up: an unverified session is asked to verify first.
    let stepped = server.apply(&["step-up-account-changes"]).await;
    let unverified = r#"{"account": "a-1001", "confidence": 0.2}"#;
    let (status, verify) = wait_for("the step-up reaches the service", || async {
        let (status, body) = reset(&addr, unverified).await;
        (body["policy"]["revision"] == stepped).then_some((status, body))
    })
    .await;
    assert_eq!(
        (status, verify["status"].as_str()),
        (401, Some("verify_first")),
        "{verify}"
    );
    assert!(
        !verify["methods"].as_array().unwrap().is_empty(),
        "{verify}"
    );

    let frozen = server.apply(&["freeze-credential-changes"]).await;
    let (status, refused) = wait_for("the freeze reaches the service", || async {
        let (status, body) = reset(&addr, body).await;
        (body["policy"]["revision"] == frozen).then_some((status, body))
    })
    .await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["status"], "refused");
    assert!(
        refused["message"].as_str().is_some_and(|m| !m.is_empty()),
        "the customer is told why: {refused}"
    );
    assert_eq!(
        refused["policy"]["reasons"].as_array().unwrap().len(),
        2,
        "{refused}"
    );

    // Malformed input is refused by the service, not decided.
    let (status, _) = reset(
        &addr,
        r#"{"account": "a-1", "methods": ["carrier_pigeon"]}"#,
    )
    .await;
    assert_eq!(status, 400);
}
