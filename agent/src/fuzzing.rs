//! Fuzz target bodies for the agent's parsers of files written by others: outbox messages (the
//! agency's JSON) and audit log exports (JSON Lines and CSV). They are shared by the cargo-fuzz
//! targets in `agent/fuzz/` and by the stable `cargo test` that replays their committed corpora
//! (`agent/fuzz/corpus/<target>/`); see `concordat_proto::fuzzing` for the conventions.

use std::io::Cursor;
use std::path::Path;

use concordat_proto::envelope::Envelope;
use concordat_proto::fuzzing::{Outcome, log_signer};
use concordat_proto::ids::MessageId;
use concordat_proto::pb;

use crate::audit_file::{records_from, verify_records};
use crate::spool::{OutboxError, OutboxMessage, OutboxSources, envelope_from_outbox};

/// The contents of every payload or token file an outbox message names, in the fuzz target.
pub const FILE_CONTENTS: &[u8] = b"contents of a named file\n";
/// The one file name that does not exist, in the fuzz target.
pub const MISSING_FILE: &str = "missing";
/// The message id the fuzz target chooses for files that give none.
pub const CHOSEN_ID: &str = "0190f3a4-5b6c-7d8e-9f01-23456789abcd";

/// Payload and token files, and chosen message ids, from memory.
struct InMemory;

