//! The tamper-evident audit log: entries as leaves of an RFC 6962 Merkle tree, stored in the
//! store's trees ([`crate::store::kv`], sled) in the tlog stored-hash layout (bundled: one record
//! of entries and one of hashes per group commit), and signed checkpoints over it.
//!
//! Entries are appended inside the same transaction as the change they describe (see
//! [`crate::store`]), so an acknowledged transfer always has its entry and no entry describes a
//! transfer that did not happen. After each group commit the writer signs a checkpoint of the
//! new tree (C2SP tlog-checkpoint as a signed note) with the broker's log key, after checking
//! that it is consistent with the previous one: the broker never signs a fork.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
};

use concordat_proto::{
    checkpoint::{self, Checkpoint, LogSigner},
    merkle::{self, Hash, HashReader, MerkleError},
    pb,
};
use prost::Message;

use crate::{
    refusal::{Failure, Internal},
    store::{
        ProvedEntry,
        kv::{KvError, Tree, TxError, TxTree, Value},
    },
};

/// The `meta` key of the number of entries.
pub const LOG_SIZE: &[u8] = b"log_size";
/// The `meta` key of the latest signed checkpoint.
pub const LOG_CHECKPOINT: &[u8] = b"log_checkpoint";
/// The log key's file name in the data directory.
pub const LOG_KEY_FILE: &str = "log-key";
/// The default checkpoint origin (and log key name).
pub const DEFAULT_ORIGIN: &str = "concordat-broker/audit";

/// A signed checkpoint and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The signed note, as sent to clients.
    pub note: String,
    /// The tree size.
    pub size: u64,
    /// The tree hash.
    pub root: Hash,
}

/// Loads the log key from `dir`, or creates it (mode 0600) on first start: only when `dir`
/// holds no log yet (no database and no published checkpoint). A data directory that has a log
/// but no key, or a key that does not verify its published checkpoint, is refused: a new key
/// would make every checkpoint already handed out unverifiable, and would let the broker sign
/// a second history.
pub fn load_or_create_key(dir: &Path, origin: &str) -> Result<LogSigner, Internal> {
    match read_key(dir, origin)? {
        Some(signer) => Ok(signer),
        None if holds_a_log(dir) => Err(missing_key(dir)),
        None => {
            let path = dir.join(LOG_KEY_FILE);
            let signer = LogSigner::generate(origin)
                .map_err(|e| Internal::new("generating the log key", e))?;
            match write_secret(&path, signer.to_secret_string().as_bytes()) {
                Ok(()) => {}
                // Another process created it meanwhile: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_key(dir, origin);
                }
                Err(e) => return Err(Internal::new("writing the log key", e)),
            }
            tracing::info!(key = %signer.verifier_key(), "generated a new audit log key");
            Ok(signer)
        }
    }
}

/// Loads the log key from `dir`; it must exist, and it must verify the checkpoint the broker
/// last published there (if any).
pub fn load_key(dir: &Path, origin: &str) -> Result<LogSigner, Internal> {
    read_key(dir, origin)?.ok_or_else(|| missing_key(dir))
}

/// Whether `dir` holds a log: a database or a published checkpoint.
fn holds_a_log(dir: &Path) -> bool {
    dir.join(DB_DIR).exists() || dir.join(PUBLISHED_CHECKPOINT_FILE).exists()
}

fn missing_key(dir: &Path) -> Internal {
    Internal::new(
        "reading the log key",
        format!(
            "the audit log key {} is missing, but {} already holds an audit log: restore the \
             key file from a backup (a new key would not verify the checkpoints the broker has \
             published, and is never made for an existing log)",
            dir.join(LOG_KEY_FILE).display(),
            dir.display()
        ),
    )
}

/// The key in `dir`, checked against the published checkpoint; `None` if there is no key file.
fn read_key(dir: &Path, origin: &str) -> Result<Option<LogSigner>, Internal> {
    let path = dir.join(LOG_KEY_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Internal::new(
                "reading the log key",
                format!("{}: {e}", path.display()),
            ));
        }
    };
    let signer = LogSigner::from_secret_string(text.trim())
        .map_err(|e| Internal::new("reading the log key", format!("{}: {e}", path.display())))?;
    if signer.name() != origin {
        return Err(Internal::new(
            "reading the log key",
            format!(
                "{} is for log {:?}, not {origin:?}",
                path.display(),
                signer.name()
            ),
        ));
    }
    // A replaced key does not verify what the broker published with the original one.
    if let Err(e) = read_published(dir, &signer.verifier()) {
        return Err(Internal::new(
            "reading the log key",
            format!(
                "{} does not verify the checkpoint published in {} ({e}): the key was replaced; \
                 restore the original key file",
                path.display(),
                dir.join(PUBLISHED_CHECKPOINT_FILE).display()
            ),
        ));
    }
    Ok(Some(signer))
}

/// The database's directory inside the data directory.
pub const DB_DIR: &str = "db";
/// The file, beside the database, that holds the last checkpoint the broker published.
pub const PUBLISHED_CHECKPOINT_FILE: &str = "checkpoint";

/// The published checkpoint file holds two slots of this many bytes, each a signed checkpoint
/// note padded with zeros. The broker overwrites them in turn, in place, with one
/// `fdatasync`: a write torn by a crash leaves the other slot, which holds the checkpoint
/// published before, and the torn one fails its signature. (A file that is not exactly two
/// slots long holds one note, as brokers before this layout wrote it; it is still read.)
pub const PUBLISHED_SLOT_BYTES: usize = 4096;

