//! Durable state: per-recipient queues, accepted transfers, receipts for idempotency, consent
//! uses and revocations — behind the small [`Storage`] trait, with sled as the embedded engine
//! ([`SledStorage`]; the layout of its queues is in [`queue`]).
//!
//! All writes go through one writer thread that does **group commit**: it takes every pending
//! operation, applies them (each atomically; the engine may share one transaction between
//! them), flushes once, and only then answers the waiting callers. Nothing is acknowledged
//! before it is on disk, and a burst of concurrent senders shares one fsync. (sled 0.34's own
//! background flush runs only every 500 ms, and its `flush_async` deadlocks under many
//! concurrent callers.)
//!
//! Readers never see more than is durable: the writer publishes the highest queue sequence
//! number it has flushed, and subscriptions deliver nothing beyond it.
//!
//! Every operation also appends its audit entries ([`crate::audit_log`]) in the same
//! transaction, and every batch is sealed with a signed checkpoint before the flush, so a
//! receipt carries its entry's index, a checkpoint that includes it, and the inclusion proof.

use std::{
    collections::BTreeSet,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use concordat_proto::{
    consent::TokenId,
    envelope::Envelope,
    ids::{AgencyId, MessageId},
    merkle::Hash,
    paserk::KeyId,
    pb,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    audit_log::SignedCheckpoint,
    policy::{ConsentLedger, Decision},
    refusal::{Failure, Internal, Reason, Refusal},
};

pub mod queue;
mod sled_store;

pub use sled_store::SledStorage;

/// The longest the writer waits for a batch to fill when it is under load.
const LINGER: Duration = Duration::from_millis(5);
/// A batch this large is written without waiting for more.
const LINGER_TARGET: usize = 64;
/// The writer stops waiting when no work has arrived for this long.
const LINGER_GAP: Duration = Duration::from_micros(500);
/// How often the writer looks for more work while it lingers.
const LINGER_POLL: Duration = Duration::from_micros(100);

/// The most operations one group commit applies before flushing.
const MAX_BATCH: usize = 512;

/// A write, applied atomically by [`Storage::apply`].
#[derive(Debug)]
pub enum Op {
    /// Record an accepted transfer and queue it for each recipient.
    Accept(Box<Accept>),
    /// Remove deliveries from a recipient's queue.
    Ack {
        /// Whose queue.
        recipient: AgencyId,
        /// The queue sequence numbers acknowledged.
        seqs: Vec<u64>,
    },
    /// Record a revocation and queue recall notices.
    Revoke(Box<Revoke>),
    /// Record a refused transfer in the audit log.
    Refuse(Box<pb::TransferRefused>),
    /// Record that queued items were handed to a recipient's connection.
    Delivered {
        /// The recipient.
        recipient: AgencyId,
        /// What was handed over: sequence number, transfer id, whether a recall notice.
        items: Vec<(u64, String, bool)>,
    },
    /// Record the configuration the broker started with.
    ConfigLoaded(pb::ConfigLoaded),
    /// Record an event that changes nothing but the audit log (a refused call, an export).
    Log(Box<pb::audit_entry::Event>),
}

/// An accepted envelope, decided and ready to store.
#[derive(Debug)]
pub struct Accept {
    /// The authenticated sender.
    pub sender: AgencyId,
    /// The envelope; its payload has moved into [`Accept::transfer`].
    pub envelope: Envelope,
    /// The decision that allowed it.
    pub decision: Decision,
    /// Identifies the envelope's content, to tell a retry from a reused message id.
    pub envelope_digest: [u8; 32],
    /// The broker-assigned transfer id.
    pub transfer_id: uuid::Uuid,
    /// When it was accepted.
    pub accepted_at: OffsetDateTime,
    /// Refuse if any recipient's queue holds this many items.
    pub max_queue_depth: u64,
    /// What is delivered (the agreement and clause, which differ per recipient, left empty).
    pub transfer: pb::Transfer,
    /// What the audit log records of the envelope.
    pub facts: pb::EnvelopeFacts,
    /// The agreement relied on for each recipient, as receipts and the log name them.
    pub authorities: Vec<pb::Authority>,
}

impl Accept {
    /// The write for `envelope`, accepted by `decision`. The records it will store are made
    /// here, on the caller's thread, so that the one writer thread only places them.
    pub fn new(
        sender: AgencyId,
        mut envelope: Envelope,
        decision: Decision,
        envelope_digest: [u8; 32],
        accepted_at: OffsetDateTime,
        max_queue_depth: u64,
    ) -> Accept {
        let transfer_id = uuid::Uuid::new_v4();
        let consent = decision.consent.as_ref().map(|c| (c.jti, c.issuer));
        let facts = facts(&sender, &envelope, consent, &decision.payload_digest);
        let e = &mut envelope;
        let transfer = pb::Transfer {
            transfer_id: transfer_id.to_string(),
            message_id: facts.message_id.clone(),
            sender: facts.sender.clone(),
            recipients: facts.recipients.clone(),
            kind: facts.kind,
            organisation: facts.organisation.clone(),
            incident_ref: facts.incident_ref.clone(),
            content_type: e.content_type.clone(),
            tlp: facts.tlp,
            payload: std::mem::take(&mut e.payload),
            consent_jti: facts.consent_jti.clone(),
            consent_issuer: facts.consent_issuer.clone(),
            // Per recipient: filled in when delivered.
            agreement_id: String::new(),
            clause: String::new(),
            accepted_at: Some(timestamp(accepted_at)),
        };
        let authorities = decision
            .authorities
            .iter()
            .map(|x| pb::Authority {
                recipient: x.recipient.to_string(),
                agreement_id: x.agreement_id.clone(),
                clause: x.clause.clone(),
            })
            .collect();
        Accept {
            sender,
            envelope,
            decision,
            envelope_digest,
            transfer_id,
            accepted_at,
            max_queue_depth,
            transfer,
            facts,
            authorities,
        }
    }
}

/// A verified revocation to record.
#[derive(Debug)]
pub struct Revoke {
    /// The agency that submitted the signed statement.
    pub submitted_by: AgencyId,
    /// The issuer whose tokens are revoked.
    pub issuer: KeyId,
    /// One token, or every token issued before a time.
    pub target: RevokeTarget,
    /// When the broker recorded it.
    pub revoked_at: OffsetDateTime,
}

/// What a revocation withdraws.
#[derive(Debug, Clone, Copy)]
pub enum RevokeTarget {
    /// One token.
    Token(TokenId),
    /// Every token of the issuer issued strictly before this time.
    IssuedBefore(OffsetDateTime),
}

/// What an applied operation produced.
#[derive(Debug)]
pub enum Applied {
    /// The transfer was stored.
    Accepted(Box<pb::Receipt>),
    /// The same envelope had been accepted before (or earlier in the same commit): its entry
    /// is at this index of the audit log, for [`Storage::receipt_at`] once committed.
    Duplicate(u64),
    /// This many deliveries were removed.
    Acked(u32),
    /// The revocation was recorded; recall notices queued.
    Revoked {
        /// Recall notices queued.
        recall_notices: u32,
        /// Whether it had been recorded before.
        duplicate: bool,
    },
    /// Audit entries were appended.
    Logged,
}

/// One item of a recipient's queue.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Its sequence number: the delivery id.
    pub seq: u64,
    /// What to deliver.
    pub body: pb::delivery::Body,
}

