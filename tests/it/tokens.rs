//! Revoking a token while the server runs: the tokens file is re-read when
//! it changes; a removed token is refused from then on and the streams it
//! opened end; a new one works; a broken file changes nothing.

use std::time::Duration;

use futures_util::FutureExt as _;
use safemode_controller::auth::{Role, create_token, hash_token};
use safemode_wire::proto;
use safemode_wire::proto::subscribe_request::Message as Outbound;
use safemode_wire::proto::subscribe_response::Message as Inbound;
use safemode_wire::proto::subscription_service_client::SubscriptionServiceClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::{
    DEADLINE, Principals, ServeProcess, TestServer, control_as, safemode, wait_until,
};

/// The tokens-file line of `principal` holding `token` with `role`.
fn line(principal: &str, role: &str, token: &str) -> String {
    format!(
        "- {{principal: {principal}, roles: [{role}], sha256: {}}}\n",
        hash_token(token)
    )
}

/// How the server answers `token` asking for status.
async fn status_code(server: &TestServer, token: &str) -> Code {
    match control_as(server, Some(token))
        .await
        .get_status(proto::GetStatusRequest::default())
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// A subscription of `channel` in `live` as `token`, kept open for as long
/// as the returned sender lives; how the server answered otherwise.
async fn subscribe_as(
    server: &TestServer,
    token: &str,
    channel: &str,
) -> Result<
    (
        mpsc::Sender<proto::SubscribeRequest>,
        tonic::Streaming<proto::SubscribeResponse>,
    ),
    tonic::Status,
> {
    let (out, rx) = mpsc::channel(4);
    out.send(proto::SubscribeRequest {
        message: Some(Outbound::Hello(proto::Hello {
            namespace: "live".into(),
            channel: channel.into(),
            subscriber_id: format!("{channel}-1"),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = SubscriptionServiceClient::with_interceptor(
        server.channel().await,
        safemode_client::Bearer::new(Some(token)).unwrap(),
    )
    .subscribe(ReceiverStream::new(rx))
    .await?
    .into_inner();
    Ok((out, stream))
}

/// Waits for the first snapshot on `stream`.
async fn first_snapshot(stream: &mut tonic::Streaming<proto::SubscribeResponse>) {
    let first = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("a first snapshot")
        .expect("the stream is open")
        .expect("a snapshot, not an error");
    assert!(matches!(first.message, Some(Inbound::Snapshot(_))));
}

/// The status `stream` ends with, skipping what arrives before (such as
/// heartbeats); fails the test if it does not end by the deadline or ends
/// without one.
async fn end_of(mut stream: tonic::Streaming<proto::SubscribeResponse>) -> tonic::Status {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return status,
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await
    .expect("the stream ends before the deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_from_the_file_is_refused_and_its_streams_end() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.tokens_reload = Duration::from_millis(50);
    })
    .await;
    let (commander, subscriber, viewer) = (
        principals.token("commander"),
        principals.token("subscriber"),
        principals.token("viewer"),
    );
    assert_eq!(status_code(&server, commander).await, Code::Ok);

    // A subscriber stream, kept open.
    let (out, mut stream) = subscribe_as(&server, subscriber, "web")
        .await
        .expect("the subscriber token subscribes");
    first_snapshot(&mut stream).await;

    // A broken file changes nothing (the unit test of TokensFile shows it
    // is never taken): the server keeps answering with the tokens it has,
    // and picks up the next good file.
    std::fs::write(principals.file.path(), "- {principal: [unclosed\n").unwrap();
    assert_eq!(status_code(&server, commander).await, Code::Ok);

    // The commander and the subscriber are revoked; carol is new.
    let carol = create_token("carol", &[Role::Commander]).unwrap();
    std::fs::write(
        principals.file.path(),
        format!(
            "{}{}",
            line("viewer", "viewer", viewer),
            line("carol", "commander", &carol.token)
        ),
    )
    .unwrap();
    wait_until("the commander's token is refused", || async {
        status_code(&server, commander).await == Code::Unauthenticated
    })
    .await;
    assert_eq!(status_code(&server, &carol.token).await, Code::Ok);
    assert_eq!(status_code(&server, viewer).await, Code::Ok);

    // The revoked subscriber's open stream ends, saying why.
    let ended = end_of(stream).await;
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(ended.message().contains("revoked"), "{}", ended.message());
    drop(out);

    // And it cannot subscribe again.
    let again = subscribe_as(&server, subscriber, "web")
        .await
        .expect_err("a revoked token cannot subscribe");
    assert_eq!(again.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_may_no_longer_subscribe_is_cut_off_too() {
    let principals = Principals::new();
    let server = TestServer::with_tokens_and(&principals, |config| {
        config.tokens_reload = Duration::from_millis(50);
    })
    .await;
    let subscriber = principals.token("subscriber");
    let (out, mut stream) = subscribe_as(&server, subscriber, "ivr").await.unwrap();
    first_snapshot(&mut stream).await;

    // Same token, now for drills only: it may not follow `live`.
    std::fs::write(
        principals.file.path(),
        line("subscriber", "drill", subscriber),
    )
    .unwrap();
    let status = end_of(stream).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("roles: drill") && status.message().contains("live"),
        "{}",
        status.message()
    );
    // The token itself still works, for what a drill token may do.
    control_as(&server, Some(subscriber))
        .await
        .list_modes(proto::ListModesRequest::default())
        .await
        .expect("a drill token lists the modes");
    drop(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_serve_read_the_tokens_file_at_once() {
    let principals = Principals::new();
    let data = tempfile::tempdir().unwrap();
    let (tokens, dir) = (
        principals.file.path().display().to_string(),
        data.path().display().to_string(),
    );
    // Checked once an hour: only SIGHUP can make it notice in time.
    let server = ServeProcess::start(
        &[
            "--tokens",
            &tokens,
            "--data-dir",
            &dir,
            "--tokens-check-interval",
            "1h",
        ],
        &[],
    );
    let status_as = |token: String| {
        let url = server.url.clone();
        async move {
            safemode(&["--server", &url, "--token", &token, "status"])
                .await
                .status
                .code()
        }
    };
    let commander = principals.token("commander").to_string();
    assert_eq!(status_as(commander.clone()).await, Some(0));

    let viewer = principals.token("viewer");
    std::fs::write(principals.file.path(), line("viewer", "viewer", viewer)).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(hup.success());
    wait_until("the commander's token is refused after SIGHUP", || {
        status_as(commander.clone()).map(|code| code == Some(1))
    })
    .await;
    assert_eq!(status_as(viewer.to_string()).await, Some(0));
}
