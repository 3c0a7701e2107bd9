//! The agent as a witness of the broker's audit log.
//!
//! Every receipt carries the transfer's audit entry, a signed checkpoint and an inclusion proof.
//! The witness checks the checkpoint's signature with the log key from `agent.toml`, the entry's
//! inclusion, and that the checkpoint is consistent with the last one it saw (asking the broker
//! for a consistency proof between the two sizes). The last checkpoint is kept in the spool's
//! `.state/`, so a restarted agent still holds the broker to its history. An inconsistency is an
//! alarm: it is logged and the agent stops sending.
//!
//! Every delivery carries the same kind of proof for the entry it was queued under (a
//! transfer's `transfer_accepted`, a recall notice's `recall_queued`); the witness checks it,
//! including that the entry names this payload's SHA-256, sender and recipients, before the
//! delivery is written to the inbox and acknowledged.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use concordat_proto::{
    audit,
    checkpoint::{self, Checkpoint, LogVerifier},
    merkle::{self, Hash},
    pb,
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::{client::Broker, spool::atomic_write};

/// Why a receipt's audit proof was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The broker's log contradicts what it showed before, or signs what it should not: stop.
    #[error("ALARM: {0}")]
    Alarm(String),
    /// The check could not be completed (e.g. the broker is unreachable); try again later.
    #[error("{0}")]
    Incomplete(String),
}

/// Checks the broker's checkpoints for one agent.
pub struct Witness {
    verifier: LogVerifier,
    state_file: PathBuf,
    last: Mutex<Option<Checkpoint>>,
    alarmed: AtomicBool,
}

fn hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, WitnessError> {
    proof
        .iter()
        .map(|h| {
            Hash::from_slice(h)
                .map_err(|_| WitnessError::Alarm("a proof hash is not 32 bytes".into()))
        })
        .collect()
}

/// Checks, offline, that `proof` proves the acceptance of transfer `transfer_id` (message
/// `message_id`): the checkpoint is signed by the log key `verifier` names, the entry is that
/// transfer's `transfer_accepted` entry, and the inclusion proof places the entry at its index
/// in the checkpoint's tree. Returns the checkpoint, or what is wrong.
pub fn verify_proof(
    verifier: &LogVerifier,
    transfer_id: &str,
    message_id: &str,
    proof: &pb::AuditProof,
) -> Result<Checkpoint, String> {
    verify_entry(verifier, "receipt", proof, |entry| match &entry.event {
        Some(pb::audit_entry::Event::TransferAccepted(a))
            if a.transfer_id == transfer_id
                && a.envelope
                    .as_ref()
                    .is_some_and(|e| e.message_id == message_id) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "the audit entry of receipt {transfer_id} describes something else"
        )),
    })
}

/// What a delivery says of itself, to hold against the audit entry its proof carries: read
/// from the wire by the agent, or from an inbox file by `concordat receipt verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryClaim {
    /// A transfer: proved by its `transfer_accepted` entry.
    Transfer {
        /// The broker's transfer id.
        transfer_id: String,
        /// The sender's message id.
        message_id: String,
        /// The sending agency.
        sender: String,
        /// Every recipient of the transfer.
        recipients: Vec<String>,
        /// The SHA-256 of the payload.
        payload_sha256: Vec<u8>,
    },
    /// A recall notice: proved by its `recall_queued` entry.
    Recall {
        /// The transfer recalled.
        transfer_id: String,
        /// Its message id.
        message_id: String,
        /// Its sender.
        sender: String,
        /// The revoked consent token.
        consent_jti: String,
    },
    /// A notice of the broker's own: proved by its `notice_queued` entry, which holds it whole.
    Notice(pb::Notice),
}

impl DeliveryClaim {
    /// What `body` claims; the payload is hashed here.
    pub fn of(body: &pb::delivery::Body) -> DeliveryClaim {
        match body {
            pb::delivery::Body::Transfer(t) => DeliveryClaim::Transfer {
                transfer_id: t.transfer_id.clone(),
                message_id: t.message_id.clone(),
                sender: t.sender.clone(),
                recipients: t.recipients.clone(),
                payload_sha256: Sha256::digest(&t.payload).to_vec(),
            },
            pb::delivery::Body::RecallNotice(n) => DeliveryClaim::Recall {
                transfer_id: n.transfer_id.clone(),
                message_id: n.message_id.clone(),
                sender: n.sender.clone(),
                consent_jti: n.consent_jti.clone(),
            },
            pb::delivery::Body::Notice(n) => DeliveryClaim::Notice(n.clone()),
        }
    }

