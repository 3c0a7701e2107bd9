//! The fuzz target body for the operator CLI's parser of files written by others: audit log
//! exports (JSON Lines and CSV), verified offline. It is shared by the cargo-fuzz target in
//! `cli/fuzz/` and by the stable `cargo test` that replays its committed corpus
//! (`cli/fuzz/corpus/audit_export/`); see `concordat_proto::fuzzing` for the conventions.

use std::io::Cursor;

use concordat_proto::fuzzing::{Outcome, log_signer};

use crate::audit_file::{records_from, verify_records};

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
    use concordat_proto::fuzzing::{Body, LOG_NAME, replay_corpora, write_seeds};
    use concordat_proto::{audit, merkle, pb};
    use prost::Message as _;
    use std::path::{Path, PathBuf};

    /// The fuzz targets of this crate, by the name of their corpus directory.
    const TARGETS: [(&str, Body); 1] = [("audit_export", audit_export)];

    fn corpus_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
    }

    /// Replays every committed corpus file through its target on stable, without a fuzzer:
    /// no invariant may fail, and each corpus must reach the target's accepting path.
    #[test]
    fn committed_fuzz_corpora_replay() {
        replay_corpora(&corpus_root(), &TARGETS);
    }

    /// Regenerates the seed inputs of the corpus (run with `--ignored`).
    #[test]
    #[ignore = "writes cli/fuzz/corpus; run by hand to regenerate the seeds"]
    fn write_fuzz_seeds() {
        write_seeds(&corpus_root(), "audit_export", &export_seeds());
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
