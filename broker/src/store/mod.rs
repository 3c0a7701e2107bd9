//! Durable state: per-recipient queues, accepted transfers, receipts for idempotency, consent
//! uses and revocations — behind the small [`Storage`] trait, with sled as the embedded engine
//! ([`SledStorage`]; the layout of its queues is in [`queue`]), reached through the
//! engine-neutral key-value layer [`kv`].
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
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use concordat_proto::{
    consent::TokenId,
    envelope::Envelope,
    ids::{AgencyId, MessageId, OrgId},
    merkle::Hash,
    paserk::KeyId,
    pb,
    workflow::qualify_incident,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    audit_log::SignedCheckpoint,
    policy::{ConsentLedger, Decision, Provenance},
    refusal::{Failure, Internal, Reason, Refusal},
};

pub mod kv;
pub mod postgres;
pub mod queue;
mod sled_store;

pub use sled_store::{SledStorage, StoreReport, database_unlocked, wait_until_closed};

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

/// A write, applied atomically by [`Storage::apply_batch`].
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
        /// What was handed over: sequence number, transfer id (or notice id), what it was.
        items: Vec<(u64, String, Carried)>,
    },
    /// Record the configuration the broker started with.
    ConfigLoaded(pb::ConfigLoaded),
    /// Record an event that changes nothing but the audit log (a refused call, an export).
    Log(Box<pb::audit_entry::Event>),
    /// An agency declares itself involved in an incident (docs/workflows.md).
    Involve(Box<Involve>),
    /// Fire the workflow timers due by `now` (at most [`MAX_TIMERS_FIRED`] of them); they run
    /// on their own, like revocations.
    FireTimers {
        /// The broker's time.
        now: OffsetDateTime,
    },
}

/// The most timers one [`Op::FireTimers`] fires; the rest wait for the next.
pub const MAX_TIMERS_FIRED: usize = 256;

/// The name of the thread that applies and flushes every group commit (the one writer), so
/// that profiles and `concordat bench relay` can tell its time apart.
pub const WRITER_THREAD: &str = "concordat-writer";

/// An agency's declaration that it is involved in an incident.
#[derive(Debug)]
pub struct Involve {
    /// The declaring agency.
    pub agency: AgencyId,
    /// The incident, federation-unique.
    pub incident: concordat_proto::workflow::WorkflowId,
    /// The agencies it shares an agreement with: only they and it are told about each other.
    pub partners: BTreeSet<AgencyId>,
    /// When.
    pub at: OffsetDateTime,
}

/// What a delivery carries, as the audit log's `delivered` and `acknowledged` entries say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A transfer.
    Transfer,
    /// A recall notice for a transfer.
    Recall,
    /// A notice of the broker's own.
    Notice,
}

impl Carried {
    /// What `body` carries, and the id the log names it by.
    pub fn of(body: &pb::delivery::Body) -> (Carried, &str) {
        match body {
            pb::delivery::Body::Transfer(t) => (Carried::Transfer, &t.transfer_id),
            pb::delivery::Body::RecallNotice(n) => (Carried::Recall, &n.transfer_id),
            pb::delivery::Body::Notice(n) => (Carried::Notice, &n.notice_id),
        }
    }
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
    /// The national-significance designation relied on, as the log records it.
    pub designation: Option<pb::SignificanceDesignation>,
    /// What the envelope's workflow step needs to be applied, when it carries one
    /// ([`crate::workflow`]).
    pub workflow: Option<crate::workflow::StepContext>,
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
        let facts = facts(
            &sender,
            &envelope,
            Some(&decision),
            &decision.payload_digest,
        );
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
            organisations: decision
                .organisations
                .iter()
                .map(|o| o.to_string())
                .collect(),
            consents: facts.consents.clone(),
            workflow: facts.workflow.clone(),
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
        let designation = decision.designation.as_ref().map(designation_record);
        Accept {
            designation,
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
            workflow: None,
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
    /// The one organisation the issuer speaks for, if it speaks for exactly one: then every
    /// token it revokes is that organisation's consent, whether or not a transfer used it.
    pub issuer_organisation: Option<OrgId>,
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
    /// An involvement was declared (its audit entry).
    Involved(Box<pb::InvolvementDeclared>),
    /// Timers fired: how many, and how many notices they queued.
    Fired {
        /// Timers taken off the store (applicable or not).
        timers: u32,
        /// Notices queued.
        notices: u32,
    },
}

/// An audit entry and its inclusion proof in a tree of a given size.
#[derive(Debug, Clone)]
pub struct ProvedEntry {
    /// The entry's exact bytes.
    pub entry: Vec<u8>,
    /// The RFC 6962 inclusion proof, leaf to root.
    pub proof: Vec<Hash>,
}

/// One item of a recipient's queue.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Its sequence number: the delivery id.
    pub seq: u64,
    /// What to deliver.
    pub body: pb::delivery::Body,
    /// The index of the audit entry it was queued under, if the item records it.
    pub log_index: Option<u64>,
}

