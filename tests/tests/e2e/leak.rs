//! The leak check over real mTLS: the broker finds the registered organisations a payload
//! names (in a STIX bundle or an incident record, by a name hidden in a description, in mixed
//! case, by a subdomain of a registered domain, by a company number) and each needs its own
//! consent token, whatever the envelope declares. Refusals say which organisation and where,
//! never the matched text, and cite the agreement and clause.

use std::path::Path;

use concordat_agent::client::Broker;
use concordat_broker::{
    config::Config,
    policy::{ConsentIssuer, Organisations},
    refusal::{citation_of, reason_of},
};
use concordat_proto::{
    consent::ConsentClaims, envelope::Kind, ids::MessageId, paserk::SecretKey, pb,
};
use concordat_tests::{TestPki, federation_config, spawn_broker};
use serde_json::json;
use time::{Duration, OffsetDateTime};
use tonic::Code;

const STIX: &str = "application/stix+json;version=2.1";
const INCIDENT: &str = "application/vnd.concordat.incident+json;version=1";
/// The embedded default agreement between the ICO and the NCSC.
const MOU: &str = "ico-ncsc-2023";

/// The test federation with the embedded default's agreements and registry (Acme Ltd and
/// Globex PLC), and `desk` as the NCSC's consent desk.
fn leak_config(pki: &TestPki, dir: &Path, desk: &SecretKey) -> Config {
    let mut config = federation_config(pki, dir, None).unwrap();
    let defaults = Config::embedded_default().unwrap();
    config.policy.agreements = defaults.policy.agreements;
    config.registry = defaults.registry;
    config.policy.issuers.insert(
        desk.key_id(),
        ConsentIssuer {
            key: desk.public(),
            agency: Some("ncsc".parse().unwrap()),
            organisations: Organisations::Any,
        },
    );
    config
}

/// `org`'s consent to the NCSC sending `kind` to the ICO.
fn token(desk: &SecretKey, org: &str, kind: Kind) -> String {
    ConsentClaims::builder(org, "ncsc", "leak check test")
        .recipient("ico")
        .kind(kind)
        .valid_for(Duration::hours(1))
        .build(desk.key_id(), OffsetDateTime::now_utc())
        .unwrap()
        .sign(desk)
        .unwrap()
}

fn record(granularity: &str, organisations: &[&str], summary: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "incident": {
            "reference": "NCSC-2026-0117",
            "first_seen": "2026-11-30T09:15:00Z",
            "categories": ["ransomware"],
            "sectors": ["manufacturing"],
            "summary": summary,
        },
        "granularity": granularity,
        "organisations": organisations,
    }))
    .unwrap()
}

/// A valid bundle: an identity, and an indicator created by it, with `description`
/// and an external reference to `url`.
fn bundle(identity_name: &str, description: &str, url: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "bundle",
        "id": "bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
        "objects": [
            {
                "type": "identity",
                "spec_version": "2.1",
                "id": "identity--1f2e3d4c-5b6a-4978-8675-a4b3c2d1e0f9",
                "created": "2026-11-30T09:15:00.000Z",
                "modified": "2026-11-30T09:15:00.000Z",
                "name": identity_name,
                "identity_class": "organization"
            },
            {
                "type": "indicator",
                "spec_version": "2.1",
                "id": "indicator--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d",
                "created": "2026-11-30T09:15:00.000Z",
                "modified": "2026-11-30T10:00:00.000Z",
                "name": "C2 address",
                "description": description,
                "pattern": "[ipv4-addr:value = '198.51.100.7']",
                "pattern_type": "stix",
                "valid_from": "2026-11-30T09:00:00Z",
                "created_by_ref": "identity--1f2e3d4c-5b6a-4978-8675-a4b3c2d1e0f9",
                "external_references": [{"source_name": "report", "url": url}]
            }
        ]
    }))
    .unwrap()
}

fn envelope(kind: Kind, content_type: &str, payload: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::from(kind) as i32,
        content_type: content_type.into(),
        tlp: pb::Tlp::Amber as i32,
        payload,
        ..Default::default()
    }
}

struct Row {
    what: &'static str,
    envelope: pb::Envelope,
    /// `None`: accepted, with this many consents. Otherwise the reason and pieces of the
    /// message.
    refusal: Option<(&'static str, Vec<&'static str>)>,
    consents: usize,
}

/// Texts that identify Acme or Globex: none may appear in a refusal's message.
const MATCHED_TEXTS: [&str; 6] = [
    "Acme Ltd",
    "ACME Limited",
    "acme.example",
    "01234567",
    "Globex PLC",
    "globex.example",
];

