//! Every refusal is in the audit log: calls refused for who the certificate is (an unknown
//! Common Name, one that differs only in case, two Common Names, an auditor sending) and refused
//! `Revoke`, `Subscribe`, `Ack` and `Export` calls are entries naming the certificate's subject
//! and SHA-256 fingerprint; every audit export is logged too; and a flood of identical refusals
//! is folded into at most two entries whose counts add up.

use std::time::{Duration, Instant};

use concordat_agent::client::Broker;
use concordat_broker::{
    audit_log::{self, DEFAULT_ORIGIN},
    refusal::reason_of,
};
use concordat_cli::{
    audit_file::{self, Format},
    pki::Issued,
};
use concordat_proto::{audit, pb};
use concordat_tests::{BrokerHandle, TestPki, federation_config, spawn_broker};
use rcgen::{DistinguishedName, DnType};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

/// How long a restart may take before the test fails rather than hangs.
const TIMEOUT: Duration = Duration::from_secs(30);

struct Site {
    pki: TestPki,
    dir: tempfile::TempDir,
    broker: BrokerHandle,
}

impl Site {
    async fn start() -> Site {
        let pki = TestPki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
            .await
            .unwrap();
        Site { pki, dir, broker }
    }

    async fn connect(&self, cert: &Issued) -> Broker {
        self.pki
            .client_tls(self.broker.addr, cert)
            .connect()
            .await
            .unwrap()
    }

