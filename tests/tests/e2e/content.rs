//! What a payload says, judged over real mTLS: STIX 2.1 bundles validated (a truncated one is
//! refused, naming the object and the property), incident records checked against their
//! schema and the envelope, opaque payloads only on flows that allow them and never as an
//! anonymised incident record. One row per case, each with its code and reason.

use std::path::{Path, PathBuf};

use concordat_agent::client::Broker;
use concordat_broker::{
    config::Config,
    policy::{Agreement, Flow},
    refusal::reason_of,
};
use concordat_proto::{envelope::Kind, ids::MessageId, pb};
use concordat_tests::{TestPki, federation_config, spawn_broker};
use tokio_stream::StreamExt as _;
use tonic::Code;

const STIX: &str = "application/stix+json;version=2.1";
const INCIDENT: &str = "application/vnd.concordat.incident+json;version=1";

/// The federation: the NCSC may send threat assessments and incident records to the ICO,
/// inspectable only; the NCA may send both to the ICO on a flow that allows opaque payloads.
fn content_config(pki: &TestPki, data_dir: &Path) -> Config {
    let mut config = federation_config(pki, data_dir, None).unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    let agreement = |id: &str, from: &str, opaque: bool| Agreement {
        id: id.into(),
        title: format!("Test agreement {id}"),
        parties: [from, "ico"].iter().map(|a| a.parse().unwrap()).collect(),
        signed: today - time::Duration::days(10),
        review_by: today + time::Duration::days(365),
        review: Default::default(),
        flows: vec![Flow {
            from: from.parse().unwrap(),
            to: "ico".parse().unwrap(),
            kinds: [Kind::ThreatAssessment, Kind::IncidentRecord]
                .into_iter()
                .collect(),
            clause: "1.1".into(),
            opaque,
            max_tlp: None,
            legal_bases: Default::default(),
            consent_refusal_note: None,
        }],
    };
    config.policy.agreements = vec![
        agreement("test-ncsc-ico", "ncsc", false),
        agreement("test-nca-ico", "nca", true),
    ];
    config
}

fn corpus(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../broker/testdata/stix")
        .join(file);
    std::fs::read(&path).unwrap()
}

fn envelope(kind: pb::MessageKind, content_type: &str, payload: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: kind as i32,
        content_type: content_type.into(),
        tlp: pb::Tlp::Amber as i32,
        payload,
        ..Default::default()
    }
}

fn incident_record(granularity: &str, organisations: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "incident": {
            "reference": "ICO-2026-0042",
            "first_seen": "2026-11-30T09:15:00Z",
            "categories": ["ransomware"],
            "sectors": ["education"],
            "counts": {"organisations": 14},
            "summary": "Ransomware affiliates encrypted file servers at 14 schools."
        },
        "granularity": granularity,
        "organisations": organisations,
    }))
    .unwrap()
}

/// A valid bundle of three objects whose last object was cut short after its id, still JSON.
fn bundle_cut_inside_an_object() -> Vec<u8> {
    let mut bundle: serde_json::Value =
        serde_json::from_slice(&corpus("valid-indicator-malware-relationship.json")).unwrap();
    let objects = bundle["objects"].as_array_mut().unwrap();
    let last = objects.last_mut().unwrap().as_object_mut().unwrap();
    last.retain(|k, _| k == "type" || k == "spec_version" || k == "id");
    serde_json::to_vec(&bundle).unwrap()
}

struct Row {
    what: &'static str,
    sender: &'static str,
    envelope: pb::Envelope,
    /// `None`: accepted. Otherwise the code, the reason and a piece of the message.
    refusal: Option<(Code, &'static str, &'static str)>,
}