/// Reads the last published checkpoint from `dir`, verified with `verifier`; `None` if the
/// broker has published none there.
///
/// It is kept outside the database because sled's recovery can silently roll the database
/// back: compared with what the database recovered, it tells whether acknowledged history was
/// lost (see [`crate::store::check_recovered`]).
pub fn read_published(
    dir: &Path,
    verifier: &checkpoint::LogVerifier,
) -> Result<Option<SignedCheckpoint>, Internal> {
    Ok(read_slots(dir, verifier)?.map(|found| found.newest))
}

/// What the published checkpoint file holds: its newest valid checkpoint, and the slot it is
/// in (`None` for a file of the older one-note layout).
struct PublishedSlots {
    newest: SignedCheckpoint,
    slot: Option<usize>,
}

fn read_slots(
    dir: &Path,
    verifier: &checkpoint::LogVerifier,
) -> Result<Option<PublishedSlots>, Internal> {
    let path = dir.join(PUBLISHED_CHECKPOINT_FILE);
    let problem = |what: String| {
        Internal::new(
            "reading the published checkpoint",
            format!("{}: {what}", path.display()),
        )
    };
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(problem(e.to_string())),
    };
    let open = |text: &[u8]| -> Result<SignedCheckpoint, String> {
        let note = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_owned())?;
        let cp = checkpoint::open(note, verifier).map_err(|e| e.to_string())?;
        Ok(SignedCheckpoint {
            size: cp.size(),
            root: *cp.root(),
            note: note.to_owned(),
        })
    };
    if bytes.len() != 2 * PUBLISHED_SLOT_BYTES {
        let newest = open(&bytes).map_err(problem)?;
        return Ok(Some(PublishedSlots { newest, slot: None }));
    }
    let mut valid: Vec<(usize, SignedCheckpoint)> = Vec::new();
    let mut errors = Vec::new();
    for (slot, chunk) in bytes.chunks(PUBLISHED_SLOT_BYTES).enumerate() {
        let text = chunk.split(|b| *b == 0).next().unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        match open(text) {
            Ok(cp) => valid.push((slot, cp)),
            Err(e) => errors.push(format!("slot {slot}: {e}")),
        }
    }
    if let [(_, a), (_, b)] = valid.as_slice()
        && a.size == b.size
        && a.root != b.root
    {
        return Err(problem(format!(
            "its two slots hold different checkpoints of size {}",
            a.size
        )));
    }
    match valid.into_iter().max_by_key(|(_, cp)| cp.size) {
        Some((slot, newest)) => Ok(Some(PublishedSlots {
            newest,
            slot: Some(slot),
        })),
        None => Err(problem(format!(
            "neither slot holds a checkpoint signed by the log key ({})",
            if errors.is_empty() {
                "both are empty".to_owned()
            } else {
                errors.join("; ")
            }
        ))),
    }
}

/// Replaces the published checkpoint in `dir` with `cp`, atomically and durably, whatever the
/// file held: a temporary file holding `cp` in the first slot and an empty second, fsync,
/// rename over the old one, fsync of the directory. [`Log`] overwrites a slot in place
/// instead, once the file is laid out.
pub fn publish(dir: &Path, cp: &SignedCheckpoint) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(PUBLISHED_CHECKPOINT_FILE);
    let tmp = dir.join(format!(".{PUBLISHED_CHECKPOINT_FILE}.tmp"));
    let written = (|| {
        let mut slots = slot_bytes(cp)?;
        slots.resize(2 * PUBLISHED_SLOT_BYTES, 0);
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&slots)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// `cp`'s note padded to one slot.
fn slot_bytes(cp: &SignedCheckpoint) -> std::io::Result<Vec<u8>> {
    if cp.note.len() >= PUBLISHED_SLOT_BYTES || cp.note.as_bytes().contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a checkpoint note does not fit a slot of the published checkpoint file",
        ));
    }
    let mut slot = cp.note.as_bytes().to_vec();
    slot.resize(PUBLISHED_SLOT_BYTES, 0);
    Ok(slot)
}

/// Overwrites slot `slot` of the published checkpoint file in `dir` with `cp`, then
/// `fdatasync`: the file keeps its size, so no metadata needs syncing.
fn write_slot(dir: &Path, slot: usize, cp: &SignedCheckpoint) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes = slot_bytes(cp)?;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join(PUBLISHED_CHECKPOINT_FILE))?;
    if f.metadata()?.len() != (2 * PUBLISHED_SLOT_BYTES) as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the published checkpoint file is not laid out in two slots",
        ));
    }
    f.write_all_at(&bytes, (slot * PUBLISHED_SLOT_BYTES) as u64)?;
    f.sync_data()
}

fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// How many hash bundles [`Log`] keeps in memory for proofs.
const HASH_CACHE_BUNDLES: usize = 512;

/// How many entry bundles [`Log`] keeps in memory for [`Log::entry`]: the receipts of one
/// group commit read its one bundle, once per transfer.
const ENTRY_CACHE_BUNDLES: usize = 16;

/// A batch's entries as one stored value: a big-endian `u32` count, then each entry's end offset
/// (big-endian `u32`, relative to the data), then the entries' bytes back to back.
fn encode_entry_bundle(entries: &[Vec<u8>]) -> Result<Vec<u8>, Internal> {
    let too_big = || Internal::new("bundling audit entries", "bundle larger than 4 GiB");
    let data: usize = entries.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(4 + 4 * entries.len() + data);
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .map_err(|_| too_big())?
            .to_be_bytes(),
    );
    let mut end = 0usize;
    for e in entries {
        end += e.len();
        out.extend_from_slice(&u32::try_from(end).map_err(|_| too_big())?.to_be_bytes());
    }
    for e in entries {
        out.extend_from_slice(e);
    }
    Ok(out)
}