/// What the store has recorded about one consent token: every transfer accepted under it
/// (`concordat consent list`, [`Storage::consents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRecord {
    /// Its issuer's key id.
    pub issuer: KeyId,
    /// The token's id.
    pub jti: TokenId,
    /// The organisation that consented.
    pub organisation: String,
    /// The token's `iat`.
    pub issued_at: OffsetDateTime,
    /// The token's `exp` (unknown for transfers recorded before it was kept).
    pub expires_at: Option<OffsetDateTime>,
    /// The token's `max_uses`, if limited.
    pub max_uses: Option<u32>,
    /// Transfers accepted under it.
    pub uses: u32,
    /// When the newest of them was accepted (unknown for older records).
    pub last_used_at: Option<OffsetDateTime>,
    /// Whether it has been revoked (by its id, or by a cut-off time after its `iat`).
    pub revoked: bool,
    /// The agencies that sent under it.
    pub senders: BTreeSet<String>,
    /// The agencies that received under it.
    pub recipients: BTreeSet<String>,
}

/// The storage engine under the broker. Reads may come from any thread; `apply` and `sync` are
/// called only by the writer thread, in order.
pub trait Storage: ConsentLedger + Provenance + Send + Sync + 'static {
    /// Applies operations in order, each atomically (refusals do not affect the others). They
    /// are not durable until [`Storage::sync`] returns.
    fn apply_batch(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>>;
    /// Reads the in-memory state again if another broker node sharing the database has
    /// committed since it was read (PostgreSQL): whether it did. Called by the writer thread.
    fn catch_up(&self) -> Result<bool, Internal> {
        Ok(false)
    }
    /// Claims `recipient`'s deliveries for one more subscription on this node: false when
    /// another broker node sharing the database serves them. Ended by
    /// [`Storage::release_deliveries`].
    fn claim_deliveries(&self, recipient: &AgencyId) -> Result<bool, Internal> {
        let _ = recipient;
        Ok(true)
    }
    /// Ends one subscription's claim of `recipient`'s deliveries.
    fn release_deliveries(&self, recipient: &AgencyId) {
        let _ = recipient;
    }
    /// Calls `wake` whenever another broker node's commit is heard (never with sled).
    fn on_moved(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let _ = wake;
    }
    /// Makes every applied operation durable, then publishes the checkpoint sealed since the
    /// last call outside the database (see [`check_recovered`]).
    fn sync(&self) -> Result<(), Internal>;
    /// Whether the storage works again after a failure: a [`Storage::sync`] that also reaches
    /// the database server, if there is one (whose sync has nothing to flush).
    fn probe(&self) -> Result<(), Internal> {
        self.sync()
    }
    /// The checkpoint last published outside the database, if any.
    fn published_checkpoint(&self) -> Result<Option<SignedCheckpoint>, Internal>;
    /// The root hash of the log's first `size` entries, from the stored hashes.
    fn tree_root(&self, size: u64) -> Result<Hash, Internal>;
    /// Recomputes the hashes of the newest `count` entries and compares them with the stored
    /// ones; returns the first disagreement.
    fn check_tail(&self, count: u64) -> Result<Option<String>, Internal>;
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
    /// The number of audit entries the store holds now, what other broker nodes sharing the
    /// database committed included (PostgreSQL: read from the server; the writer, if behind,
    /// is woken to catch up with it, see [`Store::checkpoint_now`]).
    fn stored_log_size(&self) -> Result<u64, Internal>;
    /// The audit entry at `index`.
    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal>;
    /// Up to `limit` consecutive audit entries from `index` on.
    fn log_entries(&self, index: u64, limit: usize) -> Result<Vec<Vec<u8>>, Internal>;
    /// The inclusion proof of entry `index` in the tree of `size` entries.
    fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal>;
    /// The entries at `indexes` with their inclusion proofs in the tree of `size` entries, in
    /// the same order: one delivery batch's proofs, reading each stored hash once.
    fn prove_entries(&self, indexes: &[u64], size: u64) -> Result<Vec<ProvedEntry>, Internal>;
    /// The consistency proof between two tree sizes.
    fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal>;
    /// The key that verifies the log's checkpoints (`name+keyid+base64`).
    fn log_verifier_key(&self) -> String;
    /// Starts a backup of everything stored ([`crate::backup`]) on `out`, while the caller
    /// keeps the store from changing ([`Store::between_batches`], or no broker running), and
    /// returns the rest to write once writes may go on: what cannot change once written (the
    /// audit log's append-only trees, receipts), bounded by the log as it stood when called.
    fn snapshot(&self, out: crate::backup::Output) -> Result<crate::backup::Rest, Internal>;

    /// The consent tokens transfers were accepted under, in issuer and token order, those
    /// `keep` accepts, at most `limit` of them; `true` with them when more were kept than
    /// returned.
    fn consents(
        &self,
        limit: usize,
        keep: &dyn Fn(&ConsentRecord) -> bool,
    ) -> Result<(Vec<ConsentRecord>, bool), Internal>;

    /// The stored record of a workflow ([`crate::workflow`]: `dsar/<id>`, `comms/<id>`,
    /// `incident/<ref>`).
    fn workflow_record(&self, key: &str) -> Result<Option<Vec<u8>>, Internal>;
    /// The workflow records whose key starts with `prefix` that `keep` accepts, in key order,
    /// at most `limit` of them.
    fn workflow_records(
        &self,
        prefix: &str,
        limit: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>, Internal>;
    /// When the earliest stored timer fires, if there is one.
    fn next_timer(&self) -> Result<Option<OffsetDateTime>, Internal>;
}

/// How many of the newest entries the start-up check rehashes from their stored bytes.
const TAIL_CHECK: u64 = 4096;

/// What an operator does when the broker refuses a store, appended to every such refusal.
const RESTORE_ADVICE: &str = "The data directory was damaged or rolled back, and serving it \
would lose acknowledged transfers and sign a history that contradicts the one already \
published. Keep this directory for investigation; restore the data directory from a backup \
(or a copy) whose log reaches the published checkpoint, check it offline with \
`concordat-broker verify --data-dir DIR`, then start the broker again (README: \"When the broker \
refuses to start\")";

/// Why the broker refuses to serve the store it recovered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The recovered store contradicts the history it had published, or cannot prove it is
    /// whole.
    #[error("refusing to serve the store in {dir}: {problem}. {RESTORE_ADVICE}")]
    Damaged {
        /// The data directory.
        dir: String,
        /// What does not hold.
        problem: String,
    },
    /// The store could not be read.
    #[error("checking the recovered store: {0}")]
    Internal(Internal),
}