/// The storage engine under the broker. Reads may come from any thread; `apply` and `sync` are
/// called only by the writer thread, in order.
pub trait Storage: ConsentLedger + Send + Sync + 'static {
    /// Applies operations in order, each atomically (refusals do not affect the others). They
    /// are not durable until [`Storage::sync`] returns.
    fn apply_batch(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>>;
    /// Makes every applied operation durable.
    fn sync(&self) -> Result<(), Internal>;
    /// The receipt of an accepted message (marked `duplicate`, without its proof), and the
    /// digest of its envelope.
    fn receipt(
        &self,
        sender: &AgencyId,
        id: &MessageId,
    ) -> Result<Option<(pb::Receipt, [u8; 32])>, Internal>;
    /// The receipt (marked `duplicate`, without its proof) of the transfer whose acceptance is
    /// the audit entry at `log_index`.
    fn receipt_at(&self, log_index: u64) -> Result<pb::Receipt, Internal>;
    /// Up to `limit` of `recipient`'s oldest unacknowledged items with sequence numbers up to
    /// `durable`, leaving out those for which `skip` is true.
    fn claimable(
        &self,
        recipient: &AgencyId,
        durable: u64,
        limit: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Queued>, Internal>;
    /// How many items `recipient`'s queue holds.
    fn queue_depth(&self, recipient: &AgencyId) -> u64;
    /// The highest sequence number ever assigned (0 for none).
    fn last_seq(&self) -> u64;
    /// Signs a checkpoint of the log as it now stands, unless `previous` already covers it.
    fn seal(
        &self,
        previous: Option<&SignedCheckpoint>,
    ) -> Result<Option<SignedCheckpoint>, Internal>;
    /// The latest signed checkpoint.
    fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, Internal>;
    /// The number of audit entries.
    fn log_size(&self) -> Result<u64, Internal>;
    /// The audit entry at `index`.
    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal>;
    /// Up to `limit` consecutive audit entries from `index` on.
    fn log_entries(&self, index: u64, limit: usize) -> Result<Vec<Vec<u8>>, Internal>;
    /// The inclusion proof of entry `index` in the tree of `size` entries.
    fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal>;
    /// The consistency proof between two tree sizes.
    fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal>;
    /// The key that verifies the log's checkpoints (`name+keyid+base64`).
    fn log_verifier_key(&self) -> String;
}

/// The handle the services use: reads, and writes through the group-commit writer.
#[derive(Clone)]
pub struct Store {
    storage: Arc<dyn Storage>,
    jobs: mpsc::Sender<Job>,
    durable: watch::Receiver<u64>,
    checkpoint: watch::Receiver<Option<SignedCheckpoint>>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Applied, Failure>>,
}

impl Store {
    /// Starts the writer thread over `storage`.
    pub fn start(storage: Arc<dyn Storage>) -> Result<Store, Internal> {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let (durable_tx, durable) = watch::channel(storage.last_seq());
        let (checkpoint_tx, checkpoint) = watch::channel(storage.latest_checkpoint()?);
        let writer = storage.clone();
        thread::Builder::new()
            .name("concordat-writer".into())
            .spawn(move || write_loop(writer.as_ref(), rx, durable_tx, checkpoint_tx))
            .map_err(|e| Internal::new("starting the writer thread", e))?;
        Ok(Store {
            storage,
            jobs,
            durable,
            checkpoint,
        })
    }

    /// Applies `op` and returns once it is on disk.
    pub async fn commit(&self, op: Op) -> Result<Applied, Failure> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| Internal::new("submitting a write", "the writer has stopped"))?;
        answer
            .await
            .map_err(|_| Internal::new("awaiting a write", "the writer has stopped"))?
    }

    /// The storage, for reads.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// A receiver of the highest durable queue sequence number; it changes after every commit.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// The latest durable signed checkpoint.
    pub fn checkpoint(&self) -> Option<SignedCheckpoint> {
        self.checkpoint.borrow().clone()
    }

    /// Fills in a receipt's audit proof, waiting until a durable checkpoint covers its entry (a
    /// retry racing its first attempt is answered only once that attempt is on disk).
    pub async fn prove_receipt(&self, receipt: &mut pb::Receipt) -> Result<(), Internal> {
        let Some(audit) = receipt.audit.as_mut() else {
            return Ok(());
        };
        let index = audit.log_index;
        let cp = self
            .checkpoint
            .clone()
            .wait_for(|cp| cp.as_ref().is_some_and(|cp| cp.size > index))
            .await
            .map_err(|_| Internal::new("awaiting a checkpoint", "the writer has stopped"))?
            .clone();
        if let Some(cp) = cp {
            fill_proof(self.storage.as_ref(), audit, &cp)?;
        }
        Ok(())
    }
}