fn be_u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(b)).ok()
}

/// The number of entries in a bundle, or `None` if it is malformed.
fn bundle_len(bundle: &[u8]) -> Option<usize> {
    let count = be_u32_at(bundle, 0)?;
    // The offsets table must fit.
    (bundle.len() >= 4 + 4 * count).then_some(count)
}

/// Entry `k` of a bundle, or `None` if there is no such entry or the bundle is malformed.
fn bundle_entry(bundle: &[u8], k: usize) -> Option<&[u8]> {
    let count = bundle_len(bundle)?;
    if k >= count {
        return None;
    }
    let data = bundle.get(4 + 4 * count..)?;
    let start = if k == 0 { 0 } else { be_u32_at(bundle, 4 * k)? };
    let end = be_u32_at(bundle, 4 + 4 * k)?;
    data.get(start..end)
}

/// The entries of a bundle, or `None` if it is malformed.
pub fn bundle_entries(bundle: &[u8]) -> Option<Vec<&[u8]>> {
    let count = bundle_len(bundle)?;
    (0..count).map(|k| bundle_entry(bundle, k)).collect()
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The record of `tree` with the largest big-endian key at most `index`: the bundle that holds
/// entry or hash `index`, if any does.
fn bundle_at_or_before(tree: &Tree, index: u64) -> Result<Option<(Value, Value)>, KvError> {
    tree.range(..=index.to_be_bytes()).next_back().transpose()
}

fn storage_err(e: impl std::error::Error + Send + Sync + 'static) -> MerkleError {
    MerkleError::Storage(Box::new(e))
}

/// Bundles of one log tree (entries or hashes) read recently, by the index of their first
/// record. A committed bundle never changes, so a copy in memory stays true; the cache starts
/// afresh when full, which bounds it and keeps it cheap (the hot bundles are read again at once).
struct BundleCache {
    bundles: Mutex<BTreeMap<u64, Value>>,
    capacity: usize,
}

impl BundleCache {
    fn new(capacity: usize) -> BundleCache {
        BundleCache {
            bundles: Mutex::new(BTreeMap::new()),
            capacity,
        }
    }

    /// What `pick` finds in the cached bundle starting at or before `index` (given its start).
    fn find<T>(&self, index: u64, pick: impl FnOnce(u64, &[u8]) -> Option<T>) -> Option<T> {
        let bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        let (start, bundle) = bundles.range(..=index).next_back()?;
        pick(*start, bundle)
    }

    /// What `pick` finds for each of `indexes` in the cached bundles, under one lock (a proof
    /// reads a score of hashes, many from the same few bundles): `None` where no cached bundle
    /// has it.
    fn find_all<T>(
        &self,
        indexes: &[u64],
        pick: impl Fn(u64, u64, &[u8]) -> Option<T>,
    ) -> Vec<Option<T>> {
        let bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        let mut last: Option<(u64, &Value)> = None;
        indexes
            .iter()
            .map(|&index| {
                // The bundle of the previous index first: neighbours on a path often share one.
                if let Some(found) = last.and_then(|(start, b)| pick(index, start, b)) {
                    return Some(found);
                }
                let (start, bundle) = bundles.range(..=index).next_back()?;
                last = Some((*start, bundle));
                pick(index, *start, bundle)
            })
            .collect()
    }

    /// Keeps the committed bundle starting at `start`.
    fn keep(&self, start: u64, bundle: Value) {
        let mut bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        if bundles.len() >= self.capacity {
            bundles.clear();
        }
        bundles.insert(start, bundle);
    }
}

/// The hashes of the log: stored in bundles (one per group commit, keyed by the stored-hash
/// index of its first hash), with the most recently used bundles kept in memory.
struct Hashes {
    tree: Tree,
    cache: BundleCache,
}

/// The hash at stored index `i` in the hash bundle that starts at `start`, if it holds it.
fn hash_in_bundle(i: u64, start: u64, bundle: &[u8]) -> Option<Hash> {
    let k = usize::try_from(i.checked_sub(start)?).ok()?;
    let at = k.checked_mul(32)?;
    Hash::from_slice(bundle.get(at..at.checked_add(32)?)?).ok()
}

impl Hashes {
    /// The hash at stored index `i`.
    fn get(&self, i: u64) -> Result<Hash, MerkleError> {
        let covering = |start: u64, bundle: &[u8]| hash_in_bundle(i, start, bundle);
        if let Some(h) = self.cache.find(i, covering) {
            return Ok(h);
        }
        self.read(i)
    }

    /// The hash at stored index `i`, read from the store (its bundle then kept in the cache).
    fn read(&self, i: u64) -> Result<Hash, MerkleError> {
        let covering = |start: u64, bundle: &[u8]| hash_in_bundle(i, start, bundle);
        let found = bundle_at_or_before(&self.tree, i).map_err(storage_err)?;
        let Some((key, bundle)) = found else {
            return Err(MerkleError::MissingHash { index: i });
        };
        let start = be_u64(&key).ok_or(MerkleError::MalformedHash)?;
        if bundle.len() % 32 != 0 {
            return Err(MerkleError::MalformedHash);
        }
        let h = covering(start, &bundle).ok_or(MerkleError::MissingHash { index: i })?;
        self.cache.keep(start, bundle);
        Ok(h)
    }
}

impl HashReader for Hashes {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        let cached = self.cache.find_all(indexes, hash_in_bundle);
        indexes
            .iter()
            .zip(cached)
            .map(|(&i, found)| match found {
                Some(h) => Ok(h),
                None => self.read(i),
            })
            .collect()
    }
}

