//! TLP 2.0, enforced, over real mTLS against a real broker process (docs/tlp.md): a STIX
//! bundle's markings agree with its envelope (`TLP_MISMATCH`), a flow's `max_tlp` and the
//! one-recipient rule of TLP:RED hold (`TLP_NOT_PERMITTED`), and what the broker delivered to
//! an agency under TLP:RED is not passed on to a third agency, even after a restart
//! (`TLP_ONWARD_FORBIDDEN`), while the audit log records which objects every transfer carried.

use std::time::Duration;

use concordat_agent::client::Broker;
use concordat_broker::{config::Limits, refusal::reason_of};
use concordat_proto::{audit, ids::MessageId, pb};
use concordat_tests::process::{BrokerProcess, PkiFiles, write_broker_files};
use tokio::runtime::Runtime;
use tonic::Code;

const STIX: &str = "application/stix+json;version=2.1";

/// The TLP 2.0 marking definitions (the STIX extension
/// `extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d`).
const TLP2_GREEN: &str = "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb";
const TLP2_AMBER: &str = "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421";
const TLP2_AMBER_STRICT: &str = "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003";
const TLP2_RED: &str = "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1";
/// TLP 1.0 WHITE, read as CLEAR.
const TLP1_WHITE: &str = "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9";

/// The indicator every onward-sharing test passes around.
const INDICATOR: &str = "indicator--6f1e5a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";

/// The harness's federation (ncsc → ico threat assessments, ico → ncsc incident records,
/// nca → ico threat assessments) and one more agreement: the ICO may send threat assessments
/// to the NCA and the NCSC, the NCA to the NCSC up to TLP:AMBER.
const TLP_AGREEMENT: &str = r#"
[[agreements]]
id = "test-tlp"
title = "Test agreement for TLP"
parties = ["ico", "nca", "ncsc"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "ico"
to = "nca"
kinds = ["threat_assessment", "incident_record"]
clause = "3.1"

[[agreements.flows]]
from = "ico"
to = "ncsc"
kinds = ["threat_assessment"]
clause = "3.2"

[[agreements.flows]]
from = "nca"
to = "ncsc"
kinds = ["threat_assessment"]
clause = "3.3"
max_tlp = "amber"
"#;

struct Federation {
    _dir: tempfile::TempDir,
    files: PkiFiles,
    broker: BrokerProcess,
    rt: Runtime,
}

impl Federation {
    fn start(extra: &str) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (files, config) = write_broker_files(
            dir.path(),
            &["ico", "ncsc", "nca", "auditor"],
            &data_dir,
            &Limits::default(),
        )
        .unwrap();
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        let broker = BrokerProcess::start(&config, &data_dir).unwrap();
        Federation {
            _dir: dir,
            files,
            broker,
            rt: Runtime::new().unwrap(),
        }
    }

    fn connect(&self, agency: &str) -> Broker {
        let tls = self.files.client(self.broker.addr(), agency).unwrap();
        self.rt.block_on(tls.connect()).unwrap()
    }

    /// Sends `envelope` as `agency`: the receipt, or the refusal's code, reason and message.
    fn send(
        &self,
        agency: &str,
        envelope: pb::Envelope,
    ) -> Result<pb::Receipt, (Code, Option<String>, String)> {
        let broker = self.connect(agency);
        self.rt
            .block_on(broker.exchange().send(envelope))
            .map(|r| r.into_inner())
            .map_err(|s| (s.code(), reason_of(&s), s.message().to_owned()))
    }

    /// Every `TransferAccepted` entry of the audit log, exported by the auditor.
    fn accepted_entries(&self) -> Vec<pb::TransferAccepted> {
        let auditor = self.connect("auditor");
        self.rt.block_on(async {
            let mut stream = auditor
                .audit()
                .export(pb::ExportRequest::default())
                .await
                .unwrap()
                .into_inner();
            let mut out = Vec::new();
            while let Some(item) = stream.message().await.unwrap() {
                if let Some(pb::export_item::Item::Record(r)) = item.item
                    && let Some(pb::audit_entry::Event::TransferAccepted(a)) =
                        audit::decode(&r.entry).unwrap().event
                {
                    out.push(a);
                }
            }
            out
        })
    }
}

