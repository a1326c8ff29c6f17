//! Issue 12, item 2 (part): `serve --http-listen` serves `/healthz` (the
//! process lives) and `/readyz` (namespace live is read and the store and
//! its watch are healthy), and the gRPC health service says what `/readyz`
//! says. A replica on a real etcd that is stopped and started again.

use std::net::SocketAddr;
use std::time::Duration;

use safemode_controller::ControllerConfig;
use safemode_grpc::server::{ServeConfig, SigningKeySource, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::etcd::EtcdCluster;
use crate::support::{TestServer, test_signing_key, wait_for, wait_until};

/// `GET path` over HTTP/1.1: the status code and the body.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, body)
}

/// What the gRPC health service says of the whole server ("").
async fn grpc_health(server: &TestServer) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    let answer = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    answer.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_grpc_health_follow_the_store() {
    let mut etcd = EtcdCluster::start(1).await;
    let server = TestServer::start_with(ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        readiness_interval: Duration::from_millis(100),
        signing_key: SigningKeySource::Key(test_signing_key()),
        store: StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            prefix: "/safemode/".into(),
            tls: Default::default(),
        },
        controller: ControllerConfig {
            catch_up_timeout: Duration::from_millis(300),
            ..ControllerConfig::default()
        },
        ..ServeConfig::default()
    })
    .await;
    let http = server.http_addr().expect("an HTTP listener");

    assert_eq!(get(http, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(get(http, "/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(grpc_health(&server).await, ServingStatus::Serving);
    assert_eq!(get(http, "/nothing-here").await.0, 404);

    // etcd stops: the process lives, the replica is not ready, and says why.
    etcd.kill(0);
    let body = wait_for("/readyz says not ready", || async {
        let (code, body) = get(http, "/readyz").await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(
        body.starts_with("not ready: ") && body.contains("unreachable"),
        "{body}"
    );
    assert_eq!(get(http, "/healthz").await.0, 200);
    wait_until("gRPC health says NOT_SERVING", || async {
        grpc_health(&server).await == ServingStatus::NotServing
    })
    .await;

    // etcd is back: ready again, in both.
    etcd.restart(0).await;
    wait_until("/readyz says ready again", || async {
        get(http, "/readyz").await.0 == 200
    })
    .await;
    wait_until("gRPC health says SERVING again", || async {
        grpc_health(&server).await == ServingStatus::Serving
    })
    .await;
}