impl From<Internal> for RecoveryError {
    fn from(e: Internal) -> Self {
        RecoveryError::Internal(e)
    }
}

/// Checks, before anything is served, that the store recovered everything the broker had
/// published: the log is at least as large as the checkpoint kept beside the database (which
/// sled's recovery cannot roll back) and the checkpoint kept in it, its stored hashes give
/// both their roots, and the newest entries match their stored hashes.
///
/// sled 0.34 recovers a damaged log by silently dropping everything after the first bad
/// record; without this check the broker would start on the shorter log and sign a second
/// checkpoint of an already-published size (see ../shared/PITFALLS.md).
pub fn check_recovered(storage: &dyn Storage, data_dir: &Path) -> Result<(), RecoveryError> {
    let damaged = |problem: String| RecoveryError::Damaged {
        dir: data_dir.display().to_string(),
        problem,
    };
    // The checkpoints are read before the log's size: another broker node sharing the
    // database may append and sign between the two reads, and a checkpoint read first is
    // covered by the log read after it, whereas one read after could be newer than the size.
    let stored = storage.latest_checkpoint().map_err(|e| {
        damaged(format!(
            "the checkpoint in the database does not verify: {e}"
        ))
    })?;
    let published = storage.published_checkpoint().map_err(|e| {
        damaged(format!(
            "the published checkpoint ({}) does not verify: {e}",
            data_dir
                .join(crate::audit_log::PUBLISHED_CHECKPOINT_FILE)
                .display()
        ))
    })?;
    let size = storage.log_size()?;
    let root = storage.tree_root(size).map_err(|e| {
        damaged(format!(
            "the recovered audit log of {size} entries has no complete tree: {e}"
        ))
    })?;
    if let Some(problem) = storage.check_tail(TAIL_CHECK)? {
        return Err(damaged(format!(
            "the recovered audit log is corrupt: {problem}"
        )));
    }
    if published.is_none() && size > 0 {
        return Err(damaged(format!(
            "the database holds an audit log of {size} entries (root {}), but the file {} that \
             records the last published checkpoint is missing, so nothing proves the log was \
             not rolled back. If this directory was last served by a broker that did not keep \
             that file, run `concordat-broker verify --data-dir DIR --publish-checkpoint` once",
            root.to_hex(),
            data_dir
                .join(crate::audit_log::PUBLISHED_CHECKPOINT_FILE)
                .display()
        )));
    }
    for (what, cp) in [
        ("the broker last published", published),
        ("the database's own latest checkpoint is", stored),
    ] {
        let Some(cp) = cp else { continue };
        if cp.size > size {
            return Err(damaged(format!(
                "the database recovered an audit log of {size} entries (root {}), but {what} \
                 a checkpoint of {} entries (root {}): acknowledged history was lost",
                root.to_hex(),
                cp.size,
                cp.root.to_hex()
            )));
        }
        let at = storage.tree_root(cp.size).map_err(|e| {
            damaged(format!(
                "the recovered log's first {} entries: {e}",
                cp.size
            ))
        })?;
        if at != cp.root {
            return Err(damaged(format!(
                "the database recovered an audit log of {size} entries whose first {} have \
                 root {}, but {what} a checkpoint of {} entries with root {}: the recovered \
                 log contradicts it",
                cp.size,
                at.to_hex(),
                cp.size,
                cp.root.to_hex()
            )));
        }
    }
    Ok(())
}

/// How the writer is watched, and where free space is measured.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A batch whose apply and flush take longer is failed with `STORAGE_UNAVAILABLE`, and
    /// health turns `NOT_SERVING` until a flush completes again.
    pub flush_timeout: Duration,
    /// If no flush has completed this long after the storage became unavailable, the store
    /// gives up ([`Store::failed`]): the broker exits non-zero for a supervisor to restart it.
    pub give_up_after: Duration,
    /// The directory whose file system's free space [`Store::free_bytes`] reports.
    pub data_dir: Option<std::path::PathBuf>,
    /// Where the writer thread records its batches, flushes and checkpoints (`/metrics`).
    pub metrics: Option<Arc<crate::metrics::WriterMetrics>>,
}