fn envelope(
    to: &[&str],
    kind: pb::MessageKind,
    tlp: pb::Tlp,
    content_type: &str,
    payload: Vec<u8>,
) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: to.iter().map(|r| (*r).to_owned()).collect(),
        kind: kind as i32,
        content_type: content_type.into(),
        tlp: tlp as i32,
        payload,
        ..Default::default()
    }
}

/// A threat assessment as JSON (no markings the broker reads: the envelope's TLP stands).
fn json_assessment(to: &[&str], tlp: pb::Tlp) -> pb::Envelope {
    envelope(
        to,
        pb::MessageKind::ThreatAssessment,
        tlp,
        "application/json",
        br#"{"summary":"a C2 address seen at three schools"}"#.to_vec(),
    )
}

/// A bundle with an indicator `id` marked with `object_markings`, and a malware object whose
/// `name` carries the granular marking `granular` when given.
fn bundle(id: &str, object_markings: &[&str], granular: Option<&str>) -> Vec<u8> {
    let mut indicator = serde_json::json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": id,
        "created": "2026-11-30T09:15:00.000Z",
        "modified": "2026-11-30T10:00:00.000Z",
        "name": "C2 address",
        "pattern": "[ipv4-addr:value = '198.51.100.7']",
        "pattern_type": "stix",
        "valid_from": "2026-11-30T09:00:00Z"
    });
    if !object_markings.is_empty() {
        indicator["object_marking_refs"] = serde_json::json!(object_markings);
    }
    let mut malware = serde_json::json!({
        "type": "malware",
        "spec_version": "2.1",
        "id": "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321",
        "created": "2026-11-30T09:15:00.000Z",
        "modified": "2026-11-30T09:15:00.000Z",
        "name": "LockBit",
        "is_family": true
    });
    if let Some(marking) = granular {
        malware["granular_markings"] =
            serde_json::json!([{"marking_ref": marking, "selectors": ["name"]}]);
    }
    serde_json::to_vec(&serde_json::json!({
        "type": "bundle",
        "id": "bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
        "objects": [indicator, malware],
    }))
    .unwrap()
}

/// An AMBER bundle that shares no object with [`bundle`]'s.
fn other_amber_bundle() -> Vec<u8> {
    String::from_utf8(bundle(
        "indicator--0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        &[TLP2_AMBER],
        None,
    ))
    .unwrap()
    .replace(
        "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321",
        "malware--1b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e",
    )
    .into_bytes()
}

fn stix(to: &[&str], tlp: pb::Tlp, payload: Vec<u8>) -> pb::Envelope {
    envelope(to, pb::MessageKind::ThreatAssessment, tlp, STIX, payload)
}

#[track_caller]
fn assert_refused(
    got: Result<pb::Receipt, (Code, Option<String>, String)>,
    code: Code,
    reason: &str,
    says: &[&str],
) {
    match got {
        Ok(r) => panic!("accepted (transfer {}), expected {reason}", r.transfer_id),
        Err((c, r, message)) => {
            assert_eq!((c, r.as_deref()), (code, Some(reason)), "{message}");
            for s in says {
                assert!(message.contains(s), "{message:?} does not say {s:?}");
            }
        }
    }
}

/// The issue's observation: a TLP:RED record to two agencies was accepted and delivered.
#[test]
fn tlp_red_goes_to_exactly_one_recipient() {
    let f = Federation::start(TLP_AGREEMENT);
    assert_refused(
        f.send("ico", json_assessment(&["nca", "ncsc"], pb::Tlp::Red)),
        Code::PermissionDenied,
        "TLP_NOT_PERMITTED",
        &[
            "TLP:RED",
            "exactly one recipient",
            "nca, ncsc",
            "to nca: agreement test-tlp, clause 3.1; to ncsc: agreement test-tlp, clause 3.2",
        ],
    );
    let record = envelope(
        &["nca", "ncsc"],
        pb::MessageKind::IncidentRecord,
        pb::Tlp::Red,
        "application/json",
        br#"{"summary":"aggregate"}"#.to_vec(),
    );
    let mut record_to_nca = record.clone();
    record_to_nca.recipients = vec!["nca".into()];
    assert_refused(
        f.send("ico", record),
        Code::PermissionDenied,
        "TLP_NOT_PERMITTED",
        &["exactly one recipient"],
    );
    // One recipient each, or a lower marking to both, goes.
    f.send("ico", json_assessment(&["nca"], pb::Tlp::Red))
        .unwrap();
    f.send("ico", json_assessment(&["ncsc"], pb::Tlp::Red))
        .unwrap();
    f.send("ico", record_to_nca).unwrap();
    f.send(
        "ico",
        json_assessment(&["nca", "ncsc"], pb::Tlp::AmberStrict),
    )
    .unwrap();
}

