//! National significance over real mTLS: on a flow whose only legal basis is national
//! significance (ICO → NCSC incident records, as in the MoU), an `incident_specific` record is
//! refused `NATIONAL_SIGNIFICANCE_REQUIRED` without a designation, accepted with one made by two
//! different ICO officers through the real `concordat significance designate` and `countersign`
//! commands, refused `DESIGNATION_INVALID` when one officer signs both halves (with two keys)
//! and `DESIGNATION_EXPIRED` once it has expired; `concordat audit explain` shows the
//! designation relied on.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration as StdDuration, Instant},
};

use concordat_agent::client::Broker;
use concordat_broker::{
    config::Config,
    policy::{Agreement, ConsentIssuer, Flow, LegalBases, LegalBasis, Organisations},
    refusal::reason_of,
};
use concordat_cli::audit_file::{self, Format};
use concordat_proto::{
    consent::ConsentClaims,
    envelope::Kind,
    ids::MessageId,
    paserk::{PublicKey, SecretKey},
    pb,
    significance::Officer,
};
use concordat_tests::{TestPki, binary, federation_config, spawn_broker};
use tonic::Code;

const INCIDENT: &str = "application/vnd.concordat.incident+json;version=1";
const REFERENCE: &str = "ICO-2026-0042";
const CLAUSE: &str = "Incident-specific where of national significance";

/// Runs the `concordat` CLI with `args`; returns whether it succeeded, and its output.
async fn concordat(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let exe = binary("concordat").unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let append = || {
            fs::OpenOptions::new()
                .append(true)
                .open(out.path())
                .unwrap()
        };
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(append())
            .stderr(append())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + StdDuration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("concordat {args:?} ran longer than 60 s");
            }
            std::thread::sleep(StdDuration::from_millis(20));
        };
        (status.success(), fs::read_to_string(out.path()).unwrap())
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `concordat keygen --out DIR/NAME.key`; returns the key file and the public key.
async fn officer_key(dir: &Path, name: &str) -> (PathBuf, PublicKey) {
    let key = dir.join(format!("{name}.key"));
    let (ok, out) = concordat(vec!["keygen".into(), "--out".into(), s(&key)]).await;
    assert!(ok, "keygen: {out}");
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().parse().unwrap())
}

/// `concordat significance designate` by `officer`, then `countersign` by `second`; returns the
/// designation file.
async fn designation(
    dir: &Path,
    name: &str,
    officer: &Path,
    second: &Path,
    expires: &str,
) -> PathBuf {
    let first = dir.join(format!("{name}.first"));
    let file = dir.join(format!("{name}.designation"));
    let (ok, out) = concordat(vec![
        "significance".into(),
        "designate".into(),
        "--officer-key".into(),
        s(officer),
        "--agency".into(),
        "ico".into(),
        "--incident".into(),
        REFERENCE.into(),
        "--to".into(),
        "ncsc".into(),
        "--grounds".into(),
        "Ransomware across NHS suppliers; national impact".into(),
        "--expires".into(),
        expires.into(),
        "--out".into(),
        s(&first),
    ])
    .await;
    assert!(ok, "designate: {out}");
    assert!(out.contains(REFERENCE), "{out}");
    let (ok, out) = concordat(vec![
        "significance".into(),
        "countersign".into(),
        "--officer-key".into(),
        s(second),
        "--designation".into(),
        s(&first),
        "--out".into(),
        s(&file),
    ])
    .await;
    assert!(ok, "countersign: {out}");
    file
}

fn record() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "incident": {
            "reference": REFERENCE,
            "first_seen": "2026-11-30T09:15:00Z",
            "categories": ["ransomware"],
            "sectors": ["health"],
            "summary": "Ransomware encrypted the supplier's booking systems."
        },
        "granularity": "incident_specific",
        "organisations": ["acme-ltd"],
    }))
    .unwrap()
}

