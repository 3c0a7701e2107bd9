//! The tamper-evident audit log: entries as leaves of an RFC 6962 Merkle tree, stored in sled
//! in the tlog stored-hash layout, and signed checkpoints over it.
//!
//! Entries are appended inside the same sled transaction as the change they describe (see
//! [`crate::store`]), so an acknowledged transfer always has its entry and no entry describes a
//! transfer that did not happen. After each group commit the writer signs a checkpoint of the
//! new tree (C2SP tlog-checkpoint as a signed note) with the broker's log key, after checking
//! that it is consistent with the previous one: the broker never signs a fork.

use std::{
    fs,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use concordat_proto::{
    checkpoint::{self, Checkpoint, LogSigner},
    merkle::{self, Hash, HashReader, MerkleError},
    pb,
};
use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::refusal::{Failure, Internal};

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

/// Loads the log key from `dir`, or creates it (mode 0600) on first start.
pub fn load_or_create_key(dir: &Path, origin: &str) -> Result<LogSigner, Internal> {
    let path = dir.join(LOG_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let signer = LogSigner::from_secret_string(text.trim()).map_err(|e| {
                Internal::new("reading the log key", format!("{}: {e}", path.display()))
            })?;
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
            Ok(signer)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = LogSigner::generate(origin)
                .map_err(|e| Internal::new("generating the log key", e))?;
            match write_secret(&path, signer.to_secret_string().as_bytes()) {
                Ok(()) => {}
                // Another process created it meanwhile: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_or_create_key(dir, origin);
                }
                Err(e) => return Err(Internal::new("writing the log key", e)),
            }
            tracing::info!(key = %signer.verifier_key(), "generated a new audit log key");
            Ok(signer)
        }
        Err(e) => Err(Internal::new("reading the log key", e)),
    }
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

/// Reads the stored hashes at `indexes` with `get`, which looks one up by its big-endian index.
fn read_with<E: std::error::Error + Send + Sync + 'static>(
    indexes: &[u64],
    get: impl Fn([u8; 8]) -> Result<Option<sled::IVec>, E>,
) -> Result<Vec<Hash>, MerkleError> {
    indexes
        .iter()
        .map(|i| {
            let v = get(i.to_be_bytes())
                .map_err(|e| MerkleError::Storage(Box::new(e)))?
                .ok_or(MerkleError::MissingHash { index: *i })?;
            Hash::from_slice(&v).map_err(|_| MerkleError::MalformedHash)
        })
        .collect()
}

/// Reads stored hashes from the committed tree.
pub struct TreeHashes<'a>(pub &'a sled::Tree);

impl HashReader for TreeHashes<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        read_with(indexes, |k| self.0.get(k))
    }
}

/// Reads stored hashes inside a transaction, seeing its own writes.
struct TxHashes<'a>(&'a TransactionalTree);

impl HashReader for TxHashes<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        read_with(indexes, |k| self.0.get(k))
    }
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The trees of the log, as seen inside a transaction.
pub struct TxLog<'a> {
    /// Entries by big-endian index.
    pub entries: &'a TransactionalTree,
    /// Stored hashes by big-endian stored-hash index.
    pub hashes: &'a TransactionalTree,
    /// Holds [`LOG_SIZE`].
    pub meta: &'a TransactionalTree,
}

impl TxLog<'_> {
    /// Appends `entry` and returns its index.
    pub fn append(
        &self,
        entry: &pb::AuditEntry,
    ) -> Result<u64, ConflictableTransactionError<Failure>> {
        let n = self
            .meta
            .get(LOG_SIZE)?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0);
        let bytes = entry.encode_to_vec();
        let new = merkle::stored_hashes(n, &bytes, &TxHashes(self.hashes)).map_err(|e| {
            ConflictableTransactionError::Abort(Failure::Internal(Internal::new(
                "hashing an audit entry",
                e,
            )))
        })?;
        let first = merkle::stored_hash_count(n);
        for (i, h) in new.iter().enumerate() {
            self.hashes
                .insert(&(first + i as u64).to_be_bytes(), &h.0)?;
        }
        self.entries.insert(&n.to_be_bytes(), bytes)?;
        self.meta.insert(LOG_SIZE, &(n + 1).to_be_bytes())?;
        Ok(n)
    }
}

/// The committed log: reads, proofs and checkpoint signing.
pub struct Log {
    /// Entries by big-endian index.
    pub entries: sled::Tree,
    /// Stored hashes.
    pub hashes: sled::Tree,
    meta: sled::Tree,
    signer: LogSigner,
}

impl Log {
    /// The log over these trees, signing with `signer`.
    pub fn new(
        entries: sled::Tree,
        hashes: sled::Tree,
        meta: sled::Tree,
        signer: LogSigner,
    ) -> Self {
        Log {
            entries,
            hashes,
            meta,
            signer,
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

    /// The entry at `index`.
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, Internal> {
        Ok(self
            .entries
            .get(index.to_be_bytes())
            .map_err(|e| Internal::new("reading an audit entry", e))?
            .map(|v| v.to_vec()))
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries.
    pub fn prove_entry(&self, index: u64, size: u64) -> Result<Vec<Hash>, Internal> {
        merkle::prove_record(size, index, &TreeHashes(&self.hashes))
            .map_err(|e| Internal::new("proving inclusion", e))
    }

    /// The consistency proof from the tree of `old` entries to that of `new`.
    pub fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, Internal> {
        merkle::prove_tree(new, old, &TreeHashes(&self.hashes))
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

    /// Signs a checkpoint of the tree as it now stands (not yet flushed), unless the latest one
    /// already covers it. Refuses to sign a tree that is not consistent with the last checkpoint.
    pub fn seal(
        &self,
        previous: Option<&SignedCheckpoint>,
    ) -> Result<Option<SignedCheckpoint>, Internal> {
        let size = self.size()?;
        if previous.is_some_and(|p| p.size == size) {
            return Ok(None);
        }
        let root = merkle::tree_hash(size, &TreeHashes(&self.hashes))
            .map_err(|e| Internal::new("hashing the tree", e))?;
        if let Some(p) = previous {
            if p.size > size {
                return Err(Internal::new(
                    "sealing the log",
                    format!("the log shrank from {} to {size}", p.size),
                ));
            }
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
        self.meta
            .insert(LOG_CHECKPOINT, note.as_bytes())
            .map_err(|e| Internal::new("storing the checkpoint", e))?;
        Ok(Some(SignedCheckpoint { note, size, root }))
    }

    /// The verifier key clients need: `name+keyid+base64`.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// An entry recording `event` now.
pub fn entry(event: pb::audit_entry::Event) -> pb::AuditEntry {
    pb::AuditEntry {
        time: Some(now()),
        event: Some(event),
    }
}