#[test]
fn a_flow_carries_nothing_above_its_max_tlp() {
    let f = Federation::start(TLP_AGREEMENT);
    for tlp in [pb::Tlp::AmberStrict, pb::Tlp::Red] {
        assert_refused(
            f.send("nca", json_assessment(&["ncsc"], tlp)),
            Code::PermissionDenied,
            "TLP_NOT_PERMITTED",
            &[
                "agreement test-tlp, clause 3.3,",
                "at most TLP:AMBER",
                "from nca to ncsc",
                &format!(
                    "TLP:{}",
                    tlp.as_str_name()["TLP_".len()..].replace('_', "+")
                ),
            ],
        );
    }
    for tlp in [pb::Tlp::Clear, pb::Tlp::Green, pb::Tlp::Amber] {
        f.send("nca", json_assessment(&["ncsc"], tlp)).unwrap();
    }
    // A bundle marked TLP:RED on that flow is refused too, once its envelope says so.
    assert_refused(
        f.send(
            "nca",
            stix(
                &["ncsc"],
                pb::Tlp::Red,
                bundle(INDICATOR, &[TLP2_RED], None),
            ),
        ),
        Code::PermissionDenied,
        "TLP_NOT_PERMITTED",
        &["at most TLP:AMBER"],
    );
}

#[test]
fn a_bundle_s_markings_must_agree_with_its_envelope() {
    let f = Federation::start(TLP_AGREEMENT);
    struct Row {
        what: &'static str,
        tlp: pb::Tlp,
        payload: Vec<u8>,
        /// `None`: accepted; otherwise pieces of the TLP_MISMATCH message.
        mismatch: Option<&'static [&'static str]>,
    }
    let rows = [
        Row {
            what: "an object marked TLP:RED under an AMBER envelope",
            tlp: pb::Tlp::Amber,
            payload: bundle(INDICATOR, &[TLP2_RED], None),
            mismatch: Some(&[
                "TLP:RED",
                INDICATOR,
                "the envelope says TLP:AMBER",
                "to ico: agreement test-ico-ncsc, clause 1.1",
            ]),
        },
        Row {
            what: "the same under a RED envelope",
            tlp: pb::Tlp::Red,
            payload: bundle(INDICATOR, &[TLP2_RED], None),
            mismatch: None,
        },
        Row {
            what: "a granular AMBER+STRICT marking under an AMBER envelope",
            tlp: pb::Tlp::Amber,
            payload: bundle(INDICATOR, &[TLP2_GREEN], Some(TLP2_AMBER_STRICT)),
            mismatch: Some(&[
                "TLP:AMBER+STRICT",
                "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321",
                "granular_markings",
            ]),
        },
        Row {
            what: "the most restrictive of several markings",
            tlp: pb::Tlp::AmberStrict,
            payload: bundle(
                INDICATOR,
                &[TLP2_GREEN, TLP2_AMBER],
                Some(TLP2_AMBER_STRICT),
            ),
            mismatch: None,
        },
        Row {
            what: "an envelope more restrictive than its bundle",
            tlp: pb::Tlp::Red,
            payload: bundle(INDICATOR, &[TLP2_AMBER], None),
            mismatch: Some(&["TLP:AMBER", "the envelope says TLP:RED"]),
        },
        Row {
            what: "TLP 1.0 WHITE is CLEAR",
            tlp: pb::Tlp::Clear,
            payload: bundle(INDICATOR, &[TLP1_WHITE], None),
            mismatch: None,
        },
        Row {
            what: "TLP 1.0 WHITE under a GREEN envelope",
            tlp: pb::Tlp::Green,
            payload: bundle(INDICATOR, &[TLP1_WHITE], None),
            mismatch: Some(&["TLP:CLEAR"]),
        },
        Row {
            what: "no TLP marking: the envelope's stands",
            tlp: pb::Tlp::AmberStrict,
            payload: bundle(INDICATOR, &[], None),
            mismatch: None,
        },
    ];
    for row in rows {
        let got = f.send("ncsc", stix(&["ico"], row.tlp, row.payload));
        match row.mismatch {
            None => assert!(got.is_ok(), "{}: {got:?}", row.what),
            Some(says) => assert_refused(got, Code::PermissionDenied, "TLP_MISMATCH", says),
        }
    }
}

