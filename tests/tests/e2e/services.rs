//! Health and reflection are served from day one.

use concordat_tests::{TestPki, federation_config, spawn_broker};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn health_answers_serving() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    let client = pki.connect(broker.addr, "nca").await.unwrap();
    let mut health = HealthClient::new(client.channel());
    for service in [
        "",
        "concordat.v1.Exchange",
        "concordat.v1.Consent",
        "concordat.v1.Audit",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    let client = pki.connect(broker.addr, "ico").await.unwrap();
    let mut reflection = ServerReflectionClient::new(client.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "concordat.v1.Exchange",
        "concordat.v1.Consent",
        "concordat.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn an_agency_holds_a_bounded_number_of_subscriptions() {
    use concordat_broker::{dispatch::MAX_SUBSCRIPTIONS, refusal::reason_of};
    use concordat_proto::pb::SubscribeRequest;

    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    let client = pki.connect(broker.addr, "ico").await.unwrap();
    let mut open = Vec::new();
    for _ in 0..MAX_SUBSCRIPTIONS {
        let stream = client
            .exchange()
            .subscribe(SubscribeRequest { window: 1 })
            .await
            .unwrap()
            .into_inner();
        open.push(stream);
    }
    let status = client
        .exchange()
        .subscribe(SubscribeRequest { window: 1 })
        .await
        .expect_err("one subscription too many");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("TOO_MANY_SUBSCRIPTIONS")
    );

    // Closing one frees its place (the broker notices the closed stream asynchronously).
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client
            .exchange()
            .subscribe(SubscribeRequest { window: 1 })
            .await
        {
            Ok(_) => break,
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(
                    reason_of(&status).as_deref(),
                    Some("TOO_MANY_SUBSCRIPTIONS")
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("the closed subscription was never released: {status:?}"),
        }
    }
}