    /// Whether `entry` is the entry this delivery was queued under: for a transfer, its
    /// acceptance of this payload from this sender to these recipients; for a recall notice,
    /// the recall of this transfer.
    fn check(&self, entry: &pb::AuditEntry) -> Result<(), String> {
        use pb::audit_entry::Event;
        let matches = match (self, &entry.event) {
            (
                DeliveryClaim::Transfer {
                    transfer_id,
                    message_id,
                    sender,
                    recipients,
                    payload_sha256,
                },
                Some(Event::TransferAccepted(a)),
            ) => {
                a.transfer_id == *transfer_id
                    && a.envelope.as_ref().is_some_and(|e| {
                        e.message_id == *message_id
                            && e.sender == *sender
                            && e.recipients == *recipients
                            && e.payload_sha256 == *payload_sha256
                    })
            }
            (
                DeliveryClaim::Recall {
                    transfer_id,
                    message_id,
                    sender,
                    consent_jti,
                },
                Some(Event::RecallQueued(q)),
            ) => {
                q.transfer_id == *transfer_id
                    && q.message_id == *message_id
                    && q.sender == *sender
                    && q.consent_jti == *consent_jti
            }
            (DeliveryClaim::Notice(n), Some(Event::NoticeQueued(q))) => {
                q.notice.as_ref() == Some(n)
            }
            _ => false,
        };
        if matches {
            Ok(())
        } else {
            Err(format!(
                "the audit entry of delivery {} describes something else (another transfer, \
                 sender, recipient list or payload)",
                self.transfer_id()
            ))
        }
    }

    /// The transfer delivered or recalled.
    pub fn transfer_id(&self) -> &str {
        match self {
            DeliveryClaim::Transfer { transfer_id, .. }
            | DeliveryClaim::Recall { transfer_id, .. } => transfer_id,
            DeliveryClaim::Notice(n) => &n.notice_id,
        }
    }
}

/// Checks, offline, that `proof` proves the delivery `claim`: the checkpoint is signed by the
/// log key `verifier` names, the entry is the one the delivery was queued under
/// ([`DeliveryClaim`]), and the inclusion proof places it at its index in the checkpoint's tree.
pub fn verify_delivery(
    verifier: &LogVerifier,
    claim: &DeliveryClaim,
    proof: &pb::AuditProof,
) -> Result<Checkpoint, String> {
    verify_entry(verifier, "delivery", proof, |entry| claim.check(entry))
}

/// The checks common to receipts and deliveries: the checkpoint's signature, the entry
/// (`what_entry`), and its inclusion in the checkpoint's tree.
fn verify_entry(
    verifier: &LogVerifier,
    what: &str,
    proof: &pb::AuditProof,
    what_entry: impl FnOnce(&pb::AuditEntry) -> Result<(), String>,
) -> Result<Checkpoint, String> {
    let cp = checkpoint::open(&proof.checkpoint, verifier)
        .map_err(|e| format!("the {what}'s checkpoint does not verify: {e}"))?;
    let entry = audit::decode(&proof.entry).map_err(|e| format!("the {what}'s entry: {e}"))?;
    what_entry(&entry)?;
    let path: Vec<Hash> = proof
        .inclusion_proof
        .iter()
        .map(|h| Hash::from_slice(h).map_err(|_| "a proof hash is not 32 bytes".to_owned()))
        .collect::<Result<_, _>>()?;
    merkle::check_record(
        &path,
        cp.size(),
        cp.root(),
        proof.log_index,
        &merkle::leaf_hash(&proof.entry),
    )
    .map_err(|e| {
        format!(
            "entry {} is not in the checkpoint's tree: {e}",
            proof.log_index
        )
    })?;
    Ok(cp)
}