/// Three agencies: the NCSC sends a TLP:RED bundle to the ICO; after a broker restart the ICO
/// may not pass its indicator on to the NCA, but may return it to the NCSC, and the NCSC may
/// send it to the ICO again.
#[test]
fn what_arrived_under_tlp_red_is_not_shared_onward_even_after_a_restart() {
    let mut f = Federation::start(TLP_AGREEMENT);
    let first = f
        .send(
            "ncsc",
            stix(&["ico"], pb::Tlp::Red, bundle(INDICATOR, &[TLP2_RED], None)),
        )
        .unwrap();
    // Something delivered under AMBER is the recipient's to share as TLP:AMBER allows.
    f.send("nca", stix(&["ico"], pb::Tlp::Amber, other_amber_bundle()))
        .unwrap();

    assert!(
        f.broker
            .terminate(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    f.broker.restart().unwrap();

    // The same indicator, even re-marked and in another bundle, may not go to the NCA.
    for (tlp, markings) in [
        (pb::Tlp::Green, &[TLP2_GREEN][..]),
        (pb::Tlp::Red, &[TLP2_RED][..]),
    ] {
        assert_refused(
            f.send(
                "ico",
                stix(&["nca"], tlp, bundle(INDICATOR, markings, None)),
            ),
            Code::PermissionDenied,
            "TLP_ONWARD_FORBIDDEN",
            &[
                INDICATOR,
                &first.transfer_id,
                "under TLP:RED",
                "it may go back to ncsc but not on to nca",
                "to nca: agreement test-tlp, clause 3.1",
            ],
        );
    }
    // Back to its originator is not onward sharing; the originator may send it again.
    f.send(
        "ico",
        stix(
            &["ncsc"],
            pb::Tlp::Red,
            bundle(INDICATOR, &[TLP2_RED], None),
        ),
    )
    .unwrap();
    f.send(
        "ncsc",
        stix(&["ico"], pb::Tlp::Red, bundle(INDICATOR, &[TLP2_RED], None)),
    )
    .unwrap();
    f.send("ico", stix(&["nca"], pb::Tlp::Amber, other_amber_bundle()))
        .unwrap();

    // The audit log says which objects each accepted bundle carried.
    let accepted = f.accepted_entries();
    let first_entry = accepted
        .iter()
        .find(|a| a.transfer_id == first.transfer_id)
        .expect("the first transfer's audit entry");
    assert_eq!(
        first_entry.stix_object_ids,
        [INDICATOR, "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321"]
    );
    assert_eq!(accepted.len(), 5, "{accepted:?}");

    // The stopped broker's store checks out, its TLP records included: the ICO holds the
    // indicator and the malware from the NCSC; what went back to the NCSC binds nobody.
    assert!(
        f.broker
            .terminate(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    let out = std::process::Command::new(concordat_tests::binary("concordat-broker").unwrap())
        .args(["verify", "--data-dir"])
        .arg(f.broker.data_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("TLP records: 2"), "{stdout}");
}

/// The configuration key is checked at start: an unknown level names the key.
#[test]
fn an_unknown_max_tlp_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (_files, config) =
        write_broker_files(dir.path(), &["ico"], &data_dir, &Limits::default()).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&TLP_AGREEMENT.replace(r#"max_tlp = "amber""#, r#"max_tlp = "orange""#));
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(concordat_tests::binary("concordat-broker").unwrap())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("max_tlp") && stderr.contains("orange"),
        "{stderr}"
    );
}
