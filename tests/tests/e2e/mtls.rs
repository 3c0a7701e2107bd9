//! Mutual TLS and identity: the caller is the Common Name of a certificate from the federation
//! CA; everything else is refused at the first RPC.

use concordat_broker::refusal::reason_of;
use concordat_proto::pb::HelloRequest;
use concordat_tests::{TestPki, federation_config, spawn_broker};
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

#[tokio::test]
async fn each_agency_is_identified_by_its_certificate() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    for (id, name) in concordat_tests::AGENCIES {
        let client = pki.connect(broker.addr, id).await.unwrap();
        let hello = client
            .exchange()
            .hello(HelloRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hello.agency_id, id);
        assert_eq!(hello.display_name, name);
        assert!(!hello.auditor);
    }
    let auditor = pki.connect(broker.addr, "auditor").await.unwrap();
    let hello = auditor
        .exchange()
        .hello(HelloRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hello.agency_id, "auditor");
    assert!(hello.auditor);
}

/// Asserts that the first RPC of a client fails without reaching a handler: with TLS 1.3 a
/// refused certificate only surfaces there.
async fn assert_refused(client: Result<concordat_agent::client::Broker, impl std::fmt::Debug>) {
    let Ok(client) = client else {
        return; // refused while connecting: also a refusal
    };
    let outcome = client.exchange().hello(HelloRequest {}).await;
    let status = outcome.expect_err("the broker must refuse this certificate");
    assert_ne!(status.code(), Code::Ok);
}

#[tokio::test]
async fn bad_certificates_are_refused() {
    let mut pki = TestPki::new().unwrap();
    let revoked = pki.client_cert("ncsc").unwrap();
    let crl = pki.crl(&[revoked.serial]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), Some(&crl)).unwrap())
        .await
        .unwrap();

    // Another CA's certificate with a valid-looking Common Name.
    let mut other = TestPki::new().unwrap();
    let foreign = other.client_cert("ico").unwrap();
    let mut tls = pki.client_tls(broker.addr, &foreign);
    tls.ca_pem = pki.ca_pem().into_bytes(); // trusts the real broker
    assert_refused(tls.connect().await).await;

    // Expired.
    let expired = pki.expired_cert("ico").unwrap();
    assert_refused(pki.client_tls(broker.addr, &expired).connect().await).await;

    // Revoked by the CRL.
    assert_refused(pki.client_tls(broker.addr, &revoked).connect().await).await;

    // A certificate with no client identity at all.
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", broker.addr.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.ca_pem())))
        .unwrap();
    if let Ok(channel) = endpoint.connect().await {
        let mut client = concordat_proto::pb::exchange_client::ExchangeClient::new(channel);
        assert!(client.hello(HelloRequest {}).await.is_err());
    }

    // The CRL is per certificate: a fresh ncsc certificate still works.
    let fresh = pki.connect(broker.addr, "ncsc").await.unwrap();
    assert!(fresh.exchange().hello(HelloRequest {}).await.is_ok());
}

#[tokio::test]
async fn unknown_common_name_is_unauthenticated() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    for cn in ["fca", "ICO", "ico ncsc"] {
        let client = pki.connect(broker.addr, cn).await.unwrap();
        let status = client
            .exchange()
            .hello(HelloRequest {})
            .await
            .expect_err("unknown CN must be refused");
        assert_eq!(status.code(), Code::Unauthenticated, "cn {cn}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("UNKNOWN_AGENCY"),
            "cn {cn}"
        );
    }
}

#[tokio::test]
async fn auditors_cannot_send_and_agencies_cannot_export_others_entries() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    let agency = pki.connect(broker.addr, "ico").await.unwrap();
    let status = agency
        .audit()
        .export(concordat_proto::pb::ExportRequest {
            agency: "ncsc".into(),
            ..Default::default()
        })
        .await
        .expect_err("an agency may not export another agency's entries");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status).as_deref(), Some("NOT_AUTHORISED"));

    let auditor = pki.connect(broker.addr, "auditor").await.unwrap();
    let status = auditor
        .exchange()
        .send(concordat_proto::pb::Envelope::default())
        .await
        .expect_err("an auditor may not send");
    assert_eq!(reason_of(&status).as_deref(), Some("NOT_AUTHORISED"));
}
