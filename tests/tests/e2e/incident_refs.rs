//! Federation-unique incident references and the text the gate reads, over real mTLS:
//! an incident reference the ICO sends as `INC-7` is delivered and logged as `ico:INC-7`, and
//! a consent token bound to `INC-7` for sender `ico` still covers it; a reference that is
//! neither form is `MALFORMED`; a `text/markdown` payload naming a registered organisation needs
//! its consent like any payload; and a workflow step's objection cannot carry an organisation's
//! name without consent.

use std::path::Path;

use concordat_agent::client::Broker;
use concordat_broker::{
    config::Config,
    policy::{ConsentIssuer, Organisations},
    refusal::reason_of,
};
use concordat_proto::{
    consent::ConsentClaims,
    envelope::Kind,
    ids::MessageId,
    paserk::SecretKey,
    pb,
    workflow::{CommsAnswer, Step},
};
use concordat_tests::{TestPki, federation_config, spawn_broker};
use prost::Message as _;
use time::{Duration, OffsetDateTime};
use tokio_stream::StreamExt as _;
use tonic::Code;

/// The embedded default agreement between the ICO and the NCSC.
const MOU: &str = "ico-ncsc-2023";

/// The test federation with the embedded default's agreements and registry (Acme Ltd and
/// Globex PLC), and `desk` as the ICO's consent desk.
fn config(pki: &TestPki, dir: &Path, desk: &SecretKey) -> Config {
    let mut config = federation_config(pki, dir, None).unwrap();
    let defaults = Config::embedded_default().unwrap();
    config.policy.agreements = defaults.policy.agreements;
    config.registry = defaults.registry;
    config.policy.issuers.insert(
        desk.key_id(),
        ConsentIssuer {
            key: desk.public(),
            agency: Some("ico".parse().unwrap()),
            organisations: Organisations::Any,
        },
    );
    config
}

/// Acme Ltd's consent to the ICO sending threat assessments to the NCSC, bound to the
/// incidents `incidents` (none: to no incident).
fn acme_token(desk: &SecretKey, incidents: &[&str]) -> String {
    let mut b = ConsentClaims::builder("acme-ltd", "ico", "incident references test")
        .recipient("ncsc")
        .kind(Kind::ThreatAssessment)
        .valid_for(Duration::hours(1));
    for i in incidents {
        b = b.incident_ref(*i);
    }
    b.build(desk.key_id(), OffsetDateTime::now_utc())
        .unwrap()
        .sign(desk)
        .unwrap()
}

/// An ICO → NCSC envelope of `kind` with a fresh id.
fn envelope(kind: Kind, content_type: &str, payload: &[u8]) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ncsc".into()],
        kind: pb::MessageKind::from(kind) as i32,
        content_type: content_type.into(),
        tlp: pb::Tlp::Amber as i32,
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// An ICO → NCSC threat assessment about Acme Ltd, for incident `incident`, under `token`.
fn about_acme(incident: &str, token: String) -> pb::Envelope {
    pb::Envelope {
        organisation: "acme-ltd".into(),
        incident_ref: incident.into(),
        consent_token: token,
        ..envelope(
            Kind::ThreatAssessment,
            "application/json",
            br#"{"summary":"credential stuffing against the staff portal"}"#,
        )
    }
}

async fn accepted(client: &Broker, what: &str, e: pb::Envelope) -> pb::Receipt {
    match client.exchange().send(e).await {
        Ok(r) => r.into_inner(),
        Err(status) => panic!(
            "{what}: refused {:?}: {}",
            reason_of(&status),
            status.message()
        ),
    }
}

/// Sends `e`, expects the refusal `reason` and returns its message.
async fn refused(client: &Broker, what: &str, e: pb::Envelope, reason: &str) -> String {
    match client.exchange().send(e).await {
        Ok(r) => panic!("{what}: accepted: {:?}", r.into_inner()),
        Err(status) => {
            assert_eq!(
                reason_of(&status).as_deref(),
                Some(reason),
                "{what}: {}",
                status.message()
            );
            status.message().to_owned()
        }
    }
}

/// The envelope facts of the audit entry a receipt proves.
fn logged(receipt: &pb::Receipt) -> pb::EnvelopeFacts {
    let proof = receipt.audit.as_ref().expect("a receipt with its proof");
    let entry = pb::AuditEntry::decode(proof.entry.as_slice()).unwrap();
    match entry.event {
        Some(pb::audit_entry::Event::TransferAccepted(a)) => a.envelope.unwrap(),
        other => panic!("expected transfer_accepted, got {other:?}"),
    }
}