fn rows(desk: &SecretKey) -> Vec<Row> {
    use Kind::{IncidentRecord, ThreatAssessment};
    let acme_record = |kind| token(desk, "acme-ltd", kind);
    let globex = token(desk, "globex-plc", ThreatAssessment);
    let benign = bundle(
        "Example Security Partner",
        "C2 seen in several sectors",
        "https://reports.partner.test/c2",
    );
    // The demo's refused record, its organisation field removed and "anonymised".
    let demo_record = record(
        "anonymised",
        &[],
        "Ransomware encrypted file servers at ACME Limited's Leeds site.",
    );
    let with = |mut e: pb::Envelope, org: &str, token: Option<String>, more: Vec<String>| {
        e.organisation = org.into();
        e.consent_token = token.unwrap_or_default();
        e.consent_tokens = more;
        e
    };
    vec![
        Row {
            what: "a bundle naming nobody",
            envelope: envelope(ThreatAssessment, STIX, benign),
            refusal: None,
            consents: 0,
        },
        Row {
            what: "an anonymised record naming Acme in mixed case, no organisation declared",
            envelope: envelope(IncidentRecord, INCIDENT, demo_record.clone()),
            refusal: Some((
                "ORGANISATION_IDENTIFIED",
                vec!["acme-ltd", "$.incident.summary"],
            )),
            consents: 0,
        },
        Row {
            what: "the same record as plain JSON",
            envelope: envelope(IncidentRecord, "application/json", demo_record.clone()),
            refusal: Some(("ORGANISATION_IDENTIFIED", vec!["acme-ltd"])),
            consents: 0,
        },
        Row {
            what: "the same record with Acme's consent token",
            envelope: with(
                envelope(IncidentRecord, "application/json", demo_record),
                "",
                Some(acme_record(IncidentRecord)),
                vec![],
            ),
            refusal: None,
            consents: 1,
        },
        Row {
            what: "an identity object of class organization",
            envelope: envelope(
                ThreatAssessment,
                STIX,
                bundle(
                    "Globex PLC",
                    "C2 address",
                    "https://reports.partner.test/c2",
                ),
            ),
            refusal: Some((
                "ORGANISATION_IDENTIFIED",
                vec![
                    "globex-plc",
                    "object 0 (identity--1f2e3d4c-5b6a-4978-8675-a4b3c2d1e0f9), property name",
                ],
            )),
            consents: 0,
        },
        Row {
            what: "a name hidden in a description",
            envelope: envelope(
                ThreatAssessment,
                STIX,
                bundle(
                    "Example Security Partner",
                    "Beaconing seen from acme   ltd. mail relays",
                    "https://reports.partner.test/c2",
                ),
            ),
            refusal: Some((
                "ORGANISATION_IDENTIFIED",
                vec![
                    "acme-ltd",
                    "object 1 (indicator--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d), property description",
                ],
            )),
            consents: 0,
        },
        Row {
            what: "a subdomain of a registered domain",
            envelope: envelope(
                ThreatAssessment,
                STIX,
                bundle(
                    "Example Security Partner",
                    "C2 address",
                    "https://VPN.Acme.Example/portal",
                ),
            ),
            refusal: Some((
                "ORGANISATION_IDENTIFIED",
                vec!["acme-ltd", "external_references[0].url"],
            )),
            consents: 0,
        },
        Row {
            what: "a company number",
            envelope: envelope(
                ThreatAssessment,
                "application/json",
                serde_json::to_vec(&json!({"victim": {"company_no": "01234567"}})).unwrap(),
            ),
            refusal: Some((
                "ORGANISATION_IDENTIFIED",
                vec!["acme-ltd", "company number", "$.victim.company_no"],
            )),
            consents: 0,
        },
        Row {
            what: "two organisations named, one token",
            envelope: with(
                envelope(
                    ThreatAssessment,
                    STIX,
                    bundle("Globex PLC", "Seen at Acme Ltd", "https://x.partner.test/"),
                ),
                "acme-ltd",
                Some(acme_record(ThreatAssessment)),
                vec![],
            ),
            refusal: Some(("ORGANISATION_IDENTIFIED", vec!["globex-plc"])),
            consents: 0,
        },
        Row {
            what: "two organisations named, a token each",
            envelope: with(
                envelope(
                    ThreatAssessment,
                    STIX,
                    bundle("Globex PLC", "Seen at Acme Ltd", "https://x.partner.test/"),
                ),
                "acme-ltd",
                Some(acme_record(ThreatAssessment)),
                vec![globex.clone()],
            ),
            refusal: None,
            consents: 2,
        },
        Row {
            what: "a spare token for an organisation the payload does not name",
            envelope: with(
                envelope(
                    ThreatAssessment,
                    STIX,
                    bundle(
                        "Example Security Partner",
                        "Seen at Acme Ltd",
                        "https://x.partner.test/",
                    ),
                ),
                "acme-ltd",
                Some(acme_record(ThreatAssessment)),
                vec![globex],
            ),
            refusal: Some(("CONSENT_WRONG_ORGANISATION", vec!["globex-plc"])),
            consents: 0,
        },
        Row {
            what: "a declared organisation without its token",
            envelope: with(
                envelope(ThreatAssessment, "application/json", b"{}".to_vec()),
                "globex-plc",
                None,
                vec![],
            ),
            refusal: Some(("CONSENT_MISSING", vec!["globex-plc"])),
            consents: 0,
        },
    ]
}