fn fill_proof(
    storage: &dyn Storage,
    audit: &mut pb::AuditProof,
    cp: &SignedCheckpoint,
) -> Result<(), Internal> {
    if audit.log_index >= cp.size {
        return Ok(());
    }
    audit.checkpoint = cp.note.clone();
    audit.inclusion_proof = storage
        .prove_entry(audit.log_index, cp.size)?
        .into_iter()
        .map(|h| h.0.to_vec())
        .collect();
    if audit.entry.is_empty() {
        audit.entry = storage.log_entry(audit.log_index)?.unwrap_or_default();
    }
    Ok(())
}

fn write_loop(
    storage: &dyn Storage,
    mut rx: mpsc::Receiver<Job>,
    durable: watch::Sender<u64>,
    checkpoint: watch::Sender<Option<SignedCheckpoint>>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut latest = checkpoint.borrow().clone();
    let mut previous_batch = 0usize;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        // Under load (the last batch had company), wait a moment for more work: a flush and a
        // transaction are paid per batch, so fuller batches carry more per fsync. A lone
        // request is never held back.
        let linger_until = (previous_batch > 1).then(|| Instant::now() + LINGER);
        let mut last_arrival = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(job) => {
                    batch.push(job);
                    last_arrival = Instant::now();
                    if batch.len() >= MAX_BATCH {
                        break;
                    }
                }
                Err(_) => match linger_until {
                    // Keep waiting only while work keeps arriving.
                    Some(until)
                        if batch.len() < LINGER_TARGET
                            && Instant::now() < until
                            && last_arrival.elapsed() < LINGER_GAP =>
                    {
                        thread::sleep(LINGER_POLL);
                    }
                    _ => break,
                },
            }
        }
        previous_batch = batch.len();
        let (ops, replies): (Vec<Op>, Vec<_>) =
            batch.drain(..).map(|job| (job.op, job.reply)).unzip();
        let results = storage.apply_batch(&ops);
        // Seal the batch with a checkpoint, flushed together with it.
        let sealed = storage.seal(latest.as_ref());
        let synced = sealed.and_then(|new| storage.sync().map(|()| new));
        if let Ok(new) = &synced {
            if let Some(cp) = new {
                latest = Some(cp.clone());
                checkpoint.send_replace(latest.clone());
            }
            durable.send_replace(storage.last_seq());
            // Inclusion proofs are computed by the waiting handlers (Store::prove_receipt), in
            // parallel, not here on the one writer thread.
        }
        let synced = synced.map(|_| ());
        for (reply, result) in replies.into_iter().zip(results) {
            let answer = match &synced {
                Ok(()) => result,
                Err(e) => Err(Failure::Internal(Internal::new(
                    "flushing to disk",
                    e.to_string(),
                ))),
            };
            let _ = reply.send(answer);
        }
        if let Err(e) = synced {
            tracing::error!(error = %e, "flush failed: the writes of this batch were not acknowledged");
        }
    }
}