impl StoreOptions {
    /// Options for a store in `data_dir` whose flushes may take at most `flush_timeout`; it
    /// gives up six timeouts after it became unavailable.
    pub fn new(data_dir: &Path, flush_timeout: Duration) -> StoreOptions {
        StoreOptions {
            flush_timeout,
            give_up_after: flush_timeout * 6,
            data_dir: Some(data_dir.to_path_buf()),
            metrics: None,
        }
    }

    /// These options, with the writer recording into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::WriterMetrics>) -> StoreOptions {
        self.metrics = Some(metrics);
        self
    }
}

/// Whether the store can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Writes are applied and flushed.
    Serving,
    /// A flush failed or stalled: every write is refused with `STORAGE_UNAVAILABLE` until a
    /// flush completes again.
    Unavailable,
}

/// The refusal of a write while the storage is unavailable.
pub fn storage_unavailable() -> Refusal {
    Refusal::new(
        Reason::StorageUnavailable,
        "the broker cannot write to its storage at the moment; nothing was recorded, try again \
         later",
    )
}

/// What the writer thread and its watchdog share.
struct Shared {
    options: StoreOptions,
    /// The batch being applied and flushed: when it began, and who waits for it.
    inflight: std::sync::Mutex<Option<Inflight>>,
    health: watch::Sender<Health>,
    /// When the storage became unavailable.
    unavailable_since: std::sync::Mutex<Option<Instant>>,
    /// Why the store gave up, once it has.
    failed: watch::Sender<Option<String>>,
    /// The free bytes of the data directory's file system (`u64::MAX` if unknown).
    free_bytes: std::sync::atomic::AtomicU64,
    /// Work waiting to run on the writer thread between two batches ([`Store::between_batches`]).
    pauses: std::sync::Mutex<Vec<Pause>>,
    /// When [`Store::checkpoint_now`] last warned that it answered short.
    short_warned: std::sync::Mutex<Option<Instant>>,
}

/// Work the writer thread runs between two batches, with nothing written meanwhile.
type Pause = Box<dyn FnOnce(&dyn Storage) + Send>;

struct Inflight {
    since: Instant,
    replies: Vec<oneshot::Sender<Result<Applied, Failure>>>,
}