#[tokio::test]
async fn an_incident_reference_is_qualified_with_its_sender_and_tokens_still_cover_it() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let broker = spawn_broker(config(&pki, dir.path(), &desk)).await.unwrap();
    let ico = pki.connect(broker.addr, "ico").await.unwrap();
    let ncsc = pki.connect(broker.addr, "ncsc").await.unwrap();

    // A token issued before references were federation-unique names `INC-7` for sender ico.
    let sent = about_acme("INC-7", acme_token(&desk, &["INC-7"]));
    let receipt = accepted(&ico, "INC-7 under a token for INC-7", sent).await;
    assert_eq!(logged(&receipt).incident_ref, "ico:INC-7");

    // The same incident named in full, and a token that names it in full, are the same.
    let receipt = accepted(
        &ico,
        "ico:INC-7 under a token for INC-7",
        about_acme("ico:INC-7", acme_token(&desk, &["INC-7"])),
    )
    .await;
    assert_eq!(logged(&receipt).incident_ref, "ico:INC-7");
    accepted(
        &ico,
        "INC-7 under a token for ico:INC-7",
        about_acme("INC-7", acme_token(&desk, &["ico:INC-7"])),
    )
    .await;

    // Another incident, or the same reference of another agency, is not covered.
    for (what, incident, bound) in [
        ("INC-7 under a token for INC-8", "INC-7", "INC-8"),
        ("nca:INC-7 under a token for INC-7", "nca:INC-7", "INC-7"),
        ("INC-7 under a token for nca:INC-7", "INC-7", "nca:INC-7"),
    ] {
        refused(
            &ico,
            what,
            about_acme(incident, acme_token(&desk, &[bound])),
            "CONSENT_WRONG_INCIDENT",
        )
        .await;
    }

    // A reference that is neither the sender's own nor <agency>:<reference>.
    for bad in ["INC 7", "ico:INC:7", "ICO:INC-7", "ico:"] {
        let message = refused(
            &ico,
            bad,
            about_acme(bad, acme_token(&desk, &["INC-7"])),
            "MALFORMED",
        )
        .await;
        assert!(
            message.contains("incident_ref") && message.contains("<agency>:<reference>"),
            "{bad}: {message}"
        );
    }

    // The NCSC receives all three as ico:INC-7.
    let mut stream = ncsc
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 8 })
        .await
        .unwrap()
        .into_inner();
    let mut refs = Vec::new();
    while refs.len() < 3 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("no delivery within 10 s")
            .expect("the subscription ended")
            .unwrap();
        match d.body {
            Some(pb::delivery::Body::Transfer(t)) => {
                assert_eq!(t.sender, "ico");
                refs.push(t.incident_ref);
            }
            other => panic!("an unexpected delivery {other:?}"),
        }
    }
    assert_eq!(refs, ["ico:INC-7"; 3]);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn text_payloads_and_workflow_objections_are_read_by_the_leak_check() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let broker = spawn_broker(config(&pki, dir.path(), &desk)).await.unwrap();
    let ico = pki.connect(broker.addr, "ico").await.unwrap();
    let ncsc = pki.connect(broker.addr, "ncsc").await.unwrap();

    // A draft statement naming Acme Ltd: its consent is needed, as for any payload.
    let statement =
        b"# Joint statement\n\nThe ICO and the NCSC are supporting **Acme Ltd** after a \
                      cyber incident.\n";
    let message = refused(
        &ico,
        "markdown naming Acme without consent",
        envelope(Kind::ThreatAssessment, "text/markdown", statement),
        "ORGANISATION_IDENTIFIED",
    )
    .await;
    assert!(
        message.contains("acme-ltd") && message.contains("in the text"),
        "{message}"
    );
    assert!(!message.to_lowercase().contains("acme ltd"), "{message}");
    let receipt = accepted(
        &ico,
        "markdown naming Acme with its consent",
        pb::Envelope {
            organisation: "acme-ltd".into(),
            consent_token: acme_token(&desk, &[]),
            ..envelope(
                Kind::ThreatAssessment,
                "text/markdown; charset=utf-8",
                statement,
            )
        },
    )
    .await;
    assert_eq!(receipt.consents.len(), 1);
    accepted(
        &ico,
        "plain text naming nobody",
        envelope(
            Kind::ThreatAssessment,
            "text/plain",
            b"Credential stuffing continues across the sector.",
        ),
    )
    .await;
    refused(
        &ico,
        "text that is not UTF-8",
        envelope(Kind::ThreatAssessment, "text/plain", b"caf\xe9"),
        "INVALID_CONTENT",
    )
    .await;
    refused(
        &ico,
        "text in another charset",
        envelope(
            Kind::ThreatAssessment,
            "text/plain; charset=iso-8859-1",
            b"cafe",
        ),
        "INVALID_CONTENT",
    )
    .await;

    // The ICO proposes a statement naming nobody; the NCSC's objection may not name Acme.
    let propose = Step::CommsPropose {
        reference: "PRESS-2026-07".parse().unwrap(),
        publish_after: OffsetDateTime::now_utc() + Duration::days(1),
    };
    accepted(
        &ico,
        "a statement naming nobody",
        pb::Envelope {
            workflow: Some(pb::WorkflowStep::from(&propose)),
            ..envelope(
                Kind::PublicCommunication,
                "text/markdown",
                b"The ICO and the NCSC are aware of a cyber incident.",
            )
        },
    )
    .await;
    let object = |reason: &str| pb::Envelope {
        recipients: vec!["ico".into()],
        workflow: Some(pb::WorkflowStep::from(&Step::CommsAnswer {
            statement: "ico:PRESS-2026-07".parse().unwrap(),
            answer: CommsAnswer::Objection(reason.into()),
        })),
        ..envelope(Kind::PublicCommunication, "text/plain", b"")
    };
    let message = refused(
        &ncsc,
        "an objection naming Acme without consent",
        object("Acme Ltd has not yet been told; wait until it has"),
        "ORGANISATION_IDENTIFIED",
    )
    .await;
    assert!(
        message.contains("acme-ltd") && message.contains("workflow.comms_answer.objection"),
        "{message}"
    );
    assert!(!message.to_lowercase().contains("acme ltd"), "{message}");
    let status = ncsc
        .exchange()
        .send(object("Acme Ltd has not yet been told"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        concordat_broker::refusal::citation_of(&status).map(|(a, _)| a),
        Some(MOU.to_owned())
    );
    accepted(
        &ncsc,
        "an objection naming nobody",
        object("the publication date is too early"),
    )
    .await;
    broker.stop().await.unwrap();
}
