//! The embedded engine: [`SledStorage`], the broker's state in one sled database, read and
//! written through the engine-neutral [`super::kv`]. What is sled's alone stays here: its
//! lock on `db/db` ([`database_unlocked`]), the fsync of its files after a flush
//! (`DurableFiles`), and the segment size in its `conf` (`check_segment_size`).
//!
//! Trees (keys big-endian where numeric):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `receipts` | sender `\0` message id | the audit log index of its acceptance, and its envelope's digest |
//! | `queues` | recipient `\0` first sequence number | a block of queue items ([`super::queue`]) |
//! | `queue_acks` | as `queues` | which items of a partly acknowledged block are acknowledged |
//! | `transfers`, `refs` | transfer id | a transfer to several recipients, and how many still hold it |
//! | `consent_uses` | issuer key id, token id | transfers made under a token that limits its uses |
//! | `consented_transfers` | issuer key id, token id, first sequence number | the transfers one commit made under that token (with the token's expiry and use limit), for recall and `concordat consent list` |
//! | `revocations` | `jti:` issuer, token id / `before:` issuer | revoked tokens |
//! | `tlp_received` | holder agency `\0` STIX object id | what was delivered to it under TLP:AMBER+STRICT or TLP:RED: the first transfer, the senders, the marking |
//! | `workflows` | `dsar/<id>`, `comms/<id>`, `incident/<ref>` | a workflow's record ([`crate::workflow`]) |
//! | `timers` | time it fires (big-endian nanoseconds), kind, record key, party | a workflow timer |
//! | `meta` | name | sequence counter, layout version, log size and checkpoint |
//! | `log_entries`, `log_hashes` | first index | the audit log ([`crate::audit_log`]) |
//!
//! A group commit's operations share one sled transaction (a revocation, which scans committed
//! state first, gets its own): sled's cost is per write and per transaction, so the writes of
//! a burst are gathered into few records — one block per recipient, one list of consented
//! transfers per token, one bundle of audit entries — and only the receipt is written per
//! transfer. Receipts hold no copy of what the audit log says; they are rebuilt from its entry.
//!
//! Inside a transaction nothing reads a committed tree directly (sled's iterators take the
//! lock its transactions hold): the queue index and the log's frontier are in memory.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::Path,
    sync::{
        Mutex, MutexGuard, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use concordat_proto::{
    consent::TokenId,
    ids::{AgencyId, MessageId},
    merkle::Hash,
    paserk::KeyId,
    pb,
};
use prost::Message;
use time::OffsetDateTime;

mod verify;

pub use verify::StoreReport;

use super::{
    Accept, Applied, Carried, ConsentRecord, MAX_TIMERS_FIRED, Op, ProvedEntry, Queued, Revoke,
    RevokeTarget, Storage,
    kv::{self, Kv, KvError, Tree, TxError, TxTree, Value},
    message_id_reused,
    queue::{
        AckOutcome, BlockBuilder, BlockHeader, ItemKind, ItemMeta, QueueIndex, StoredBlock,
        StoredItem, block_key, decode_acked, encode_acked, parse_block_key,
    },
    receipt_from_entry, timestamp, transfer_refused,
};
use crate::{
    audit_log::{self, Appended, Log, SignedCheckpoint, TxLog},
    backup,
    policy::{
        ConsentLedger, ConsentUse,
        tlp::{Provenance, Received},
    },
    refusal::{Failure, Internal, Reason, Refusal},
    workflow,
};

/// The `meta` key of the next queue sequence number.
const NEXT_SEQ: &[u8] = b"next_seq";

/// Prefix of the `meta` keys of designations already recorded in the log (then their
/// SHA-256).
const DESIGNATION_PREFIX: &[u8] = b"significance/";
/// The `meta` key of the storage layout's version.
const LAYOUT: &[u8] = b"store_layout";
/// This layout: queue blocks, receipts by log index, bundled log.
const LAYOUT_VERSION: &[u8] = b"2";

/// What the broker stores per accepted message id, for idempotency.
#[derive(Clone, PartialEq, Message)]
struct StoredReceipt {
    /// The audit log index of the transfer's acceptance.
    #[prost(uint64, tag = "1")]
    log_index: u64,
    #[prost(bytes = "vec", tag = "2")]
    envelope_digest: Vec<u8>,
}

/// A transfer made under a consent token, kept for recall.
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
    #[prost(string, tag = "7")]
    transfer_id: String,
    /// The token's `exp`, in nanoseconds since the Unix epoch (0 in records written before
    /// this field).
    #[prost(int64, tag = "8")]
    expires_at_nanos: i64,
    /// The token's `max_uses` (0: unlimited).
    #[prost(uint32, tag = "9")]
    max_uses: u32,
    /// When the transfer was accepted, in nanoseconds since the Unix epoch (0 in records
    /// written before this field).
    #[prost(int64, tag = "10")]
    accepted_at_nanos: i64,
}

/// What the broker delivered of one STIX object to one agency under TLP:AMBER+STRICT or
/// TLP:RED (the `tlp_received` tree), for the onward-sharing rule (`policy::tlp`).
#[derive(Clone, PartialEq, Message)]
struct StoredReceived {
    /// The transfer it first arrived in.
    #[prost(string, tag = "1")]
    first_transfer: String,
    /// Every agency that sent it to the holder, in the order they first did.
    #[prost(string, repeated, tag = "2")]
    from: Vec<String>,
    /// The most restrictive marking it arrived under (`pb::Tlp`).
    #[prost(int32, tag = "3")]
    tlp: i32,
}

/// The transfers one commit made under one token.
#[derive(Clone, PartialEq, Message)]
struct ConsentedBlock {
    #[prost(message, repeated, tag = "1")]
    transfers: Vec<ConsentedTransfer>,
}

/// The sled engine.
pub struct SledStorage {
    db: Kv,
    receipts: Tree,
    transfers: Tree,
    refs: Tree,
    queues: Tree,
    queue_acks: Tree,
    uses: Tree,
    consented: Tree,
    revoked: Tree,
    tlp_received: Tree,
    workflows: Tree,
    timers: Tree,
    meta: Tree,
    log: Log,
    index: Mutex<QueueIndex>,
    /// The `revocations` tree, mirrored: read for every consented transfer, changed only by
    /// revocations, which the writer applies.
    revocations: RwLock<HashMap<Vec<u8>, Value>>,
    last_seq: AtomicU64,
    /// The last transaction failed in the engine: its outcome is not known, and the
    /// in-memory state is read again before the next one.
    unsure: std::sync::atomic::AtomicBool,
    /// The last transaction was stale: another broker node had committed since this node's
    /// state was read (PostgreSQL). It wrote nothing; it runs again once the state is read.
    stale: std::sync::atomic::AtomicBool,
    /// sled's log file and blob directory, which [`Storage::sync`] fsyncs itself (`None` on
    /// PostgreSQL, whose commits are durable when they return).
    files: Option<DurableFiles>,
    /// The data directory (the log key beside the database, for snapshots).
    dir: std::path::PathBuf,
}

