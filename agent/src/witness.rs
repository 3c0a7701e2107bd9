//! The agent as a witness of the broker's audit log.
//!
//! Every receipt carries the transfer's audit entry, a signed checkpoint and an inclusion proof.
//! The witness checks the checkpoint's signature with the log key from `agent.toml`, the entry's
//! inclusion, and that the checkpoint is consistent with the last one it saw (asking the broker
//! for a consistency proof between the two sizes). The last checkpoint is kept in the spool's
//! `.state/`, so a restarted agent still holds the broker to its history. An inconsistency is an
//! alarm: it is logged and the agent stops sending.

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
    let cp = checkpoint::open(&proof.checkpoint, verifier)
        .map_err(|e| format!("the receipt's checkpoint does not verify: {e}"))?;
    let entry = audit::decode(&proof.entry).map_err(|e| format!("the receipt's entry: {e}"))?;
    match &entry.event {
        Some(pb::audit_entry::Event::TransferAccepted(a))
            if a.transfer_id == transfer_id
                && a.envelope
                    .as_ref()
                    .is_some_and(|e| e.message_id == message_id) => {}
        _ => {
            return Err(format!(
                "the audit entry of receipt {transfer_id} describes something else"
            ));
        }
    }
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