/// A digest identifying an envelope's content, independent of the consent token's bytes, given
/// the SHA-256 of its payload.
pub fn envelope_digest(e: &Envelope, payload_sha256: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for r in &e.recipients {
        field(r.as_str().as_bytes());
    }
    field(b"|");
    field(e.kind.as_str().as_bytes());
    field(
        e.organisation
            .as_ref()
            .map(|o| o.as_str())
            .unwrap_or_default()
            .as_bytes(),
    );
    field(e.incident_ref.as_deref().unwrap_or_default().as_bytes());
    field(e.content_type.as_bytes());
    field(e.tlp.as_str().as_bytes());
    field(payload_sha256);
    h.finalize().into()
}

/// A timestamp for the wire.
pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// The receipt of the transfer whose acceptance was logged as `entry` (encoded as `bytes`) at
/// `log_index`, without its checkpoint and proof. Every receipt, first or duplicate, is made
/// here: it says nothing that its audit entry does not.
pub fn receipt_from_entry(
    log_index: u64,
    entry: &pb::AuditEntry,
    bytes: Vec<u8>,
) -> Result<pb::Receipt, Internal> {
    let Some(pb::audit_entry::Event::TransferAccepted(accepted)) = &entry.event else {
        return Err(Internal::new(
            "making a receipt",
            format!("audit entry {log_index} is not an accepted transfer"),
        ));
    };
    let facts = accepted.envelope.clone().unwrap_or_default();
    Ok(pb::Receipt {
        transfer_id: accepted.transfer_id.clone(),
        message_id: facts.message_id,
        accepted_at: entry.time,
        authorities: accepted.authorities.clone(),
        consent_jti: facts.consent_jti,
        consent_issuer: facts.consent_issuer,
        duplicate: false,
        audit: Some(pb::AuditProof {
            log_index,
            entry: bytes,
            ..Default::default()
        }),
    })
}