impl Shared {
    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, Option<Inflight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_pauses(&self) -> Vec<Pause> {
        std::mem::take(&mut *self.pauses.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unavailable_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a short checkpoint's warning may be logged now: at most one a minute, since
    /// any caller of the audit service can bring one about.
    fn warn_short_checkpoint(&self) -> bool {
        let mut last = self.short_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Turns health `NOT_SERVING` (once) and logs why.
    fn mark_unavailable(&self, why: &str) {
        let mut since = self.lock_since();
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::error!(
                "storage unavailable: {why}; refusing writes with STORAGE_UNAVAILABLE, health \
                 NOT_SERVING"
            );
            self.health.send_replace(Health::Unavailable);
        }
    }

    fn mark_serving(&self) {
        let mut since = self.lock_since();
        if let Some(at) = since.take() {
            tracing::warn!(
                after = ?at.elapsed(),
                "storage recovered: flushes complete again, health SERVING"
            );
            self.health.send_replace(Health::Serving);
        }
    }

    fn refresh_free_bytes(&self) {
        if let Some(dir) = &self.options.data_dir {
            let free = free_bytes(dir).unwrap_or(u64::MAX);
            self.free_bytes
                .store(free, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The bytes available to unprivileged writers in the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The time of the newest entry in the log, if any: the floor of the broker's clock.
pub fn newest_entry_time(storage: &dyn Storage) -> Result<Option<OffsetDateTime>, Internal> {
    let size = storage.log_size()?;
    let Some(last) = size.checked_sub(1) else {
        return Ok(None);
    };
    let Some(bytes) = storage.log_entry(last)? else {
        return Ok(None);
    };
    let entry = concordat_proto::audit::decode(&bytes)
        .map_err(|e| Internal::new("reading the newest audit entry", e))?;
    Ok(entry.time.and_then(|t| {
        OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
        )
        .ok()
    }))
}

/// The handle the services use: reads, and writes through the group-commit writer.
#[derive(Clone)]
pub struct Store {
    storage: Arc<dyn Storage>,
    jobs: mpsc::Sender<Job>,
    durable: watch::Receiver<u64>,
    checkpoint: watch::Receiver<Option<SignedCheckpoint>>,
    shared: Arc<Shared>,
    health: watch::Receiver<Health>,
}

/// A write for the writer thread, or (`op: None`, [`Job::nudge`]) a nudge that wakes it: the
/// watchdog's, to try a flush while the storage is unavailable; another node's commit heard,
/// to catch up; work waiting between batches; an audit answer waiting for a checkpoint.
struct Job {
    op: Option<Op>,
    reply: oneshot::Sender<Result<Applied, Failure>>,
}

impl Job {
    /// A job with nothing to write, whose answer nobody awaits.
    fn nudge() -> Job {
        let (reply, _) = oneshot::channel();
        Job { op: None, reply }
    }
}

impl Store {
    /// Starts the writer thread over `storage`, and the watchdog that bounds its flushes.
    pub fn start(storage: Arc<dyn Storage>, options: StoreOptions) -> Result<Store, Internal> {
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let (durable_tx, durable) = watch::channel(storage.last_seq());
        let (checkpoint_tx, checkpoint) = watch::channel(storage.latest_checkpoint()?);
        let (health_tx, health) = watch::channel(Health::Serving);
        let shared = Arc::new(Shared {
            options,
            inflight: std::sync::Mutex::new(None),
            health: health_tx,
            unavailable_since: std::sync::Mutex::new(None),
            failed: watch::channel(None).0,
            free_bytes: std::sync::atomic::AtomicU64::new(u64::MAX),
            pauses: std::sync::Mutex::new(Vec::new()),
            short_warned: std::sync::Mutex::new(None),
        });
        shared.refresh_free_bytes();
        let writer = storage.clone();
        let writer_shared = shared.clone();
        thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || {
                write_loop(
                    writer.as_ref(),
                    rx,
                    durable_tx,
                    checkpoint_tx,
                    &writer_shared,
                )
            })
            .map_err(|e| Internal::new("starting the writer thread", e))?;
        // Another node's commit wakes the writer, which reads the state again and lets this
        // node's subscribers see what was queued for them there.
        let wake = jobs.downgrade();
        storage.on_moved(Arc::new(move || {
            if let Some(jobs) = wake.upgrade() {
                // A full queue means the writer is busy: it catches up before its next batch.
                let _ = jobs.try_send(Job::nudge());
            }
        }));
        let watched = Arc::downgrade(&shared);
        let nudge = jobs.downgrade();
        thread::Builder::new()
            .name("concordat-watchdog".into())
            .spawn(move || watchdog(watched, nudge))
            .map_err(|e| Internal::new("starting the writer's watchdog", e))?;
        Ok(Store {
            storage,
            jobs,
            durable,
            checkpoint,
            shared,
            health,
        })
    }

    /// Applies `op` and returns once it is on disk. While the storage is unavailable (a flush
    /// failed or stalled) it is refused at once with `STORAGE_UNAVAILABLE`.
    pub async fn commit(&self, op: Op) -> Result<Applied, Failure> {
        let mut health = self.health.clone();
        if *health.borrow_and_update() == Health::Unavailable {
            return Err(storage_unavailable().into());
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                op: Some(op),
                reply,
            })
            .await
            .map_err(|_| Internal::new("submitting a write", "the writer has stopped"))?;
        tokio::select! {
            answer = answer => answer
                .map_err(|_| Internal::new("awaiting a write", "the writer has stopped"))?,
            // Waiting behind a stalled flush: give up now. The writer skips a job whose caller
            // is gone; one it had already taken may still be applied later, which a retry
            // under the same message id finds (its receipt, not a second transfer).
            _ = health.wait_for(|h| *h == Health::Unavailable) => {
                Err(storage_unavailable().into())
            }
        }
    }

    /// Runs `work` on the writer thread between two batches: every batch before it is applied,
    /// sealed, flushed and published, and none after it has begun, so `work` sees complete
    /// batches only (a backup's consistency). Writes wait meanwhile: keep `work` short. Refused
    /// with `STORAGE_UNAVAILABLE` while the storage is unavailable.
    pub async fn between_batches<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Storage) -> T + Send + 'static,
    ) -> Result<T, Failure> {
        if *self.health.borrow() == Health::Unavailable {
            return Err(storage_unavailable().into());
        }
        let (done, result) = oneshot::channel();
        self.shared
            .pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(move |storage: &dyn Storage| {
                let _ = done.send(work(storage));
            }));
        // Wakes the writer if it is idle; if it is busy, it runs the work after this batch.
        self.jobs
            .send(Job::nudge())
            .await
            .map_err(|_| Internal::new("pausing the writer", "the writer has stopped"))?;
        // Dropped unrun only while the storage is unavailable.
        result.await.map_err(|_| storage_unavailable().into())
    }

    /// Claims `recipient`'s deliveries for one more subscription on this node (see
    /// [`Storage::claim_deliveries`]).
    pub fn claim_deliveries(&self, recipient: &AgencyId) -> Result<bool, Internal> {
        self.storage.claim_deliveries(recipient)
    }

    /// Ends one subscription's claim of `recipient`'s deliveries.
    pub fn release_deliveries(&self, recipient: &AgencyId) {
        self.storage.release_deliveries(recipient);
    }

