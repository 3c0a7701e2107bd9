//! Durable state: per-recipient queues, accepted transfers, receipts for idempotency, consent
//! uses and revocations — behind the small [`Storage`] trait, with sled as the embedded engine.
//!
//! All writes go through one writer thread that does **group commit**: it takes every pending
//! operation, applies each atomically (one sled transaction per operation), flushes once, and
//! only then answers the waiting callers. Nothing is acknowledged before it is on disk, and a
//! burst of concurrent senders shares one fsync. (sled 0.34's own background flush runs only
//! every 500 ms, and its `flush_async` deadlocks under many concurrent callers.)
//!
//! Readers never see more than is durable: the writer publishes the highest queue sequence
//! number it has flushed, and subscriptions deliver nothing beyond it.
//!
//! Every operation also appends its audit entries ([`crate::audit_log`]) in the same
//! transaction, and every batch is sealed with a signed checkpoint before the flush, so a
//! receipt carries its entry's index, a checkpoint that includes it, and the inclusion proof.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
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
use prost::Message;
use sha2::{Digest, Sha256};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    audit_log::{self, Log, SignedCheckpoint, TxLog},
    policy::{ConsentLedger, ConsentUse, Decision},
    refusal::{Failure, Internal, Reason, Refusal},
};

/// sled's page cache size.
const CACHE_BYTES: u64 = 128 * 1024 * 1024;

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
}

