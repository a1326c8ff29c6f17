//! Errors a person can act on when the address or the token is wrong: a
//! `--server` that is not a safemode controller (a web server, a gRPC server
//! without the safemode services), `http://` to a controller that serves
//! TLS, and a token the controller refuses. Each command exits 1 with one
//! line on stderr that names the fix, and `watch` and `decide` stop instead
//! of retrying a token that cannot work.

use std::process::{Output, Stdio};
use std::time::Duration;

use safemode_grpc::server::{ServeConfig, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::support::{Principals, TestServer, safemode, wait_for};

/// A plain HTTP/1.1 server that answers every connection with 404.
async fn http_404() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// An old web server that answers with an error page and no status line
/// (as Python's `http.server` answers the HTTP/2 preface).
async fn web_page_without_status_line() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"<!DOCTYPE HTML>\n<html><body>Error code: 505</body></html>\n")
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// A gRPC server that offers only the standard health service.
async fn grpc_without_safemode() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// A controller serving TLS with a self-signed certificate for 127.0.0.1.
async fn tls_controller() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreConfig::Embedded {
            data_dir: dir.path().join("data"),
        },
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..ServeConfig::default()
    })
    .await;
    (server, dir)
}

/// Checks that `output` is a failure with exit 1, nothing on stdout, and
/// one line on stderr starting with "error: " that holds every one of
/// `expected`.
fn one_line_error(args: &[&str], output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?} should exit 1; stderr: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "{args:?} printed to stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?} should print one line, printed: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    for part in expected {
        assert!(
            stderr.contains(part),
            "{args:?}: expected {part:?} in {stderr:?}"
        );
    }
}

/// Commands that call the control service, and those that subscribe.
const COMMANDS: &[&[&str]] = &[
    &["status"],
    &["mode", "apply", "degraded", "--reason", "test"],
    &["watch", "--channel", "chatbot"],
    &["decide", "--channel", "chatbot", "--action", "order.view"],
];

#[tokio::test]
async fn a_server_that_is_not_safemode_is_named_as_such() {
    let (tls, _dir) = tls_controller().await;
    let tls_as_http = format!("http://{}", tls.addr());
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "an HTTP/1.1 server",
            http_404().await,
            vec!["is not a safemode controller: check --server"],
        ),
        (
            "a web server answering without a status line",
            web_page_without_status_line().await,
            vec!["is not a safemode controller: check --server"],
        ),
        (
            "a gRPC server without safemode",
            grpc_without_safemode().await,
            vec!["is not a safemode controller: check --server"],
        ),
        (
            "http:// to a TLS controller",
            tls_as_http.clone(),
            vec![&tls_as_http, "serves TLS", "use https://"],
        ),
    ];
    for (what, server, expected) in &cases {
        for command in COMMANDS {
            let mut args = vec!["--server", server.as_str()];
            args.extend_from_slice(command);
            let output = tokio::time::timeout(Duration::from_secs(60), safemode(&args))
                .await
                .unwrap_or_else(|_| panic!("{what}: {args:?} did not end"));
            let mut expected = expected.clone();
            expected.push(server);
            one_line_error(&args, &output, &expected);
        }
    }
}

#[tokio::test]
async fn watch_and_decide_stop_when_the_token_is_refused() {
    let principals = Principals::new();
    let server = TestServer::with_tokens(&principals).await;
    let url = format!("http://{}", server.addr());
    let cases: &[(&str, &str, &[&str])] = &[
        // Not a token the server knows: UNAUTHENTICATED.
        (
            "an unknown token",
            "smt_not_a_token",
            &["refused the token", "--token-file"],
        ),
        // A token whose role may not subscribe: PERMISSION_DENIED.
        (
            "a drill token",
            principals.token("drill"),
            &["refused the token", "--token-file"],
        ),
    ];
    for (what, token, expected) in cases {
        for command in [
            &["watch", "--channel", "chatbot"][..],
            &["decide", "--channel", "chatbot", "--action", "order.view"][..],
        ] {
            let mut args = vec!["--server", url.as_str(), "--token", token];
            args.extend_from_slice(command);
            let output = tokio::time::timeout(Duration::from_secs(60), safemode(&args))
                .await
                .unwrap_or_else(|_| panic!("{what}: {args:?} kept retrying"));
            one_line_error(&args, &output, expected);
        }
    }
    // A control command keeps the controller's own words, which name the
    // token or role the call needs.
    let args = [
        "--server",
        url.as_str(),
        "--token",
        "smt_not_a_token",
        "status",
    ];
    let output = safemode(&args).await;
    one_line_error(&args, &output, &["unknown token"]);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("refused the token"),
        "{output:?}"
    );
}

#[tokio::test]
async fn a_watch_whose_token_is_revoked_stops_with_one_line() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.tokens_reload = Duration::from_millis(50);
    })
    .await;
    let url = format!("http://{}", server.addr());
    let args = [
        "--server",
        url.as_str(),
        "--token",
        principals.token("subscriber"),
        "watch",
        "--channel",
        "chatbot",
    ];
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_safemode"))
        .args(args)
        .env_remove("SAFEMODE_SERVER")
        .env_remove("RUST_LOG")
        .env("SAFEMODE_TRUSTED_KEYS", crate::support::key_file_for(&args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The first snapshot is printed: the watch is up.
    let mut stdout = watch.stdout.take().unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(30), stdout.read_exact(&mut first))
        .await
        .expect("watch printed its first snapshot")
        .unwrap();
    // Every token but the subscriber's stays.
    let kept: String = std::fs::read_to_string(principals.file.path())
        .unwrap()
        .lines()
        .filter(|line| !line.contains("subscriber"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(principals.file.path(), kept).unwrap();
    let status = wait_for("the watch to end", || {
        let ended = watch.try_wait().unwrap();
        async move { ended }
    })
    .await;
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    watch
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("refused the token"),
        "{stderr}"
    );
    // Nothing but the reason: no retries, no warnings of them.
    assert_eq!(lines.len(), 1, "{stderr}");
}