/// What the audit log records about a validated envelope: never the payload, only its digest.
pub fn facts(
    sender: &AgencyId,
    e: &Envelope,
    consent: Option<(TokenId, KeyId)>,
    payload_sha256: &[u8; 32],
) -> pb::EnvelopeFacts {
    pb::EnvelopeFacts {
        message_id: e.message_id.to_string(),
        sender: sender.to_string(),
        recipients: e.recipients.iter().map(ToString::to_string).collect(),
        kind: pb::MessageKind::from(e.kind) as i32,
        organisation: e
            .organisation
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        incident_ref: e.incident_ref.clone().unwrap_or_default(),
        tlp: pb::Tlp::from(e.tlp) as i32,
        payload_sha256: payload_sha256.to_vec(),
        payload_size: e.payload.len() as u64,
        consent_jti: consent.map(|c| c.0.to_string()).unwrap_or_default(),
        consent_issuer: consent.map(|c| c.1.to_string()).unwrap_or_default(),
    }
}

/// What the audit log records about a validated envelope the decision refused: its facts, with
/// the issuer named by the consent token's footer if it has one (whether or not it verified).
pub fn refused_facts(
    sender: &AgencyId,
    e: &Envelope,
    payload_sha256: &[u8; 32],
) -> pb::EnvelopeFacts {
    let mut f = facts(sender, e, None, payload_sha256);
    if let Some(token) = &e.consent_token {
        f.consent_issuer = concordat_proto::consent::key_id_of(token)
            .map(|k| k.to_string())
            .unwrap_or_default();
    }
    f
}

/// The refusal of a message id used before for another envelope.
pub fn message_id_reused() -> Refusal {
    Refusal::new(
        Reason::MessageIdReused,
        "this message id was already used for a different envelope; choose a new id",
    )
}

/// What the audit log records about an envelope that did not validate: its fields as far as
/// they go, each cut to a bounded length, the payload only by digest.
pub fn raw_facts(
    sender: &AgencyId,
    e: &pb::Envelope,
    payload_sha256: &[u8; 32],
) -> pb::EnvelopeFacts {
    let cut = |s: &str| s.chars().take(128).collect::<String>();
    pb::EnvelopeFacts {
        message_id: cut(&e.message_id),
        sender: sender.to_string(),
        recipients: e.recipients.iter().take(32).map(|r| cut(r)).collect(),
        kind: e.kind,
        organisation: cut(&e.organisation),
        incident_ref: cut(&e.incident_ref),
        tlp: e.tlp,
        payload_sha256: payload_sha256.to_vec(),
        payload_size: e.payload.len() as u64,
        consent_jti: String::new(),
        consent_issuer: concordat_proto::consent::key_id_of(&e.consent_token)
            .map(|k| k.to_string())
            .unwrap_or_default(),
    }
}

/// The agencies with a non-empty queue, for logs at start-up.
pub fn nonempty_queues(
    storage: &dyn Storage,
    agencies: &BTreeSet<AgencyId>,
) -> Vec<(AgencyId, u64)> {
    agencies
        .iter()
        .map(|a| (a.clone(), storage.queue_depth(a)))
        .filter(|(_, d)| *d > 0)
        .collect()
}