    /// Stops the broker gracefully and starts another on the same data directory.
    async fn restart(mut self) -> Site {
        self.broker.stop().await.unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // The stopped broker's writer thread releases the database just after `stop`.
            let broker = spawn_broker(federation_config(&self.pki, self.dir.path(), None).unwrap())
                .await
                .unwrap();
            let up = async {
                let auditor = self.pki.connect(broker.addr, "auditor").await?;
                let mut audit = auditor.audit();
                anyhow::Ok(audit.checkpoint(pb::CheckpointRequest::default()).await?)
            };
            match tokio::time::timeout(TIMEOUT, up).await {
                Ok(Ok(_)) => {
                    self.broker = broker;
                    return self;
                }
                outcome => {
                    let stopped = broker.stop().await;
                    assert!(
                        Instant::now() < deadline,
                        "the restarted broker did not come up: {outcome:?}, {stopped:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The records of an export, as an auditor.
    async fn export(&mut self, request: pb::ExportRequest) -> Vec<pb::ExportRecord> {
        let auditor = self.pki.connect(self.broker.addr, "auditor").await.unwrap();
        let mut stream = auditor.audit().export(request).await.unwrap().into_inner();
        let mut records = Vec::new();
        while let Some(item) = stream.next().await {
            if let Some(pb::export_item::Item::Record(r)) = item.unwrap().item {
                records.push(r);
            }
        }
        records
    }

    /// Every entry of the log, as its JSON view.
    async fn entries(&mut self) -> Vec<Value> {
        self.export(pb::ExportRequest::default())
            .await
            .iter()
            .map(|r| audit::to_json(&audit::decode(&r.entry).unwrap()))
            .collect()
    }
}

/// The SHA-256 fingerprint of a certificate, in hex.
fn fingerprint(cert: &Issued) -> String {
    let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
    Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `call_refused` entries for the certificate with fingerprint `fp`.
fn refused_calls<'a>(entries: &'a [Value], fp: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["event"] == "call_refused" && e["details"]["cert_sha256"] == fp)
        .map(|e| &e["details"])
        .collect()
}

/// The RPCs a row calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    Send,
    Revoke,
    Subscribe,
    Ack,
    Export,
}

impl Call {
    async fn run(self, client: &Broker) -> tonic::Status {
        let outcome = match self {
            Call::Send => client
                .exchange()
                .send(pb::Envelope::default())
                .await
                .map(|_| ()),
            Call::Revoke => client
                .consent()
                .revoke(pb::RevokeRequest {
                    revocation: "v4.public.not-a-statement".into(),
                })
                .await
                .map(|_| ()),
            Call::Subscribe => client
                .exchange()
                .subscribe(pb::SubscribeRequest { window: 1 })
                .await
                .map(|_| ()),
            Call::Ack => client
                .exchange()
                .ack(pb::AckRequest {
                    delivery_ids: vec!["not-a-number".into()],
                })
                .await
                .map(|_| ()),
            Call::Export => {
                // A server-streaming refusal may come with the response or as the stream's
                // first item.
                // Another agency's entries: what no agency may export.
                let request = pb::ExportRequest {
                    agency: "nca".into(),
                    ..Default::default()
                };
                match client.audit().export(request).await {
                    Ok(response) => {
                        let mut stream = response.into_inner();
                        match stream.next().await {
                            Some(Err(status)) => Err(status),
                            other => panic!("the export was not refused: {other:?}"),
                        }
                    }
                    Err(status) => Err(status),
                }
            }
        };
        outcome.expect_err("the call must be refused")
    }
}

fn subject(cns: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (i, cn) in cns.iter().enumerate() {
        // rcgen keeps one value per attribute type: a second Common Name goes in under its OID.
        let ty = if i == 0 {
            DnType::CommonName
        } else {
            DnType::CustomDnType(vec![2, 5, 4, 3])
        };
        dn.push(ty, *cn);
    }
    dn
}

#[tokio::test]
async fn every_refused_call_is_logged_with_the_certificate() {
    let mut site = Site::start().await;
    struct Row {
        what: &'static str,
        cns: &'static [&'static str],
        call: Call,
        code: Code,
        reason: &'static str,
        rpc: &'static str,
        caller: &'static str,
    }
    let rows = [
        Row {
            what: "unknown Common Name",
            cns: &["mi6"],
            call: Call::Send,
            code: Code::Unauthenticated,
            reason: "UNKNOWN_AGENCY",
            rpc: "Exchange.Send",
            caller: "",
        },
        Row {
            what: "Common Name in the wrong case",
            cns: &["NCSC"],
            call: Call::Send,
            code: Code::Unauthenticated,
            reason: "UNKNOWN_AGENCY",
            rpc: "Exchange.Send",
            caller: "",
        },
        Row {
            what: "two Common Names",
            cns: &["ico", "ncsc"],
            call: Call::Send,
            code: Code::Unauthenticated,
            reason: "UNAUTHENTICATED",
            rpc: "Exchange.Send",
            caller: "",
        },
        Row {
            what: "an auditor sending",
            cns: &["auditor"],
            call: Call::Send,
            code: Code::PermissionDenied,
            reason: "NOT_AUTHORISED",
            rpc: "Exchange.Send",
            caller: "auditor",
        },
        Row {
            what: "an invalid revocation",
            cns: &["ico"],
            call: Call::Revoke,
            code: Code::PermissionDenied,
            reason: "REVOCATION_INVALID",
            rpc: "Consent.Revoke",
            caller: "ico",
        },
        Row {
            what: "an auditor subscribing",
            cns: &["auditor"],
            call: Call::Subscribe,
            code: Code::PermissionDenied,
            reason: "NOT_AUTHORISED",
            rpc: "Exchange.Subscribe",
            caller: "auditor",
        },
        Row {
            what: "a malformed acknowledgement",
            cns: &["nca"],
            call: Call::Ack,
            code: Code::InvalidArgument,
            reason: "MALFORMED",
            rpc: "Exchange.Ack",
            caller: "nca",
        },
        Row {
            what: "an agency exporting another's entries",
            cns: &["ncsc"],
            call: Call::Export,
            code: Code::PermissionDenied,
            reason: "NOT_AUTHORISED",
            rpc: "Audit.Export",
            caller: "ncsc",
        },
    ];
    let mut certs = Vec::new();
    for row in &rows {
        let cert = site.pki.client_cert_subject(subject(row.cns)).unwrap();
        let client = site.connect(&cert).await;
        let status = row.call.run(&client).await;
        assert_eq!(status.code(), row.code, "{}: {status:?}", row.what);
        assert_eq!(
            reason_of(&status).as_deref(),
            Some(row.reason),
            "{}: {status:?}",
            row.what
        );
        certs.push(cert);
    }

    let entries = site.entries().await;
    for (row, cert) in rows.iter().zip(&certs) {
        let found = refused_calls(&entries, &fingerprint(cert));
        assert_eq!(found.len(), 1, "{}: {found:#?}", row.what);
        let entry = found[0];
        assert_eq!(entry["rpc"], row.rpc, "{}: {entry:#}", row.what);
        assert_eq!(entry["reason"], row.reason, "{}: {entry:#}", row.what);
        assert_eq!(entry["caller"], row.caller, "{}: {entry:#}", row.what);
        assert_eq!(entry["count"], 1, "{}: {entry:#}", row.what);
        assert!(
            !entry["message"].as_str().unwrap().is_empty(),
            "{}: {entry:#}",
            row.what
        );
        let subject = entry["cert_subject"].as_str().unwrap();
        for cn in row.cns {
            assert!(
                subject.contains(&format!("CN={cn}")),
                "{}: {subject}",
                row.what
            );
        }
    }

    // The filters find them: by reason, and by the caller an agency filter names.
    let by_reason = site
        .export(pb::ExportRequest {
            reason: "UNKNOWN_AGENCY".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_reason.len(), 2, "{by_reason:?}");
    let by_agency = site
        .export(pb::ExportRequest {
            agency: "nca".into(),
            ..Default::default()
        })
        .await;
    let events: Vec<_> = by_agency
        .iter()
        .map(|r| audit::to_json(&audit::decode(&r.entry).unwrap()))
        .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["details"]["reason"], "MALFORMED");
    // And the explanation names the certificate.
    let words = audit::explain(
        by_agency[0].index,
        &audit::decode(&by_agency[0].entry).unwrap(),
    );
    assert!(words.contains("REFUSED"), "{words}");
    assert!(words.contains(&fingerprint(&certs[6])), "{words}");

    // The agent's offline tools read the new entries: a full export verifies, and the CLI's
    // explanation of an entry read from the file names the certificate.
    let key = audit_log::load_or_create_key(site.dir.path(), DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    let file = site.dir.path().join("export.jsonl");
    let auditor = site.pki.connect(site.broker.addr, "auditor").await.unwrap();
    audit_file::export(&auditor, pb::ExportRequest::default(), &file, Format::Jsonl)
        .await
        .unwrap();
    let verified = audit_file::verify(&file, &key).unwrap().unwrap();
    assert!(!verified.partial);
    let from_file = audit_file::entry_from_file(&file, by_agency[0].index).unwrap();
    assert_eq!(
        audit::explain(by_agency[0].index, &from_file),
        words,
        "the file's entry is the exported one"
    );
}

#[tokio::test]
async fn every_audit_export_is_logged() {
    let mut site = Site::start().await;
    // One refusal to find.
    let client = site.pki.connect(site.broker.addr, "ico").await.unwrap();
    Call::Ack.run(&client).await;
    let first = site
        .export(pb::ExportRequest {
            reason: "MALFORMED".into(),
            index_from: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(first.len(), 1);

    let entries = site.entries().await;
    let exports: Vec<_> = entries
        .iter()
        .filter(|e| e["event"] == "audit_exported")
        .map(|e| &e["details"])
        .collect();
    // The filtered export is there; the full export that returned these entries is logged once
    // it has finished, after them.
    assert_eq!(exports.len(), 1, "{entries:#?}");
    let logged = exports[0];
    assert_eq!(logged["auditor"], "auditor", "{logged:#}");
    assert_eq!(logged["reason"], "MALFORMED", "{logged:#}");
    assert_eq!(logged["index_from"], 1, "{logged:#}");
    assert_eq!(logged["entries"], 1, "{logged:#}");
    assert_eq!(logged["complete"], true, "{logged:#}");

    // The full export is in the log by the time the next one starts.
    let again = site.entries().await;
    let exports = again
        .iter()
        .filter(|e| e["event"] == "audit_exported")
        .count();
    assert_eq!(exports, 2, "{again:#?}");
    let last = again
        .iter()
        .rev()
        .find(|e| e["event"] == "audit_exported")
        .unwrap();
    assert_eq!(last["details"]["entries"], entries.len() as u64, "{last:#}");
}

#[tokio::test]
async fn a_flood_of_identical_refusals_is_folded() {
    let mut site = Site::start().await;
    let cert = site.pki.client_cert_subject(subject(&["mi6"])).unwrap();
    let fp = fingerprint(&cert);
    let client = site.connect(&cert).await;
    for _ in 0..100 {
        let status = Call::Send.run(&client).await;
        assert_eq!(reason_of(&status).as_deref(), Some("UNKNOWN_AGENCY"));
    }

    // The first is logged at once; the other 99 are being counted.
    let entries = site.entries().await;
    let found = refused_calls(&entries, &fp);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["count"], 1);

    // A graceful stop writes what was counted.
    let mut site = site.restart().await;
    let entries = site.entries().await;
    let found = refused_calls(&entries, &fp);
    assert!(found.len() <= 2, "{found:#?}");
    let total: u64 = found.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 100, "{found:#?}");
    let folded = found.last().unwrap();
    assert!(
        folded["first_at"].as_str().unwrap() <= folded["last_at"].as_str().unwrap(),
        "{folded:#}"
    );
}

/// Every refused transfer cites the agreement and clause it was judged under, or says that no
/// agreement covers the flow: in the refusal's `ErrorInfo` metadata and in its audit entry, the
/// same values.
#[tokio::test]
async fn every_refused_transfer_cites_its_clause_or_none() {
    let pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federation_config(&pki, dir.path(), None).unwrap();
    let defaults = concordat_broker::config::Config::embedded_default().unwrap();
    config.policy.agreements = defaults.policy.agreements;
    config.registry = defaults.registry;
    let broker = spawn_broker(config).await.unwrap();
    let mut site = Site { pki, dir, broker };
    let ncsc = site.pki.connect(site.broker.addr, "ncsc").await.unwrap();
    const NCSC_ICO_RECORDS: &str = "Information sharing: NCSC shares information from an \
                                    organisation it engages with on an incident only with that \
                                    organisation's approval";
    const NCSC_ICO_THREATS: &str = "Information sharing: relevant cyber threat information";
    let envelope =
        |to: &str, kind: pb::MessageKind, content_type: &str, payload: &[u8]| pb::Envelope {
            message_id: concordat_proto::ids::MessageId::new_random().to_string(),
            recipients: vec![to.into()],
            kind: kind as i32,
            content_type: content_type.into(),
            tlp: pb::Tlp::Amber as i32,
            payload: payload.to_vec(),
            ..Default::default()
        };
    use pb::MessageKind::{IncidentRecord, ThreatAssessment};
    let rows: Vec<(&str, pb::Envelope, &str, (&str, &str))> = vec![
        (
            "an unknown recipient",
            envelope("mi5", ThreatAssessment, "application/json", b"{}"),
            "UNKNOWN_RECIPIENT",
            ("none", "none"),
        ),
        (
            "a flow no agreement permits",
            envelope("nca", ThreatAssessment, "application/json", b"{}"),
            "NO_AGREEMENT",
            ("none", "none"),
        ),
        (
            "a malformed envelope",
            pb::Envelope {
                message_id: "not-a-uuid".into(),
                ..envelope("ico", ThreatAssessment, "application/json", b"{}")
            },
            "MALFORMED",
            ("none", "none"),
        ),
        (
            "an opaque payload on an inspectable flow",
            envelope("ico", ThreatAssessment, "application/pdf", b"%PDF"),
            "UNINSPECTABLE_CONTENT",
            ("ico-ncsc-2023", NCSC_ICO_THREATS),
        ),
        (
            "an organisation without its consent",
            pb::Envelope {
                organisation: "acme-ltd".into(),
                ..envelope("ico", IncidentRecord, "application/json", b"{}")
            },
            "CONSENT_MISSING",
            ("ico-ncsc-2023", NCSC_ICO_RECORDS),
        ),
        (
            "a payload naming an organisation",
            envelope(
                "ico",
                IncidentRecord,
                "application/json",
                br#"{"summary":"phishing at Globex PLC"}"#,
            ),
            "ORGANISATION_IDENTIFIED",
            ("ico-ncsc-2023", NCSC_ICO_RECORDS),
        ),
    ];
    let mut want = std::collections::HashMap::new();
    for (what, e, reason, (agreement, clause)) in rows {
        let id = e.message_id.clone();
        let status = ncsc.exchange().send(e).await.expect_err(what);
        assert_eq!(reason_of(&status).as_deref(), Some(reason), "{what}");
        assert_eq!(
            concordat_broker::refusal::citation_of(&status),
            Some((agreement.to_owned(), clause.to_owned())),
            "{what}: {}",
            status.message()
        );
        want.insert(id, (what, agreement, clause));
    }
    let entries = site.entries().await;
    let mut seen = 0;
    for e in entries.iter().filter(|e| e["event"] == "transfer_refused") {
        let d = &e["details"];
        let id = d["envelope"]["message_id"].as_str().unwrap();
        let (what, agreement, clause) = want[id];
        assert_eq!(d["agreement_id"], agreement, "{what}: {d}");
        assert_eq!(d["clause"], clause, "{what}: {d}");
        seen += 1;
    }
    assert_eq!(seen, want.len(), "every refusal is in the audit log");
    site.broker.stop().await.unwrap();
}