fn envelope(token: &str, designation: Option<&Path>) -> pb::Envelope {
    let (d, c) = match designation {
        Some(path) => {
            let text = fs::read_to_string(path).unwrap();
            let mut lines = text.lines();
            (
                lines.next().unwrap().to_owned(),
                lines.next().unwrap().to_owned(),
            )
        }
        None => (String::new(), String::new()),
    };
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ncsc".into()],
        kind: pb::MessageKind::IncidentRecord as i32,
        organisation: "acme-ltd".into(),
        incident_ref: REFERENCE.into(),
        content_type: INCIDENT.into(),
        tlp: pb::Tlp::Amber as i32,
        payload: record(),
        consent_token: token.into(),
        significance_designation: d,
        significance_countersignature: c,
        ..Default::default()
    }
}

async fn refused(client: &Broker, e: pb::Envelope) -> (String, String) {
    match client.exchange().send(e).await {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{}",
                status.message()
            );
            (
                reason_of(&status).unwrap_or_default(),
                status.message().to_owned(),
            )
        }
    }
}

#[tokio::test]
async fn incident_specific_records_need_a_two_officer_designation() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (a, a_pub) = officer_key(&keys, "ico-a").await;
    let (a2, a2_pub) = officer_key(&keys, "ico-a-second-key").await;
    let (b, b_pub) = officer_key(&keys, "ico-b").await;

    let mut config: Config = federation_config(&pki, &dir.path().join("broker"), None).unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    config.policy.agreements = vec![Agreement {
        id: "ico-ncsc-test".into(),
        title: "Test MoU".into(),
        parties: ["ico", "ncsc"].iter().map(|a| a.parse().unwrap()).collect(),
        signed: today - time::Duration::days(10),
        review_by: today + time::Duration::days(365),
        review: Default::default(),
        flows: vec![Flow {
            from: "ico".parse().unwrap(),
            to: "ncsc".parse().unwrap(),
            kinds: [Kind::IncidentRecord].into_iter().collect(),
            clause: CLAUSE.into(),
            opaque: false,
            max_tlp: None,
            legal_bases: LegalBases::of(&[LegalBasis::NationalSignificance]),
            consent_refusal_note: None,
        }],
    }];
    // No skew, so that a designation valid for one second expires within the test.
    config.policy.clock_skew = time::Duration::ZERO;
    let desk = SecretKey::generate();
    config.policy.issuers.insert(
        desk.key_id(),
        ConsentIssuer {
            key: desk.public(),
            agency: Some("ico".parse().unwrap()),
            organisations: Organisations::Any,
        },
    );
    for (id, key) in [("ico-a", &a_pub), ("ico-a", &a2_pub), ("ico-b", &b_pub)] {
        config.policy.significance_officers.insert(
            key.key_id(),
            Officer {
                id: id.into(),
                agency: "ico".parse().unwrap(),
                key: *key,
            },
        );
    }
    let broker = spawn_broker(config).await.unwrap();
    let ico = pki.connect(broker.addr, "ico").await.unwrap();
    let auditor = pki.connect(broker.addr, "auditor").await.unwrap();
    let token = ConsentClaims::builder("acme-ltd", "ico", "Acme agrees to share with the NCSC")
        .recipient("ncsc")
        .kind(Kind::IncidentRecord)
        .valid_for(time::Duration::hours(1))
        .build(desk.key_id(), time::OffsetDateTime::now_utc())
        .unwrap()
        .sign(&desk)
        .unwrap();

    // Made first, so that its second has passed by the time it is presented.
    let short = designation(dir.path(), "short", &a, &b, "1s").await;
    let made = Instant::now();

    // Consent alone is no basis on this flow.
    let (reason, message) = refused(&ico, envelope(&token, None)).await;
    assert_eq!(reason, "NATIONAL_SIGNIFICANCE_REQUIRED", "{message}");
    assert!(message.contains("ico -> ncsc"), "{message}");

    // One officer cannot countersign their own designation with the same key: the CLI refuses.
    let first = dir.path().join("own.first");
    let (ok, _) = concordat(vec![
        "significance".into(),
        "designate".into(),
        "--officer-key".into(),
        s(&a),
        "--agency".into(),
        "ico".into(),
        "--incident".into(),
        REFERENCE.into(),
        "--to".into(),
        "ncsc".into(),
        "--grounds".into(),
        "One officer alone".into(),
        "--out".into(),
        s(&first),
    ])
    .await;
    assert!(ok);
    let (ok, out) = concordat(vec![
        "significance".into(),
        "countersign".into(),
        "--officer-key".into(),
        s(&a),
        "--designation".into(),
        s(&first),
        "--out".into(),
        s(&dir.path().join("own.designation")),
    ])
    .await;
    assert!(!ok, "an officer countersigned their own designation: {out}");
    assert!(out.contains("two different officers"), "{out}");
    // With a second key of the same officer, the CLI cannot tell; the broker refuses.
    let same = designation(dir.path(), "same", &a, &a2, "1h").await;
    let (reason, message) = refused(&ico, envelope(&token, Some(&same))).await;
    assert_eq!(reason, "DESIGNATION_INVALID", "{message}");
    assert!(message.contains("ico-a signed both halves"), "{message}");

    // Two different officers: accepted, citing the designation.
    let valid = designation(dir.path(), "valid", &a, &b, "7d").await;
    let receipt = ico
        .exchange()
        .send(envelope(&token, Some(&valid)))
        .await
        .unwrap()
        .into_inner();
    let accepted_at = receipt.audit.as_ref().unwrap().log_index;
    // Used again: accepted, and the designation is recorded only once (checked below).
    ico.exchange()
        .send(envelope(&token, Some(&valid)))
        .await
        .unwrap();

    // Expired.
    if let Some(left) = StdDuration::from_millis(1100).checked_sub(made.elapsed()) {
        // Waiting for time to pass (the designation's expiry), not for readiness.
        tokio::time::sleep(left).await;
    }
    let (reason, message) = refused(&ico, envelope(&token, Some(&short))).await;
    assert_eq!(reason, "DESIGNATION_EXPIRED", "{message}");
    assert!(message.contains("expired at"), "{message}");

    // `concordat audit explain` over an export shows the designation relied on, and its record.
    let export = dir.path().join("export.jsonl");
    audit_file::export(
        &auditor,
        pb::ExportRequest::default(),
        &export,
        Format::Jsonl,
    )
    .await
    .unwrap();
    let explain = |index: u64| {
        concordat(vec![
            "audit".into(),
            "explain".into(),
            "--index".into(),
            index.to_string(),
            "--file".into(),
            s(&export),
        ])
    };
    let (ok, words) = explain(accepted_at).await;
    assert!(ok, "{words}");
    for expected in [
        "ACCEPTED",
        "national significance",
        REFERENCE,
        "officer ico-a",
        "officer ico-b",
        "ico->ncsc",
    ] {
        assert!(
            words.contains(expected),
            "{expected:?} missing from:\n{words}"
        );
    }
    let (ok, words) = explain(accepted_at - 1).await;
    assert!(ok, "{words}");
    assert!(
        words.contains("recorded a designation") && words.contains("officer ico-b"),
        "{words}"
    );
    let exported = fs::read_to_string(&export).unwrap();
    assert_eq!(
        exported
            .matches("\"event\":\"designation_recorded\"")
            .count(),
        1,
        "{exported}"
    );
    assert_eq!(
        exported.matches("\"designated_by\":\"ico-a\"").count(),
        3,
        "recorded once, cited by both transfers: {exported}"
    );
    let (ok, words) = explain(accepted_at + 2).await;
    assert!(ok, "{words}");
    assert!(
        words.contains("REFUSED") && words.contains("DESIGNATION_EXPIRED"),
        "{words}"
    );
    broker.stop().await.unwrap();

    // The store, with the designation it has recorded, still verifies offline.
    let data_dir = dir.path().join("broker");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(binary("concordat-broker").unwrap())
            .args(["verify", "--data-dir", &s(&data_dir)])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
