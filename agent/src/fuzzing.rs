//! The fuzz target body for the agent's parser of files written by others: outbox messages (the
//! agency's JSON). It is shared by the cargo-fuzz target in `agent/fuzz/` and by the stable
//! `cargo test` that replays its committed corpus (`agent/fuzz/corpus/outbox/`); see
//! `concordat_proto::fuzzing` for the conventions.

use std::path::Path;

use concordat_proto::envelope::Envelope;
use concordat_proto::fuzzing::Outcome;
use concordat_proto::ids::MessageId;
use concordat_proto::pb;

use crate::spool::{OutboxError, OutboxItem, OutboxMessage, OutboxSources, item_from_outbox};

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
    let item = item_from_outbox("fuzz.json", data, &InMemory);
    let Ok(message) = serde_json::from_slice::<OutboxMessage>(data) else {
        // Only an involvement declaration is accepted without being an outbox message.
        return match item {
            Ok(OutboxItem::Involvement(r)) => {
                assert!(!r.is_empty() && !r.contains(char::is_whitespace));
                Outcome::Accepted
            }
            Ok(OutboxItem::Envelope(_)) => panic!("an envelope from a file that is no message"),
            Err(_) => Outcome::Refused,
        };
    };
    let envelope = match item {
        Ok(OutboxItem::Envelope(envelope)) => *envelope,
        Ok(OutboxItem::Involvement(_)) => panic!("an outbox message read as an involvement"),
        Err(_) => return Outcome::Parsed,
    };
    // A step's kind is the envelope's, whether the file named it or not.
    if let Some(step) = &envelope.workflow {
        assert_eq!(envelope.kind, step.kind(), "the step decides the kind");
    }
    // The payload is the one the message gave.
    // An inline payload is the JSON written, as written but for insignificant whitespace.
    if let Some(value) = &message.payload {
        let sent = serde_json::from_slice::<serde_json::Value>(&envelope.payload);
        let written = serde_json::from_str::<serde_json::Value>(value.get());
        if let (Ok(sent), Ok(written)) = (sent, written) {
            assert_eq!(sent, written, "the envelope carries the JSON written");
        }
        assert!(
            envelope.payload.len() <= value.get().len(),
            "the payload sent is no longer than written"
        );
    }
    let expected = message
        .payload_file
        .is_some()
        .then(|| FILE_CONTENTS.to_vec());
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use concordat_proto::fuzzing::{Body, replay_corpora, write_seeds};
    use std::path::PathBuf;

    /// The fuzz targets of this crate, by the name of their corpus directory.
    const TARGETS: [(&str, Body); 1] = [("outbox", outbox)];

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
    #[ignore = "writes agent/fuzz/corpus; run by hand to regenerate the seeds"]
    fn write_fuzz_seeds() {
        write_seeds(&corpus_root(), "outbox", &outbox_seeds());
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
                "recipients": ["ico"],
                "payload": {"step": "dsar_open"},
                "workflow": {"dsar_open": {"reference": "DSAR-2026-0012",
                    "concerns": ["0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b"],
                    "organisation": "acme-ltd", "respond_by": "2026-12-31"}},
            }),
            serde_json::json!({
                "recipients": ["nca"],
                "kind": "dsar_consultation",
                "payload": {},
                "workflow": {"dsar_answer": {"consultation_id": "nca:DSAR-2026-0012",
                    "need_more_time": "2027-01-15T12:00:00Z"}},
            }),
            serde_json::json!({
                "recipients": ["ico"],
                "payload": {},
                "workflow": {"dsar_close": {"consultation_id": "nca:DSAR-2026-0012"}},
            }),
            serde_json::json!({
                "recipients": ["ncsc"],
                "payload_base64": "IyBTdGF0ZW1lbnQ=",
                "content_type": "text/markdown",
                "workflow": {"comms_propose": {"reference": "press-1",
                    "publish_after": "2026-12-05"}},
            }),
            serde_json::json!({
                "recipients": ["ico"],
                "kind": "public_communication",
                "payload": {},
                "workflow": {"comms_answer": {"statement_id": "ico:press-1",
                    "objection": "names a victim"}},
            }),
            serde_json::json!({
                "recipients": ["ico"],
                "kind": "threat_assessment",
                "payload": {},
                "workflow": {"comms_answer": {"statement_id": "ico:press-1", "approve": true}},
            }),
            serde_json::json!({"incident_involvement": "ico:INC-2026-0042"}),
            serde_json::json!({"incident_involvement": "has space"}),
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
}