fn rows() -> Vec<Row> {
    use pb::MessageKind::{IncidentRecord, ThreatAssessment};
    let valid = corpus("valid-indicator-malware-relationship.json");
    let truncated = valid[..valid.len() / 2].to_vec();
    vec![
        Row {
            what: "a valid STIX bundle",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, STIX, valid.clone()),
            refusal: None,
        },
        Row {
            what: "a STIX bundle truncated mid-stream",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, STIX, truncated),
            refusal: Some((Code::InvalidArgument, "INVALID_CONTENT", "not valid JSON")),
        },
        Row {
            what: "a STIX bundle whose last object was cut short",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, STIX, bundle_cut_inside_an_object()),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "objects[2] (relationship--0c1d2e3f-4a5b-4c6d-ae8f-9a0b1c2d3e4f) property `created`: is required",
            )),
        },
        Row {
            what: "a STIX bundle with a bad granular marking",
            sender: "ncsc",
            envelope: envelope(
                ThreatAssessment,
                "Application/STIX+JSON; version=\"2.1\"",
                corpus("invalid-granular-bad-selector.json"),
            ),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "property `granular_markings[0].selectors[0]`",
            )),
        },
        Row {
            what: "STIX of an unknown version",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, "application/stix+json;version=2.0", valid),
            refusal: Some((Code::InvalidArgument, "INVALID_CONTENT", "version \"2.0\"")),
        },
        Row {
            what: "JSON that does not parse",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, "application/json", b"{\"a\":".to_vec()),
            refusal: Some((Code::InvalidArgument, "INVALID_CONTENT", "not valid JSON")),
        },
        Row {
            what: "an opaque payload on a flow that does not allow it",
            sender: "ncsc",
            envelope: envelope(ThreatAssessment, "application/pdf", b"%PDF-1.7".to_vec()),
            refusal: Some((
                Code::PermissionDenied,
                "UNINSPECTABLE_CONTENT",
                "does not allow opaque payloads",
            )),
        },
        Row {
            what: "an opaque payload on a flow that allows it",
            sender: "nca",
            envelope: envelope(ThreatAssessment, "application/pdf", b"%PDF-1.7".to_vec()),
            refusal: None,
        },
        Row {
            what: "an opaque anonymised incident record, even on an opaque flow",
            sender: "nca",
            envelope: envelope(IncidentRecord, "application/octet-stream", vec![0x5a; 64]),
            refusal: Some((
                Code::PermissionDenied,
                "UNINSPECTABLE_CONTENT",
                "must be inspectable",
            )),
        },
        Row {
            what: "an aggregate incident record",
            sender: "ncsc",
            envelope: envelope(IncidentRecord, INCIDENT, incident_record("aggregate", &[])),
            refusal: None,
        },
        Row {
            what: "an incident record with an unknown granularity",
            sender: "ncsc",
            envelope: envelope(IncidentRecord, INCIDENT, incident_record("secret", &[])),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "unknown variant `secret`",
            )),
        },
        Row {
            what: "an anonymised incident record naming an organisation",
            sender: "ncsc",
            envelope: envelope(
                IncidentRecord,
                INCIDENT,
                incident_record("anonymised", &["acme-ltd"]),
            ),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "organisations must be empty",
            )),
        },
        Row {
            what: "an incident-specific record without the envelope's organisation",
            sender: "ncsc",
            envelope: envelope(
                IncidentRecord,
                INCIDENT,
                incident_record("incident_specific", &["acme-ltd"]),
            ),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "names its organisation in the envelope",
            )),
        },
        Row {
            what: "an incident record sent as a threat assessment",
            sender: "ncsc",
            envelope: envelope(
                ThreatAssessment,
                INCIDENT,
                incident_record("aggregate", &[]),
            ),
            refusal: Some((
                Code::InvalidArgument,
                "INVALID_CONTENT",
                "cannot be sent as threat_assessment",
            )),
        },
    ]
}

async fn client(pki: &mut TestPki, addr: std::net::SocketAddr, cn: &str) -> Broker {
    pki.connect(addr, cn).await.unwrap()
}

#[tokio::test]
async fn payloads_are_judged_by_what_they_say() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(content_config(&pki, dir.path()))
        .await
        .unwrap();
    let ncsc = client(&mut pki, broker.addr, "ncsc").await;
    let nca = client(&mut pki, broker.addr, "nca").await;
    let ico = client(&mut pki, broker.addr, "ico").await;

    let mut accepted = Vec::new();
    for row in rows() {
        let sender = if row.sender == "ncsc" { &ncsc } else { &nca };
        let id = row.envelope.message_id.clone();
        let result = sender.exchange().send(row.envelope).await;
        match (row.refusal, result) {
            (None, Ok(_)) => accepted.push(id),
            (None, Err(status)) => panic!(
                "{}: refused {:?} {:?}: {}",
                row.what,
                status.code(),
                reason_of(&status),
                status.message()
            ),
            (Some(_), Ok(receipt)) => panic!("{}: accepted: {receipt:?}", row.what),
            (Some((code, reason, message)), Err(status)) => {
                assert_eq!(status.code(), code, "{}: {}", row.what, status.message());
                assert_eq!(reason_of(&status).as_deref(), Some(reason), "{}", row.what);
                assert!(
                    status.message().contains(message),
                    "{}: {:?} does not say {message:?}",
                    row.what,
                    status.message()
                );
            }
        }
    }

    // The accepted payloads, and only those, are delivered.
    let mut stream = ico
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 16 })
        .await
        .unwrap()
        .into_inner();
    let mut delivered = Vec::new();
    while delivered.len() < accepted.len() {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("no delivery within 10 s")
            .expect("the subscription ended")
            .unwrap();
        match d.body {
            Some(pb::delivery::Body::Transfer(t)) => delivered.push(t.message_id),
            other => panic!("expected a transfer, got {other:?}"),
        }
    }
    assert_eq!(delivered, accepted);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), stream.next())
            .await
            .is_err(),
        "a refused payload was delivered"
    );
    broker.stop().await.unwrap();
}