/// The stored hashes already read by one batch of proofs, in front of [`Hashes`].
struct Memo<'h> {
    hashes: &'h Hashes,
    /// Hashed with foldhash: the keys are the log's own indexes, and SipHash was a tenth of
    /// a delivery's proof.
    seen: RefCell<HashMap<u64, Hash, foldhash::fast::FixedState>>,
}

impl HashReader for Memo<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        let mut seen = self.seen.borrow_mut();
        // Those already seen, and where the others go, read together.
        let mut out = Vec::with_capacity(indexes.len());
        let (mut unseen, mut slots) = (Vec::new(), Vec::new());
        for &i in indexes {
            match seen.get(&i) {
                Some(h) => out.push(*h),
                None => {
                    unseen.push(i);
                    slots.push(out.len());
                    out.push(Hash([0; 32]));
                }
            }
        }
        if !unseen.is_empty() {
            let read = self.hashes.read_hashes(&unseen)?;
            for ((i, slot), h) in unseen.into_iter().zip(slots).zip(read) {
                out[slot] = h;
                seen.insert(i, h);
            }
        }
        Ok(out)
    }
}

/// The hashes of the perfect subtrees of the committed tree (one per set bit of its size), by
/// stored-hash index: all that appending needs to read. The writer keeps them in memory so that
/// a transaction never reads the committed trees (sled's iterators take a lock that its
/// transactions hold).
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    hashes: BTreeMap<u64, Hash>,
}

impl Frontier {
    /// The stored-hash indexes of the perfect subtrees of a tree of `size` entries.
    fn indexes(size: u64) -> impl Iterator<Item = u64> {
        (0..64u8)
            .filter(move |level| (size >> level) & 1 == 1)
            .map(move |level| merkle::stored_hash_index(level, (size >> level) - 1))
    }

    /// Reads the frontier of a tree of `size` entries.
    fn load(size: u64, reader: &dyn HashReader) -> Result<Frontier, MerkleError> {
        let indexes: Vec<u64> = Frontier::indexes(size).collect();
        let hashes = reader.read_hashes(&indexes)?;
        if hashes.len() != indexes.len() {
            return Err(MerkleError::ShortRead {
                expected: indexes.len(),
                got: hashes.len(),
            });
        }
        Ok(Frontier {
            size,
            hashes: indexes.into_iter().zip(hashes).collect(),
        })
    }

    /// The frontier after `pending` is appended.
    fn advanced(&self, pending: &Pending) -> Result<Frontier, MerkleError> {
        let size = pending.start + pending.entries.len() as u64;
        let reader = PendingReader {
            pending,
            frontier: self,
        };
        Frontier::load(size, &reader)
    }
}

impl HashReader for Frontier {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        indexes
            .iter()
            .map(|i| {
                self.hashes
                    .get(i)
                    .copied()
                    .ok_or(MerkleError::MissingHash { index: *i })
            })
            .collect()
    }
}

/// The trees of the log, as seen inside a transaction: appended entries and their hashes are
/// kept in memory and written as one bundle each by [`TxLog::finish`].
pub struct TxLog<'a> {
    entries: TxTree<'a>,
    hashes: TxTree<'a>,
    meta: TxTree<'a>,
    frontier: Frontier,
    pending: RefCell<Pending>,
}

struct Pending {
    /// The log size when the transaction began.
    start: u64,
    entries: Vec<Vec<u8>>,
    /// The stored-hash index of the first pending hash.
    hash_start: u64,
    hashes: Vec<Hash>,
}

/// Reads pending hashes, falling back to the committed tree's frontier.
struct PendingReader<'p> {
    pending: &'p Pending,
    frontier: &'p Frontier,
}

impl HashReader for PendingReader<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        indexes
            .iter()
            .map(|&i| {
                let found = match i.checked_sub(self.pending.hash_start) {
                    Some(k) => usize::try_from(k)
                        .ok()
                        .and_then(|k| self.pending.hashes.get(k)),
                    None => self.frontier.hashes.get(&i),
                };
                found.copied().ok_or(MerkleError::MissingHash { index: i })
            })
            .collect()
    }
}

