//! What any gRPC tool sees: server reflection and the standard health
//! service (so grpcurl works with no .proto files at hand), and a graceful
//! shutdown that ends open streams.

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{RawSubscriber, TestServer, wait_until};

#[tokio::test]
async fn reflection_lists_every_service_and_describes_the_api() {
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "safemode.v1.SubscriptionService".into(),
            )),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let list = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = list.message_response else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "safemode.v1.ControlService",
        "safemode.v1.SubscriptionService",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    let file = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(file)) = file.message_response else {
        panic!("expected a file descriptor");
    };
    assert!(!file.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "safemode.v1.ControlService",
        "safemode.v1.SubscriptionService",
    ] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_stops_the_server() {
    let mut server = TestServer::start().await;
    let subscriber = RawSubscriber::connect(server.channel().await, "live", "email", "email-1", 0)
        .await
        .unwrap();
    wait_until("the first snapshot arrived", || async {
        !subscriber.revisions().is_empty()
    })
    .await;
    server.stop().await;
    wait_until("the stream ended", || async {
        subscriber.ended.lock().unwrap().is_some()
    })
    .await;
    let status = subscriber.ended.lock().unwrap().clone().unwrap();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}