    /// Whether the store can write, as it changes.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Completes with the reason once the store has given up: its storage stayed unavailable
    /// for [`StoreOptions::give_up_after`]. The broker then exits for a supervisor to restart.
    pub async fn failed(&self) -> String {
        let mut failed = self.shared.failed.subscribe();
        match failed.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the writer's watchdog stopped".into(),
        }
    }

    /// The free bytes of the data directory's file system, measured at the last batch and at
    /// least every second (`u64::MAX` if unknown).
    pub fn free_bytes(&self) -> u64 {
        self.shared
            .free_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
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

    /// The latest durable signed checkpoint once it covers every entry the store held when
    /// this was called, what other broker nodes sharing the database had committed included:
    /// for the answers that should not lag behind what was acknowledged before the question,
    /// an auditor's export and a witness's checkpoint. The store's log size is read (on
    /// PostgreSQL, with the head, so that a node whose listener has not heard of another
    /// node's commit catches up with it) and the writer nudged to sign it. Within
    /// [`CATCH_UP_WAIT`], the read included, that checkpoint and `true`; otherwise (the
    /// storage unavailable, the database not answering, the writer not done in time) the
    /// latest checkpoint there is, consistent with the log but perhaps shorter, and `false`.
    pub async fn checkpoint_now(&self) -> (Option<SignedCheckpoint>, bool) {
        let mut health = self.health.clone();
        if *health.borrow_and_update() == Health::Unavailable {
            return (self.checkpoint(), false);
        }
        let storage = self.storage.clone();
        let mut checkpoint = self.checkpoint.clone();
        let jobs = self.jobs.clone();
        let signed = async move {
            let size = tokio::task::spawn_blocking(move || storage.stored_log_size())
                .await
                .map_err(|e| Internal::new("reading the log size", e))??;
            let covers = |cp: &Option<SignedCheckpoint>| {
                size == 0 || cp.as_ref().is_some_and(|cp| cp.size >= size)
            };
            if !covers(&checkpoint.borrow_and_update()) {
                // The writer signs what it has not signed yet when nudged, even if it has
                // nothing to write; a full queue means it is writing, and signs anyway.
                let _ = jobs.try_send(Job::nudge());
            }
            checkpoint
                .wait_for(covers)
                .await
                .map_err(|_| Internal::new("awaiting a checkpoint", "the writer has stopped"))?;
            Ok::<u64, Internal>(size)
        };
        let outcome = tokio::select! {
            signed = tokio::time::timeout(CATCH_UP_WAIT, signed) => match signed {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("not signed within {CATCH_UP_WAIT:?}")),
            },
            _ = health.wait_for(|h| *h == Health::Unavailable) => Err("storage unavailable".into()),
        };
        let cp = self.checkpoint();
        match outcome {
            Ok(()) => (cp, true),
            Err(why) => {
                if self.shared.warn_short_checkpoint() {
                    tracing::warn!(
                        signed = cp.as_ref().map_or(0, |cp| cp.size),
                        why,
                        "answering with a checkpoint that may be short of the stored log (at most one such warning a minute)"
                    );
                }
                (cp, false)
            }
        }
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

impl Store {
    /// The audit proofs of one batch of deliveries, in order: each item's entry (its transfer's
    /// `transfer_accepted`, its notice's `recall_queued`) with one signed checkpoint for the
    /// whole batch and the inclusion proofs in its tree, each stored hash read once. `None` for
    /// an item whose entry is unknown: a recall notice queued by a broker older than
    /// [`Queued::log_index`] (a transfer's is found through its receipt).
    pub async fn prove_deliveries(
        &self,
        items: &[Queued],
    ) -> Result<Vec<Option<pb::AuditProof>>, Internal> {
        let indexes: Vec<Option<u64>> = items
            .iter()
            .map(|item| match item.log_index {
                Some(index) => Ok(Some(index)),
                None => self.accepted_index(item),
            })
            .collect::<Result<_, _>>()?;
        let Some(highest) = indexes.iter().flatten().max().copied() else {
            return Ok(vec![None; items.len()]);
        };
        // Every item is durable, so a durable checkpoint covers it already; waiting only guards
        // the order in which the writer publishes the two.
        let cp = self
            .checkpoint
            .clone()
            .wait_for(|cp| cp.as_ref().is_some_and(|cp| cp.size > highest))
            .await
            .map_err(|_| Internal::new("awaiting a checkpoint", "the writer has stopped"))?
            .clone();
        let Some(cp) = cp else {
            return Ok(vec![None; items.len()]);
        };
        let known: Vec<u64> = indexes.iter().flatten().copied().collect();
        let mut proved = self.storage.prove_entries(&known, cp.size)?.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for index in indexes {
            let Some(log_index) = index else {
                out.push(None);
                continue;
            };
            let p = proved
                .next()
                .ok_or_else(|| Internal::new("proving deliveries", "fewer proofs than entries"))?;
            out.push(Some(pb::AuditProof {
                log_index,
                checkpoint: cp.note.clone(),
                inclusion_proof: p.proof.into_iter().map(|h| h.0.to_vec()).collect(),
                entry: p.entry,
            }));
        }
        Ok(out)
    }

    /// The index of the acceptance of a queued transfer that does not record it, from its
    /// receipt.
    fn accepted_index(&self, item: &Queued) -> Result<Option<u64>, Internal> {
        let pb::delivery::Body::Transfer(t) = &item.body else {
            return Ok(None);
        };
        let (Ok(sender), Ok(id)) = (
            t.sender.parse::<AgencyId>(),
            t.message_id.parse::<MessageId>(),
        ) else {
            return Ok(None);
        };
        Ok(self
            .storage
            .receipt(&sender, &id)?
            .and_then(|(receipt, _)| receipt.audit.map(|a| a.log_index)))
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

/// How often the watchdog looks at the writer, and refreshes the free space.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long the writer waits between flushes that try whether the storage is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How long [`Store::checkpoint_now`] waits for the writer to sign what the store holds: a
/// batch's flush, or catching up with another node's commits, takes milliseconds.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Fails the batch whose flush has taken longer than [`StoreOptions::flush_timeout`], marks
/// the storage unavailable, and gives up once it has been for [`StoreOptions::give_up_after`].
/// sled 0.34 can block for good in a flush when its disk is full (../shared/PITFALLS.md): the
/// thread stuck in it cannot answer, so this one does.
fn watchdog(shared: std::sync::Weak<Shared>, nudge: mpsc::WeakSender<Job>) {
    loop {
        thread::sleep(WATCH_INTERVAL);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.refresh_free_bytes();
        // Unavailable and idle: nudge the writer to try a flush, so that the store recovers
        // even when no request arrives (requests are refused at once meanwhile).
        if shared.lock_since().is_some()
            && shared.lock_inflight().is_none()
            && let Some(jobs) = nudge.upgrade()
        {
            let _ = jobs.try_send(Job::nudge());
        }
        let timeout = shared.options.flush_timeout;
        let stalled = {
            let mut inflight = shared.lock_inflight();
            match inflight.as_mut() {
                Some(batch) if batch.since.elapsed() > timeout => {
                    Some(std::mem::take(&mut batch.replies))
                }
                _ => None,
            }
        };
        if let Some(replies) = stalled {
            shared.mark_unavailable(&format!("a flush has not completed within {timeout:?}"));
            for reply in replies {
                let _ = reply.send(Err(storage_unavailable().into()));
            }
        }
        let since = *shared.lock_since();
        if let Some(at) = since
            && at.elapsed() > shared.options.give_up_after
            && shared.failed.borrow().is_none()
        {
            let why = format!(
                "the storage has been unavailable for {:?} (no flush completed): giving up so \
                 that a supervisor restarts the broker",
                at.elapsed()
            );
            tracing::error!("{why}");
            shared.failed.send_replace(Some(why));
        }
    }
}

/// Signs a checkpoint of the log as it stands unless `latest` covers it, and makes it durable
/// with everything applied before it: the new checkpoint, if one was signed.
fn seal_and_sync(
    storage: &dyn Storage,
    latest: Option<&SignedCheckpoint>,
) -> Result<Option<SignedCheckpoint>, Internal> {
    let sealed = storage.seal(latest)?;
    storage.sync()?;
    Ok(sealed)
}

/// Signs a checkpoint of the log as it stands unless `latest` covers it, and makes it durable
/// then: the new checkpoint, if one was signed (nothing is flushed otherwise).
fn seal_if_behind(
    storage: &dyn Storage,
    latest: Option<&SignedCheckpoint>,
) -> Result<Option<SignedCheckpoint>, Internal> {
    let Some(sealed) = storage.seal(latest)? else {
        return Ok(None);
    };
    storage.sync()?;
    Ok(Some(sealed))
}

fn write_loop(
    storage: &dyn Storage,
    mut rx: mpsc::Receiver<Job>,
    durable: watch::Sender<u64>,
    checkpoint: watch::Sender<Option<SignedCheckpoint>>,
    shared: &Shared,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut latest = checkpoint.borrow().clone();
    let mut previous_batch = 0usize;
    while let Some(first) = rx.blocking_recv() {
        // What other broker nodes committed (PostgreSQL): this node's state follows it before
        // it writes, and its subscribers are woken for what was queued for them.
        let nudged = first.op.is_none();
        batch.push(first);
        let caught_up = storage.catch_up().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading what other broker nodes committed");
            false
        });
        // The tree caught up with is signed here: the other node's checkpoint of it may not be
        // stored yet (its seal follows its commit, which is what was heard), or ever (it was
        // killed in between). Every node signs the same checkpoint of a size. So is a tree a
        // nudge finds unsigned while the storage is available (an audit answer waits for it:
        // the last such seal failed, or the node started with its log ahead of the stored
        // checkpoint).
        if caught_up || (nudged && shared.lock_since().is_none()) {
            match seal_if_behind(storage, latest.as_ref()) {
                Ok(Some(cp)) => {
                    latest = Some(cp);
                    checkpoint.send_replace(latest.clone());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "signing the log caught up with");
                }
            }
        }
        if caught_up {
            durable.send_replace(storage.last_seq());
        }
        // A batch boundary: the last batch is flushed and published, the next not begun.
        let pauses = shared.take_pauses();
        if shared.lock_since().is_none() {
            for pause in pauses {
                pause(storage);
            }
        }
        // (Unavailable: the pauses are dropped unrun, and their callers refused.)
        if shared.lock_since().is_some() {
            // Unavailable: try a flush, under the watchdog, before taking writes again.
            *shared.lock_inflight() = Some(Inflight {
                since: Instant::now(),
                replies: Vec::new(),
            });
            let probe = storage.probe();
            *shared.lock_inflight() = None;
            match probe {
                Ok(()) => {
                    if let Ok(cp) = storage.latest_checkpoint() {
                        latest = cp;
                        checkpoint.send_replace(latest.clone());
                    }
                    durable.send_replace(storage.last_seq());
                    shared.mark_serving();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "storage still unavailable");
                    while let Ok(job) = rx.try_recv() {
                        batch.push(job);
                    }
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(storage_unavailable().into()));
                    }
                    thread::sleep(PROBE_INTERVAL);
                    continue;
                }
            }
        }
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
        // A caller that gave up (the storage was unavailable) is not written for, and a nudge
        // has done its work by now.
        batch.retain(|job| job.op.is_some() && !job.reply.is_closed());
        previous_batch = batch.len();
        if batch.is_empty() {
            continue;
        }
        let (ops, replies): (Vec<Op>, Vec<_>) = batch
            .drain(..)
            .filter_map(|job| job.op.map(|op| (op, job.reply)))
            .unzip();
        // The watchdog answers these callers if applying and flushing stall.
        *shared.lock_inflight() = Some(Inflight {
            since: Instant::now(),
            replies,
        });
        let started = Instant::now();
        let results = storage.apply_batch(&ops);
        // Seal the batch with a checkpoint, flushed together with it (and published beside
        // the database once the flush is durable).
        let synced = seal_and_sync(storage, latest.as_ref());
        let replies = shared
            .lock_inflight()
            .take()
            .map(|b| b.replies)
            .unwrap_or_default();
        shared.refresh_free_bytes();
        if let (Ok(new), Some(m)) = (&synced, &shared.options.metrics) {
            m.batch_written(ops.len(), started.elapsed());
            if new.is_some() {
                m.checkpoint_sealed();
            }
        }
        match synced {
            Ok(new) => {
                if let Some(cp) = new {
                    latest = Some(cp.clone());
                    checkpoint.send_replace(latest.clone());
                }
                durable.send_replace(storage.last_seq());
                shared.mark_serving();
                // Inclusion proofs are computed by the waiting handlers (Store::prove_receipt),
                // in parallel, not here on the one writer thread. Replies the watchdog already
                // answered are gone.
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                shared.mark_unavailable(&format!("a flush failed: {e}"));
                for reply in replies {
                    let _ = reply.send(Err(storage_unavailable().into()));
                }
            }
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
    // Further declared organisations, only when there are some, so that the digest of every
    // envelope without them stays what earlier versions stored.
    if !e.organisations.is_empty() {
        field(b"organisations");
        for o in &e.organisations {
            field(o.as_str().as_bytes());
        }
    }
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
        consents: facts.consents,
        warnings: Vec::new(),
        duplicate: false,
        audit: Some(pb::AuditProof {
            log_index,
            entry: bytes,
            ..Default::default()
        }),
    })
}