impl TxLog<'_> {
    /// Appends `entry` and returns its index.
    pub fn append(&self, entry: &pb::AuditEntry) -> Result<u64, TxError<Failure>> {
        self.append_bytes(entry).map(|(index, _)| index)
    }

    /// Appends `entry` and returns its index and its encoding.
    pub fn append_bytes(&self, entry: &pb::AuditEntry) -> Result<(u64, Vec<u8>), TxError<Failure>> {
        let mut p = self.pending.borrow_mut();
        let n = p.start + p.entries.len() as u64;
        let bytes = entry.encode_to_vec();
        let reader = PendingReader {
            pending: &p,
            frontier: &self.frontier,
        };
        let new = merkle::stored_hashes(n, &bytes, &reader).map_err(|e| {
            TxError::Abort(Failure::Internal(Internal::new(
                "hashing an audit entry",
                e,
            )))
        })?;
        p.hashes.extend(new);
        p.entries.push(bytes.clone());
        Ok((n, bytes))
    }

    /// Writes what was appended — one bundle of entries, one of hashes, the new size — and
    /// returns what to hand to [`Log::advance`] once the transaction has committed (`None` if
    /// nothing was appended).
    pub fn finish(&self) -> Result<Option<Appended>, TxError<Failure>> {
        let p = self.pending.borrow();
        if p.entries.is_empty() {
            return Ok(None);
        }
        let internal = |e: Internal| TxError::Abort(Failure::Internal(e));
        let bundle = encode_entry_bundle(&p.entries).map_err(internal)?;
        self.entries.insert(p.start.to_be_bytes(), &bundle)?;
        let hashes: Vec<u8> = p.hashes.iter().flat_map(|h| h.0).collect();
        self.hashes.insert(p.hash_start.to_be_bytes(), &hashes)?;
        let size = p.start + p.entries.len() as u64;
        self.meta.insert(LOG_SIZE, size.to_be_bytes())?;
        let frontier = self
            .frontier
            .advanced(&p)
            .map_err(|e| internal(Internal::new("advancing the log frontier", e)))?;
        Ok(Some(Appended {
            frontier,
            entries: (p.start, bundle.into()),
            hashes: (p.hash_start, hashes.into()),
        }))
    }
}

/// What a transaction appended to the log: the tree's new frontier, and the two bundles it
/// wrote, which [`Log::advance`] keeps in the caches once it has committed (the commit's
/// checkpoint, receipts and deliveries read them next).
pub struct Appended {
    frontier: Frontier,
    entries: (u64, Value),
    hashes: (u64, Value),
}

/// The committed log: reads, proofs and checkpoint signing.
///
/// Storage: the tree `log_entries` holds one bundle of entries per group commit, keyed by the
/// big-endian index of its first entry; `log_hashes` holds the stored hashes (P§3 of
/// docs/audit-log-proofs.md) added by that commit, concatenated, keyed by the big-endian
/// stored-hash index of the first. Two writes per commit instead of three or more per entry.
pub struct Log {
    entries: Tree,
    /// Entry bundles read by [`Log::entry`] (never by the reads that check the store).
    entry_cache: BundleCache,
    hashes: Hashes,
    meta: Tree,
    signer: LogSigner,
    /// The committed tree's frontier; only the writer advances it.
    frontier: Mutex<Frontier>,
    /// The data directory, where [`Log::publish_sealed`] keeps the published checkpoint.
    dir: PathBuf,
    /// The checkpoint sealed since the last flush, to publish once the flush is durable.
    unpublished: Mutex<Option<SignedCheckpoint>>,
    /// The slot of the published checkpoint file to overwrite next: the one that does not
    /// hold the newest checkpoint. `None`: the file is rewritten whole next time (it is
    /// missing, of the older layout, or neither slot could be read).
    next_slot: Mutex<Option<usize>>,
}

impl Log {
    /// The log over these trees, signing with `signer`, publishing its checkpoints in `dir`.
    pub fn open(
        entries: Tree,
        hashes: Tree,
        meta: Tree,
        signer: LogSigner,
        dir: &Path,
    ) -> Result<Self, Internal> {
        let hashes = Hashes {
            tree: hashes,
            cache: BundleCache::new(HASH_CACHE_BUNDLES),
        };
        let size = meta
            .get(LOG_SIZE)
            .map_err(|e| Internal::new("reading the log size", e))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        let frontier = Frontier::load(size, &hashes)
            .map_err(|e| Internal::new("reading the log frontier", e))?;
        let next_slot = match read_slots(dir, &signer.verifier()) {
            Ok(Some(PublishedSlots {
                slot: Some(slot), ..
            })) => Some(1 - slot),
            _ => None,
        };
        Ok(Log {
            entries,
            entry_cache: BundleCache::new(ENTRY_CACHE_BUNDLES),
            hashes,
            meta,
            signer,
            frontier: Mutex::new(frontier),
            dir: dir.to_path_buf(),
            unpublished: Mutex::new(None),
            next_slot: Mutex::new(next_slot),
        })
    }

    /// The trees a transaction needs: entries, hashes.
    pub fn trees(&self) -> (&Tree, &Tree) {
        (&self.entries, &self.hashes.tree)
    }

    fn lock_frontier(&self) -> std::sync::MutexGuard<'_, Frontier> {
        // Replaced whole, never torn.
        self.frontier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed tree's frontier, which must be that of a log of `size` entries (the size
    /// stored beside the entries); `doing` names the operation for the error.
    fn frontier_of(&self, size: u64, doing: &'static str) -> Result<Frontier, Internal> {
        let frontier = self.lock_frontier().clone();
        if frontier.size != size {
            return Err(Internal::new(
                doing,
                format!(
                    "the stored log has {size} entries but its frontier {}",
                    frontier.size
                ),
            ));
        }
        Ok(frontier)
    }