impl Witness {
    /// A witness trusting `verifier`, keeping its last checkpoint in `state_dir/checkpoint`.
    pub fn new(verifier: LogVerifier, state_dir: PathBuf) -> anyhow::Result<Self> {
        let state_file = state_dir.join("checkpoint");
        let last = match std::fs::read_to_string(&state_file) {
            Ok(note) => Some(checkpoint::open(&note, &verifier).map_err(|e| {
                anyhow::anyhow!(
                    "{}: stored checkpoint does not verify: {e}",
                    state_file.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Witness {
            verifier,
            state_file,
            last: Mutex::new(last),
            alarmed: AtomicBool::new(false),
        })
    }

    /// Whether an alarm has been raised: the agent must not send.
    pub fn alarmed(&self) -> bool {
        self.alarmed.load(Ordering::SeqCst)
    }

    fn alarm(&self, why: String) -> WitnessError {
        if !self.alarmed.swap(true, Ordering::SeqCst) {
            tracing::error!("ALARM: {why}; the agent stops sending until an operator investigates");
        }
        WitnessError::Alarm(why)
    }

    /// Checks the audit proof of a receipt for message `message_id`.
    pub async fn check_receipt(
        &self,
        broker: &Broker,
        receipt: &pb::Receipt,
    ) -> Result<(), WitnessError> {
        let Some(proof) = &receipt.audit else {
            return Err(self.alarm(format!(
                "receipt for {} carries no audit proof",
                receipt.message_id
            )));
        };
        let cp = verify_proof(
            &self.verifier,
            &receipt.transfer_id,
            &receipt.message_id,
            proof,
        )
        .map_err(|why| self.alarm(why))?;
        self.advance(broker, cp, &proof.checkpoint).await
    }

    /// Checks the audit proof of a delivery before it is stored and acknowledged: the entry it
    /// was queued under, its inclusion, and the checkpoint's consistency with the last one seen.
    /// A delivery without a proof, or whose proof fails, is an alarm.
    pub async fn check_delivery(
        &self,
        broker: &Broker,
        delivery: &pb::Delivery,
    ) -> Result<(), WitnessError> {
        let Some(body) = &delivery.body else {
            return Ok(());
        };
        let claim = DeliveryClaim::of(body);
        let Some(proof) = &delivery.audit else {
            return Err(self.alarm(format!(
                "delivery {} (transfer {}) carries no audit proof",
                delivery.delivery_id,
                claim.transfer_id()
            )));
        };
        let cp = verify_delivery(&self.verifier, &claim, proof).map_err(|why| self.alarm(why))?;
        self.advance(broker, cp, &proof.checkpoint).await
    }

    /// Checks `new` against the last checkpoint seen and keeps the larger.
    async fn advance(
        &self,
        broker: &Broker,
        new: Checkpoint,
        note: &str,
    ) -> Result<(), WitnessError> {
        let mut last = self.last.lock().await;
        let Some(old) = last.as_ref() else {
            self.store(note)?;
            *last = Some(new);
            return Ok(());
        };
        if old.origin() != new.origin() {
            return Err(self.alarm(format!(
                "checkpoint origin changed from {} to {}",
                old.origin(),
                new.origin()
            )));
        }
        let (small, large) = if new.size() >= old.size() {
            (old, &new)
        } else {
            (&new, old)
        };
        if small.size() == large.size() {
            if small.root() != large.root() {
                return Err(self.alarm(format!(
                    "two checkpoints of size {} with different roots (a fork)",
                    small.size()
                )));
            }
            return Ok(());
        }
        let response = broker
            .deadline(broker.audit().checkpoint(pb::CheckpointRequest {
                from_size: small.size(),
                to_size: large.size(),
            }))
            .await
            .map_err(|s| match crate::client::refusal_of(&s) {
                // An honest broker can always prove consistency between two sizes it signed;
                // refusing the sizes means its log no longer reaches the larger one.
                Some((reason, message)) if reason == "MALFORMED" => self.alarm(format!(
                    "the broker cannot prove its log of size {} extends the one of size {}: {message}",
                    large.size(),
                    small.size()
                )),
                _ => WitnessError::Incomplete(format!("asking for a consistency proof: {}", s.message())),
            })?
            .into_inner();
        let proof = hashes(&response.consistency_proof)?;
        checkpoint::check_consistent(small, large, &proof).map_err(|e| {
            self.alarm(format!(
                "checkpoint of size {} is not consistent with the one of size {}: {e}",
                large.size(),
                small.size()
            ))
        })?;
        if new.size() > old.size() {
            self.store(note)?;
            *last = Some(new);
        }
        Ok(())
    }

    fn store(&self, note: &str) -> Result<(), WitnessError> {
        let dir = self
            .state_file
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        atomic_write(&dir, "checkpoint", note.as_bytes())
            .map_err(|e| WitnessError::Incomplete(format!("storing the checkpoint: {e}")))
    }
}