/// What the audit log records about a validated envelope: never the payload, only its digest.
/// For an accepted one, `decision` adds the organisations its payload named and the consents
/// relied on.
pub fn facts(
    sender: &AgencyId,
    e: &Envelope,
    decision: Option<&Decision>,
    payload_sha256: &[u8; 32],
) -> pb::EnvelopeFacts {
    let consents: Vec<pb::ConsentRef> = decision
        .map(|d| d.consents.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| pb::ConsentRef {
            organisation: c.organisation.to_string(),
            jti: c.jti.to_string(),
            issuer: c.issuer.to_string(),
        })
        .collect();
    // The first consent is also in the fields older readers know.
    let first = consents.first();
    let organisations: Vec<String> = match decision {
        Some(d) => d
            .organisations
            .iter()
            .filter(|o| Some(*o) != e.organisation.as_ref())
            .map(ToString::to_string)
            .collect(),
        None => e.organisations.iter().map(ToString::to_string).collect(),
    };
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
        consent_jti: first.map(|c| c.jti.clone()).unwrap_or_default(),
        consent_issuer: first.map(|c| c.issuer.clone()).unwrap_or_default(),
        consents,
        organisations,
        workflow: e.workflow.as_ref().map(pb::WorkflowStep::from),
    }
}

/// What the audit log records of a designation relied on: ids, officers and times, never the
/// tokens or the grounds.
pub fn designation_record(
    d: &concordat_proto::significance::Designation,
) -> pb::SignificanceDesignation {
    let c = &d.claims;
    pb::SignificanceDesignation {
        jti: c.jti().to_string(),
        agency: c.agency().to_string(),
        incident_ref: c.qualified_incident_ref(),
        flows: c.flows().iter().map(ToString::to_string).collect(),
        designated_by: d.designated_by.clone(),
        designated_by_key: c.iss().to_string(),
        countersigned_by: d.countersigned_by.clone(),
        countersigned_by_key: d.countersigned_by_key.to_string(),
        issued_at: Some(timestamp(c.issued_at())),
        countersigned_at: Some(timestamp(d.countersigned_at)),
        expires_at: Some(timestamp(c.expires_at())),
        designation_sha256: d.digest.to_vec(),
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

/// The audit record of a refused transfer: its facts, the reason and message, and the
/// agreement and clause cited (`none` when no agreement covers the flow).
pub fn transfer_refused(envelope: Option<pb::EnvelopeFacts>, r: &Refusal) -> pb::TransferRefused {
    let citation = r.citation.as_ref();
    pb::TransferRefused {
        envelope,
        reason: r.reason.as_str().into(),
        message: r.message.clone(),
        agreement_id: citation.map(|c| c.agreement_id()).unwrap_or_default(),
        clause: citation.map(|c| c.clause()).unwrap_or_default(),
    }
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
        // A reference that qualifies is logged as the broker reads it, like an accepted one's.
        incident_ref: qualify_incident(sender, &e.incident_ref)
            .unwrap_or_else(|| cut(&e.incident_ref)),
        tlp: e.tlp,
        payload_sha256: payload_sha256.to_vec(),
        payload_size: e.payload.len() as u64,
        consent_jti: String::new(),
        consent_issuer: concordat_proto::consent::key_id_of(&e.consent_token)
            .map(|k| k.to_string())
            .unwrap_or_default(),
        consents: Vec::new(),
        organisations: e.organisations.iter().take(32).map(|o| cut(o)).collect(),
        // Not the step of an envelope that did not validate: its text is unchecked.
        workflow: None,
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