    /// The log inside a transaction over [`Log::trees`] and `meta`.
    pub fn in_tx<'a>(
        &'a self,
        entries: TxTree<'a>,
        hashes: TxTree<'a>,
        meta: TxTree<'a>,
    ) -> Result<TxLog<'a>, TxError<Failure>> {
        let start = meta.get(LOG_SIZE)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        let frontier = self
            .frontier_of(start, "appending to the audit log")
            .map_err(|e| TxError::Abort(Failure::Internal(e)))?;
        Ok(TxLog {
            entries,
            hashes,
            meta,
            frontier,
            pending: RefCell::new(Pending {
                start,
                entries: Vec::new(),
                hash_start: merkle::stored_hash_count(start),
                hashes: Vec::new(),
            }),
        })
    }

    /// Reads the log's size and frontier again from the store, for when a transaction's
    /// outcome is unknown or another broker node has appended; refuses a log shorter than
    /// what this broker committed.
    pub fn reload(&self) -> Result<(), Internal> {
        let size = self
            .meta
            .get(LOG_SIZE)
            .map_err(|e| Internal::new("reading the log size", e))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        // Committed entries never go away: a shorter log is a database that lost them (a
        // stale primary), and this broker writes nothing on it.
        let committed = self.lock_frontier().size;
        if size < committed {
            return Err(Internal::new(
                "reading the log again",
                format!(
                    "the database's log has {size} entries, fewer than the {committed} this broker committed: acknowledged history was lost (a stale primary?); nothing is written to it"
                ),
            ));
        }
        let frontier = Frontier::load(size, &self.hashes)
            .map_err(|e| Internal::new("reading the log frontier", e))?;
        *self.lock_frontier() = frontier;
        Ok(())
    }

    /// Records that a transaction which returned `appended` from [`TxLog::finish`] committed.
    pub fn advance(&self, appended: Option<Appended>) {
        if let Some(a) = appended {
            let ((entries_start, entries), (hashes_start, hashes)) = (a.entries, a.hashes);
            self.entry_cache.keep(entries_start, entries);
            self.hashes.cache.keep(hashes_start, hashes);
            *self.lock_frontier() = a.frontier;
        }
    }

    /// The number of entries.
    pub fn size(&self) -> Result<u64, Internal> {
        Ok(self
            .meta
            .get(LOG_SIZE)
            .map_err(|e| Internal::new("reading the log size", e))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0))
    }

    /// The entry at `index`, from a bundle kept in memory when it was read lately (receipts
    /// and proofs; [`Log::entries_from`], which the store's checks use, always reads the
    /// store).
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal> {
        let malformed = || Internal::new("reading audit entries", "malformed entry bundle");
        // `Some(None)`: the bundle ends before `index`; `None`: it does not decode.
        let pick = |start: u64, bundle: &[u8]| -> Option<Option<Vec<u8>>> {
            let k = usize::try_from(index.checked_sub(start)?).ok()?;
            if k >= bundle_len(bundle)? {
                return Some(None);
            }
            bundle_entry(bundle, k).map(|e| Some(e.to_vec()))
        };
        if let Some(Some(entry)) = self.entry_cache.find(index, pick) {
            return Ok(Some(entry));
        }
        let found = bundle_at_or_before(&self.entries, index)
            .map_err(|e| Internal::new("reading audit entries", e))?;
        let Some((key, bundle)) = found else {
            return Ok(None);
        };
        let start = be_u64(&key).ok_or_else(malformed)?;
        let entry = pick(start, &bundle).ok_or_else(malformed)?;
        if entry.is_some() {
            self.entry_cache.keep(start, bundle);
        }
        Ok(entry)
    }

    /// Up to `limit` consecutive entries from `index` on (fewer at the end of the log).
    pub fn entries_from(&self, index: u64, limit: usize) -> Result<Vec<Vec<u8>>, Internal> {
        let read = |e| Internal::new("reading audit entries", e);
        let malformed = || Internal::new("reading audit entries", "malformed entry bundle");
        let mut out = Vec::new();
        let mut next = index;
        // The bundle holding `index`, then the ones after it.
        let first = bundle_at_or_before(&self.entries, index).map_err(read)?;
        let Some(first) = first else {
            return Ok(out);
        };
        let rest = self.entries.range((
            std::ops::Bound::Excluded(first.0.clone()),
            std::ops::Bound::Unbounded,
        ));
        for item in std::iter::once(Ok(first)).chain(rest) {
            let (key, bundle) = item.map_err(read)?;
            let start = be_u64(&key).ok_or_else(malformed)?;
            if start != next && !out.is_empty() {
                return Err(malformed());
            }
            let count = bundle_len(&bundle).ok_or_else(malformed)?;
            let skip = usize::try_from(next - start).map_err(|_| malformed())?;
            if skip >= count {
                // `index` lies beyond the last bundle.
                return Ok(out);
            }
            for k in skip..count {
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push(bundle_entry(&bundle, k).ok_or_else(malformed)?.to_vec());
                next += 1;
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries.
    pub fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal> {
        merkle::prove_record(size, index, &self.hashes)
            .map_err(|e| Internal::new("proving inclusion", e))
    }

    /// The entries at `indexes` with their inclusion proofs in the tree of `size` entries, in
    /// the same order. The proofs of one tree share their upper hashes (those near the root and
    /// the newest subtrees); each stored hash is read once for the whole batch.
    pub fn prove_entries(&self, indexes: &[u64], size: u64) -> Result<Vec<ProvedEntry>, Internal> {
        let memo = Memo {
            hashes: &self.hashes,
            seen: RefCell::new(HashMap::default()),
        };
        indexes
            .iter()
            .map(|&index| {
                let entry = self.entry(index)?.ok_or_else(|| {
                    Internal::new("proving entries", format!("audit entry {index} is missing"))
                })?;
                let proof = merkle::prove_record(size, index, &memo)
                    .map_err(|e| Internal::new("proving inclusion", e))?;
                Ok(ProvedEntry { entry, proof })
            })
            .collect()
    }

    /// The consistency proof from the tree of `old` entries to that of `new`.
    pub fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal> {
        merkle::prove_tree(new, old, &self.hashes)
            .map_err(|e| Internal::new("proving consistency", e))
    }

    /// The latest signed checkpoint, if any.
    pub fn latest(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        let Some(raw) = self
            .meta
            .get(LOG_CHECKPOINT)
            .map_err(|e| Internal::new("reading the checkpoint", e))?
        else {
            return Ok(None);
        };
        let note = String::from_utf8(raw.to_vec())
            .map_err(|e| Internal::new("reading the checkpoint", e))?;
        let cp = checkpoint::open(&note, &self.signer.verifier())
            .map_err(|e| Internal::new("reading the checkpoint", e))?;
        Ok(Some(SignedCheckpoint {
            size: cp.size(),
            root: *cp.root(),
            note,
        }))
    }

    /// Signs a checkpoint of the tree as this node last committed it (not yet flushed), unless
    /// `previous` already covers it. Refuses to sign a tree that is not consistent with the last
    /// checkpoint.
    pub fn seal(
        &self,
        previous: Option<&SignedCheckpoint>,
    ) -> Result<Option<SignedCheckpoint>, Internal> {
        let stored = self.size()?;
        // The tree this node committed: other broker nodes sharing the database (PostgreSQL)
        // may have appended since, and seal their own trees. A stored log shorter than what
        // was committed, or than a checkpoint, is a store that lost entries: nothing is signed.
        let frontier = self.lock_frontier().clone();
        let size = frontier.size;
        if stored < size {
            return Err(Internal::new(
                "sealing the log",
                format!("the stored log has {stored} entries but its frontier {size}"),
            ));
        }
        if let Some(p) = previous {
            if p.size > stored {
                return Err(Internal::new(
                    "sealing the log",
                    format!("the log shrank from {} to {stored}", p.size),
                ));
            }
            if p.size >= size {
                return Ok(None);
            }
        }
        let root =
            merkle::tree_hash(size, &frontier).map_err(|e| Internal::new("hashing the tree", e))?;
        if let Some(p) = previous {
            let proof = self.prove_consistency(p.size, size)?;
            merkle::check_tree(&proof, size, &root, p.size, &p.root).map_err(|e| {
                Internal::new(
                    "sealing the log: new tree inconsistent with the last checkpoint",
                    e,
                )
            })?;
        }
        // A timestamp extension line would be optional; the body stays the C2SP minimum.
        let cp = Checkpoint::new(self.signer.name(), size, root)
            .map_err(|e| Internal::new("making a checkpoint", e))?;
        let note = checkpoint::sign(&cp, &self.signer)
            .map_err(|e| Internal::new("signing a checkpoint", e))?;
        // Made durable by the flush that follows (sled) or by the next commit (PostgreSQL);
        // one lost in a crash is harmless: the published checkpoint beside the database and
        // the entries already committed prove as much, and the next seal signs it again.
        self.meta
            .insert_unsynced(LOG_CHECKPOINT, note.as_bytes())
            .map_err(|e| Internal::new("storing the checkpoint", e))?;
        let sealed = SignedCheckpoint { note, size, root };
        *self.lock_unpublished() = Some(sealed.clone());
        Ok(Some(sealed))
    }

    fn lock_unpublished(&self) -> std::sync::MutexGuard<'_, Option<SignedCheckpoint>> {
        // Replaced whole, never torn.
        self.unpublished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the checkpoint sealed since the last call, once the flush that made it
    /// durable has returned: the file beside the database then never names a tree that the
    /// database could not have recovered. On failure it stays pending for the next flush.
    pub fn publish_sealed(&self) -> Result<(), Internal> {
        let mut pending = self.lock_unpublished();
        if let Some(cp) = pending.as_ref() {
            self.write_published(cp).map_err(|e| {
                Internal::new(
                    "publishing the checkpoint",
                    format!(
                        "{}: {e}",
                        self.dir.join(PUBLISHED_CHECKPOINT_FILE).display()
                    ),
                )
            })?;
            *pending = None;
        }
        Ok(())
    }

    /// Publishes the latest checkpoint in the database beside it, whatever was published.
    pub fn publish_latest(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        let Some(cp) = self.latest()? else {
            return Ok(None);
        };
        let mut next = self.lock_next_slot();
        publish(&self.dir, &cp).map_err(|e| Internal::new("publishing the checkpoint", e))?;
        *next = Some(1);
        Ok(Some(cp))
    }

    fn lock_next_slot(&self) -> std::sync::MutexGuard<'_, Option<usize>> {
        // Replaced whole, never torn.
        self.next_slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `cp` in the slot that does not hold the newest checkpoint (one write and
    /// one `fdatasync`), or, when the file is not laid out in slots yet or has gone, rewrites
    /// it whole. After a failed write the same slot is tried again: the other one still holds
    /// the checkpoint published before.
    fn write_published(&self, cp: &SignedCheckpoint) -> std::io::Result<()> {
        let mut next = self.lock_next_slot();
        match *next {
            Some(slot) => match write_slot(&self.dir, slot, cp) {
                Ok(()) => *next = Some(1 - slot),
                // The file has gone, or was replaced by one of the older layout.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
                    ) =>
                {
                    publish(&self.dir, cp)?;
                    *next = Some(1);
                }
                Err(e) => return Err(e),
            },
            None => {
                publish(&self.dir, cp)?;
                *next = Some(1);
            }
        }
        Ok(())
    }

    /// The checkpoint last published beside the database.
    pub fn published(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        read_published(&self.dir, &self.signer.verifier())
    }

    /// The root hash of the tree of the first `size` entries, from the stored hashes.
    pub fn root_at(&self, size: u64) -> Result<Hash, Internal> {
        merkle::tree_hash(size, &self.hashes).map_err(|e| Internal::new("hashing the tree", e))
    }

    /// Recomputes the leaf hashes of the newest `count` entries from the entries themselves
    /// and compares them with the stored hashes; returns the first disagreement, if any.
    pub fn check_tail(&self, count: u64) -> Result<Option<String>, Internal> {
        let size = self.size()?;
        let first = size.saturating_sub(count);
        let limit = usize::try_from(size - first).unwrap_or(usize::MAX);
        let entries = self.entries_from(first, limit)?;
        if entries.len() != limit {
            return Ok(Some(format!(
                "the log has {size} entries, but only {} of the newest {limit} could be read",
                entries.len()
            )));
        }
        for (k, entry) in entries.iter().enumerate() {
            let index = first + k as u64;
            let stored = match self.hashes.get(merkle::stored_hash_index(0, index)) {
                Ok(h) => h,
                Err(e) => return Ok(Some(format!("the hash of entry {index}: {e}"))),
            };
            if stored != merkle::leaf_hash(entry) {
                return Ok(Some(format!(
                    "entry {index} does not match its stored hash"
                )));
            }
        }
        Ok(None)
    }

    /// The verifier key clients need: `name+keyid+base64`.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The log's origin: its checkpoints' first line and its key's name.
    pub fn origin(&self) -> &str {
        self.signer.name()
    }
}

/// The current time as a protobuf timestamp, from the broker's [`crate::clock`].
pub fn now() -> prost_types::Timestamp {
    crate::clock::now_timestamp()
}

/// An entry recording `event` now.
pub fn entry(event: pb::audit_entry::Event) -> pb::AuditEntry {
    entry_at(now(), event)
}

/// An entry recording `event` at `time`.
pub fn entry_at(time: prost_types::Timestamp, event: pb::audit_entry::Event) -> pb::AuditEntry {
    pb::AuditEntry {
        time: Some(time),
        event: Some(event),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::store::kv::{self, Kv};

    /// Every stored hash of a log, computed apart from the store: the reference the store's
    /// proofs are compared with.
    #[derive(Default)]
    struct Reference(HashMap<u64, Hash>);

    impl HashReader for Reference {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
            indexes
                .iter()
                .map(|i| {
                    self.0
                        .get(i)
                        .copied()
                        .ok_or(MerkleError::MissingHash { index: *i })
                })
                .collect()
        }
    }

    fn test_entry(i: u64) -> pb::AuditEntry {
        let seconds = i64::try_from(i).unwrap();
        pb::AuditEntry {
            time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            event: None,
        }
    }

    /// Proofs read through the hash cache (one lock for a proof's hashes, the previous
    /// hash's bundle tried first; each commit's bundles kept there when it commits), through
    /// the batch memo of deliveries, and from the store alone after a restart, are those of
    /// the specification's algorithm over the same hashes, for every entry of trees of many
    /// sizes; and the entries read with them are the bytes appended.
    #[test]
    fn proofs_from_the_cache_and_from_the_store_are_the_specifications() {
        let dir = tempfile::tempdir().unwrap();
        let origin = "test/proofs";
        load_or_create_key(dir.path(), origin).unwrap();
        let kv = Kv::open_sled(&dir.path().join("db")).unwrap();
        let (entries, hashes, meta) = (
            kv.open_tree("log_entries").unwrap(),
            kv.open_tree("log_hashes").unwrap(),
            kv.open_tree("meta").unwrap(),
        );
        let open = || {
            let signer = load_key(dir.path(), origin).unwrap();
            Log::open(
                entries.clone(),
                hashes.clone(),
                meta.clone(),
                signer,
                dir.path(),
            )
            .unwrap()
        };
        let log = open();
        let mut reference = Reference::default();
        // Commits of 1 to 37 entries: bundles of every shape, 40 of them.
        let mut size = 0u64;
        let mut sizes = Vec::new();
        for commit in 0..40u64 {
            let n = 1 + (commit * 7) % 37;
            let appended = kv::transaction(&[&entries, &hashes, &meta], |view| {
                let [e, h, m] = view.array(0).unwrap();
                let tx = log.in_tx(e, h, m)?;
                for i in size..size + n {
                    tx.append(&test_entry(i))?;
                }
                tx.finish()
            })
            .unwrap();
            log.advance(appended);
            for i in size..size + n {
                let leaf = test_entry(i).encode_to_vec();
                let new = merkle::stored_hashes(i, &leaf, &reference).unwrap();
                let first = merkle::stored_hash_count(i);
                reference.0.extend((first..).zip(new));
            }
            size += n;
            sizes.push(size);
        }
        let check = |log: &Log| {
            for &t in sizes.iter().step_by(3).chain(sizes.last()) {
                let all: Vec<u64> = (0..t).collect();
                let batch = log.prove_entries(&all, t).unwrap();
                for n in 0..t {
                    let expected = merkle::prove_record(t, n, &reference).unwrap();
                    assert_eq!(log.prove_entry(n, t).unwrap(), expected, "entry {n} of {t}");
                    assert_eq!(batch[n as usize].proof, expected, "batch: entry {n} of {t}");
                    let bytes = test_entry(n).encode_to_vec();
                    assert_eq!(batch[n as usize].entry, bytes, "entry {n}'s bytes");
                    assert_eq!(log.entry(n).unwrap(), Some(bytes), "entry {n} alone");
                }
            }
        };
        check(&log);
        // A restarted broker's cache is empty: every bundle is read from the store first.
        drop(log);
        check(&open());
    }
}