async fn client(pki: &mut TestPki, addr: std::net::SocketAddr, cn: &str) -> Broker {
    pki.connect(addr, cn).await.unwrap()
}

#[tokio::test]
async fn a_payload_that_names_an_organisation_needs_its_consent() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let broker = spawn_broker(leak_config(&pki, dir.path(), &desk))
        .await
        .unwrap();
    let ncsc = client(&mut pki, broker.addr, "ncsc").await;

    for row in rows(&desk) {
        let result = ncsc.exchange().send(row.envelope).await;
        match (row.refusal, result) {
            (None, Ok(receipt)) => {
                let receipt = receipt.into_inner();
                assert_eq!(receipt.consents.len(), row.consents, "{}", row.what);
            }
            (None, Err(status)) => panic!(
                "{}: refused {:?}: {}",
                row.what,
                reason_of(&status),
                status.message()
            ),
            (Some(_), Ok(receipt)) => panic!("{}: accepted: {receipt:?}", row.what),
            (Some((reason, pieces)), Err(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{}", row.what);
                assert_eq!(reason_of(&status).as_deref(), Some(reason), "{}", row.what);
                for piece in pieces {
                    assert!(
                        status.message().contains(piece),
                        "{}: {:?} does not say {piece:?}",
                        row.what,
                        status.message()
                    );
                }
                for text in MATCHED_TEXTS {
                    assert!(
                        !status
                            .message()
                            .to_lowercase()
                            .contains(&text.to_lowercase()),
                        "{}: the message repeats the matched text {text:?}: {}",
                        row.what,
                        status.message()
                    );
                }
                let (agreement, _clause) = citation_of(&status)
                    .unwrap_or_else(|| panic!("{}: the refusal cites no clause", row.what));
                assert_eq!(agreement, MOU, "{}", row.what);
            }
        }
    }
    broker.stop().await.unwrap();
}

/// A transfer made under two organisations' consent is recalled when either withdraws it: the
/// recall notice names the organisation and the token that was revoked.
#[tokio::test]
async fn revoking_either_consent_recalls_a_two_organisation_transfer() {
    use concordat_proto::consent::{RevocationTarget, TokenId};
    use tokio_stream::StreamExt as _;

    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let broker = spawn_broker(leak_config(&pki, dir.path(), &desk))
        .await
        .unwrap();
    let ncsc = client(&mut pki, broker.addr, "ncsc").await;
    let ico = client(&mut pki, broker.addr, "ico").await;

    let acme = token(&desk, "acme-ltd", Kind::ThreatAssessment);
    let globex = token(&desk, "globex-plc", Kind::ThreatAssessment);
    let mut e = envelope(
        Kind::ThreatAssessment,
        STIX,
        bundle("Globex PLC", "Seen at Acme Ltd", "https://x.partner.test/"),
    );
    // Both tokens in consent_tokens, no organisation declared: each is matched by its `sub`.
    e.consent_tokens = vec![acme, globex];
    let receipt = ncsc.exchange().send(e).await.unwrap().into_inner();
    let orgs: Vec<&str> = receipt
        .consents
        .iter()
        .map(|c| c.organisation.as_str())
        .collect();
    // The identity object (Globex) comes before the indicator's description (Acme).
    assert_eq!(orgs, ["globex-plc", "acme-ltd"], "in document order");
    let globex_jti: TokenId = receipt.consents[0].jti.parse().unwrap();

    let statement = concordat_proto::consent::Revocation::new(
        desk.key_id(),
        RevocationTarget::Token(globex_jti),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
    .sign(&desk)
    .unwrap();
    let revoked = ncsc
        .consent()
        .revoke(pb::RevokeRequest {
            revocation: statement,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.recall_notices, 1);

    let mut stream = ico
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 8 })
        .await
        .unwrap()
        .into_inner();
    let mut transfer = None;
    let mut recall = None;
    while transfer.is_none() || recall.is_none() {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("no delivery within 10 s")
            .expect("the subscription ended")
            .unwrap();
        match d.body {
            Some(pb::delivery::Body::Transfer(t)) => transfer = Some(t),
            Some(pb::delivery::Body::RecallNotice(r)) => recall = Some(r),
            Some(pb::delivery::Body::Notice(n)) => panic!("an unexpected notice {n:?}"),
            None => panic!("an empty delivery"),
        }
    }
    let (transfer, recall) = (transfer.unwrap(), recall.unwrap());
    assert_eq!(transfer.organisations, ["globex-plc", "acme-ltd"]);
    assert_eq!(transfer.consents.len(), 2);
    assert_eq!(recall.transfer_id, receipt.transfer_id);
    assert_eq!(recall.organisation, "globex-plc");
    assert_eq!(recall.consent_jti, globex_jti.to_string());
    broker.stop().await.unwrap();
}