impl OutboxSources for InMemory {
    fn read_file(&self, path: &Path) -> Result<Vec<u8>, OutboxError> {
        if path == Path::new(MISSING_FILE) {
            return Err(OutboxError::Read {
                path: MISSING_FILE.into(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(FILE_CONTENTS.to_vec())
    }

    fn message_id(&self, _name: &str, _fingerprint: &str) -> Result<MessageId, OutboxError> {
        CHOSEN_ID
            .parse()
            .map_err(|e| OutboxError::Parse(format!("chosen id: {e}")))
    }
}

/// An outbox file's contents, turned into an envelope as the agent's outbox loop does. An
/// accepted envelope carries exactly the payload the file gave, and survives the trip to the
/// wire and back unchanged.
pub fn outbox(data: &[u8]) -> Outcome {
    let Ok(message) = serde_json::from_slice::<OutboxMessage>(data) else {
        return Outcome::Refused;
    };
    let Ok(envelope) = envelope_from_outbox("fuzz.json", data, &InMemory) else {
        return Outcome::Parsed;
    };
    // The payload is the one the message gave.
    let expected = if let Some(value) = &message.payload {
        serde_json::to_vec(value).ok()
    } else if message.payload_file.is_some() {
        Some(FILE_CONTENTS.to_vec())
    } else {
        None
    };
    if let Some(expected) = expected {
        assert_eq!(
            envelope.payload, expected,
            "the envelope carries the file's payload"
        );
    }
    match &message.message_id {
        Some(id) => assert_eq!(id.parse::<MessageId>().ok(), Some(envelope.message_id)),
        None => assert_eq!(envelope.message_id.to_string(), CHOSEN_ID),
    }
    assert_eq!(
        envelope
            .recipients
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        message.recipients,
        "recipients are kept as given, in order"
    );
    let wire = pb::Envelope::from(envelope.clone());
    match Envelope::try_from(wire) {
        Ok(again) => assert_eq!(again, envelope, "wire round trip"),
        Err(e) => panic!("an envelope from the outbox is refused on the wire: {e}"),
    }
    Outcome::Accepted
}

/// An audit log export, verified offline with the fuzzing log key, once read as JSON Lines and
/// once as CSV. A verified export is signed by that key and, when full, holds as many entries
/// as its checkpoint's tree.
pub fn audit_export(data: &[u8]) -> Outcome {
    let key = log_signer().verifier();
    let mut outcome = Outcome::Refused;
    for csv in [false, true] {
        let records = records_from(Cursor::new(data.to_vec()), csv);
        match verify_records(records, &key) {
            Ok(Ok(verified)) => {
                assert_eq!(verified.checkpoint.origin(), key.name());
                if !verified.partial {
                    assert_eq!(verified.entries, verified.checkpoint.size());
                }
                outcome = Outcome::Accepted;
            }
            Ok(Err(problem)) => {
                if problem.line > 1 {
                    // It got past the signed checkpoint.
                    outcome = outcome.max(Outcome::Parsed);
                }
            }
            Err(e) => panic!("reading from memory cannot fail: {e}"),
        }
    }
    outcome
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use concordat_proto::checkpoint::{self, Checkpoint};
    use concordat_proto::fuzzing::LOG_NAME;
    use concordat_proto::{audit, merkle};
    use prost::Message as _;
    use sha2::{Digest as _, Sha256};
    use std::path::PathBuf;

    /// A fuzz target's body.
    type Body = fn(&[u8]) -> Outcome;

    /// The fuzz targets of this crate, by the name of their corpus directory.
    const TARGETS: [(&str, Body); 2] = [("outbox", outbox), ("audit_export", audit_export)];

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    /// Replays every committed corpus file through its target on stable, without a fuzzer:
    /// no invariant may fail, and each corpus must reach the target's accepting path.
    #[test]
    fn committed_fuzz_corpora_replay() {
        for (target, run) in TARGETS {
            let mut files = 0;
            let mut deepest = Outcome::Refused;
            for entry in std::fs::read_dir(corpus_dir(target)).expect(target) {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data))
                    .unwrap_or_else(|_| panic!("{target}: {} broke an invariant", path.display()));
                deepest = deepest.max(outcome);
                files += 1;
            }
            assert!(files > 0, "{target}: empty corpus");
            assert_eq!(
                deepest,
                Outcome::Accepted,
                "{target}: no corpus file is accepted"
            );
        }
    }

    /// Regenerates the seed inputs of the corpora (run with `--ignored`).
    #[test]
    #[ignore = "writes agent/fuzz/corpus; run by hand to regenerate the seeds"]
    fn write_fuzz_seeds() {
        for (target, seeds) in [("outbox", outbox_seeds()), ("audit_export", export_seeds())] {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            for seed in seeds {
                let name = hex::encode(&Sha256::digest(&seed)[..16]);
                std::fs::write(dir.join(format!("seed-{name}")), seed).unwrap();
            }
        }
    }

    fn outbox_seeds() -> Vec<Vec<u8>> {
        let token = "v4.public.eyJhIjoxfQ";
        [
            serde_json::json!({
                "message_id": "0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b",
                "recipients": ["ico", "nca"],
                "kind": "incident_record",
                "organisation": "acme-ltd",
                "incident_ref": "INC-2026-0042",
                "tlp": "amber+strict",
                "payload": {"summary": "phishing", "count": 3, "ok": true, "list": [1.5, null]},
                "consent_token": token,
            }),
            serde_json::json!({
                "recipients": ["ico"],
                "kind": "threat_assessment",
                "payload_base64": "aGVsbG8=",
                "content_type": "text/plain",
                "tlp": "clear",
            }),
            serde_json::json!({
                "recipients": ["nca"],
                "kind": "dsar_consultation",
                "payload_file": "payloads/p.bin",
                "consent_token_file": "tokens/t.txt",
            }),
            serde_json::json!({
                "recipients": ["nca"],
                "kind": "dsar_consultation",
                "payload_file": MISSING_FILE,
            }),
            serde_json::json!({
                "recipients": ["ico"],
                "kind": "incident_record",
                "payload": "x",
                "payload_base64": "eA==",
            }),
            serde_json::json!({
                "recipients": ["ico", "ico"],
                "kind": "incident_record",
                "tlp": "purple",
                "payload": null,
            }),
        ]
        .iter()
        .map(|v| serde_json::to_vec_pretty(v).unwrap())
        .collect()
    }

    fn entry(i: u64) -> pb::AuditEntry {
        use pb::audit_entry::Event;
        let facts = pb::EnvelopeFacts {
            message_id: format!("0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a{i:02x}"),
            sender: "ncsc".into(),
            recipients: vec!["ico".into()],
            kind: pb::MessageKind::IncidentRecord as i32,
            organisation: "acme-ltd".into(),
            payload_sha256: vec![i as u8; 32],
            payload_size: 10 * i,
            ..Default::default()
        };
        let event = if i.is_multiple_of(2) {
            Event::TransferAccepted(pb::TransferAccepted {
                transfer_id: format!("t-{i}"),
                envelope: Some(facts),
                authorities: Vec::new(),
                stix_object_ids: Vec::new(),
                designation: None,
            })
        } else {
            Event::TransferRefused(pb::TransferRefused {
                envelope: Some(facts),
                reason: "CONSENT_MISSING".into(),
                message: "no consent token".into(),
                ..Default::default()
            })
        };
        pb::AuditEntry {
            time: Some(prost_types::Timestamp {
                seconds: 1_780_000_000 + i as i64,
                nanos: 0,
            }),
            event: Some(event),
        }
    }

    /// Full and partial exports of a five-entry log, as JSON Lines and as CSV.
    fn export_seeds() -> Vec<Vec<u8>> {
        let signer = log_signer();
        let entries: Vec<Vec<u8>> = (0..5).map(|i| entry(i).encode_to_vec()).collect();
        let mut stored = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            stored.extend(merkle::stored_hashes(i as u64, e, &stored).unwrap());
        }
        let size = entries.len() as u64;
        let root = merkle::tree_hash(size, &stored).unwrap();
        let note =
            checkpoint::sign(&Checkpoint::new(LOG_NAME, size, root).unwrap(), &signer).unwrap();
        let mut seeds = Vec::new();
        for partial in [false, true] {
            let picked: Vec<u64> = if partial {
                vec![1, 3]
            } else {
                (0..size).collect()
            };
            let lines: Vec<serde_json::Value> = picked
                .iter()
                .map(|&i| {
                    let bytes = &entries[i as usize];
                    let mut line = serde_json::json!({
                        "index": i,
                        "entry": B64.encode(bytes),
                        "decoded": audit::to_json(&audit::decode(bytes).unwrap()),
                    });
                    if partial {
                        let proof = merkle::prove_record(size, i, &stored).unwrap();
                        line["proof"] = proof.iter().map(|h| h.to_base64()).collect();
                    }
                    line
                })
                .collect();
            // JSON Lines.
            let mut jsonl = serde_json::json!({"checkpoint": note, "partial": partial}).to_string();
            for line in &lines {
                jsonl.push('\n');
                jsonl.push_str(&line.to_string());
            }
            jsonl.push('\n');
            seeds.push(jsonl.into_bytes());
            // CSV.
            let mut csv = csv::Writer::from_writer(Vec::new());
            csv.write_record(["index", "entry", "proof", "decoded"])
                .unwrap();
            let kind = if partial { "partial" } else { "full" };
            csv.write_record(["checkpoint", &B64.encode(&note), "", kind])
                .unwrap();
            for line in &lines {
                let proof: Vec<&str> = line["proof"]
                    .as_array()
                    .map(|p| p.iter().filter_map(|h| h.as_str()).collect())
                    .unwrap_or_default();
                csv.write_record([
                    line["index"].to_string(),
                    line["entry"].as_str().unwrap().to_owned(),
                    proof.join(" "),
                    line["decoded"].to_string(),
                ])
                .unwrap();
            }
            seeds.push(csv.into_inner().unwrap());
        }
        seeds
    }
}