/// What makes sled's flush durable. On Linux sled 0.34's `flush` writes its log with
/// `sync_file_range`, which neither empties the drive's write cache nor records a grown file
/// size, and it never syncs the files it writes large nodes to (`blobs/`); its own `fsync`
/// runs only every 500 ms. So after each flush the broker calls `fdatasync` on the log file
/// and `fsync` on every blob file it has not synced yet, and on their directory.
struct DurableFiles {
    log: std::fs::File,
    blobs: std::path::PathBuf,
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

impl DurableFiles {
    /// Opens sled's files in `db_dir` once sled has created them, and syncs the directories
    /// that hold them.
    fn open(db_dir: &Path) -> std::io::Result<DurableFiles> {
        let log = std::fs::File::open(db_dir.join("db"))?;
        let blobs = db_dir.join("blobs");
        for dir in [db_dir, blobs.as_path()] {
            std::fs::File::open(dir)?.sync_all()?;
        }
        if let Some(parent) = db_dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(DurableFiles {
            log,
            blobs,
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    /// Makes what sled has flushed durable.
    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashSet::with_capacity(synced.len());
        let mut added = false;
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it meanwhile: nothing refers to it any more.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                added = true;
            }
            present.insert(name);
        }
        if added {
            std::fs::File::open(&self.blobs)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

fn kv_err(context: &'static str) -> impl Fn(KvError) -> Internal {
    move |e| Internal::new(context, e)
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

fn received_key(holder: &AgencyId, object_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(holder.as_str().len() + 1 + object_id.len());
    k.extend_from_slice(holder.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(object_id.as_bytes());
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
    receipts: TxTree<'a>,
    transfers: TxTree<'a>,
    refs: TxTree<'a>,
    queues: TxTree<'a>,
    queue_acks: TxTree<'a>,
    uses: TxTree<'a>,
    meta: TxTree<'a>,
    consented: TxTree<'a>,
    tlp_received: TxTree<'a>,
    /// Present when an operation of the batch carries a workflow step.
    workflows: Option<TxTree<'a>>,
    timers: Option<TxTree<'a>>,
    log: TxLog<'a>,
}

impl<'a> Trees<'a> {
    /// The workflow trees, which a batch without workflow operations leaves out.
    fn workflow_trees(&self) -> TxResult<(TxTree<'a>, TxTree<'a>)> {
        match (self.workflows, self.timers) {
            (Some(w), Some(t)) => Ok((w, t)),
            _ => abort(Internal::new(
                "applying a workflow step",
                "the batch's transaction lacks the workflow trees",
            )),
        }
    }
}

/// What a transaction gathers while it runs, written at its end.
#[derive(Default)]
struct Effects {
    /// Items queued per recipient (for the depth checks of later operations).
    queued: HashMap<AgencyId, u64>,
    /// The items queued, into blocks.
    blocks: BlockBuilder,
    /// Positions newly acknowledged, per recipient and block.
    acks: BTreeMap<(AgencyId, u64), BTreeSet<usize>>,
    /// Transfers made under each token, with the first sequence number they were queued at.
    consented: BTreeMap<Vec<u8>, (u64, Vec<ConsentedTransfer>)>,
    /// The highest queue sequence number assigned.
    last_seq: u64,
}

/// What a committed transaction changes in memory.
#[derive(Default)]
struct Committed {
    blocks: Vec<(AgencyId, Vec<ItemMeta>)>,
    acks: Vec<(AgencyId, u64, Vec<usize>)>,
    last_seq: u64,
    appended: Option<Appended>,
}

/// What a step inside a transaction returns: its error aborts the transaction.
type TxResult<T> = Result<T, TxError<Failure>>;

fn abort<T>(f: impl Into<Failure>) -> TxResult<T> {
    kv::abort(f.into())
}

/// Writes the blocks a transaction queued; returns their index entries.
fn write_blocks(
    queues: TxTree<'_>,
    blocks: BlockBuilder,
) -> TxResult<Vec<(AgencyId, Vec<ItemMeta>)>> {
    let mut out = Vec::new();
    for (recipient, items) in blocks.finish() {
        let Some(first) = items.first().map(|i| i.seq) else {
            continue;
        };
        let Some(metas) = items
            .iter()
            .map(StoredItem::meta)
            .collect::<Option<Vec<_>>>()
        else {
            return abort(Internal::new("queueing", "a malformed queue item"));
        };
        queues.insert(
            block_key(&recipient, first),
            StoredBlock { items }.encode_to_vec(),
        )?;
        out.push((recipient, metas));
    }
    Ok(out)
}

/// Whether no one holds the lock sled takes on the database in `dir` (the broker's data
/// directory) while it is open. sled lets go of it a little after its last handle is dropped,
/// once its background threads have finished; [`crate::serve_with`] waits for this before it
/// returns. A database that does not exist is not locked.
pub fn database_unlocked(dir: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let file = dir.join(audit_log::DB_DIR).join("db");
    match std::fs::File::open(&file) {
        // Taken and, on drop, given back at once.
        Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok(),
        Err(_) => true,
    }
}

/// Waits, blocking, at most `within` until `released()` holds (the caller's own handles are
/// gone) and then [`database_unlocked`]; whether both do.
pub fn wait_until_closed(
    dir: &Path,
    within: std::time::Duration,
    released: impl Fn() -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + within;
    while !(released() && database_unlocked(dir)) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

impl SledStorage {
    /// Stores a workflow record as it is, for tests of what reads them.
    #[cfg(test)]
    pub(crate) fn put_workflow_record(&self, key: &str, record: &[u8]) {
        #[allow(clippy::unwrap_used)]
        self.workflows.insert(key.as_bytes(), record).unwrap();
    }

    /// Opens (or creates) the database in `dir`, with the audit log's key (created on first
    /// start) for checkpoints whose origin is `origin`.
    pub fn open(dir: &Path, origin: &str) -> Result<SledStorage, Internal> {
        let signer = audit_log::load_or_create_key(dir, origin)?;
        let db_dir = dir.join(audit_log::DB_DIR);
        check_segment_size(&db_dir)?;
        let fresh = !db_dir.exists();
        let db = Kv::open_sled(&db_dir).map_err(kv_err("opening the database"))?;
        let files = DurableFiles::open(&db_dir)
            .map_err(|e| Internal::new("opening the database files", e))?;
        Self::open_on(db, Some(files), fresh, dir, signer)
    }

    /// Opens the store in the PostgreSQL database `options` names (creating its schema on
    /// first use), with the log key and the published checkpoint in `dir`.
    pub fn open_postgres(
        dir: &Path,
        origin: &str,
        options: &super::postgres::PgOptions,
    ) -> Result<SledStorage, Internal> {
        let db = Kv::open_postgres(options).map_err(kv_err("opening the database"))?;
        // Never written to: its layout is the first thing a broker writes.
        let fresh = db
            .open_tree("meta")
            .and_then(|meta| meta.first())
            .map_err(kv_err("reading the database's layout"))?
            .is_none();
        // A database that holds a log needs the key that signed its checkpoints.
        let signer = if fresh {
            audit_log::load_or_create_key(dir, origin)?
        } else {
            audit_log::load_key(dir, origin)?
        };
        Self::open_on(db, None, fresh, dir, signer)
    }

    /// What the engine's settings leave of durability (PostgreSQL's server settings), one
    /// warning per weakness: `check-config` and the log at start print them.
    pub fn durability_warnings(&self) -> Result<Vec<String>, Internal> {
        self.db
            .durability_warnings()
            .map_err(kv_err("reading the database's settings"))
    }

    /// Opens the store on `db`; `fresh` says it was just created, so that its empty log is
    /// published at once.
    fn open_on(
        db: Kv,
        files: Option<DurableFiles>,
        fresh: bool,
        dir: &Path,
        signer: concordat_proto::checkpoint::LogSigner,
    ) -> Result<SledStorage, Internal> {
        let tree = |name: &str| db.open_tree(name).map_err(kv_err("opening a tree"));
        let meta = tree("meta")?;
        check_layout(&meta)?;
        let storage = SledStorage {
            receipts: tree("receipts")?,
            transfers: tree("transfers")?,
            refs: tree("refs")?,
            queues: tree("queues")?,
            queue_acks: tree("queue_acks")?,
            uses: tree("consent_uses")?,
            consented: tree("consented_transfers")?,
            revoked: tree("revocations")?,
            tlp_received: tree("tlp_received")?,
            workflows: tree("workflows")?,
            timers: tree("timers")?,
            log: Log::open(
                tree("log_entries")?,
                tree("log_hashes")?,
                meta.clone(),
                signer,
                dir,
            )?,
            meta,
            index: Mutex::new(QueueIndex::default()),
            revocations: RwLock::new(HashMap::new()),
            last_seq: AtomicU64::new(0),
            unsure: std::sync::atomic::AtomicBool::new(false),
            stale: std::sync::atomic::AtomicBool::new(false),
            files,
            db,
            dir: dir.to_path_buf(),
        };
        let revocations = storage.read_revocations()?;
        *storage
            .revocations
            .write()
            .unwrap_or_else(|p| p.into_inner()) = revocations;
        let next = storage
            .meta
            .get(NEXT_SEQ)
            .map_err(kv_err("reading the sequence counter"))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(1);
        storage
            .last_seq
            .store(next.saturating_sub(1), Ordering::SeqCst);
        *storage.lock_index() = storage.load_index()?;
        if fresh {
            // A new log publishes its empty tree at once: from then on a log without a
            // published checkpoint beside it can only have lost it.
            storage.log.seal(None)?;
            storage.sync()?;
        }
        Ok(storage)
    }

    /// Reads every block's index entries and acknowledgements.
    fn load_index(&self) -> Result<QueueIndex, Internal> {
        let malformed =
            |what: &str| Internal::new("reading the queues", format!("malformed {what}"));
        let mut index = QueueIndex::default();
        for item in self.queues.iter() {
            let (key, value) = item.map_err(kv_err("reading the queues"))?;
            let (recipient, _) = parse_block_key(&key).ok_or_else(|| malformed("block key"))?;
            let metas = BlockHeader::decode(value.as_ref())
                .ok()
                .and_then(|h| h.metas())
                .ok_or_else(|| malformed("block"))?;
            let acked = self
                .queue_acks
                .get(&key)
                .map_err(kv_err("reading the queues"))?
                .map(|bits| decode_acked(&bits, metas.len()))
                .unwrap_or_default();
            index.add_block(&recipient, metas, acked);
        }
        Ok(index)
    }

    fn lock_index(&self) -> MutexGuard<'_, QueueIndex> {
        // Updated only by the writer, in whole steps; a panic elsewhere cannot tear it.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(meta: TxTree<'_>) -> TxResult<u64> {
        Ok(meta.get(NEXT_SEQ)?.and_then(|v| be_u64(&v)).unwrap_or(1))
    }

    /// Whether the token `jti` of `issuer`, issued at `issued_at`, is revoked.
    fn revoked(&self, issuer: &KeyId, jti: &TokenId, issued_at: OffsetDateTime) -> bool {
        let r = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        r.contains_key(&revoked_jti_key(issuer, jti))
            || r.get(&revoked_before_key(issuer))
                .and_then(|v| be_i128(v))
                .is_some_and(|b| issued_at.unix_timestamp_nanos() < b)
    }

    /// Applies a batch: consecutive operations share one sled transaction; a revocation, which
    /// scans committed state, runs in a transaction of its own between them.
    fn apply_batch_sled(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut start = 0;
        for (i, op) in ops.iter().enumerate() {
            if !matches!(op, Op::Revoke(_) | Op::FireTimers { .. }) {
                continue;
            }
            out.extend(self.fresh(|| self.run_tx(&ops[start..i])));
            out.push(self.fresh(|| self.apply_alone(op)));
            start = i + 1;
        }
        out.extend(self.fresh(|| self.run_tx(&ops[start..])));
        out
    }

    /// An operation that runs in a transaction of its own.
    fn apply_alone(&self, op: &Op) -> Result<Applied, Failure> {
        match op {
            Op::Revoke(r) => self.apply_revoke(r),
            Op::FireTimers { now } => self.fire_timers(*now),
            _ => Err(Internal::new("applying a batch", "not an operation applied alone").into()),
        }
    }

    /// Runs `apply` (one transaction's worth of a batch) and, if another broker node's commit
    /// made it stale, runs it again with the store's head held: the state is read again while
    /// no node can commit, so the second run cannot be stale, and a node is never starved by
    /// faster ones. A stale transaction wrote nothing, so running it again applies it once.
    fn fresh<T>(&self, apply: impl Fn() -> T) -> T {
        let result = apply();
        if !self.stale.swap(false, Ordering::SeqCst) {
            return result;
        }
        if let Err(e) = self.db.hold_head() {
            tracing::error!(error = %e, "holding the store's head to apply a batch again");
            self.unsure.store(true, Ordering::SeqCst);
            return result;
        }
        let again = match self.reload_state("another broker node committed") {
            Ok(()) => apply(),
            Err(e) => {
                tracing::error!(error = %e, "reading the store's state again");
                self.unsure.store(true, Ordering::SeqCst);
                self.db.release_head();
                return result;
            }
        };
        self.db.release_head();
        if self.stale.swap(false, Ordering::SeqCst) {
            // Only if the held transaction was lost with its connection: the callers are told
            // the storage is unavailable, and the next batch reads the state first.
            self.unsure.store(true, Ordering::SeqCst);
        }
        again
    }

    /// Notes a transaction that failed in the engine because another node committed first.
    fn note_stale<T, A>(&self, outcome: &Result<T, TxError<A>>) -> bool {
        let stale = matches!(outcome, Err(TxError::Kv(e)) if e.is_stale());
        if stale {
            self.stale.store(true, Ordering::SeqCst);
        }
        stale
    }

    /// Applies `ops` in one transaction. A refusal writes nothing but its audit entry and does
    /// not affect the others; an internal error aborts them all.
    fn run_tx(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        if ops.is_empty() {
            return Vec::new();
        }
        // After an engine failure the last commit's outcome may be unknown (PostgreSQL can
        // commit a transaction whose COMMIT never answered): read the state again first.
        if self.unsure.load(Ordering::SeqCst) {
            if let Err(e) = self.reload_state("a commit's outcome was not known") {
                let why = e.to_string();
                return ops
                    .iter()
                    .map(|_| {
                        Err(Failure::Internal(Internal::new(
                            "applying a batch",
                            why.clone(),
                        )))
                    })
                    .collect();
            }
            self.unsure.store(false, Ordering::SeqCst);
        }
        let (entries, hashes) = self.log.trees();
        // The workflow trees join the transaction only when an operation needs them: the
        // cost of a sled transaction grows with the trees it spans.
        let workflow_ops = ops.iter().any(|op| match op {
            Op::Accept(a) => a.envelope.workflow.is_some(),
            Op::Involve(_) => true,
            _ => false,
        });
        let mut trees = vec![
            &self.receipts,
            &self.transfers,
            &self.refs,
            &self.queues,
            &self.queue_acks,
            &self.uses,
            &self.consented,
            &self.tlp_received,
            &self.meta,
            entries,
            hashes,
        ];
        if workflow_ops {
            trees.extend([&self.workflows, &self.timers]);
        }
        let outcome = kv::transaction(&trees, |view| {
            let Some(
                [
                    receipts,
                    transfers,
                    refs,
                    queues,
                    queue_acks,
                    uses,
                    consented,
                    tlp_received,
                    meta,
                    le,
                    lh,
                ],
            ) = view.array(0)
            else {
                return abort(Internal::new("applying a batch", "wrong number of trees"));
            };
            let (workflows, timers) = match view.array(11) {
                Some([w, t]) => (Some(w), Some(t)),
                None => (None, None),
            };
            // What the operations will look up, and the counters every batch reads: read at
            // once where that saves round trips (PostgreSQL: one for all).
            let (mut receipt_keys, mut use_keys) = (Vec::new(), Vec::new());
            for op in ops {
                if let Op::Accept(a) = op {
                    receipt_keys.push(receipt_key(&a.sender, &a.envelope.message_id));
                    use_keys.extend(
                        a.decision
                            .consents
                            .iter()
                            .map(|c| token_key(&c.issuer, &c.jti).to_vec()),
                    );
                }
            }
            kv::prefetch(vec![
                (meta, vec![audit_log::LOG_SIZE.to_vec(), NEXT_SEQ.to_vec()]),
                (receipts, receipt_keys),
                (uses, use_keys),
            ])?;
            let t = Trees {
                receipts,
                transfers,
                refs,
                queues,
                queue_acks,
                uses,
                meta,
                consented,
                tlp_received,
                workflows,
                timers,
                log: self.log.in_tx(le, lh, meta)?,
            };
            let mut fx = Effects::default();
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(self.op_in(&t, op, &mut fx)?);
            }
            let committed = self.finish(&t, fx)?;
            Ok((results, committed))
        });
        if self.note_stale(&outcome) {
            return ops
                .iter()
                .map(|_| Err(super::storage_unavailable().into()))
                .collect();
        }
        if let Err(TxError::Kv(e)) = &outcome {
            // The engine failed (a lost connection, a server that went away): nothing is
            // acknowledged, and every caller is told to try again, as when a flush fails. A
            // retry finds its receipt if the commit went through after all.
            tracing::error!(error = %e, "a batch's transaction failed in the database");
            self.unsure.store(true, Ordering::SeqCst);
            return ops
                .iter()
                .map(|_| Err(super::storage_unavailable().into()))
                .collect();
        }
        match tx_outcome(outcome) {
            Ok((results, committed)) => {
                self.settle(committed);
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

    /// Writes what the transaction gathered: queue blocks, acknowledgements, consented
    /// transfers, the audit log's bundles.
    fn finish(&self, t: &Trees<'_>, fx: Effects) -> TxResult<Committed> {
        let blocks = write_blocks(t.queues, fx.blocks)?;
        let mut acks = Vec::with_capacity(fx.acks.len());
        {
            let index = self.lock_index();
            for ((recipient, block), positions) in fx.acks {
                let positions: Vec<usize> = positions.into_iter().collect();
                let key = block_key(&recipient, block);
                match index.after_ack(&recipient, block, &positions) {
                    Some(AckOutcome::Partial(bits)) => {
                        t.queue_acks.insert(key, encode_acked(&bits))?;
                    }
                    Some(AckOutcome::Complete { had_bitmap }) => {
                        if had_bitmap {
                            t.queue_acks.delete(key.as_slice())?;
                        }
                        t.queues.delete(key)?;
                    }
                    None => continue,
                }
                acks.push((recipient, block, positions));
            }
        }
        for (mut key, (first, transfers)) in fx.consented {
            key.extend_from_slice(&first.to_be_bytes());
            t.consented
                .insert(key, ConsentedBlock { transfers }.encode_to_vec())?;
        }
        Ok(Committed {
            blocks,
            acks,
            last_seq: fx.last_seq,
            appended: t.log.finish()?,
        })
    }

    /// Reads the in-memory state again from the database: the log's size and frontier, the
    /// queue index, the sequence counter and the revocations. After an engine failure the
    /// transaction that failed may have committed (or not); after another broker node's
    /// commit the database holds more than this node applied. The state then is whatever the
    /// database holds, and the next transaction starts from it, as a restart would.
    fn reload_state(&self, why: &str) -> Result<(), Internal> {
        let mark = self
            .db
            .mark()
            .map_err(kv_err("reading the store's generation"))?;
        self.log.reload()?;
        *self.lock_index() = self.load_index()?;
        let next = self
            .meta
            .get(NEXT_SEQ)
            .map_err(kv_err("reading the sequence counter"))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(1);
        self.last_seq
            .store(next.saturating_sub(1), Ordering::SeqCst);
        let revocations = self.read_revocations()?;
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) = revocations;
        self.db.reloaded(mark);
        tracing::debug!(
            log_size = self.log_size().unwrap_or(0),
            why,
            "read the store's state again"
        );
        Ok(())
    }

    fn read_revocations(&self) -> Result<HashMap<Vec<u8>, Value>, Internal> {
        self.revoked
            .iter()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v)))
            .collect::<Result<HashMap<_, _>, _>>()
            .map_err(kv_err("reading revocations"))
    }

    /// Applies what a committed transaction changed to the in-memory state.
    fn settle(&self, c: Committed) {
        self.log.advance(c.appended);
        let mut index = self.lock_index();
        for (recipient, items) in c.blocks {
            index.add_block(&recipient, items, Vec::new());
        }
        for (recipient, block, positions) in c.acks {
            index.ack(&recipient, block, &positions);
        }
        drop(index);
        self.last_seq.fetch_max(c.last_seq, Ordering::SeqCst);
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
            Op::Ack { recipient, seqs } => self.ack_in(t, recipient, seqs, fx).map(Ok),
            Op::Refuse(refused) => {
                t.log
                    .append(&audit_log::entry(pb::audit_entry::Event::TransferRefused(
                        *refused.clone(),
                    )))?;
                Ok(Ok(Applied::Logged))
            }
            Op::Delivered { recipient, items } => {
                for (seq, transfer_id, carried) in items {
                    t.log
                        .append(&audit_log::entry(pb::audit_entry::Event::Delivered(
                            pb::Delivered {
                                recipient: recipient.to_string(),
                                delivery_id: seq.to_string(),
                                transfer_id: transfer_id.clone(),
                                recall_notice: *carried == Carried::Recall,
                                notice: *carried == Carried::Notice,
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
            Op::Log(event) => {
                t.log.append(&audit_log::entry(*event.clone()))?;
                Ok(Ok(Applied::Logged))
            }
            Op::Involve(i) => {
                let (workflows, _) = t.workflow_trees()?;
                let stored = workflows.get(workflow::incident_key(&i.incident).as_bytes())?;
                let involved = match workflow::involve(
                    &i.agency,
                    &i.incident,
                    &i.partners,
                    stored.as_deref(),
                    i.at,
                ) {
                    Ok(v) => v,
                    Err(e) => return abort(e),
                };
                workflows.insert(involved.key.as_bytes(), involved.record)?;
                t.log.append(&audit_log::entry_at(
                    timestamp(i.at),
                    pb::audit_entry::Event::InvolvementDeclared(involved.entry.clone()),
                ))?;
                for (to, notice) in involved.notices {
                    let seq =
                        Self::queue_notice(t.meta, &t.log, &mut fx.blocks, &to, notice, i.at)?;
                    fx.last_seq = fx.last_seq.max(seq);
                    *fx.queued.entry(to).or_default() += 1;
                }
                Ok(Ok(Applied::Involved(Box::new(involved.entry))))
            }
            Op::Revoke(_) | Op::FireTimers { .. } => abort(Internal::new(
                "applying a batch",
                "a revocation or a timer must run on its own",
            )),
        }
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
                // logged like any other, in the same group commit, citing the decision's
                // clauses.
                let refusal = refusal.cited(|| a.decision.citation());
                t.log
                    .append(&audit_log::entry(pb::audit_entry::Event::TransferRefused(
                        transfer_refused(Some(a.facts.clone()), &refusal),
                    )))?;
                Ok(Err(Failure::Refused(refusal)))
            }
            Ok(Some(log_index)) => Ok(Ok(Applied::Duplicate(log_index))),
            Ok(None) => {
                let step = match Self::workflow_step(t, a)? {
                    Ok(step) => step,
                    Err(refusal) => {
                        let refusal = refusal.cited(|| a.decision.citation());
                        t.log.append(&audit_log::entry(
                            pb::audit_entry::Event::TransferRefused(transfer_refused(
                                Some(a.facts.clone()),
                                &refusal,
                            )),
                        ))?;
                        return Ok(Err(Failure::Refused(refusal)));
                    }
                };
                let receipt = Self::accept_writes(t, a, fx)?;
                if let Some(step) = step {
                    let (workflows, timers) = t.workflow_trees()?;
                    workflows.insert(step.key.as_bytes(), step.record)?;
                    for timer in step.timers {
                        timers.insert(timer.storage_key(), timer.encode_to_vec())?;
                    }
                }
                Ok(Ok(Applied::Accepted(Box::new(receipt))))
            }
        }
    }

    /// The envelope's workflow step applied to its record (`None` without a step), or why it
    /// is refused: read inside the transaction, so that steps on one workflow are serialised.
    fn workflow_step(
        t: &Trees<'_>,
        a: &Accept,
    ) -> TxResult<Result<Option<workflow::Applied>, Refusal>> {
        let (Some(step), Some(cx)) = (&a.envelope.workflow, &a.workflow) else {
            return Ok(Ok(None));
        };
        let key = workflow::key_of(&a.sender, step);
        let (workflows, _) = t.workflow_trees()?;
        let stored = workflows.get(key.as_bytes())?;
        match workflow::apply_step(
            &workflow::StepInput {
                sender: &a.sender,
                recipients: &a.envelope.recipients,
                step,
                cx,
                at: a.accepted_at,
                transfer_id: &a.transfer.transfer_id,
                payload_digest: &a.decision.payload_digest,
            },
            stored.as_deref(),
        ) {
            Ok(outcome) => Ok(outcome.map(Some)),
            Err(e) => abort(e),
        }
    }

    /// Queues `notice` for `to` under its `notice_queued` entry; returns its sequence number.
    fn queue_notice(
        meta: TxTree<'_>,
        log: &TxLog<'_>,
        blocks: &mut BlockBuilder,
        to: &AgencyId,
        notice: pb::Notice,
        at: OffsetDateTime,
    ) -> TxResult<u64> {
        let Ok(id) = notice.notice_id.parse::<uuid::Uuid>() else {
            return abort(Internal::new("queueing a notice", "its id is not a UUID"));
        };
        let seq = Self::next_seq(meta)?;
        let index = log.append(&audit_log::entry_at(
            timestamp(at),
            pb::audit_entry::Event::NoticeQueued(pb::NoticeQueued {
                recipient: to.to_string(),
                notice: Some(notice.clone()),
            }),
        ))?;
        blocks.push(
            to,
            StoredItem {
                seq,
                transfer_id: id.as_bytes().to_vec(),
                kind: ItemKind::Notice.to_wire(),
                log_index: Some(index),
                notice: Some(notice),
                ..Default::default()
            },
        );
        meta.insert(NEXT_SEQ, (seq + 1).to_be_bytes())?;
        Ok(seq)
    }

    /// Fires the timers due by `now`, in one transaction of their own: each is removed, and
    /// applied to its record if it still matches it ([`workflow::fire`]).
    fn fire_timers(&self, now: OffsetDateTime) -> Result<Applied, Failure> {
        // Every timer that fires at or before `now` sorts before the prefix of the next
        // nanosecond.
        let end = workflow::timer_prefix(nanos(now).saturating_add(1));
        let mut due: Vec<Value> = Vec::new();
        for item in self.timers.range(..&end[..]).take(MAX_TIMERS_FIRED) {
            let (k, _) = item.map_err(kv_err("reading the timers"))?;
            due.push(k);
        }
        if due.is_empty() {
            return Ok(Applied::Fired {
                timers: 0,
                notices: 0,
            });
        }
        let (entries, hashes) = self.log.trees();
        let outcome = kv::transaction(
            &[
                &self.timers,
                &self.workflows,
                &self.queues,
                &self.meta,
                entries,
                hashes,
            ],
            |view| {
                let Some([timers, workflows, queues, meta, le, lh]) = view.array(0) else {
                    return abort(Internal::new("firing timers", "wrong number of trees"));
                };
                let log = self.log.in_tx(le, lh, meta)?;
                let mut blocks = BlockBuilder::default();
                let (mut fired, mut notices) = (0u32, 0u32);
                for key in &due {
                    let Some(raw) = timers.remove(key)? else {
                        continue;
                    };
                    fired += 1;
                    // A timer or record that does not decode cannot be fired, now or later:
                    // it is dropped and logged, rather than aborting this firing and every
                    // one after it (the timers due later would never fire). Its record, if
                    // any, is left as it is for an operator to look at.
                    let timer = match workflow::Timer::decode(raw.as_ref()) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "dropped a workflow timer that does not decode");
                            continue;
                        }
                    };
                    let stored = workflows.get(timer.key.as_bytes())?;
                    let outcome = match workflow::fire(&timer, stored.as_deref(), now) {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::error!(error = %e, record = %timer.key, party = %timer.party, "dropped a workflow timer whose record cannot be read");
                            continue;
                        }
                    };
                    let Some(f) = outcome else { continue };
                    workflows.insert(timer.key.as_bytes(), f.record)?;
                    for (to, notice) in f.notices {
                        Self::queue_notice(meta, &log, &mut blocks, &to, notice, now)?;
                        notices += 1;
                    }
                }
                let last_seq = Self::next_seq(meta)?.saturating_sub(1);
                let committed = Committed {
                    blocks: write_blocks(queues, blocks)?,
                    acks: Vec::new(),
                    last_seq,
                    appended: log.finish()?,
                };
                Ok((fired, notices, committed))
            },
        );
        self.note_stale(&outcome);
        let (timers, notices, committed) = tx_outcome(outcome)?;
        self.settle(committed);
        Ok(Applied::Fired { timers, notices })
    }

    /// The checks that can change between decision and commit, before anything is written:
    /// `Ok(Some(log_index))` for a duplicate, `Err(refusal)`, or `Ok(None)` to go ahead.
    fn accept_checks(
        &self,
        t: &Trees<'_>,
        a: &Accept,
        fx: &Effects,
    ) -> TxResult<Result<Option<u64>, Refusal>> {
        let rkey = receipt_key(&a.sender, &a.envelope.message_id);
        if let Some(found) = t.receipts.get(&rkey)? {
            let stored = match StoredReceipt::decode(found.as_ref()) {
                Ok(s) => s,
                Err(e) => return abort(Internal::new("decoding a stored receipt", e)),
            };
            if stored.envelope_digest != a.envelope_digest {
                return Ok(Err(message_id_reused()));
            }
            return Ok(Ok(Some(stored.log_index)));
        }
        // After the receipt check: a retry of a stored message is answered even when the queue
        // its first attempt filled is full.
        {
            let index = self.lock_index();
            for r in &a.envelope.recipients {
                let depth = index
                    .depth(r)
                    .saturating_add(fx.queued.get(r).copied().unwrap_or(0));
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
        }
        for c in &a.decision.consents {
            if self.revoked(&c.issuer, &c.jti, c.issued_at) {
                return Ok(Err(Refusal::new(
                    Reason::ConsentRevoked,
                    format!("consent token {} has been revoked by its issuer", c.jti),
                )));
            }
            if let Some(max) = c.max_uses {
                let used = t
                    .uses
                    .get(token_key(&c.issuer, &c.jti))?
                    .and_then(|v| be_u64(&v))
                    .unwrap_or(0);
                if used >= u64::from(max) {
                    return Ok(Err(Refusal::new(
                        Reason::ConsentUsedUp,
                        format!("consent token {} allows {max} use(s), all used", c.jti),
                    )));
                }
            }
        }
        Ok(Ok(None))
    }

    /// Stores an accepted transfer: its queue items, the consent use, the audit entry and the
    /// receipt.
    fn accept_writes(t: &Trees<'_>, a: &Accept, fx: &mut Effects) -> TxResult<pb::Receipt> {
        // Uses are counted only for tokens that limit them: nothing else reads the count.
        for c in a.decision.consents.iter().filter(|c| c.max_uses.is_some()) {
            let key = token_key(&c.issuer, &c.jti);
            let used = t.uses.get(&key)?.and_then(|v| be_u64(&v)).unwrap_or(0);
            t.uses.insert(key, (used + 1).to_be_bytes())?;
        }
        // The log first, so that each queue item can record its transfer's entry (whose proof
        // goes with the delivery). The first transfer that relies on a designation records it,
        // once, before its own entry (`docs/national-significance.md`); the key lives in `meta`.
        if let Some(d) = &a.designation {
            let key = [DESIGNATION_PREFIX, &d.designation_sha256[..]].concat();
            if t.meta.get(&key)?.is_none() {
                t.meta.insert(key, &[][..])?;
                t.log.append(&audit_log::entry_at(
                    timestamp(a.accepted_at),
                    pb::audit_entry::Event::DesignationRecorded(d.clone()),
                ))?;
            }
        }
        let entry = audit_log::entry_at(
            timestamp(a.accepted_at),
            pb::audit_entry::Event::TransferAccepted(pb::TransferAccepted {
                transfer_id: a.transfer.transfer_id.clone(),
                envelope: Some(a.facts.clone()),
                authorities: a.authorities.clone(),
                stix_object_ids: a.decision.carried.object_ids.clone(),
                designation: a.designation.clone(),
            }),
        );
        let (log_index, bytes) = t.log.append_bytes(&entry)?;
        let tid = a.transfer_id.as_bytes();
        let transfer = a.transfer.clone();
        // A transfer for one recipient travels inside its queue item; one for several is stored
        // once, with a count of the recipients still holding it.
        let (kind, mut inline) = if a.envelope.recipients.len() == 1 {
            (ItemKind::Inline, Some(transfer))
        } else {
            t.transfers.insert(&tid[..], transfer.encode_to_vec())?;
            t.refs
                .insert(&tid[..], (a.envelope.recipients.len() as u64).to_be_bytes())?;
            (ItemKind::Shared, None)
        };
        let mut seq = Self::next_seq(t.meta)?;
        let first_seq = seq;
        for (r, authority) in a.envelope.recipients.iter().zip(&a.decision.authorities) {
            fx.blocks.push(
                r,
                StoredItem {
                    seq,
                    transfer_id: tid.to_vec(),
                    kind: kind.to_wire(),
                    agreement_id: authority.agreement_id.clone(),
                    clause: authority.clause.clone(),
                    // Only a transfer for a single recipient is inline: it moves into that
                    // recipient's item.
                    transfer: inline.take(),
                    recall: None,
                    log_index: Some(log_index),
                    notice: None,
                },
            );
            *fx.queued.entry(r.clone()).or_default() += 1;
            fx.last_seq = fx.last_seq.max(seq);
            seq += 1;
        }
        t.meta.insert(NEXT_SEQ, seq.to_be_bytes())?;
        for c in &a.decision.consents {
            fx.consented
                .entry(token_key(&c.issuer, &c.jti))
                .or_insert_with(|| (first_seq, Vec::new()))
                .1
                .push(consented_record(a, c));
        }
        Self::remember_restricted(t, a)?;
        t.receipts.insert(
            receipt_key(&a.sender, &a.envelope.message_id),
            StoredReceipt {
                log_index,
                envelope_digest: a.envelope_digest.to_vec(),
            }
            .encode_to_vec(),
        )?;
        receipt_from_entry(log_index, &entry, bytes).or_else(abort)
    }

    /// Remembers, per recipient, the STIX objects a transfer delivers under TLP:AMBER+STRICT
    /// or TLP:RED: the first transfer each arrived in is kept, its sender added to those it
    /// may go back to, the most restrictive marking kept. An object going back to an agency
    /// it came from (the sender holds it from that recipient) is not remembered for it: the
    /// originator is not bound by its own marking.
    fn remember_restricted(t: &Trees<'_>, a: &Accept) -> TxResult<()> {
        let transfer_id = &a.transfer.transfer_id;
        let sender = a.sender.as_str();
        for object in &a.decision.carried.restricted {
            let came_from: Vec<String> = match t
                .tlp_received
                .get(received_key(&a.sender, &object.object_id))?
            {
                Some(found) => match StoredReceived::decode(found.as_ref()) {
                    Ok(r) => r.from,
                    Err(e) => return abort(Internal::new("decoding a TLP record", e)),
                },
                None => Vec::new(),
            };
            for holder in &a.envelope.recipients {
                if came_from.iter().any(|f| f == holder.as_str()) {
                    continue;
                }
                let key = received_key(holder, &object.object_id);
                let tlp = pb::Tlp::from(object.tlp) as i32;
                let record = match t.tlp_received.get(&key)? {
                    Some(found) => {
                        let mut r = match StoredReceived::decode(found.as_ref()) {
                            Ok(r) => r,
                            Err(e) => return abort(Internal::new("decoding a TLP record", e)),
                        };
                        if r.from.iter().any(|f| f == sender) && r.tlp >= tlp {
                            continue;
                        }
                        if !r.from.iter().any(|f| f == sender) {
                            r.from.push(sender.to_owned());
                        }
                        r.tlp = r.tlp.max(tlp);
                        r
                    }
                    None => StoredReceived {
                        first_transfer: transfer_id.clone(),
                        from: vec![sender.to_owned()],
                        tlp,
                    },
                };
                t.tlp_received.insert(key, record.encode_to_vec())?;
            }
        }
        Ok(())
    }

    /// Acknowledges deliveries of `recipient` (and drops a shared transfer once every
    /// recipient has it). Unknown or already acknowledged ids are ignored.
    fn ack_in(
        &self,
        t: &Trees<'_>,
        recipient: &AgencyId,
        seqs: &[u64],
        fx: &mut Effects,
    ) -> TxResult<Applied> {
        let found: Vec<_> = {
            let index = self.lock_index();
            seqs.iter()
                .filter_map(|seq| index.locate(recipient, *seq))
                .collect()
        };
        let mut removed = 0u32;
        for loc in found {
            if !fx
                .acks
                .entry((recipient.clone(), loc.block))
                .or_default()
                .insert(loc.position)
            {
                // Twice in one commit.
                continue;
            }
            removed += 1;
            let item = &loc.item;
            t.log
                .append(&audit_log::entry(pb::audit_entry::Event::Acknowledged(
                    pb::Acknowledged {
                        recipient: recipient.to_string(),
                        delivery_id: item.seq.to_string(),
                        transfer_id: item.transfer_id.to_string(),
                        recall_notice: item.kind == ItemKind::Recall,
                        notice: item.kind == ItemKind::Notice,
                    },
                )))?;
            if item.kind != ItemKind::Shared {
                continue;
            }
            let tid = item.transfer_id.as_bytes();
            let counted = t.refs.get(tid)?.and_then(|v| be_u64(&v));
            let left = counted.unwrap_or(1).saturating_sub(1);
            if left == 0 {
                if counted.is_some() {
                    t.refs.delete(&tid[..])?;
                }
                t.transfers.delete(&tid[..])?;
            } else {
                t.refs.insert(&tid[..], left.to_be_bytes())?;
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
        // Keys are issuer (33 bytes) || jti (16) || first sequence number (8).
        let mut candidates: Vec<(TokenId, ConsentedTransfer)> = Vec::new();
        for item in self.consented.scan_prefix(&prefix) {
            let (k, v) = item.map_err(kv_err("scanning consented transfers"))?;
            let block = ConsentedBlock::decode(v.as_ref())
                .map_err(|e| Internal::new("decoding consented transfers", e))?;
            let jti = k
                .get(33..49)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(TokenId::from_bytes)
                .ok_or_else(|| Internal::new("decoding consented transfers", "short key"))?;
            candidates.extend(block.transfers.into_iter().map(|t| (jti, t)));
        }
        let (entries, hashes) = self.log.trees();
        let outcome = kv::transaction(
            &[&self.revoked, &self.queues, &self.meta, entries, hashes],
            |view| {
                let Some([revoked, queues, meta, le, lh]) = view.array(0) else {
                    return abort(Internal::new("revoking consent", "wrong number of trees"));
                };
                let log = self.log.in_tx(le, lh, meta)?;
                let previous_before = revoked
                    .get(revoked_before_key(&r.issuer))?
                    .and_then(|v| be_i128(&v));
                let already = |rec: &ConsentedTransfer, jti: &TokenId| -> TxResult<bool> {
                    let iat = i128::from(rec.issued_at_nanos);
                    Ok(revoked.get(revoked_jti_key(&r.issuer, jti))?.is_some()
                        || previous_before.is_some_and(|b| iat < b))
                };
                let mut recalled: Vec<&ConsentedTransfer> = Vec::new();
                let written = match r.target {
                    RevokeTarget::Token(jti) => {
                        if revoked.get(revoked_jti_key(&r.issuer, &jti))?.is_some() {
                            return Ok((0, true, Committed::default(), None));
                        }
                        for (_, rec) in &candidates {
                            if !already(rec, &jti)? {
                                recalled.push(rec);
                            }
                        }
                        let record = (
                            revoked_jti_key(&r.issuer, &jti),
                            r.revoked_at.unix_timestamp().to_be_bytes().to_vec(),
                        );
                        revoked.insert(record.0.as_slice(), record.1.as_slice())?;
                        record
                    }
                    RevokeTarget::IssuedBefore(before) => {
                        let cut = before.unix_timestamp_nanos();
                        if previous_before.is_some_and(|b| b >= cut) {
                            return Ok((0, true, Committed::default(), None));
                        }
                        for (jti, rec) in &candidates {
                            let iat = i128::from(rec.issued_at_nanos);
                            if iat < cut && !already(rec, jti)? {
                                recalled.push(rec);
                            }
                        }
                        let record = (revoked_before_key(&r.issuer), cut.to_be_bytes().to_vec());
                        revoked.insert(record.0.as_slice(), record.1.as_slice())?;
                        record
                    }
                };
                let mut seq = Self::next_seq(meta)?;
                let mut blocks = BlockBuilder::default();
                // Each notice, queued below once its entry's index is known.
                let mut queued: Vec<(AgencyId, StoredItem, pb::RecallQueued)> = Vec::new();
                for rec in recalled {
                    let Ok(transfer_id) = rec.transfer_id.parse::<uuid::Uuid>() else {
                        continue;
                    };
                    for recipient in &rec.recipients {
                        let Ok(to) = recipient.parse::<AgencyId>() else {
                            continue;
                        };
                        let notice = pb::RecallNotice {
                            transfer_id: rec.transfer_id.clone(),
                            message_id: rec.message_id.clone(),
                            consent_jti: rec.jti.clone(),
                            consent_issuer: r.issuer.to_string(),
                            revoked_at: Some(timestamp(r.revoked_at)),
                            sender: rec.sender.clone(),
                            organisation: rec.organisation.clone(),
                        };
                        let item = StoredItem {
                            seq,
                            transfer_id: transfer_id.as_bytes().to_vec(),
                            kind: ItemKind::Recall.to_wire(),
                            recall: Some(notice),
                            ..Default::default()
                        };
                        let entry = pb::RecallQueued {
                            recipient: to.to_string(),
                            transfer_id: rec.transfer_id.clone(),
                            message_id: rec.message_id.clone(),
                            consent_jti: rec.jti.clone(),
                            consent_issuer: r.issuer.to_string(),
                            organisation: rec.organisation.clone(),
                            sender: rec.sender.clone(),
                        };
                        queued.push((to, item, entry));
                        seq += 1;
                    }
                }
                meta.insert(NEXT_SEQ, seq.to_be_bytes())?;
                let notices = u32::try_from(queued.len()).unwrap_or(u32::MAX);
                // Whose consent it withdraws: the organisations of the transfers made under the
                // tokens it revokes (recalled now or before), and the issuer's own if it speaks
                // for one organisation only.
                let organisations: BTreeSet<String> = candidates
                    .iter()
                    .filter(|(jti, rec)| match r.target {
                        RevokeTarget::Token(t) => t == *jti,
                        RevokeTarget::IssuedBefore(before) => {
                            i128::from(rec.issued_at_nanos) < before.unix_timestamp_nanos()
                        }
                    })
                    .map(|(_, rec)| rec.organisation.clone())
                    .chain(r.issuer_organisation.iter().map(ToString::to_string))
                    .filter(|o| !o.is_empty())
                    .collect();
                // The revocation, then each recall notice it queued, in the same transaction.
                log.append(&audit_log::entry(pb::audit_entry::Event::ConsentRevoked(
                    pb::ConsentRevoked {
                        submitted_by: r.submitted_by.to_string(),
                        issuer: r.issuer.to_string(),
                        jti: match r.target {
                            RevokeTarget::Token(jti) => jti.to_string(),
                            RevokeTarget::IssuedBefore(_) => String::new(),
                        },
                        issued_before: match r.target {
                            RevokeTarget::Token(_) => None,
                            RevokeTarget::IssuedBefore(t) => Some(timestamp(t)),
                        },
                        recall_notices: notices,
                        organisations: organisations.into_iter().collect(),
                    },
                )))?;
                for (to, mut item, q) in queued {
                    let index =
                        log.append(&audit_log::entry(pb::audit_entry::Event::RecallQueued(q)))?;
                    item.log_index = Some(index);
                    blocks.push(&to, item);
                }
                let committed = Committed {
                    blocks: write_blocks(queues, blocks)?,
                    acks: Vec::new(),
                    last_seq: seq - 1,
                    appended: log.finish()?,
                };
                Ok((notices, false, committed, Some(written)))
            },
        );
        self.note_stale(&outcome);
        let (recall_notices, duplicate, committed, written) = tx_outcome(outcome)?;
        if let Some((key, value)) = written {
            self.revocations
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, value.into());
        }
        self.settle(committed);
        Ok(Applied::Revoked {
            recall_notices,
            duplicate,
        })
    }

    /// The receipt of the acceptance logged at `log_index`, marked as a duplicate.
    fn receipt_from_log(&self, log_index: u64) -> Result<pb::Receipt, Internal> {
        let bytes = self.log.entry(log_index)?.ok_or_else(|| {
            Internal::new(
                "reading a receipt",
                format!("audit entry {log_index} is missing"),
            )
        })?;
        let entry = concordat_proto::audit::decode(&bytes)
            .map_err(|e| Internal::new("reading a receipt", e))?;
        let mut receipt = receipt_from_entry(log_index, &entry, bytes)?;
        receipt.duplicate = true;
        Ok(receipt)
    }
}

/// How a snapshot copies a tree after the writer has resumed ([`Storage::snapshot`]).
enum Later {
    /// An append-only tree: up to (and including) the last key it held during the pause.
    UpTo(Option<Value>),
    /// Receipts: those whose audit entry's index is below the snapshot's log size.
    LoggedBefore(u64),
}

/// Refuses a database whose sled log was made with other segments (sled itself would refuse it
/// with a message about io buffers): brokers before this layout used sled's default.
fn check_segment_size(db_dir: &Path) -> Result<(), Internal> {
    let conf = match std::fs::read(db_dir.join("conf")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Internal::new("reading the database configuration", e)),
    };
    let text = String::from_utf8_lossy(&conf);
    let segment_size = text
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match segment_size {
        Some(n) if n != kv::SLED_SEGMENT_BYTES => Err(older_layout()),
        _ => Ok(()),
    }
}

fn older_layout() -> Internal {
    Internal::new(
        "opening the database",
        "it was written by an older broker, in a layout this one does not read; export its \
         audit log with that version and start from a new data directory",
    )
}

/// Refuses a database written in another layout, and marks a new one with this layout.
fn check_layout(meta: &Tree) -> Result<(), Internal> {
    let read = kv_err("reading the storage layout");
    match meta.get(LAYOUT).map_err(&read)?.as_deref() {
        Some(LAYOUT_VERSION) => Ok(()),
        Some(other) => Err(Internal::new(
            "opening the database",
            format!(
                "its storage layout {:?} is not this broker's ({:?}): it was written by another \
                 version",
                String::from_utf8_lossy(other),
                String::from_utf8_lossy(LAYOUT_VERSION)
            ),
        )),
        None if meta.get(NEXT_SEQ).map_err(&read)?.is_some()
            || meta.get(audit_log::LOG_SIZE).map_err(&read)?.is_some() =>
        {
            Err(older_layout())
        }
        None => {
            meta.insert(LAYOUT, LAYOUT_VERSION)
                .map_err(kv_err("recording the storage layout"))?;
            Ok(())
        }
    }
}

fn tx_outcome<T>(r: Result<T, TxError<Failure>>) -> Result<T, Failure> {
    r.map_err(|e| match e {
        TxError::Abort(f) => f,
        TxError::Kv(e) => Failure::Internal(Internal::new("writing to the database", e)),
    })
}

fn consented_record(a: &Accept, c: &ConsentUse) -> ConsentedTransfer {
    ConsentedTransfer {
        issued_at_nanos: i64::try_from(c.issued_at.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        recipients: a.facts.recipients.clone(),
        message_id: a.facts.message_id.clone(),
        sender: a.facts.sender.clone(),
        organisation: c.organisation.to_string(),
        jti: c.jti.to_string(),
        transfer_id: a.transfer.transfer_id.clone(),
        expires_at_nanos: nanos(c.expires_at),
        max_uses: c.max_uses.unwrap_or(0),
        accepted_at_nanos: nanos(a.accepted_at),
    }
}

/// A time from nanoseconds since the Unix epoch; `None` for 0 (not recorded).
fn from_nanos(nanos: i64) -> Option<OffsetDateTime> {
    (nanos != 0)
        .then(|| OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).ok())
        .flatten()
}

/// A time as nanoseconds since the Unix epoch, saturated to `i64`.
fn nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

impl ConsentLedger for SledStorage {
    fn is_revoked(
        &self,
        issuer: &KeyId,
        jti: &TokenId,
        issued_at: OffsetDateTime,
    ) -> Result<bool, Internal> {
        Ok(self.revoked(issuer, jti, issued_at))
    }

    fn uses(&self, issuer: &KeyId, jti: &TokenId) -> Result<u32, Internal> {
        let used = self
            .uses
            .get(token_key(issuer, jti))
            .map_err(kv_err("reading consent uses"))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        Ok(u32::try_from(used).unwrap_or(u32::MAX))
    }
}

impl Provenance for SledStorage {
    fn received(&self, holder: &AgencyId, object_id: &str) -> Result<Option<Received>, Internal> {
        self.tlp_received
            .get(received_key(holder, object_id))
            .map_err(kv_err("reading TLP records"))?
            .map(|found| decode_received(found.as_ref()))
            .transpose()
    }

    /// One read of them all (on PostgreSQL one round trip, not one per object).
    fn received_many(
        &self,
        holder: &AgencyId,
        object_ids: &[&str],
    ) -> Result<Vec<Option<Received>>, Internal> {
        let keys: Vec<Vec<u8>> = object_ids
            .iter()
            .map(|id| received_key(holder, id))
            .collect();
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        self.tlp_received
            .get_many(&keys)
            .map_err(kv_err("reading TLP records"))?
            .into_iter()
            .map(|found| found.map(|f| decode_received(f.as_ref())).transpose())
            .collect()
    }

    /// One probe of the holder's keys instead of one per object: most agencies never
    /// receive anything restricted.
    fn holds_any(&self, holder: &AgencyId) -> Result<bool, Internal> {
        Ok(self
            .tlp_received
            .scan_prefix(received_key(holder, ""))
            .next()
            .transpose()
            .map_err(kv_err("reading TLP records"))?
            .is_some())
    }
}

/// A record of the `tlp_received` tree.
fn decode_received(found: &[u8]) -> Result<Received, Internal> {
    let r = StoredReceived::decode(found).map_err(|e| Internal::new("decoding a TLP record", e))?;
    let from = r
        .from
        .iter()
        .map(|a| a.parse::<AgencyId>())
        .collect::<Result<_, _>>()
        .map_err(|e| Internal::new("decoding a TLP record", e))?;
    let tlp = concordat_proto::envelope::Tlp::try_from(r.tlp)
        .map_err(|e| Internal::new("decoding a TLP record", e))?;
    Ok(Received {
        first_transfer: r.first_transfer,
        from,
        tlp,
    })
}

impl Storage for SledStorage {
    fn consents(
        &self,
        limit: usize,
        keep: &dyn Fn(&ConsentRecord) -> bool,
    ) -> Result<(Vec<ConsentRecord>, bool), Internal> {
        // Keys are issuer (33 bytes) || jti (16) || first sequence number (8): the blocks of one
        // token are adjacent.
        let mut out = Vec::new();
        let mut current: Option<(Vec<u8>, ConsentRecord)> = None;
        let finish = |record: ConsentRecord, out: &mut Vec<ConsentRecord>| -> bool {
            if keep(&record) {
                if out.len() == limit {
                    return false;
                }
                out.push(record);
            }
            true
        };
        for item in self.consented.iter() {
            let (k, v) = item.map_err(kv_err("reading consented transfers"))?;
            let token = k
                .get(..49)
                .ok_or_else(|| Internal::new("reading consented transfers", "short key"))?;
            let block = ConsentedBlock::decode(v.as_ref())
                .map_err(|e| Internal::new("decoding consented transfers", e))?;
            if current
                .as_ref()
                .is_none_or(|(key, _)| key.as_slice() != token)
            {
                if let Some((_, done)) = current.take()
                    && !finish(done, &mut out)
                {
                    return Ok((out, true));
                }
                let issuer = k
                    .get(..33)
                    .and_then(|b| <[u8; 33]>::try_from(b).ok())
                    .map(KeyId::from_bytes)
                    .ok_or_else(|| Internal::new("reading consented transfers", "bad issuer"))?;
                let jti = k
                    .get(33..49)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(TokenId::from_bytes)
                    .ok_or_else(|| Internal::new("reading consented transfers", "short key"))?;
                let Some(first) = block.transfers.first() else {
                    continue;
                };
                let issued_at =
                    from_nanos(first.issued_at_nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
                current = Some((
                    token.to_vec(),
                    ConsentRecord {
                        issuer,
                        jti,
                        organisation: first.organisation.clone(),
                        issued_at,
                        expires_at: None,
                        max_uses: None,
                        uses: 0,
                        last_used_at: None,
                        revoked: self.revoked(&issuer, &jti, issued_at),
                        senders: BTreeSet::new(),
                        recipients: BTreeSet::new(),
                    },
                ));
            }
            if let Some((_, record)) = current.as_mut() {
                for t in block.transfers {
                    record.uses = record.uses.saturating_add(1);
                    record.expires_at = record.expires_at.or(from_nanos(t.expires_at_nanos));
                    if t.max_uses > 0 {
                        record.max_uses = Some(t.max_uses);
                    }
                    if let Some(at) = from_nanos(t.accepted_at_nanos) {
                        record.last_used_at = record.last_used_at.max(Some(at));
                    }
                    record.senders.insert(t.sender);
                    record.recipients.extend(t.recipients);
                }
            }
        }
        if let Some((_, done)) = current.take()
            && !finish(done, &mut out)
        {
            return Ok((out, true));
        }
        Ok((out, false))
    }

    fn workflow_record(&self, key: &str) -> Result<Option<Vec<u8>>, Internal> {
        Ok(self
            .workflows
            .get(key.as_bytes())
            .map_err(kv_err("reading a workflow"))?
            .map(|v| v.to_vec()))
    }

    fn workflow_records(
        &self,
        prefix: &str,
        limit: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<Vec<u8>>, Internal> {
        let mut kept = Vec::new();
        for item in self.workflows.scan_prefix(prefix.as_bytes()) {
            if kept.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(kv_err("reading the workflows"))?;
            if keep(&v) {
                kept.push(v.to_vec());
            }
        }
        Ok(kept)
    }

    fn next_timer(&self) -> Result<Option<OffsetDateTime>, Internal> {
        // A key that does not say when it fires is due at once, so that the firing drops it
        // rather than it hiding every timer behind it.
        Ok(self
            .timers
            .first()
            .map_err(kv_err("reading the timers"))?
            .map(|(k, _)| workflow::timer_key_time(&k).unwrap_or(OffsetDateTime::UNIX_EPOCH)))
    }

    fn apply_batch(&self, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        self.apply_batch_sled(ops)
    }

    fn catch_up(&self) -> Result<bool, Internal> {
        if !self.db.moved() {
            return Ok(false);
        }
        self.reload_state("another broker node committed")?;
        Ok(true)
    }

    fn on_moved(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) {
        self.db.on_moved(wake);
    }

    fn claim_deliveries(&self, recipient: &AgencyId) -> Result<bool, Internal> {
        self.db
            .claim(recipient.as_str())
            .map_err(kv_err("claiming deliveries"))
    }

    fn release_deliveries(&self, recipient: &AgencyId) {
        self.db.unclaim(recipient.as_str());
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

    fn stored_log_size(&self) -> Result<u64, Internal> {
        // The size first: the generation read after it is at least the one it was read at.
        let size = self.log.size()?;
        let mark = self
            .db
            .mark()
            .map_err(kv_err("reading the store's generation"))?;
        self.db.hear(mark);
        Ok(size)
    }

    fn log_entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal> {
        self.log.entry(index)
    }

    fn log_entries(&self, index: u64, limit: usize) -> Result<Vec<Vec<u8>>, Internal> {
        self.log.entries_from(index, limit)
    }

    fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal> {
        self.log.prove_entry(index, size)
    }

    fn prove_entries(&self, indexes: &[u64], size: u64) -> Result<Vec<ProvedEntry>, Internal> {
        self.log.prove_entries(indexes, size)
    }

    fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal> {
        self.log.prove_consistency(old, new)
    }

    fn log_verifier_key(&self) -> String {
        self.log.verifier_key()
    }

    fn snapshot(&self, out: backup::Output) -> Result<backup::Rest, Internal> {
        let failed = |e: std::io::Error| Internal::new("writing the backup", e);
        let size = self.log.size()?;
        let checkpoint = self.log.latest()?;
        let Some(cp) = checkpoint.filter(|cp| cp.size == size) else {
            return Err(Internal::new(
                "taking a snapshot",
                format!("the log holds {size} entries that no checkpoint covers exactly"),
            ));
        };
        let header = backup::Header::now(self.log.origin(), size, &cp.note);
        let mut w = backup::Writer::new(out, &header).map_err(failed)?;
        for name in backup::FILES {
            let path = self.dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| {
                Internal::new("taking a snapshot", format!("{}: {e}", path.display()))
            })?;
            w.file(name, &bytes).map_err(failed)?;
        }
        // Every tree, by name, so that a restore rebuilds the database exactly. Two kinds are
        // copied later, while writes go on, because what they held during the pause cannot
        // change: the audit log's trees are append-only (a bundle, once written under its first
        // index, never changes), copied up to the last key they held; receipts are written
        // once, in the transaction that logs their transfer, and never changed or removed,
        // copied if their entry's index is below the snapshot's size.
        let (entries, hashes) = self.log.trees();
        let appended = [entries.name(), hashes.name()];
        let mut names = self.db.tree_names().map_err(kv_err("listing the trees"))?;
        names.sort();
        let mut later = Vec::new();
        for name in names {
            let text = std::str::from_utf8(&name)
                .map_err(|_| Internal::new("taking a snapshot", "a tree name is not UTF-8"))?
                .to_owned();
            let tree = self.db.open_tree(&text).map_err(kv_err("opening a tree"))?;
            if appended.contains(&name) {
                let last = tree
                    .last()
                    .map_err(kv_err("reading a tree for a snapshot"))?
                    .map(|(k, _)| k);
                later.push((text, tree, Later::UpTo(last)));
                continue;
            }
            if name == self.receipts.name() {
                later.push((text, tree, Later::LoggedBefore(size)));
                continue;
            }
            w.tree(&text).map_err(failed)?;
            for item in tree.iter() {
                let (k, v) = item.map_err(kv_err("reading a tree for a snapshot"))?;
                w.pair(&k, &v).map_err(failed)?;
            }
        }
        Ok(Box::new(move || {
            let read = kv_err("reading a tree for a snapshot");
            for (name, tree, how) in later {
                w.tree(&name).map_err(failed)?;
                match how {
                    Later::UpTo(None) => {}
                    Later::UpTo(Some(last)) => {
                        for item in tree.range(..=last) {
                            let (k, v) = item.map_err(&read)?;
                            w.pair(&k, &v).map_err(failed)?;
                        }
                    }
                    Later::LoggedBefore(size) => {
                        for item in tree.iter() {
                            let (k, v) = item.map_err(&read)?;
                            let stored = StoredReceipt::decode(v.as_ref())
                                .map_err(|e| Internal::new("decoding a receipt", e))?;
                            if stored.log_index < size {
                                w.pair(&k, &v).map_err(failed)?;
                            }
                        }
                    }
                }
            }
            let (_, counts) = w.finish().map_err(failed)?;
            Ok((header, counts))
        }))
    }

    fn sync(&self) -> Result<(), Internal> {
        self.db.flush().map_err(kv_err("flushing the database"))?;
        if let Some(files) = &self.files {
            files
                .sync()
                .map_err(|e| Internal::new("syncing the database files", e))?;
        }
        // Only now is the sealed checkpoint's tree durable: publish it beside the database.
        self.log.publish_sealed()
    }

    fn probe(&self) -> Result<(), Internal> {
        self.sync()?;
        self.db
            .probe()
            .map_err(kv_err("asking the database whether it answers"))
    }

    fn published_checkpoint(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        self.log.published()
    }

    fn tree_root(&self, size: u64) -> Result<Hash, Internal> {
        self.log.root_at(size)
    }

    fn check_tail(&self, count: u64) -> Result<Option<String>, Internal> {
        self.log.check_tail(count)
    }

    fn receipt(
        &self,
        sender: &AgencyId,
        id: &MessageId,
    ) -> Result<Option<(pb::Receipt, [u8; 32])>, Internal> {
        let Some(raw) = self
            .receipts
            .get(receipt_key(sender, id))
            .map_err(kv_err("reading a receipt"))?
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
        Ok(Some((self.receipt_from_log(stored.log_index)?, digest)))
    }

    fn receipt_at(&self, log_index: u64) -> Result<pb::Receipt, Internal> {
        self.receipt_from_log(log_index)
    }

    fn claimable(
        &self,
        recipient: &AgencyId,
        durable: u64,
        limit: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Queued>, Internal> {
        let locations = self.lock_index().claimable(recipient, durable, limit, skip);
        let mut out = Vec::with_capacity(locations.len());
        // Locations come in block order: each block is read and decoded once.
        let mut current: Option<(u64, StoredBlock)> = None;
        for loc in locations {
            if current.as_ref().map(|(first, _)| *first) != Some(loc.block) {
                current = match self
                    .queues
                    .get(block_key(recipient, loc.block))
                    .map_err(kv_err("reading a queue"))?
                {
                    Some(raw) => Some((
                        loc.block,
                        StoredBlock::decode(raw.as_ref())
                            .map_err(|e| Internal::new("decoding a queue block", e))?,
                    )),
                    // Acknowledged in full since the index was read.
                    None => None,
                };
            }
            let Some((_, block)) = current.as_mut() else {
                continue;
            };
            let Some(stored) = block
                .items
                .get_mut(loc.position)
                .filter(|i| i.seq == loc.item.seq)
            else {
                tracing::error!(
                    seq = loc.item.seq,
                    "queue block disagrees with its index; skipping the item"
                );
                continue;
            };
            let body = match loc.item.kind {
                ItemKind::Recall => match stored.recall.take() {
                    Some(notice) => pb::delivery::Body::RecallNotice(notice),
                    None => {
                        tracing::error!(
                            seq = loc.item.seq,
                            "recall notice is missing; skipping it"
                        );
                        continue;
                    }
                },
                ItemKind::Notice => match stored.notice.take() {
                    Some(notice) => pb::delivery::Body::Notice(notice),
                    None => {
                        tracing::error!(seq = loc.item.seq, "notice is missing; skipping it");
                        continue;
                    }
                },
                ItemKind::Inline | ItemKind::Shared => {
                    let transfer = match stored.transfer.take() {
                        Some(inline) => Some(inline),
                        None => self
                            .transfers
                            .get(loc.item.transfer_id.as_bytes())
                            .map_err(kv_err("reading a transfer"))?
                            .map(|raw| pb::Transfer::decode(raw.as_ref()))
                            .transpose()
                            .map_err(|e| Internal::new("decoding a transfer", e))?,
                    };
                    let Some(mut transfer) = transfer else {
                        tracing::error!(
                            seq = loc.item.seq,
                            "queued transfer is missing; skipping it"
                        );
                        continue;
                    };
                    transfer.agreement_id = std::mem::take(&mut stored.agreement_id);
                    transfer.clause = std::mem::take(&mut stored.clause);
                    pb::delivery::Body::Transfer(transfer)
                }
            };
            out.push(Queued {
                seq: loc.item.seq,
                body,
                log_index: stored.log_index,
            });
        }
        Ok(out)
    }

    fn queue_depth(&self, recipient: &AgencyId) -> u64 {
        self.lock_index().depth(recipient)
    }

    fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use concordat_proto::envelope::{Envelope, Kind, Tlp};

    use super::*;
    use crate::policy::{
        Authority, Decision,
        tlp::{Carried, Restricted},
    };

    const ORIGIN: &str = "test/audit";

    /// Opens the store in `dir`, which a store of this process may just have closed: sled
    /// lets go of its lock a little after the last handle is dropped ([`wait_until_closed`]).
    fn reopen(dir: &Path) -> Result<SledStorage, Internal> {
        wait_until_closed(dir, std::time::Duration::from_secs(10), || true);
        SledStorage::open(dir, ORIGIN)
    }

    /// Where a test's store lives: its data directory (the log key, the published checkpoint)
    /// and, on PostgreSQL, its database. `open` opens the same store again each time.
    trait Place {
        fn dir(&self) -> &Path;
        fn open(&self) -> SledStorage;
    }

    struct SledPlace(tempfile::TempDir);

    impl SledPlace {
        fn new() -> SledPlace {
            SledPlace(tempfile::tempdir().unwrap())
        }
    }

    impl Place for SledPlace {
        fn dir(&self) -> &Path {
            self.0.path()
        }

        fn open(&self) -> SledStorage {
            reopen(self.0.path()).unwrap()
        }
    }

    /// The store's behaviour that does not depend on its engine: each scenario runs as a test
    /// of its own on sled, and all of them, each in a database of its own, on PostgreSQL
    /// (`the_shared_suite_on_postgres`), so that the two engines cannot drift apart.
    macro_rules! shared_suite {
        ($($name:ident),* $(,)?) => {
            /// Every scenario of the shared suite, by name.
            const SHARED_SUITE: &[(&str, fn(&dyn Place))] = &[$((stringify!($name), $name)),*];

            mod on_sled {
                $(
                    #[test]
                    fn $name() {
                        super::$name(&super::SledPlace::new());
                    }
                )*
            }
        };
    }

    /// A store in a PostgreSQL database of its own (created on the server at `base`).
    struct PgPlace {
        dir: tempfile::TempDir,
        options: crate::store::postgres::PgOptions,
    }

    impl PgPlace {
        fn new(server: &str, database: &str) -> PgPlace {
            let admin = crate::store::postgres::PgOptions {
                url: format!("{server}/postgres"),
                pool: 1,
                ca_file: None,
            };
            crate::store::postgres::create_database(&admin, database).unwrap();
            PgPlace {
                dir: tempfile::tempdir().unwrap(),
                options: crate::store::postgres::PgOptions {
                    url: format!("{server}/{database}"),
                    pool: 2,
                    ca_file: None,
                },
            }
        }
    }

    impl Place for PgPlace {
        fn dir(&self) -> &Path {
            self.dir.path()
        }

        fn open(&self) -> SledStorage {
            SledStorage::open_postgres(self.dir.path(), ORIGIN, &self.options).unwrap()
        }
    }

    /// The shared suite on PostgreSQL: a real primary with a synchronous standby (started as
    /// the `postgres` user when the tests run as root), each scenario in a database of its own.
    /// PostgreSQL must be installed (`.ci/run` installs it): without it this test fails, saying
    /// how to install it.
    #[test]
    fn the_shared_suite_on_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = concordat_tests::postgres::PgCluster::start(dir.path())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let server = format!("postgres://postgres@127.0.0.1:{}", cluster.primary_port());
        for (i, (name, scenario)) in SHARED_SUITE.iter().enumerate() {
            eprintln!("the shared suite on PostgreSQL: {name}");
            scenario(&PgPlace::new(&server, &format!("suite_{i}")));
        }
    }

    /// The writer's probe, after a failure, reaches the primary: with the primary down it
    /// fails, where `sync` (which has nothing to flush on PostgreSQL) succeeds, so a writer that
    /// probed with `sync` took the storage for recovered and failed its next batch again.
    #[test]
    fn the_probe_fails_while_the_primary_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = concordat_tests::postgres::PgCluster::start(dir.path())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let server = format!("postgres://postgres@127.0.0.1:{}", cluster.primary_port());
        let s = PgPlace::new(&server, "probe").open();
        s.probe().unwrap();
        cluster.kill_primary().unwrap();
        assert!(s.sync().is_ok(), "sync asks nothing of the server");
        let Err(e) = s.probe() else {
            panic!("the probe succeeded with the primary down");
        };
        assert!(format!("{e:?}").contains("answers"), "{e:?}");
    }

    /// An audit answer ([`crate::store::Store::checkpoint_now`]) on a store whose log is ahead
    /// of its latest checkpoint, with nothing to write: the writer, nudged, signs the log, and
    /// the answer covers it. (Before, the answer waited 5 s for a write that never came and
    /// fell back to the shorter checkpoint: a node that started after another died between
    /// its commit and its seal, or whose last seal failed.)
    #[test]
    fn an_audit_answer_has_the_writer_sign_what_is_unsigned() {
        let place = SledPlace::new();
        let s = place.open();
        let accepted = |r: &Result<Applied, Failure>| matches!(r, Ok(Applied::Accepted(_)));
        assert!(
            commit(&s, &[accept(&["ico"], b"sealed".to_vec(), None)])
                .iter()
                .all(accepted)
        );
        let sealed = s.latest_checkpoint().unwrap().unwrap().size;
        let out = s.apply_batch(&[accept(&["ico"], b"unsealed".to_vec(), None)]);
        assert!(out.iter().all(accepted), "{out:?}");
        s.sync().unwrap();
        let size = s.log_size().unwrap();
        assert!(sealed < size);
        let store = crate::store::Store::start(
            std::sync::Arc::new(s),
            crate::store::StoreOptions::new(place.dir(), std::time::Duration::from_secs(10)),
        )
        .unwrap();
        assert_eq!(store.checkpoint().map(|cp| cp.size), Some(sealed));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (cp, current) = rt.block_on(store.checkpoint_now());
        assert!(
            current,
            "the answer fell back to the checkpoint of {sealed}"
        );
        assert_eq!(cp.map(|cp| cp.size), Some(size));
    }

    /// Two broker nodes on one PostgreSQL database (one log key, data directories of their
    /// own): batches taking turns and batches at once make one log with every entry once and
    /// one sequence number per item; each node sees what the other queued and acknowledged
    /// once it has heard of the commit; and both sign the same checkpoint of a size.
    #[test]
    fn two_nodes_on_one_database_keep_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = concordat_tests::postgres::PgCluster::start(dir.path())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let server = format!("postgres://postgres@127.0.0.1:{}", cluster.primary_port());
        let place = PgPlace::new(&server, "two_nodes");
        let a = place.open();
        let b_dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            place.dir().join(audit_log::LOG_KEY_FILE),
            b_dir.path().join(audit_log::LOG_KEY_FILE),
        )
        .unwrap();
        let b = SledStorage::open_postgres(b_dir.path(), ORIGIN, &place.options).unwrap();
        let accepted = |r: &Result<Applied, Failure>| matches!(r, Ok(Applied::Accepted(_)));
        // Taking turns: each node's batch follows one of the other's, which it has not read.
        for i in 0..5u8 {
            for s in [&a, &b] {
                let out = commit(
                    s,
                    &[
                        accept(&["ico"], vec![i; 8], None),
                        accept(&["nca"], vec![i; 8], None),
                    ],
                );
                assert!(out.iter().all(accepted), "{out:?}");
            }
        }
        // At once, from two threads.
        std::thread::scope(|scope| {
            for s in [&a, &b] {
                scope.spawn(move || {
                    for i in 0..20u8 {
                        let out = commit(s, &[accept(&["ico"], vec![i; 8], None)]);
                        assert!(out.iter().all(accepted), "{out:?}");
                    }
                });
            }
        });
        for s in [&a, &b] {
            s.reload_state("the test").unwrap();
            assert_eq!(s.log_size().unwrap(), 60);
            assert_eq!(s.last_seq(), 60);
        }
        let ico = seqs(&a, "ico");
        assert_eq!(ico.len(), 50);
        assert_eq!(seqs(&b, "ico"), ico);
        assert_eq!(seqs(&a, "nca").len(), 10);
        // One node acknowledges what both queued; the other has heard of it before long.
        let acked = commit(&b, &[ack("ico", &ico)]);
        assert!(matches!(acked[0], Ok(Applied::Acked(50))), "{acked:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !a.catch_up().unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "a did not hear b's commit"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(seqs(&a, "ico").is_empty());
        // A transfer accepted on `a` after it caught up, delivered from `b`.
        let out = commit(&a, &[accept(&["ico"], b"late".to_vec(), None)]);
        assert!(out.iter().all(accepted), "{out:?}");
        b.reload_state("the test").unwrap();
        assert_eq!(seqs(&b, "ico"), vec![61]);
        // The same checkpoint of the same size, whichever node signs it.
        let (sa, sb) = (
            a.seal(None).unwrap().unwrap(),
            b.seal(None).unwrap().unwrap(),
        );
        // (60 acceptances, 50 acknowledgements, one more acceptance.)
        assert_eq!((sa.size, &sa.note), (111, &sb.note));
        let report = a.verify().unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.entries, 111);

        // A node starting while the other commits and signs checkpoints finds its store whole:
        // the checkpoint it reads may be newer than the log size it read a moment before, so
        // the check must read the checkpoints first.
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut i = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    i = i.wrapping_add(1);
                    let out = commit(&b, &[accept(&["nca"], vec![i; 8], None)]);
                    assert!(out.iter().all(accepted), "{out:?}");
                    b.seal(None).unwrap();
                }
            });
            let checks = (0..200)
                .map(|_| crate::store::check_recovered(&a, place.dir()))
                .collect::<Vec<_>>();
            stop.store(true, Ordering::SeqCst);
            for checked in checks {
                checked.unwrap_or_else(|e| panic!("{e}"));
            }
        });

        // A node's signed checkpoint follows what the other commits, even when the other never
        // stores a checkpoint of it (a node killed between its commit and its seal; or any
        // node in the moment between the two, whose NOTIFY comes with the commit).
        let a = std::sync::Arc::new(a);
        let store = crate::store::Store::start(
            a.clone(),
            crate::store::StoreOptions::new(place.dir(), std::time::Duration::from_secs(10)),
        )
        .unwrap();
        let out = b.apply_batch(&[accept(&["ico"], b"unsealed".to_vec(), None)]);
        assert!(out.iter().all(accepted), "{out:?}");
        b.sync().unwrap();
        let size = b.log_size().unwrap();
        assert!(b.latest_checkpoint().unwrap().unwrap().size < size);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.checkpoint().map(|cp| cp.size) != Some(size) {
            assert!(
                std::time::Instant::now() < deadline,
                "node a signs {:?}, the log holds {size}",
                store.checkpoint().map(|cp| cp.size)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(store);
    }

    shared_suite!(
        queues_and_acknowledgements_survive_a_restart,
        notices_are_deliverable_at_once_and_timers_survive_a_restart,
        a_corrupt_timer_or_record_does_not_stop_the_other_timers,
        a_list_counts_only_the_records_the_caller_may_see,
        steps_on_one_consultation_in_one_batch_apply_in_order_and_a_retry_adds_nothing,
        a_retry_gets_the_first_receipt_and_a_reused_id_is_refused,
        a_revocation_recalls_what_was_sent_and_is_remembered,
        the_published_checkpoint_alternates_slots_and_a_torn_slot_leaves_the_one_before,
        a_published_checkpoint_of_the_older_layout_is_read_and_rewritten_in_slots,
        verify_finds_a_changed_hash_and_an_orphan_queue_item,
        what_was_delivered_under_tlp_red_is_remembered_across_a_restart,
        an_entry_read_through_the_cache_is_the_stored_one,
    );

    /// `log_entry` keeps the bundles it read in memory: it answers as `log_entries` (which
    /// always reads the store) does for every entry, read once or again, and an entry
    /// committed after its bundle's predecessor was cached is found, not hidden by it.
    fn an_entry_read_through_the_cache_is_the_stored_one(place: &dyn Place) {
        let s = place.open();
        let mut size = 0;
        for batch in [1usize, 3, 2, 5] {
            let ops: Vec<Op> = (0..batch)
                .map(|i| accept(&["ico"], vec![u8::try_from(i).unwrap(); 8], None))
                .collect();
            commit(&s, &ops);
            let new_size = s.log_size().unwrap();
            assert!(new_size > size);
            // Past the end, after the last bundle was cached.
            assert_eq!(s.log_entry(new_size).unwrap(), None);
            for _ in 0..2 {
                for i in 0..new_size {
                    let stored = s.log_entries(i, 1).unwrap();
                    assert_eq!(stored.len(), 1, "entry {i}");
                    assert_eq!(
                        s.log_entry(i).unwrap().as_ref(),
                        stored.first(),
                        "entry {i}"
                    );
                }
            }
            size = new_size;
        }
        assert_eq!(s.log_entry(size + 100).unwrap(), None);
    }

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    /// An accepted threat assessment from the NCSC to `to`, with `payload`.
    fn accept(to: &[&str], payload: Vec<u8>, consent: Option<ConsentUse>) -> Op {
        let envelope = Envelope {
            message_id: MessageId::new_random(),
            recipients: to.iter().map(|r| agency(r)).collect(),
            kind: Kind::ThreatAssessment,
            organisation: consent.as_ref().map(|_| "acme-ltd".parse().unwrap()),
            incident_ref: None,
            content_type: "application/octet-stream".into(),
            tlp: Tlp::Green,
            payload,
            consent_token: None,
            organisations: Vec::new(),
            consent_tokens: Vec::new(),
            significance: None,
            workflow: None,
        };
        Op::Accept(Box::new(Accept::new(
            agency("ncsc"),
            envelope,
            Decision {
                authorities: to
                    .iter()
                    .map(|r| Authority {
                        recipient: agency(r),
                        agreement_id: "test-mou".into(),
                        clause: "clause 1".into(),
                        review: crate::policy::ReviewStage::Current,
                    })
                    .collect(),
                organisations: consent.iter().map(|c| c.organisation.clone()).collect(),
                consents: consent.into_iter().collect(),
                designation: None,
                payload_digest: [7; 32],
                carried: Default::default(),
            },
            [1; 32],
            OffsetDateTime::now_utc(),
            1000,
        )))
    }

    /// Applies `ops` as the writer does: one batch, a checkpoint, a flush.
    fn commit(s: &SledStorage, ops: &[Op]) -> Vec<Result<Applied, Failure>> {
        let out = s.apply_batch(ops);
        let previous = s.latest_checkpoint().unwrap();
        s.seal(previous.as_ref()).unwrap();
        s.sync().unwrap();
        out
    }

    fn seqs(s: &SledStorage, r: &str) -> Vec<u64> {
        s.claimable(&agency(r), u64::MAX, 1000, &|_| false)
            .unwrap()
            .iter()
            .map(|q| q.seq)
            .collect()
    }

    fn ack(r: &str, seqs: &[u64]) -> Op {
        Op::Ack {
            recipient: agency(r),
            seqs: seqs.to_vec(),
        }
    }

    fn queues_and_acknowledgements_survive_a_restart(place: &dyn Place) {
        let s = place.open();
        let ops: Vec<Op> = (0..5)
            .map(|i| accept(&["ico"], vec![i; 10], None))
            .chain([accept(&["ico", "nca"], b"both".to_vec(), None)])
            .collect();
        for r in commit(&s, &ops) {
            assert!(matches!(r, Ok(Applied::Accepted(_))), "{r:?}");
        }
        assert_eq!(seqs(&s, "ico"), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs(&s, "nca"), vec![7]);
        // Deliveries carry the transfer, with the authority for this recipient.
        let first = s
            .claimable(&agency("ico"), u64::MAX, 1, &|_| false)
            .unwrap();
        let pb::delivery::Body::Transfer(t) = &first[0].body else {
            panic!("not a transfer");
        };
        assert_eq!(
            (t.payload.as_slice(), t.clause.as_str()),
            (&[0u8; 10][..], "clause 1")
        );
        // Acknowledge part of the block, twice over and with unknown ids mixed in.
        let acked = commit(&s, &[ack("ico", &[2, 4, 99]), ack("ico", &[4])]);
        assert!(matches!(acked[0], Ok(Applied::Acked(2))), "{:?}", acked[0]);
        assert!(matches!(acked[1], Ok(Applied::Acked(0))), "{:?}", acked[1]);
        assert_eq!(s.queue_depth(&agency("ico")), 4);
        drop(s);

        let s = place.open();
        assert_eq!(seqs(&s, "ico"), vec![1, 3, 5, 6]);
        assert_eq!(s.queue_depth(&agency("ico")), 4);
        assert_eq!(s.last_seq(), 7);
        commit(&s, &[ack("ico", &[1, 3, 5, 6])]);
        assert!(seqs(&s, "ico").is_empty());
        assert_eq!(s.queues.len().unwrap(), 1, "only the NCA's block is left");
        assert_eq!(
            s.queue_acks.len().unwrap(),
            0,
            "no bitmap outlives its block"
        );
        // The shared transfer stays until its last recipient has it.
        assert_eq!(s.transfers.len().unwrap(), 1);
        commit(&s, &[ack("nca", &[7])]);
        assert_eq!(
            (
                s.transfers.len().unwrap(),
                s.refs.len().unwrap(),
                s.queues.len().unwrap()
            ),
            (0, 0, 0)
        );
        // Every acceptance, delivery-free here, and acknowledgement is in the log.
        assert_eq!(s.log_size().unwrap(), 6 + 7);
    }

    fn notices_are_deliverable_at_once_and_timers_survive_a_restart(place: &dyn Place) {
        use concordat_proto::workflow::WorkflowId;
        let s = place.open();
        let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let incident: WorkflowId = "ico:INC-1".parse().unwrap();
        let involve = |who: &str, partner: &str| {
            Op::Involve(Box::new(super::super::Involve {
                agency: agency(who),
                incident: incident.clone(),
                partners: [agency(partner)].into_iter().collect(),
                at: t0,
            }))
        };
        let done = commit(&s, &[involve("ico", "nca"), involve("nca", "ico")]);
        assert!(matches!(&done[1], Ok(Applied::Involved(e)) if e.notified == ["ico"]));
        // Both notices are queued, deliverable as soon as the commit is durable.
        for (who, other) in [("ico", "nca"), ("nca", "ico")] {
            let items = s
                .claimable(&agency(who), s.last_seq(), 8, &|_| false)
                .unwrap();
            let [item] = &items[..] else {
                panic!("{who}: {items:?}");
            };
            let pb::delivery::Body::Notice(n) = &item.body else {
                panic!("not a notice");
            };
            assert_eq!(n.agencies, [other]);
            assert!(item.log_index.is_some());
        }
        // A timer stored by a consultation, due while no broker ran, fires once after a
        // restart; `verify` accepts the notices it queued.
        let timer = workflow::Timer {
            kind: workflow::TimerKind::Deadline as i32,
            key: "dsar/nca:D-1".into(),
            party: "ico".into(),
            due_nanos: 1,
            at_nanos: 1,
        };
        let record = pb::ConsultationStatus {
            consultation_id: "nca:D-1".into(),
            requester: "nca".into(),
            parties: vec![pb::ConsultationParty {
                agency: "ico".into(),
                state: "awaiting".into(),
                due: Some(timestamp(
                    OffsetDateTime::from_unix_timestamp_nanos(1).unwrap(),
                )),
                ..Default::default()
            }],
            ..Default::default()
        };
        s.workflows
            .insert(timer.key.as_bytes(), record.encode_to_vec())
            .unwrap();
        s.timers
            .insert(timer.storage_key(), timer.encode_to_vec())
            .unwrap();
        s.sync().unwrap();
        drop(s);
        let s = place.open();
        assert!(s.next_timer().unwrap().is_some_and(|t| t <= t0));
        let fired = commit(&s, &[Op::FireTimers { now: t0 }]);
        assert!(
            matches!(
                fired[0],
                Ok(Applied::Fired {
                    timers: 1,
                    notices: 2
                })
            ),
            "{fired:?}"
        );
        assert_eq!(s.next_timer().unwrap(), None);
        let again = commit(&s, &[Op::FireTimers { now: t0 }]);
        assert!(matches!(
            again[0],
            Ok(Applied::Fired {
                timers: 0,
                notices: 0
            })
        ));
        let view =
            workflow::consultation_view(&s.workflow_record("dsar/nca:D-1").unwrap().unwrap(), t0)
                .unwrap();
        assert_eq!(view.parties[0].state, "overdue");
        assert_eq!(s.queue_depth(&agency("nca")), 2);
        let report = s.verify().unwrap();
        assert!(report.ok(), "{report:?}");
    }

    fn a_corrupt_timer_or_record_does_not_stop_the_other_timers(place: &dyn Place) {
        let s = place.open();
        let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let deadline = |key: &str, at: i64| workflow::Timer {
            kind: workflow::TimerKind::Deadline as i32,
            key: key.into(),
            party: "ico".into(),
            due_nanos: at,
            at_nanos: at,
        };
        // Due first: a timer whose record is not a consultation, and a timer that is not a
        // timer; then a sound one.
        let bad_record = deadline("dsar/nca:BAD", 1);
        s.workflows
            .insert(bad_record.key.as_bytes(), &[0xff, 0xff, 0xff][..])
            .unwrap();
        s.timers
            .insert(bad_record.storage_key(), bad_record.encode_to_vec())
            .unwrap();
        let mut bad_timer_key = deadline("dsar/nca:JUNK", 2).storage_key();
        bad_timer_key.push(b'x');
        s.timers
            .insert(bad_timer_key, &[0xff, 0xff, 0xff][..])
            .unwrap();
        let good = deadline("dsar/nca:D-1", 3);
        let record = pb::ConsultationStatus {
            consultation_id: "nca:D-1".into(),
            requester: "nca".into(),
            parties: vec![pb::ConsultationParty {
                agency: "ico".into(),
                state: "awaiting".into(),
                due: Some(timestamp(
                    OffsetDateTime::from_unix_timestamp_nanos(3).unwrap(),
                )),
                ..Default::default()
            }],
            ..Default::default()
        };
        s.workflows
            .insert(good.key.as_bytes(), record.encode_to_vec())
            .unwrap();
        s.timers
            .insert(good.storage_key(), good.encode_to_vec())
            .unwrap();
        let fired = commit(&s, &[Op::FireTimers { now: t0 }]);
        assert!(
            matches!(
                fired[0],
                Ok(Applied::Fired {
                    timers: 3,
                    notices: 2
                })
            ),
            "{fired:?}"
        );
        // The corrupt ones are gone rather than retried every second for ever; the corrupt
        // record is left for an operator to look at.
        assert_eq!(s.next_timer().unwrap(), None);
        assert!(s.workflow_record("dsar/nca:BAD").unwrap().is_some());
        // A key too short to say when it fires sorts first: it must not hide the timers
        // behind it from the loop that asks when the next one is due.
        s.timers.insert(&[0u8, 0][..], &[][..]).unwrap();
        let later = deadline("dsar/nca:D-1", 4);
        s.timers
            .insert(later.storage_key(), later.encode_to_vec())
            .unwrap();
        assert!(s.next_timer().unwrap().is_some_and(|at| at <= t0));
        let fired = commit(&s, &[Op::FireTimers { now: t0 }]);
        assert!(
            matches!(fired[0], Ok(Applied::Fired { timers: 2, .. })),
            "{fired:?}"
        );
        assert_eq!(s.next_timer().unwrap(), None);
        assert_eq!(s.queue_depth(&agency("nca")), 1);
    }

    fn a_list_counts_only_the_records_the_caller_may_see(place: &dyn Place) {
        // More consultations between other agencies than one answer lists, sorting before
        // the caller's own: they must not crowd it out.
        let s = place.open();
        let record = |requester: &str, reference: &str| pb::ConsultationStatus {
            consultation_id: format!("{requester}:{reference}"),
            requester: requester.into(),
            parties: vec![pb::ConsultationParty {
                agency: "ncsc".into(),
                state: "awaiting".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        for i in 0..=crate::workflow_service::MAX_LISTED {
            let r = record("ico", &format!("D-{i:05}"));
            s.workflows
                .insert(format!("dsar/{}", r.consultation_id), r.encode_to_vec())
                .unwrap();
        }
        let mine = record("nca", "D-1");
        s.workflows
            .insert("dsar/nca:D-1", mine.encode_to_vec())
            .unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let seen = crate::workflow_service::visible_records(&s, "dsar/", |b| {
            Ok(Some(workflow::consultation_view(b, now)?)
                .filter(|c| workflow::consultation_party(c, "nca")))
        })
        .unwrap();
        let ids: Vec<_> = seen.iter().map(|c| c.consultation_id.as_str()).collect();
        assert_eq!(ids, ["nca:D-1"]);
    }

    fn steps_on_one_consultation_in_one_batch_apply_in_order_and_a_retry_adds_nothing(
        place: &dyn Place,
    ) {
        use concordat_proto::workflow::{DsarAnswer, DsarOpen, Step};
        let s = place.open();
        let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let day = time::Duration::days(1);
        let step = |sender: &str, to: &str, step: Step, id: MessageId| {
            let mut op = accept(&[to], b"step".to_vec(), None);
            let Op::Accept(a) = &mut op else {
                unreachable!()
            };
            let mut envelope = a.envelope.clone();
            envelope.message_id = id;
            envelope.kind = Kind::DsarConsultation;
            envelope.workflow = Some(step);
            let mut a = Accept::new(
                agency(sender),
                envelope,
                a.decision.clone(),
                [1; 32],
                t0,
                1000,
            );
            a.workflow = Some(workflow::StepContext {
                default_due: [(agency("ico"), t0 + 20 * day)].into_iter().collect(),
                reminder_before: 3 * day,
            });
            Op::Accept(Box::new(a))
        };
        let open = Step::DsarOpen(DsarOpen {
            reference: "D-1".parse().unwrap(),
            concerns: Vec::new(),
            organisation: None,
            respond_by: None,
        });
        let answer = |a| Step::DsarAnswer {
            consultation: "nca:D-1".parse().unwrap(),
            answer: a,
        };
        let more = MessageId::new_random();
        let done = commit(
            &s,
            &[
                step("nca", "ico", open, MessageId::new_random()),
                step(
                    "ico",
                    "nca",
                    answer(DsarAnswer::NeedMoreTime(t0 + 30 * day)),
                    more,
                ),
                step(
                    "ico",
                    "nca",
                    answer(DsarAnswer::NeedMoreTime(t0 + 30 * day)),
                    more,
                ),
                step(
                    "ico",
                    "nca",
                    answer(DsarAnswer::NoObjection),
                    MessageId::new_random(),
                ),
            ],
        );
        let outcomes: Vec<&str> = done
            .iter()
            .map(|r| match r {
                Ok(Applied::Accepted(_)) => "accepted",
                Ok(Applied::Duplicate(_)) => "duplicate",
                _ => "other",
            })
            .collect();
        assert_eq!(
            outcomes,
            ["accepted", "accepted", "duplicate", "accepted"],
            "{done:?}"
        );
        // The opening's reminder and deadline, and those of the one extension.
        assert_eq!(s.timers.len().unwrap(), 4);
        let view =
            workflow::consultation_view(&s.workflow_record("dsar/nca:D-1").unwrap().unwrap(), t0)
                .unwrap();
        assert_eq!(
            (view.state.as_str(), view.parties[0].state.as_str()),
            ("answered", "no_objection")
        );
        // Every timer then fires to nothing: the party has answered.
        let fired = commit(&s, &[Op::FireTimers { now: t0 + 31 * day }]);
        assert!(
            matches!(
                fired[0],
                Ok(Applied::Fired {
                    timers: 4,
                    notices: 0
                })
            ),
            "{fired:?}"
        );
    }

    fn a_retry_gets_the_first_receipt_and_a_reused_id_is_refused(place: &dyn Place) {
        let s = place.open();
        let op = accept(&["ico"], b"once".to_vec(), None);
        let Op::Accept(a) = &op else { unreachable!() };
        let (sender, id) = (a.sender.clone(), a.envelope.message_id);
        let mut changed = accept(&["ico"], b"other".to_vec(), None);
        if let Op::Accept(c) = &mut changed {
            c.envelope.message_id = id;
            c.envelope_digest = [2; 32];
        }
        let mut again = accept(&["ico"], b"once".to_vec(), None);
        if let Op::Accept(c) = &mut again {
            c.envelope.message_id = id;
        }
        let out = commit(&s, &[op, again]);
        let Ok(Applied::Accepted(first)) = &out[0] else {
            panic!("{:?}", out[0]);
        };
        // In the same commit, the retry is recognised.
        let Ok(Applied::Duplicate(index)) = out[1] else {
            panic!("{:?}", out[1]);
        };
        let receipt = s.receipt_at(index).unwrap();
        assert!(receipt.duplicate);
        assert_eq!(
            pb::Receipt {
                duplicate: false,
                ..receipt.clone()
            },
            **first
        );
        let (found, digest) = s.receipt(&sender, &id).unwrap().unwrap();
        assert_eq!((found, digest), (receipt, [1; 32]));
        let out = commit(&s, &[changed]);
        match &out[0] {
            Err(Failure::Refused(r)) => assert_eq!(r.reason, Reason::MessageIdReused),
            other => panic!("{other:?}"),
        }
        assert_eq!(seqs(&s, "ico"), vec![1]);
    }

    fn a_revocation_recalls_what_was_sent_and_is_remembered(place: &dyn Place) {
        let s = place.open();
        let issuer: KeyId = concordat_proto::paserk::SecretKey::generate().key_id();
        let jti = TokenId::random();
        let consent = ConsentUse {
            organisation: "acme-ltd".parse().unwrap(),
            jti,
            issuer,
            issued_at: OffsetDateTime::now_utc(),
            max_uses: Some(3),
            expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
        };
        let ops: Vec<Op> = (0..2)
            .map(|_| accept(&["ico"], b"x".to_vec(), Some(consent.clone())))
            .collect();
        commit(&s, &ops);
        assert_eq!(s.uses(&issuer, &jti).unwrap(), 2);
        let revoke = Op::Revoke(Box::new(Revoke {
            submitted_by: agency("ncsc"),
            issuer,
            target: RevokeTarget::Token(jti),
            issuer_organisation: None,
            revoked_at: OffsetDateTime::now_utc(),
        }));
        let out = commit(&s, &[revoke]);
        assert!(
            matches!(
                out[0],
                Ok(Applied::Revoked {
                    recall_notices: 2,
                    duplicate: false
                })
            ),
            "{:?}",
            out[0]
        );
        assert!(s.is_revoked(&issuer, &jti, consent.issued_at).unwrap());
        let recalls = s
            .claimable(&agency("ico"), u64::MAX, 10, &|_| false)
            .unwrap();
        let kinds: Vec<bool> = recalls
            .iter()
            .map(|q| matches!(q.body, pb::delivery::Body::RecallNotice(_)))
            .collect();
        assert_eq!(kinds, vec![false, false, true, true]);
        // Accepting under the revoked token now fails in the writer too.
        let late = commit(
            &s,
            &[accept(&["ico"], b"y".to_vec(), Some(consent.clone()))],
        );
        match &late[0] {
            Err(Failure::Refused(r)) => assert_eq!(r.reason, Reason::ConsentRevoked),
            other => panic!("{other:?}"),
        }
        drop(s);
        let s = place.open();
        assert!(s.is_revoked(&issuer, &jti, consent.issued_at).unwrap());
        assert_eq!(seqs(&s, "ico").len(), 4);
        // The consent ledger lists the token with its uses, its limit, its expiry and its
        // revocation (`concordat consent list`).
        let (listed, truncated) = s.consents(10, &|_| true).unwrap();
        assert!(!truncated);
        let [record] = &listed[..] else {
            panic!("{listed:?}")
        };
        assert_eq!((record.issuer, record.jti), (issuer, jti));
        assert_eq!(record.uses, 2);
        assert_eq!(record.max_uses, Some(3));
        assert!(record.revoked);
        assert_eq!(
            record.expires_at.map(|t| t.unix_timestamp()),
            Some(consent.expires_at.unix_timestamp())
        );
        assert!(record.last_used_at.is_some());
        assert_eq!(record.organisation, "acme-ltd");
        assert!(record.recipients.contains("ico"));
        assert!(s.consents(10, &|_| false).unwrap().0.is_empty());
        assert_eq!(s.consents(0, &|_| true).unwrap(), (Vec::new(), true));
    }

    #[test]
    fn a_payload_larger_than_a_segment_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path()).unwrap();
        let big: Vec<u8> = (0..(3 * kv::SLED_SEGMENT_BYTES / 2))
            .map(|i| i as u8)
            .collect();
        commit(&s, &[accept(&["ico"], big.clone(), None)]);
        // sled keeps a node this large in a file of its own; the flush synced it.
        let blobs: Vec<_> = std::fs::read_dir(dir.path().join("db").join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!blobs.is_empty(), "sled wrote no blob file");
        let synced = s
            .files
            .as_ref()
            .unwrap()
            .synced_blobs
            .lock()
            .unwrap()
            .clone();
        assert!(
            blobs.iter().all(|b| synced.contains(b)),
            "{blobs:?} vs {synced:?}"
        );
        drop(s);
        let s = reopen(dir.path()).unwrap();
        let got = s
            .claimable(&agency("ico"), u64::MAX, 1, &|_| false)
            .unwrap();
        let pb::delivery::Body::Transfer(t) = &got[0].body else {
            panic!("not a transfer");
        };
        assert!(t.payload == big);
    }

    #[test]
    fn the_start_check_refuses_a_rolled_back_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path()).unwrap();
        commit(&s, &[accept(&["ico"], b"one".to_vec(), None)]);
        drop(s);
        // A copy of the database as it was, published at 1 entry.
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&dir.path().join("db"), &copy.path().join("db"));
        let s = reopen(dir.path()).unwrap();
        crate::store::check_recovered(&s, dir.path()).unwrap();
        commit(&s, &[accept(&["ico"], b"two".to_vec(), None)]);
        let published = s.published_checkpoint().unwrap().unwrap();
        assert_eq!(published.size, 2);
        drop(s);
        // The database rolls back; the published checkpoint does not.
        std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        copy_dir(&copy.path().join("db"), &dir.path().join("db"));
        let s = reopen(dir.path()).unwrap();
        let e = crate::store::check_recovered(&s, dir.path()).unwrap_err();
        let text = e.to_string();
        for needle in [
            "refusing to serve",
            "audit log of 1 entries",
            "checkpoint of 2 entries",
            &published.root.to_hex(),
            "verify --data-dir",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        // So does the offline check.
        let report = s.verify().unwrap();
        assert!(!report.ok(), "{report:?}");
    }

    /// The published checkpoint file's two slots, as text (empty for an empty slot).
    fn slots(dir: &Path) -> Vec<String> {
        let bytes = std::fs::read(dir.join(audit_log::PUBLISHED_CHECKPOINT_FILE)).unwrap();
        assert_eq!(bytes.len(), 2 * audit_log::PUBLISHED_SLOT_BYTES);
        bytes
            .chunks(audit_log::PUBLISHED_SLOT_BYTES)
            .map(|c| String::from_utf8_lossy(c.split(|b| *b == 0).next().unwrap()).into_owned())
            .collect()
    }

    fn the_published_checkpoint_alternates_slots_and_a_torn_slot_leaves_the_one_before(
        place: &dyn Place,
    ) {
        let path = place.dir().join(audit_log::PUBLISHED_CHECKPOINT_FILE);
        let s = place.open();
        let mut published = Vec::new();
        for n in 0..3u8 {
            commit(&s, &[accept(&["ico"], vec![n], None)]);
            let cp = s.published_checkpoint().unwrap().unwrap();
            assert_eq!(Some(&cp), s.latest_checkpoint().unwrap().as_ref());
            published.push(cp);
        }
        // The last two publications are in different slots, in place.
        let both = slots(place.dir());
        assert!(both.contains(&published[1].note) && both.contains(&published[2].note));
        // A crash tears the newest slot: the one published before it is read instead.
        let newest = both.iter().position(|n| *n == published[2].note).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = newest * audit_log::PUBLISHED_SLOT_BYTES + 40;
        bytes[at..at + 8].copy_from_slice(b"XXXXXXXX");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(s.published_checkpoint().unwrap().unwrap(), published[1]);
        drop(s);
        // Reopened, the broker overwrites the torn slot, never the one it reads.
        let s = place.open();
        commit(&s, &[accept(&["ico"], b"after".to_vec(), None)]);
        let after = s.published_checkpoint().unwrap().unwrap();
        assert_eq!(after.size, published[2].size + 1);
        assert_eq!(slots(place.dir())[1 - newest], published[1].note);
        // Both slots torn: nothing proves what was published, and the broker says so.
        let mut bytes = std::fs::read(&path).unwrap();
        for slot in 0..2 {
            let at = slot * audit_log::PUBLISHED_SLOT_BYTES + 40;
            bytes[at..at + 8].copy_from_slice(b"XXXXXXXX");
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = s.published_checkpoint().unwrap_err().to_string();
        assert!(e.contains("neither slot"), "{e}");
    }

    fn a_published_checkpoint_of_the_older_layout_is_read_and_rewritten_in_slots(
        place: &dyn Place,
    ) {
        let path = place.dir().join(audit_log::PUBLISHED_CHECKPOINT_FILE);
        let s = place.open();
        commit(&s, &[accept(&["ico"], b"one".to_vec(), None)]);
        let cp = s.published_checkpoint().unwrap().unwrap();
        drop(s);
        // As a broker before the slots wrote it: the note alone.
        std::fs::write(&path, cp.note.as_bytes()).unwrap();
        let s = place.open();
        crate::store::check_recovered(&s, place.dir()).unwrap();
        assert_eq!(s.published_checkpoint().unwrap().unwrap(), cp);
        commit(&s, &[accept(&["ico"], b"two".to_vec(), None)]);
        let next = s.published_checkpoint().unwrap().unwrap();
        assert_eq!(next.size, cp.size + 1);
        assert!(slots(place.dir()).contains(&next.note));
    }

    fn verify_finds_a_changed_hash_and_an_orphan_queue_item(place: &dyn Place) {
        let s = place.open();
        commit(
            &s,
            &[
                accept(&["ico"], b"one".to_vec(), None),
                accept(&["ico", "nca"], b"two".to_vec(), None),
            ],
        );
        let report = s.verify().unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(
            (report.entries, report.queue_items, report.receipts),
            (2, 3, 2)
        );
        // One stored hash changed, one queue item for a transfer the log never accepted.
        let (_, hashes) = s.log.trees();
        let (key, bundle) = hashes.iter().next().unwrap().unwrap();
        let mut changed = bundle.to_vec();
        changed[0] ^= 1;
        hashes.insert(key, changed).unwrap();
        let orphan = StoredItem {
            seq: 99,
            transfer_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
            kind: ItemKind::Inline.to_wire(),
            transfer: Some(pb::Transfer::default()),
            ..Default::default()
        };
        s.queues
            .insert(
                block_key(&agency("ico"), 99),
                StoredBlock {
                    items: vec![orphan],
                }
                .encode_to_vec(),
            )
            .unwrap();
        let report = s.verify().unwrap();
        let all = report.problems.join("\n");
        assert!(all.contains("stored hash 0 differs"), "{all}");
        assert!(all.contains("has no transfer_accepted entry"), "{all}");
    }

    /// An accepted transfer from `from` to `to` carrying the STIX objects `ids` under `tlp`,
    /// restricted when `tlp` is AMBER+STRICT or RED.
    fn accept_stix(from: &str, to: &[&str], tlp: Tlp, ids: &[&str]) -> Op {
        let Op::Accept(mut a) = accept(to, b"{}".to_vec(), None) else {
            unreachable!()
        };
        a.sender = agency(from);
        a.facts.sender = from.into();
        a.envelope.tlp = tlp;
        a.decision.carried = Carried {
            object_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            restricted: if tlp >= Tlp::AmberStrict {
                ids.iter()
                    .map(|id| Restricted {
                        object_id: (*id).to_owned(),
                        tlp,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        };
        Op::Accept(a)
    }

    fn transfer_of(r: &Result<Applied, Failure>) -> String {
        match r {
            Ok(Applied::Accepted(receipt)) => receipt.transfer_id.clone(),
            other => panic!("not accepted: {other:?}"),
        }
    }

    fn what_was_delivered_under_tlp_red_is_remembered_across_a_restart(place: &dyn Place) {
        const X: &str = "indicator--6f1e5a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
        const Y: &str = "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321";
        let s = place.open();
        // Two in one commit: the second sender is added, the first transfer kept.
        let out = commit(
            &s,
            &[
                accept_stix("ncsc", &["ico"], Tlp::AmberStrict, &[X, Y]),
                accept_stix("nca", &["ico"], Tlp::Red, &[X]),
                accept_stix("ncsc", &["nca"], Tlp::Amber, &[Y]),
            ],
        );
        let first = transfer_of(&out[0]);
        transfer_of(&out[1]);
        transfer_of(&out[2]);
        drop(s);

        let s = place.open();
        let x = s.received(&agency("ico"), X).unwrap().unwrap();
        assert_eq!(x.first_transfer, first);
        assert_eq!(
            x.from,
            [agency("nca"), agency("ncsc")].into_iter().collect()
        );
        assert_eq!(x.tlp, Tlp::Red, "the most restrictive marking is kept");
        let y = s.received(&agency("ico"), Y).unwrap().unwrap();
        assert_eq!(
            (y.first_transfer.as_str(), y.tlp),
            (first.as_str(), Tlp::AmberStrict)
        );
        // Delivered under AMBER: nothing to remember; nothing for the senders either.
        assert_eq!(s.received(&agency("nca"), Y).unwrap(), None);
        assert_eq!(s.received(&agency("ncsc"), X).unwrap(), None);
        assert!(s.holds_any(&agency("ico")).unwrap());
        for other in ["nca", "ncsc", "ic"] {
            assert!(!s.holds_any(&agency(other)).unwrap(), "{other}");
        }
        // Read together, as read one by one, in the order asked.
        const Z: &str = "tool--0f1e5a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
        for holder in ["ico", "nca"] {
            let holder = agency(holder);
            let one_by_one: Vec<_> = [Y, Z, X, Y]
                .iter()
                .map(|id| s.received(&holder, id).unwrap())
                .collect();
            assert_eq!(s.received_many(&holder, &[Y, Z, X, Y]).unwrap(), one_by_one);
        }
        assert!(s.received_many(&agency("ico"), &[]).unwrap().is_empty());
        // Sent back to where it came from, it does not bind its originator.
        let back = commit(&s, &[accept_stix("ico", &["ncsc"], Tlp::Red, &[X])]);
        transfer_of(&back[0]);
        assert_eq!(s.received(&agency("ncsc"), X).unwrap(), None);
        // The audit entry of the acceptance names the objects.
        let entry = s.log_entry(0).unwrap().unwrap();
        assert_eq!(s.log_size().unwrap(), 4);
        let Some(pb::audit_entry::Event::TransferAccepted(a)) =
            concordat_proto::audit::decode(&entry).unwrap().event
        else {
            panic!("not an acceptance");
        };
        assert_eq!(a.stix_object_ids, [X, Y]);
        // verify checks the records against the log.
        let report = s.verify().unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.tlp_records, 2);
        s.tlp_received
            .insert(
                received_key(&agency("nca"), X),
                StoredReceived {
                    first_transfer: first.clone(),
                    from: vec!["ncsc".into()],
                    tlp: pb::Tlp::Red as i32,
                }
                .encode_to_vec(),
            )
            .unwrap();
        let report = s.verify().unwrap();
        assert!(
            report.problems.join("\n").contains(&format!(
                "the TLP record of {X} held by nca names transfer {first}, which was not \
                 accepted for nca from ncsc"
            )),
            "{report:?}"
        );
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn a_database_in_the_old_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path()).unwrap();
        // Flushed first, like every other restart here: a database dropped while sled's
        // threads still write what opening it started may keep its lock a moment longer.
        s.sync().unwrap();
        drop(s);
        {
            let db = sled::Config::new()
                .path(dir.path().join("db"))
                .segment_size(kv::SLED_SEGMENT_BYTES)
                .open()
                .unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.remove(LAYOUT).unwrap();
            meta.insert(NEXT_SEQ, &5u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let Err(e) = reopen(dir.path()) else {
            panic!("opened a database in another layout");
        };
        assert!(e.to_string().contains("older broker"), "{e}");
    }

    #[test]
    fn a_database_with_sleds_default_segments_is_refused_with_our_message() {
        let dir = tempfile::tempdir().unwrap();
        // An older broker made its key, then its database.
        audit_log::load_or_create_key(dir.path(), ORIGIN).unwrap();
        drop(sled::open(dir.path().join("db")).unwrap());
        let Err(e) = reopen(dir.path()) else {
            panic!("opened a database with other segments");
        };
        assert!(e.to_string().contains("older broker"), "{e}");
    }

    /// A snapshot taken while transfers are accepted holds the receipt of every transfer its
    /// log holds, and no other: receipts are copied after the writer resumes, filtered by
    /// their entry's index.
    #[test]
    fn a_snapshot_under_accepts_holds_exactly_the_receipts_of_its_log() {
        use std::sync::Arc;

        use crate::store::{Store, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let storage = Arc::new(reopen(&live).unwrap());
        let store = Store::start(
            storage.clone(),
            StoreOptions::new(&live, std::time::Duration::from_secs(10)),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let file = dir.path().join("backup");
        let (header, accepted) = rt.block_on(async {
            let senders: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut accepted = Vec::new();
                        for _ in 0..120 {
                            let mut op = accept(&["ico"], vec![3; 2048], None);
                            if let Op::Accept(a) = &mut op {
                                a.max_queue_depth = u64::MAX;
                            }
                            let Op::Accept(a) = &op else { unreachable!() };
                            let key = (a.sender.clone(), a.envelope.message_id);
                            match store.commit(op).await.unwrap() {
                                Applied::Accepted(r) => {
                                    accepted.push((key, r.audit.unwrap().log_index))
                                }
                                other => panic!("{other:?}"),
                            }
                        }
                        accepted
                    })
                })
                .collect();
            while store.checkpoint().map_or(0, |c| c.size) < 300 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let out = std::fs::File::create(&file).unwrap();
            let (header, _, _) = crate::backup::snapshot_running(&store, &out).await.unwrap();
            let mut accepted = Vec::new();
            for s in senders {
                accepted.extend(s.await.unwrap());
            }
            (header, accepted)
        });
        assert!(
            accepted.iter().any(|(_, i)| *i >= header.log_size),
            "taken mid-way"
        );
        let restored = dir.path().join("restored");
        crate::backup::restore(&file, &restored).unwrap();
        let copy = reopen(&restored).unwrap();
        for ((sender, id), index) in &accepted {
            let found = copy.receipt(sender, id).unwrap();
            if *index < header.log_size {
                assert_eq!(found.unwrap().0.audit.unwrap().log_index, *index);
            } else {
                assert!(found.is_none(), "a receipt beyond the snapshot, at {index}");
            }
        }
    }

    /// Measures how long sends stall while a backup is taken of a store of 100k transfers
    /// (each still queued, 512-byte payloads): the writer's pause, and the slowest commit that
    /// waited behind it compared with the usual one. A measurement, not a check: run with
    /// `cargo test -p concordat-broker --release --lib backup_stall -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn backup_stall_with_100k_transfers() {
        use std::{sync::Arc, time::Instant};

        use crate::store::{Store, StoreOptions};
        const TRANSFERS: usize = 100_000;
        let unbounded = |mut op: Op| {
            if let Op::Accept(a) = &mut op {
                a.max_queue_depth = u64::MAX;
            }
            op
        };
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path()).unwrap();
        let filled = Instant::now();
        for _ in 0..TRANSFERS / 500 {
            let ops: Vec<Op> = (0..500)
                .map(|_| unbounded(accept(&["ico"], vec![7; 512], None)))
                .collect();
            assert!(commit(&s, &ops).iter().all(|r| r.is_ok()));
        }
        println!("filled {TRANSFERS} transfers in {:?}", filled.elapsed());
        let storage = Arc::new(s);
        let store = Store::start(
            storage.clone(),
            StoreOptions::new(dir.path(), std::time::Duration::from_secs(60)),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // One sender committing back to back, timing each commit, while a backup is taken.
        let measure = |what: &str| {
            let (paused, bytes, latencies) = rt.block_on(async {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let sender = {
                    let (store, stop) = (store.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let t = Instant::now();
                            store
                                .commit(unbounded(accept(&["nca"], vec![1; 512], None)))
                                .await
                                .unwrap();
                            latencies.push(t.elapsed());
                        }
                        latencies
                    })
                };
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let file = tempfile::tempfile_in(dir.path()).unwrap();
                let (_, _, paused) = crate::backup::snapshot_running(&store, &file)
                    .await
                    .unwrap();
                let bytes = file.metadata().unwrap().len();
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                stop.store(true, Ordering::Relaxed);
                (paused, bytes, sender.await.unwrap())
            });
            let mut sorted = latencies.clone();
            sorted.sort();
            println!(
                "{what}: snapshot of {} MiB: writer paused {:?}; {} commits meanwhile: median \
                 {:?}, p99 {:?}, slowest {:?}",
                bytes >> 20,
                paused,
                sorted.len(),
                sorted[sorted.len() / 2],
                sorted[sorted.len() * 99 / 100],
                sorted[sorted.len() - 1]
            );
        };
        measure("all 100k queued");
        // Delivered and acknowledged: the queues empty, the bulk is the audit log.
        rt.block_on(async {
            let seqs: Vec<u64> = (1..=TRANSFERS as u64).collect();
            for chunk in seqs.chunks(500) {
                store.commit(ack("ico", chunk)).await.unwrap();
            }
        });
        measure("all 100k acknowledged");
    }
}