/// An accepted envelope, decided and ready to store.
#[derive(Debug)]
pub struct Accept {
    /// The authenticated sender.
    pub sender: AgencyId,
    /// The envelope.
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
    /// The transfer was stored (or had been: `duplicate` on the receipt).
    Accepted(Box<pb::Receipt>),
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
    /// The receipt of an accepted message, and the digest of its envelope.
    fn receipt(
        &self,
        sender: &AgencyId,
        id: &MessageId,
    ) -> Result<Option<(pb::Receipt, [u8; 32])>, Internal>;
    /// Up to `limit` items of `recipient`'s queue with sequence numbers in `from..=to`, oldest
    /// first, leaving out those for which `skip` is true.
    fn queued(
        &self,
        recipient: &AgencyId,
        from: u64,
        to: u64,
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

// ---------------------------------------------------------------------------------------------
// sled

/// What the broker stores per accepted message id, for idempotency.
#[derive(Clone, PartialEq, Message)]
struct StoredReceipt {
    #[prost(message, optional, tag = "1")]
    receipt: Option<pb::Receipt>,
    #[prost(bytes = "vec", tag = "2")]
    envelope_digest: Vec<u8>,
}

/// A queue item: a transfer (by id) or a recall notice.
#[derive(Clone, PartialEq, Message)]
struct StoredItem {
    #[prost(bytes = "vec", tag = "1")]
    transfer_id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    recall: Option<pb::RecallNotice>,
    /// The agreement and clause that allowed the transfer to this recipient.
    #[prost(string, tag = "3")]
    agreement_id: String,
    #[prost(string, tag = "4")]
    clause: String,
    /// The transfer itself when it has a single recipient: then it lives in its queue item
    /// alone, and there is no shared record in `transfers` to write and delete.
    #[prost(message, optional, tag = "5")]
    transfer: Option<pb::Transfer>,
}

/// A transfer made under a consent token, indexed for recall.
#[derive(Clone, PartialEq, Message)]
struct ConsentedTransfer {
    /// The token's `iat`, in nanoseconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    issued_at_nanos: i64,
    #[prost(string, repeated, tag = "2")]
    recipients: Vec<String>,
    #[prost(string, tag = "3")]
    message_id: String,
    #[prost(string, tag = "4")]
    sender: String,
    #[prost(string, tag = "5")]
    organisation: String,
    #[prost(string, tag = "6")]
    jti: String,
}

/// The sled engine.
pub struct SledStorage {
    db: sled::Db,
    receipts: sled::Tree,
    transfers: sled::Tree,
    refs: sled::Tree,
    queues: sled::Tree,
    uses: sled::Tree,
    consented: sled::Tree,
    revoked: sled::Tree,
    meta: sled::Tree,
    log: Log,
    depths: Mutex<HashMap<AgencyId, u64>>,
    last_seq: std::sync::atomic::AtomicU64,
}

const NEXT_SEQ: &[u8] = b"next_seq";

fn sled_err(context: &'static str) -> impl Fn(sled::Error) -> Internal {
    move |e| Internal::new(context, e)
}

fn queue_key(recipient: &AgencyId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(recipient.as_str().len() + 9);
    k.extend_from_slice(recipient.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn receipt_key(sender: &AgencyId, id: &MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(sender.as_str().len() + 17);
    k.extend_from_slice(sender.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn token_key(issuer: &KeyId, jti: &TokenId) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(issuer.as_bytes());
    k.extend_from_slice(jti.as_bytes());
    k
}

fn revoked_before_key(issuer: &KeyId) -> Vec<u8> {
    let mut k = b"before:".to_vec();
    k.extend_from_slice(issuer.as_bytes());
    k
}

fn revoked_jti_key(issuer: &KeyId, jti: &TokenId) -> Vec<u8> {
    let mut k = b"jti:".to_vec();
    k.extend_from_slice(&token_key(issuer, jti));
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn be_i128(bytes: &[u8]) -> Option<i128> {
    Some(i128::from_be_bytes(bytes.try_into().ok()?))
}

/// The trees of the store as seen inside one transaction.
struct Trees<'a> {
    receipts: &'a TransactionalTree,
    transfers: &'a TransactionalTree,
    refs: &'a TransactionalTree,
    queues: &'a TransactionalTree,
    uses: &'a TransactionalTree,
    consented: &'a TransactionalTree,
    revoked: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    log: TxLog<'a>,
}

/// What a batch changes in the in-memory counters, applied once it commits.
#[derive(Default)]
struct Effects {
    /// Queue depth changes per recipient.
    depth: HashMap<AgencyId, i64>,
    /// The highest queue sequence number assigned.
    last_seq: u64,
}

/// Aborts a sled transaction with a failure.
type TxResult<T> = Result<T, ConflictableTransactionError<Failure>>;

fn abort<T>(f: impl Into<Failure>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(f.into()))
}

impl SledStorage {
    /// Opens (or creates) the database in `dir`, with the audit log's key (created on first
    /// start) for checkpoints whose origin is `origin`.
    pub fn open(dir: &Path, origin: &str) -> Result<SledStorage, Internal> {
        let signer = audit_log::load_or_create_key(dir, origin)?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .mode(sled::Mode::HighThroughput)
            // sled caches up to 1 GiB by default; keep the broker's memory bounded.
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(sled_err("opening the database"))?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err("opening a tree"));
        let storage = SledStorage {
            receipts: tree("receipts")?,
            transfers: tree("transfers")?,
            refs: tree("refs")?,
            queues: tree("queues")?,
            uses: tree("consent_uses")?,
            consented: tree("consented_transfers")?,
            revoked: tree("revocations")?,
            meta: tree("meta")?,
            log: Log::new(
                tree("log_entries")?,
                tree("log_hashes")?,
                tree("meta")?,
                signer,
            ),
            depths: Mutex::new(HashMap::new()),
            last_seq: std::sync::atomic::AtomicU64::new(0),
            db,
        };
        let next = storage
            .meta
            .get(NEXT_SEQ)
            .map_err(sled_err("reading the sequence counter"))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(1);
        storage
            .last_seq
            .store(next.saturating_sub(1), std::sync::atomic::Ordering::SeqCst);
        // Count each recipient's queue once; the writer keeps the counts from here on.
        let mut depths: HashMap<AgencyId, u64> = HashMap::new();
        for item in storage.queues.iter().keys() {
            let key = item.map_err(sled_err("counting queues"))?;
            let name = key.split(|b| *b == 0).next().unwrap_or_default();
            if let Ok(id) = String::from_utf8_lossy(name).parse::<AgencyId>() {
                *depths.entry(id).or_default() += 1;
            }
        }
        *storage.lock_depths() = depths;
        Ok(storage)
    }

    fn lock_depths(&self) -> std::sync::MutexGuard<'_, HashMap<AgencyId, u64>> {
        // A poisoned lock means a panic while holding it; the counts are still usable.
        self.depths.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(meta: &TransactionalTree) -> TxResult<u64> {
        Ok(meta.get(NEXT_SEQ)?.and_then(|v| be_u64(&v)).unwrap_or(1))
    }

    fn is_revoked_in(
        revoked: &TransactionalTree,
        issuer: &KeyId,
        jti: &TokenId,
        issued_at: OffsetDateTime,
    ) -> TxResult<bool> {
        if revoked.get(revoked_jti_key(issuer, jti))?.is_some() {
            return Ok(true);
        }
        let before = revoked
            .get(revoked_before_key(issuer))?
            .and_then(|v| be_i128(&v));
        Ok(before.is_some_and(|b| issued_at.unix_timestamp_nanos() < b))
    }

    /// Applies a batch: consecutive operations share one sled transaction (sled's cost is per
    /// write and per transaction, so this halves it); a revocation, which scans committed
    /// state, runs in a transaction of its own between them.
    fn apply_batch_sled(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut start = 0;
        for (i, op) in ops.iter().enumerate() {
            if let Op::Revoke(r) = op {
                out.extend(self.run_tx(&ops[start..i]));
                out.push(self.apply_revoke(r));
                start = i + 1;
            }
        }
        out.extend(self.run_tx(&ops[start..]));
        out
    }

    /// Applies `ops` in one transaction. A refusal writes nothing but its audit entry and does
    /// not affect the others; an internal error aborts them all.
    fn run_tx(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        if ops.is_empty() {
            return Vec::new();
        }
        let trees = (
            &self.receipts,
            &self.transfers,
            &self.refs,
            &self.queues,
            &self.uses,
            &self.consented,
            &self.revoked,
            &self.meta,
            &self.log.entries,
            &self.log.hashes,
        );
        let outcome = trees.transaction(
            |(receipts, transfers, refs, queues, uses, consented, revoked, meta, le, lh)| {
                let t = Trees {
                    receipts,
                    transfers,
                    refs,
                    queues,
                    uses,
                    consented,
                    revoked,
                    meta,
                    log: TxLog {
                        entries: le,
                        hashes: lh,
                        meta,
                    },
                };
                let mut fx = Effects::default();
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(self.op_in(&t, op, &mut fx)?);
                }
                Ok((results, fx))
            },
        );
        match tx_outcome(outcome) {
            Ok((results, fx)) => {
                self.settle(&fx);
                results
            }
            Err(f) => {
                let why = match f {
                    Failure::Internal(e) => e.to_string(),
                    Failure::Refused(r) => r.to_string(),
                };
                ops.iter()
                    .map(|_| {
                        Err(Failure::Internal(Internal::new(
                            "applying a batch",
                            why.clone(),
                        )))
                    })
                    .collect()
            }
        }
    }

    /// One operation inside the batch's transaction. The outer error aborts the transaction;
    /// the inner result is the operation's own outcome.
    fn op_in(
        &self,
        t: &Trees<'_>,
        op: &Op,
        fx: &mut Effects,
    ) -> TxResult<Result<Applied, Failure>> {
        match op {
            Op::Accept(a) => self.accept_in(t, a, fx),
            Op::Ack { recipient, seqs } => Self::ack_in(t, recipient, seqs, fx).map(Ok),
            Op::Refuse(refused) => {
                t.log
                    .append(&audit_log::entry(pb::audit_entry::Event::TransferRefused(
                        *refused.clone(),
                    )))?;
                Ok(Ok(Applied::Logged))
            }
            Op::Delivered { recipient, items } => {
                for (seq, transfer_id, recall_notice) in items {
                    t.log
                        .append(&audit_log::entry(pb::audit_entry::Event::Delivered(
                            pb::Delivered {
                                recipient: recipient.to_string(),
                                delivery_id: seq.to_string(),
                                transfer_id: transfer_id.clone(),
                                recall_notice: *recall_notice,
                            },
                        )))?;
                }
                Ok(Ok(Applied::Logged))
            }
            Op::ConfigLoaded(c) => {
                t.log
                    .append(&audit_log::entry(pb::audit_entry::Event::ConfigLoaded(
                        c.clone(),
                    )))?;
                Ok(Ok(Applied::Logged))
            }
            Op::Revoke(_) => Err(ConflictableTransactionError::Abort(Failure::Internal(
                Internal::new("applying a batch", "a revocation must run on its own"),
            ))),
        }
    }

    /// Records what a committed batch changed in the in-memory counters.
    fn settle(&self, fx: &Effects) {
        let mut depths = self.lock_depths();
        for (r, delta) in &fx.depth {
            let d = depths.entry(r.clone()).or_default();
            *d = d.saturating_add_signed(*delta);
        }
        drop(depths);
        self.last_seq
            .fetch_max(fx.last_seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// Accepts a transfer, or refuses it (then only its audit entry is written).
    fn accept_in(
        &self,
        t: &Trees<'_>,
        a: &Accept,
        fx: &mut Effects,
    ) -> TxResult<Result<Applied, Failure>> {
        match self.accept_checks(t, a, fx)? {
            Err(refusal) => {
                // Refusals decided here (revoked meanwhile, used up, queue full, id reused) are
                // logged like any other, in the same group commit.
                let consent = a.decision.consent.as_ref().map(|c| (c.jti, c.issuer));
                t.log
                    .append(&audit_log::entry(pb::audit_entry::Event::TransferRefused(
                        pb::TransferRefused {
                            envelope: Some(facts(
                                &a.sender,
                                &a.envelope,
                                consent,
                                &a.decision.payload_digest,
                            )),
                            reason: refusal.reason.as_str().into(),
                            message: refusal.message.clone(),
                        },
                    )))?;
                Ok(Err(Failure::Refused(refusal)))
            }
            Ok(Some(duplicate)) => Ok(Ok(Applied::Accepted(Box::new(duplicate)))),
            Ok(None) => Self::accept_writes(t, a, fx).map(|r| Ok(Applied::Accepted(Box::new(r)))),
        }
    }

    /// The checks that can change between decision and commit, before anything is written:
    /// `Ok(Some(receipt))` for a duplicate, `Err(refusal)`, or `Ok(None)` to go ahead.
    fn accept_checks(
        &self,
        t: &Trees<'_>,
        a: &Accept,
        fx: &Effects,
    ) -> TxResult<Result<Option<pb::Receipt>, Refusal>> {
        let rkey = receipt_key(&a.sender, &a.envelope.message_id);
        if let Some(found) = t.receipts.get(&rkey)? {
            return match duplicate_receipt(&found, &a.envelope_digest) {
                Ok((receipt, _)) => Ok(Ok(Some(receipt))),
                Err(ConflictableTransactionError::Abort(Failure::Refused(r))) => Ok(Err(r)),
                Err(other) => Err(other),
            };
        }
        // After the receipt check: a retry of a stored message is answered even when the queue
        // its first attempt filled is full.
        for r in &a.envelope.recipients {
            let depth = self
                .queue_depth(r)
                .saturating_add_signed(fx.depth.get(r).copied().unwrap_or(0));
            if depth >= a.max_queue_depth {
                return Ok(Err(Refusal::new(
                    Reason::RecipientQueueFull,
                    format!(
                        "the queue of {r} is full ({} items); try again later",
                        a.max_queue_depth
                    ),
                )));
            }
        }
        if let Some(c) = &a.decision.consent {
            if Self::is_revoked_in(t.revoked, &c.issuer, &c.jti, c.issued_at)? {
                return Ok(Err(Refusal::new(
                    Reason::ConsentRevoked,
                    format!("consent token {} has been revoked by its issuer", c.jti),
                )));
            }
            let used = t
                .uses
                .get(token_key(&c.issuer, &c.jti))?
                .and_then(|v| be_u64(&v))
                .unwrap_or(0);
            if let Some(max) = c.max_uses
                && used >= u64::from(max)
            {
                return Ok(Err(Refusal::new(
                    Reason::ConsentUsedUp,
                    format!("consent token {} allows {max} use(s), all used", c.jti),
                )));
            }
        }
        Ok(Ok(None))
    }

    /// Stores an accepted transfer: the transfer, its queue entries, the consent use, the audit
    /// entry and the receipt.
    fn accept_writes(t: &Trees<'_>, a: &Accept, fx: &mut Effects) -> TxResult<pb::Receipt> {
        // Uses are counted only for tokens that limit them: nothing else reads the count.
        if let Some(c) = &a.decision.consent
            && c.max_uses.is_some()
        {
            let key = token_key(&c.issuer, &c.jti);
            let used = t.uses.get(&key)?.and_then(|v| be_u64(&v)).unwrap_or(0);
            t.uses.insert(key, &(used + 1).to_be_bytes())?;
        }
        let mut receipt = build_receipt(a);
        let tid = a.transfer_id.as_bytes();
        // A transfer for one recipient travels inside its queue item; one for several is stored
        // once, with a count of the recipients still holding it.
        let inline = if a.envelope.recipients.len() == 1 {
            Some(build_transfer(a))
        } else {
            t.transfers
                .insert(&tid[..], build_transfer(a).encode_to_vec())?;
            t.refs.insert(
                &tid[..],
                &(a.envelope.recipients.len() as u64).to_be_bytes(),
            )?;
            None
        };
        let mut seq = Self::next_seq(t.meta)?;
        for (r, authority) in a.envelope.recipients.iter().zip(&a.decision.authorities) {
            let item = StoredItem {
                transfer_id: tid.to_vec(),
                recall: None,
                agreement_id: authority.agreement_id.clone(),
                clause: authority.clause.clone(),
                transfer: inline.clone(),
            };
            t.queues.insert(queue_key(r, seq), item.encode_to_vec())?;
            *fx.depth.entry(r.clone()).or_default() += 1;
            fx.last_seq = fx.last_seq.max(seq);
            seq += 1;
        }
        t.meta.insert(NEXT_SEQ, &seq.to_be_bytes())?;
        if let Some(c) = &a.decision.consent {
            let mut key = token_key(&c.issuer, &c.jti);
            key.extend_from_slice(tid);
            t.consented
                .insert(key, consented_record(a, c).encode_to_vec())?;
        }
        let entry = audit_log::entry(pb::audit_entry::Event::TransferAccepted(
            pb::TransferAccepted {
                transfer_id: receipt.transfer_id.clone(),
                envelope: Some(facts(
                    &a.sender,
                    &a.envelope,
                    a.decision.consent.as_ref().map(|c| (c.jti, c.issuer)),
                    &a.decision.payload_digest,
                )),
                authorities: receipt.authorities.clone(),
            },
        ));
        let index = t.log.append(&entry)?;
        receipt.audit = Some(pb::AuditProof {
            log_index: index,
            entry: entry.encode_to_vec(),
            ..Default::default()
        });
        let stored = StoredReceipt {
            receipt: Some(receipt.clone()),
            envelope_digest: a.envelope_digest.to_vec(),
        };
        t.receipts.insert(
            receipt_key(&a.sender, &a.envelope.message_id),
            stored.encode_to_vec(),
        )?;
        Ok(receipt)
    }

    /// Removes acknowledged deliveries (and a transfer once every recipient has it).
    fn ack_in(
        t: &Trees<'_>,
        recipient: &AgencyId,
        seqs: &[u64],
        fx: &mut Effects,
    ) -> TxResult<Applied> {
        let mut removed = 0u32;
        for seq in seqs {
            let Some(raw) = t.queues.remove(queue_key(recipient, *seq))? else {
                continue;
            };
            removed += 1;
            *fx.depth.entry(recipient.clone()).or_default() -= 1;
            let item = StoredItem::decode(raw.as_ref()).map_err(|e| {
                ConflictableTransactionError::Abort(Failure::Internal(Internal::new(
                    "decoding a queue item",
                    e,
                )))
            })?;
            let (transfer_id, recall_notice) = match &item.recall {
                Some(n) => (n.transfer_id.clone(), true),
                None => (uuid_string(&item.transfer_id), false),
            };
            t.log
                .append(&audit_log::entry(pb::audit_entry::Event::Acknowledged(
                    pb::Acknowledged {
                        recipient: recipient.to_string(),
                        delivery_id: seq.to_string(),
                        transfer_id,
                        recall_notice,
                    },
                )))?;
            if recall_notice || item.transfer.is_some() {
                continue;
            }
            let counted = t.refs.get(&item.transfer_id)?.and_then(|v| be_u64(&v));
            let left = counted.unwrap_or(1).saturating_sub(1);
            if left == 0 {
                if counted.is_some() {
                    t.refs.remove(item.transfer_id.as_slice())?;
                }
                t.transfers.remove(item.transfer_id.as_slice())?;
            } else {
                t.refs
                    .insert(item.transfer_id.as_slice(), &left.to_be_bytes())?;
            }
        }
        Ok(Applied::Acked(removed))
    }

    fn apply_revoke(&self, r: &Revoke) -> Result<Applied, Failure> {
        let prefix = match r.target {
            RevokeTarget::Token(jti) => token_key(&r.issuer, &jti),
            RevokeTarget::IssuedBefore(_) => r.issuer.as_bytes().to_vec(),
        };
        // The transfers that may be affected; the transaction decides which are.
        // Keys are issuer (33 bytes) || jti (16) || transfer id (16).
        let candidates: Vec<(TokenId, String, ConsentedTransfer)> = self
            .consented
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, v) = item.map_err(sled_err("scanning consented transfers"))?;
                let rec = ConsentedTransfer::decode(v.as_ref())
                    .map_err(|e| Internal::new("decoding a consented transfer", e))?;
                let jti = k
                    .get(33..49)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(TokenId::from_bytes)
                    .ok_or_else(|| Internal::new("decoding a consented transfer", "short key"))?;
                let transfer_id = k
                    .get(49..65)
                    .and_then(|b| uuid::Uuid::from_slice(b).ok())
                    .map(|u| u.to_string())
                    .ok_or_else(|| Internal::new("decoding a consented transfer", "short key"))?;
                Ok((jti, transfer_id, rec))
            })
            .collect::<Result<_, Internal>>()?;
        let outcome =
            (&self.revoked, &self.queues, &self.meta).transaction(|(revoked, queues, meta)| {
                let mut added: Vec<AgencyId> = Vec::new();
                let previous_before = revoked
                    .get(revoked_before_key(&r.issuer))?
                    .and_then(|v| be_i128(&v));
                let already = |rec: &ConsentedTransfer, jti: &TokenId| -> TxResult<bool> {
                    let iat = i128::from(rec.issued_at_nanos);
                    Ok(revoked.get(revoked_jti_key(&r.issuer, jti))?.is_some()
                        || previous_before.is_some_and(|b| iat < b))
                };
                let mut recalled: Vec<(&String, &ConsentedTransfer)> = Vec::new();
                match r.target {
                    RevokeTarget::Token(jti) => {
                        if revoked.get(revoked_jti_key(&r.issuer, &jti))?.is_some() {
                            return Ok((0, true, 0, Vec::new()));
                        }
                        for (_, transfer_id, rec) in &candidates {
                            if !already(rec, &jti)? {
                                recalled.push((transfer_id, rec));
                            }
                        }
                        revoked.insert(
                            revoked_jti_key(&r.issuer, &jti),
                            &r.revoked_at.unix_timestamp().to_be_bytes(),
                        )?;
                    }
                    RevokeTarget::IssuedBefore(before) => {
                        let cut = before.unix_timestamp_nanos();
                        if previous_before.is_some_and(|b| b >= cut) {
                            return Ok((0, true, 0, Vec::new()));
                        }
                        for (jti, transfer_id, rec) in &candidates {
                            let iat = i128::from(rec.issued_at_nanos);
                            if iat < cut && !already(rec, jti)? {
                                recalled.push((transfer_id, rec));
                            }
                        }
                        revoked.insert(revoked_before_key(&r.issuer), &cut.to_be_bytes())?;
                    }
                }
                let mut seq = Self::next_seq(meta)?;
                let mut notices = 0u32;
                for (transfer_id, rec) in recalled {
                    for recipient in &rec.recipients {
                        let Ok(to) = recipient.parse::<AgencyId>() else {
                            continue;
                        };
                        let notice = pb::RecallNotice {
                            transfer_id: transfer_id.clone(),
                            message_id: rec.message_id.clone(),
                            consent_jti: rec.jti.clone(),
                            consent_issuer: r.issuer.to_string(),
                            revoked_at: Some(timestamp(r.revoked_at)),
                            sender: rec.sender.clone(),
                            organisation: rec.organisation.clone(),
                        };
                        let item = StoredItem {
                            transfer_id: Vec::new(),
                            recall: Some(notice),
                            agreement_id: String::new(),
                            clause: String::new(),
                            transfer: None,
                        };
                        queues.insert(queue_key(&to, seq), item.encode_to_vec())?;
                        added.push(to);
                        seq += 1;
                        notices += 1;
                    }
                }
                meta.insert(NEXT_SEQ, &seq.to_be_bytes())?;
                Ok((notices, false, seq - 1, added))
            });
        let (recall_notices, duplicate, last, added) = tx_outcome(outcome)?;
        if recall_notices > 0 {
            let mut fx = Effects {
                last_seq: last,
                ..Effects::default()
            };
            for r in added {
                *fx.depth.entry(r).or_default() += 1;
            }
            self.settle(&fx);
        }
        Ok(Applied::Revoked {
            recall_notices,
            duplicate,
        })
    }
}

fn uuid_string(bytes: &[u8]) -> String {
    uuid::Uuid::from_slice(bytes)
        .map(|u| u.to_string())
        .unwrap_or_default()
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

fn duplicate_receipt(found: &[u8], digest: &[u8; 32]) -> TxResult<(pb::Receipt, u64)> {
    let stored = match StoredReceipt::decode(found) {
        Ok(s) => s,
        Err(e) => return abort(Internal::new("decoding a stored receipt", e)),
    };
    if stored.envelope_digest != digest {
        return abort(Refusal::new(
            Reason::MessageIdReused,
            "this message id was already used for a different envelope; choose a new id",
        ));
    }
    let mut receipt = stored.receipt.unwrap_or_default();
    receipt.duplicate = true;
    Ok((receipt, 0))
}

fn tx_outcome<T>(r: Result<T, TransactionError<Failure>>) -> Result<T, Failure> {
    r.map_err(|e| match e {
        TransactionError::Abort(f) => f,
        TransactionError::Storage(e) => {
            Failure::Internal(Internal::new("writing to the database", e))
        }
    })
}

fn build_receipt(a: &Accept) -> pb::Receipt {
    pb::Receipt {
        transfer_id: a.transfer_id.to_string(),
        message_id: a.envelope.message_id.to_string(),
        accepted_at: Some(timestamp(a.accepted_at)),
        authorities: a
            .decision
            .authorities
            .iter()
            .map(|x| pb::Authority {
                recipient: x.recipient.to_string(),
                agreement_id: x.agreement_id.clone(),
                clause: x.clause.clone(),
            })
            .collect(),
        consent_jti: consent_jti(a),
        consent_issuer: consent_issuer(a),
        duplicate: false,
        audit: None,
    }
}

/// The consent token's id behind an accepted transfer, or "" when none was needed.
fn consent_jti(a: &Accept) -> String {
    a.decision
        .consent
        .as_ref()
        .map(|c| c.jti.to_string())
        .unwrap_or_default()
}

/// The consent token's issuer key id, or "" when none was needed.
fn consent_issuer(a: &Accept) -> String {
    a.decision
        .consent
        .as_ref()
        .map(|c| c.issuer.to_string())
        .unwrap_or_default()
}

fn build_transfer(a: &Accept) -> pb::Transfer {
    let e = &a.envelope;
    pb::Transfer {
        transfer_id: a.transfer_id.to_string(),
        message_id: e.message_id.to_string(),
        sender: a.sender.to_string(),
        recipients: e.recipients.iter().map(ToString::to_string).collect(),
        kind: pb::MessageKind::from(e.kind) as i32,
        organisation: e
            .organisation
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        incident_ref: e.incident_ref.clone().unwrap_or_default(),
        content_type: e.content_type.clone(),
        tlp: pb::Tlp::from(e.tlp) as i32,
        payload: e.payload.clone(),
        consent_jti: consent_jti(a),
        consent_issuer: consent_issuer(a),
        // Per recipient: filled in when delivered.
        agreement_id: String::new(),
        clause: String::new(),
        accepted_at: Some(timestamp(a.accepted_at)),
    }
}

fn consented_record(a: &Accept, c: &ConsentUse) -> ConsentedTransfer {
    ConsentedTransfer {
        issued_at_nanos: i64::try_from(c.issued_at.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        recipients: a
            .envelope
            .recipients
            .iter()
            .map(ToString::to_string)
            .collect(),
        message_id: a.envelope.message_id.to_string(),
        sender: a.sender.to_string(),
        organisation: a
            .envelope
            .organisation
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        jti: c.jti.to_string(),
    }
}

impl ConsentLedger for SledStorage {
    fn is_revoked(
        &self,
        issuer: &KeyId,
        jti: &TokenId,
        issued_at: OffsetDateTime,
    ) -> Result<bool, Internal> {
        let read = sled_err("reading revocations");
        if self
            .revoked
            .get(revoked_jti_key(issuer, jti))
            .map_err(&read)?
            .is_some()
        {
            return Ok(true);
        }
        let before = self
            .revoked
            .get(revoked_before_key(issuer))
            .map_err(&read)?
            .and_then(|v| be_i128(&v));
        Ok(before.is_some_and(|b| issued_at.unix_timestamp_nanos() < b))
    }

    fn uses(&self, issuer: &KeyId, jti: &TokenId) -> Result<u32, Internal> {
        let used = self
            .uses
            .get(token_key(issuer, jti))
            .map_err(sled_err("reading consent uses"))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        Ok(u32::try_from(used).unwrap_or(u32::MAX))
    }
}

impl Storage for SledStorage {
    fn apply_batch(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        self.apply_batch_sled(ops)
    }

    fn seal(
        &self,
        previous: Option<&SignedCheckpoint>,
    ) -> Result<Option<SignedCheckpoint>, Internal> {
        self.log.seal(previous)
    }

    fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        self.log.latest()
    }

    fn log_size(&self) -> Result<u64, Internal> {
        self.log.size()
    }

    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal> {
        self.log.entry(index)
    }

    fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal> {
        self.log.prove_entry(index, size)
    }

    fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal> {
        self.log.prove_consistency(old, new)
    }

    fn log_verifier_key(&self) -> String {
        self.log.verifier_key()
    }

    fn sync(&self) -> Result<(), Internal> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(sled_err("flushing the database"))
    }

    fn receipt(
        &self,
        sender: &AgencyId,
        id: &MessageId,
    ) -> Result<Option<(pb::Receipt, [u8; 32])>, Internal> {
        let Some(raw) = self
            .receipts
            .get(receipt_key(sender, id))
            .map_err(sled_err("reading a receipt"))?
        else {
            return Ok(None);
        };
        let stored = StoredReceipt::decode(raw.as_ref())
            .map_err(|e| Internal::new("decoding a receipt", e))?;
        let digest: [u8; 32] = stored
            .envelope_digest
            .as_slice()
            .try_into()
            .map_err(|_| Internal::new("decoding a receipt", "bad digest length"))?;
        Ok(stored.receipt.map(|r| (r, digest)))
    }

    fn queued(
        &self,
        recipient: &AgencyId,
        from: u64,
        to: u64,
        limit: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Queued>, Internal> {
        if from > to {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self
            .queues
            .range(queue_key(recipient, from)..=queue_key(recipient, to))
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(sled_err("reading a queue"))?;
            let seq = k
                .get(k.len().saturating_sub(8)..)
                .and_then(be_u64)
                .unwrap_or(0);
            if skip(seq) {
                continue;
            }
            let stored = StoredItem::decode(v.as_ref())
                .map_err(|e| Internal::new("decoding a queue item", e))?;
            let body = match stored.recall {
                Some(notice) => pb::delivery::Body::RecallNotice(notice),
                None => {
                    let mut transfer = match stored.transfer {
                        Some(inline) => inline,
                        None => {
                            let Some(raw) = self
                                .transfers
                                .get(&stored.transfer_id)
                                .map_err(sled_err("reading a transfer"))?
                            else {
                                tracing::error!(seq, "queued transfer is missing; skipping it");
                                continue;
                            };
                            pb::Transfer::decode(raw.as_ref())
                                .map_err(|e| Internal::new("decoding a transfer", e))?
                        }
                    };
                    transfer.agreement_id = stored.agreement_id;
                    transfer.clause = stored.clause;
                    pb::delivery::Body::Transfer(transfer)
                }
            };
            out.push(Queued { seq, body });
        }
        Ok(out)
    }

    fn queue_depth(&self, recipient: &AgencyId) -> u64 {
        self.lock_depths().get(recipient).copied().unwrap_or(0)
    }

    fn last_seq(&self) -> u64 {
        self.last_seq.load(std::sync::atomic::Ordering::SeqCst)
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
