//! The audit log's Merkle tree: RFC 6962 / RFC 9162 hashing, proofs and their verification,
//! kept in the append-only "stored hashes" layout of Go's `golang.org/x/mod/sumdb/tlog`.
//!
//! # Hashing
//!
//! A leaf is hashed as `SHA-256(0x00 || entry)` ([`leaf_hash`]), an interior node as
//! `SHA-256(0x01 || left || right)` ([`node_hash`]), and the tree of zero leaves has the root
//! `SHA-256("")` ([`EMPTY_TREE_HASH`]). The root of `n > 1` leaves is the node hash of the root of
//! the first `k` leaves and the root of the remaining `n - k`, where `k` is the largest power of
//! two smaller than `n` (RFC 9162 §2.1.1).
//!
//! # Stored-hash layout
//!
//! Appending record `n` stores its leaf hash followed by the hash of every subtree that this
//! record completes (one per trailing `1` bit of `n`), bottom-up. Every hash therefore has a
//! fixed position, [`stored_hash_index`]`(level, index)`, that never changes once written: the
//! storage is append-only and can be a key-value store keyed by the big-endian position. After
//! `n` records exactly [`stored_hash_count`]`(n)` hashes are stored (just under two per record).
//! The first positions are:
//!
//! | position | 0     | 1     | 2     | 3     | 4     | 5     | 6     | 7     |
//! |----------|-------|-------|-------|-------|-------|-------|-------|-------|
//! | (level, index) | (0,0) | (0,1) | (1,0) | (0,2) | (0,3) | (1,1) | (2,0) | (0,4) |
//!
//! Any root, inclusion proof or consistency proof is then assembled from at most `2·log₂ n`
//! stored hashes (perfect subtrees), read with one [`HashReader::read_hashes`] call.
//!
//! # Verification
//!
//! [`check_record`] and [`check_tree`] are the RFC 9162 §2.1.3.2 and §2.1.4.2 algorithms; they
//! need only the proof, the sizes and the roots (no storage), consume every proof hash, refuse
//! proofs with a missing or surplus hash, and allocate nothing. Proofs generated here are
//! byte-for-byte the RFC 6962 `PATH` and `PROOF` lists, so any RFC 6962 verifier accepts them.
//!
//! A proof binds a leaf (or an old root) to a *(size, root)* pair: the verifier must take both
//! from the same signed checkpoint. Checked against a size that does not belong to the root,
//! a proof proves nothing, and for some shapes the arithmetic still closes (the proof of record
//! 0 in a tree of 3 also "verifies" as size 4 with the size-3 root).
//!
//! # Why this is not a wrapper around `tlog_tiles`
//!
//! `tlog_tiles` 0.2 (cloudflare/azul, a port of Go's tlog) was evaluated first. It uses the same
//! `sha2` 0.10, but it would add a second `base64` (0.21) and a second `thiserror` (1.x), and it
//! makes `url` — with `idna` and about thirty ICU crates — a normal dependency although only its
//! own tests use it. Its functions `assert!` on a [`HashReader`] that returns the wrong number of
//! hashes (a panic reachable from a storage fault), its error enum has no variant to carry a
//! storage error, and its verifiers copy the proof at every level. The algorithms are about 300
//! lines, so they are written here against the RFC and Go's published layout instead.

use std::error::Error as StdError;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// The size in bytes of a [`Hash`](struct@Hash).
pub const HASH_SIZE: usize = 32;

/// The largest tree size that the functions reading stored hashes accept (2^62 records).
///
/// Below it every position computed by [`stored_hash_index`] fits in a `u64`.
pub const MAX_TREE_SIZE: u64 = 1 << 62;

/// The root hash of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1).
pub const EMPTY_TREE_HASH: Hash = Hash([
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
]);

/// A SHA-256 hash of a leaf, an interior node or a tree root.
///
/// `Display` and [`FromStr`] use standard padded base64 (RFC 4648 §4), the form used in
/// checkpoints and by Go's tlog; `Debug` prints lowercase hex, the form of the RFC test vectors.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; HASH_SIZE]);

impl Hash {
    /// Returns the 32 bytes of the hash.
    pub const fn as_bytes(&self) -> &[u8; HASH_SIZE] {
        &self.0
    }

    /// Reads a hash from exactly 32 bytes (for example a value read back from storage).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, MerkleError> {
        <[u8; HASH_SIZE]>::try_from(bytes)
            .map(Hash)
            .map_err(|_| MerkleError::MalformedHash)
    }

    /// Encodes the hash as lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Decodes a hash from 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, MerkleError> {
        let mut out = [0u8; HASH_SIZE];
        hex::decode_to_slice(s, &mut out).map_err(|_| MerkleError::MalformedHash)?;
        Ok(Hash(out))
    }

    /// Encodes the hash as standard padded base64 (44 characters).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Decodes a hash from standard padded base64, refusing any other length or a
    /// non-canonical encoding.
    pub fn from_base64(s: &str) -> Result<Self, MerkleError> {
        // 32 bytes are always 44 characters; checking first bounds the work on hostile input.
        if s.len() != 44 {
            return Err(MerkleError::MalformedHash);
        }
        let bytes = BASE64.decode(s).map_err(|_| MerkleError::MalformedHash)?;
        Self::from_slice(&bytes)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl FromStr for Hash {
    type Err = MerkleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl From<[u8; HASH_SIZE]> for Hash {
    fn from(bytes: [u8; HASH_SIZE]) -> Self {
        Hash(bytes)
    }
}

impl AsRef<[u8]> for Hash {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Why a Merkle tree operation or a proof verification failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MerkleError {
    /// The proof does not prove the claim: a hash is wrong, missing or surplus, or the index,
    /// sizes or roots it was checked against are not the ones it was made for.
    #[error("invalid Merkle proof")]
    InvalidProof,
    /// A record index is not inside the tree (`index >= size`).
    #[error("record {index} is not in a tree of size {size}")]
    IndexOutOfRange {
        /// The record index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A consistency check or proof was asked from a larger old tree to a smaller new one.
    #[error("old tree size {old} is larger than new tree size {new}")]
    SizesOutOfOrder {
        /// The old (smaller) tree size.
        old: u64,
        /// The new (larger) tree size.
        new: u64,
    },
    /// The tree size exceeds [`MAX_TREE_SIZE`].
    #[error("tree size {size} exceeds the supported maximum")]
    TreeTooLarge {
        /// The tree size asked for.
        size: u64,
    },
    /// The hash storage does not hold the hash at this stored-hash index.
    #[error("no stored hash at index {index}")]
    MissingHash {
        /// The stored-hash index (see [`stored_hash_index`]).
        index: u64,
    },
    /// A [`HashReader`] returned a different number of hashes than it was asked for.
    #[error("hash reader returned {got} hashes, {expected} were asked for")]
    ShortRead {
        /// How many hashes were asked for.
        expected: usize,
        /// How many came back.
        got: usize,
    },
    /// The hash storage failed (the source is the storage's own error).
    #[error("hash storage failed")]
    Storage(#[source] Box<dyn StdError + Send + Sync>),
    /// A hash was not 32 bytes, or not in the expected hex or base64 form.
    #[error("malformed hash")]
    MalformedHash,
}

/// Returns the leaf hash of an audit entry: `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    Hash(h.finalize().into())
}

/// Returns the hash of an interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    // The RFC input, 0x01 || left || right, hashed in one piece.
    let mut input = [0u8; 1 + 2 * HASH_SIZE];
    input[0] = 0x01;
    input[1..=HASH_SIZE].copy_from_slice(&left.0);
    input[1 + HASH_SIZE..].copy_from_slice(&right.0);
    Hash(Sha256::digest(input).into())
}

/// Reads stored hashes by their stored-hash index (see [`stored_hash_index`]).
///
/// The broker implements it over its key-value store; `[Hash]` and `Vec<Hash>` implement it
/// with the hash at stored index `i` at position `i`, which is what tests and small tools need.
pub trait HashReader {
    /// Returns the hashes at `indexes`, in the same order and the same number.
    ///
    /// The functions of this module ask for increasing indexes, so a store can read them in one
    /// forward scan. A missing hash should be reported as [`MerkleError::MissingHash`] and a
    /// storage failure as [`MerkleError::Storage`]; a result of the wrong length is refused by
    /// the callers with [`MerkleError::ShortRead`].
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError>;
}

impl HashReader for [Hash] {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        indexes
            .iter()
            .map(|&index| {
                usize::try_from(index)
                    .ok()
                    .and_then(|i| self.get(i))
                    .copied()
                    .ok_or(MerkleError::MissingHash { index })
            })
            .collect()
    }
}

impl HashReader for Vec<Hash> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
        self.as_slice().read_hashes(indexes)
    }
}

/// Returns the storage position of the hash of the perfect subtree at `level` (0 = leaves) and
/// position `n` within that level, i.e. the subtree over records `[n·2^level, (n+1)·2^level)`.
///
/// That hash is appended together with the subtree's last record `r = (n+1)·2^level − 1`. Before
/// record `r` come `r` leaf hashes and, for each earlier record `i`, one hash per trailing one
/// bit of `i`, which adds up to `r − popcount(r)`; the leaf hash of `r` is followed by its
/// completed subtrees level by level. Hence the closed form
/// `stored_hash_index(level, n) = 2r − popcount(r) + level`, which equals Go tlog's
/// `StoredHashIndex`.
///
/// The result is exact for every node of a tree of at most [`MAX_TREE_SIZE`] records; outside
/// that domain it wraps around (it never panics).
pub fn stored_hash_index(level: u8, n: u64) -> u64 {
    let last_record = n
        .wrapping_add(1)
        .wrapping_shl(u32::from(level))
        .wrapping_sub(1);
    leaf_position(last_record).wrapping_add(u64::from(level))
}

/// Returns `(level, n)` such that [`stored_hash_index`]`(level, n) == index`: the inverse of
/// [`stored_hash_index`], for tools that walk the storage.
pub fn split_stored_hash_index(index: u64) -> (u8, u64) {
    // The leaf of record r is at 2r - popcount(r) (computed in u128 so that nothing wraps), so
    // the record that appended `index` is at least index/2 and at most about 64 records later.
    let position = |r: u64| 2 * u128::from(r) - u128::from(r.count_ones());
    let target = u128::from(index);
    let mut record = index / 2;
    while record < u64::MAX && position(record + 1) <= target {
        record += 1;
    }
    // A record appends at most 64 hashes, so the level fits in a u8.
    let level = u8::try_from(target.saturating_sub(position(record))).unwrap_or(u8::MAX);
    (level, record.checked_shr(u32::from(level)).unwrap_or(0))
}

/// Returns the number of hashes stored for a tree of `n` records: `2n − popcount(n)`.
///
/// It is also the position where the leaf hash of record `n` will be stored.
pub fn stored_hash_count(n: u64) -> u64 {
    leaf_position(n)
}

/// The stored position of the leaf hash of record `r`: `2r − popcount(r)` (wrapping).
fn leaf_position(r: u64) -> u64 {
    r.wrapping_mul(2).wrapping_sub(u64::from(r.count_ones()))
}

/// Returns the hashes to append to the storage when adding record `n` (0-based) with contents
/// `entry`: its leaf hash, then the hash of each subtree it completes, bottom-up.
///
/// They go at positions `stored_hash_count(n)`, `stored_hash_count(n) + 1`, … The `reader`
/// must hold the hashes of records `0..n`; at most `log₂ n` of them are read.
pub fn stored_hashes<R: HashReader + ?Sized>(
    n: u64,
    entry: &[u8],
    reader: &R,
) -> Result<Vec<Hash>, MerkleError> {
    stored_hashes_for_leaf(n, &leaf_hash(entry), reader)
}

/// Like [`stored_hashes`], but takes the record's leaf hash instead of its contents.
pub fn stored_hashes_for_leaf<R: HashReader + ?Sized>(
    n: u64,
    leaf: &Hash,
    reader: &R,
) -> Result<Vec<Hash>, MerkleError> {
    if n >= MAX_TREE_SIZE {
        return Err(MerkleError::TreeTooLarge {
            size: n.saturating_add(1),
        });
    }
    // Record n completes one subtree per trailing one bit. At level i the left sibling is
    // subtree (i, (n >> i) - 1); higher levels come first so that the indexes increase.
    let completed = n.trailing_ones();
    let indexes: Vec<u64> = (0..completed)
        .rev()
        .map(|level| stored_hash_index(level as u8, (n >> level) - 1))
        .collect();
    let siblings = read_exact(reader, &indexes)?;
    let mut out = Vec::with_capacity(indexes.len() + 1);
    let mut h = *leaf;
    out.push(h);
    for sibling in siblings.iter().rev() {
        h = node_hash(sibling, &h);
        out.push(h);
    }
    Ok(out)
}

/// Returns the root hash of the tree made of the first `n` records.
pub fn tree_hash<R: HashReader + ?Sized>(n: u64, reader: &R) -> Result<Hash, MerkleError> {
    if n == 0 {
        return Ok(EMPTY_TREE_HASH);
    }
    if n > MAX_TREE_SIZE {
        return Err(MerkleError::TreeTooLarge { size: n });
    }
    let roots = subtree_hashes(&[(0, n)], reader)?;
    roots.first().copied().ok_or(MerkleError::ShortRead {
        expected: 1,
        got: 0,
    })
}

/// Returns the inclusion proof of record `n` in the tree of the first `t` records: the RFC 6962
/// `PATH(n, D[0:t])`, from the leaf's sibling up to the child of the root.
pub fn prove_record<R: HashReader + ?Sized>(
    t: u64,
    n: u64,
    reader: &R,
) -> Result<Vec<Hash>, MerkleError> {
    if t > MAX_TREE_SIZE {
        return Err(MerkleError::TreeTooLarge { size: t });
    }
    if n >= t {
        return Err(MerkleError::IndexOutOfRange { index: n, size: t });
    }
    // Walk from the root down to leaf n, noting the subtree not taken at each step.
    let (mut lo, mut hi) = (0, t);
    let mut siblings = Vec::new();
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if n < lo + k {
            siblings.push((lo + k, hi));
            hi = lo + k;
        } else {
            siblings.push((lo, lo + k));
            lo += k;
        }
    }
    siblings.reverse();
    subtree_hashes(&siblings, reader)
}

/// Verifies that `proof` shows record `n`, whose leaf hash is `leaf_hash`, to be in the tree of
/// size `t` whose root is `tree_hash` (RFC 9162 §2.1.3.2).
///
/// Every proof hash is used; a proof with a changed, missing or extra hash fails, and so does
/// one checked against another index, or against the root of another size.
pub fn check_record(
    proof: &[Hash],
    t: u64,
    tree_hash: &Hash,
    n: u64,
    leaf_hash: &Hash,
) -> Result<(), MerkleError> {
    if n >= t {
        return Err(MerkleError::IndexOutOfRange { index: n, size: t });
    }
    // `f` is the position of the running node within its level and `s` the position of the
    // last node of that level; both shift right as the walk goes up.
    let (mut f, mut s) = (n, t - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s == 0 {
            // The walk has reached the root but hashes remain.
            return Err(MerkleError::InvalidProof);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                // The running node is the last of its level and has no right sibling: it moves
                // up unchanged until it becomes a right child (or reaches the top).
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s == 0 && r == *tree_hash {
        Ok(())
    } else {
        Err(MerkleError::InvalidProof)
    }
}

/// Returns the consistency proof from the tree of the first `n` records to the tree of the
/// first `t` records: the RFC 6962 `PROOF(n, D[0:t])`.
///
/// The proof is empty when `n == 0` or `n == t`, for which nothing needs proving.
pub fn prove_tree<R: HashReader + ?Sized>(
    t: u64,
    n: u64,
    reader: &R,
) -> Result<Vec<Hash>, MerkleError> {
    if t > MAX_TREE_SIZE {
        return Err(MerkleError::TreeTooLarge { size: t });
    }
    if n > t {
        return Err(MerkleError::SizesOutOfOrder { old: n, new: t });
    }
    if n == 0 || n == t {
        return Ok(Vec::new());
    }
    // RFC 6962 SUBPROOF(n, D[lo:hi], whole), walked from the root down; `whole` is true while
    // [lo, hi) starts at 0, where the verifier already knows the old root.
    let (mut lo, mut hi) = (0, t);
    let mut whole = true;
    let mut ranges = Vec::new();
    while n != hi {
        let k = split_point(hi - lo);
        if n <= lo + k {
            ranges.push((lo + k, hi));
            hi = lo + k;
        } else {
            ranges.push((lo, lo + k));
            lo += k;
            whole = false;
        }
    }
    if !whole {
        ranges.push((lo, hi));
    }
    ranges.reverse();
    subtree_hashes(&ranges, reader)
}

/// Verifies that `proof` shows the tree of size `n` with root `h` to be a prefix of the tree of
/// size `t` with root `th` (RFC 9162 §2.1.4.2).
///
/// Trivial cases: with `n == t` the proof must be empty and the roots equal; with `n == 0` the
/// proof must be empty and `h` must be [`EMPTY_TREE_HASH`]. Otherwise every proof hash is used,
/// and a changed, missing or extra hash, or other sizes or roots, make the check fail.
pub fn check_tree(proof: &[Hash], t: u64, th: &Hash, n: u64, h: &Hash) -> Result<(), MerkleError> {
    if n > t {
        return Err(MerkleError::SizesOutOfOrder { old: n, new: t });
    }
    if n == t {
        return if proof.is_empty() && h == th && (n > 0 || *h == EMPTY_TREE_HASH) {
            Ok(())
        } else {
            Err(MerkleError::InvalidProof)
        };
    }
    if n == 0 {
        return if proof.is_empty() && *h == EMPTY_TREE_HASH {
            Ok(())
        } else {
            Err(MerkleError::InvalidProof)
        };
    }
    if proof.is_empty() {
        return Err(MerkleError::InvalidProof);
    }
    // When n is a power of two the old tree is a complete subtree of the new one, its root is
    // not sent, and the verifier starts from the old root it already has.
    let known_start = n.is_power_of_two().then_some(h);
    let mut path = known_start.into_iter().chain(proof.iter());
    let (mut f, mut s) = (n - 1, t - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let first = path.next().ok_or(MerkleError::InvalidProof)?;
    let (mut fr, mut sr) = (*first, *first);
    for c in path {
        if s == 0 {
            return Err(MerkleError::InvalidProof);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s == 0 && fr == *h && sr == *th {
        Ok(())
    } else {
        Err(MerkleError::InvalidProof)
    }
}

/// The largest power of two strictly smaller than `size` (the RFC's `k`); `size` must be ≥ 2.
fn split_point(size: u64) -> u64 {
    1 << (63 - (size - 1).leading_zeros())
}

/// Reads `indexes` and refuses a result of the wrong length.
fn read_exact<R: HashReader + ?Sized>(
    reader: &R,
    indexes: &[u64],
) -> Result<Vec<Hash>, MerkleError> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = reader.read_hashes(indexes)?;
    if hashes.len() != indexes.len() {
        return Err(MerkleError::ShortRead {
            expected: indexes.len(),
            got: hashes.len(),
        });
    }
    Ok(hashes)
}

/// Returns the hash of each record range `[lo, hi)`, reading all the stored hashes they need in
/// one call.
///
/// Each range must start at a multiple of a power of two that is at least its length, which
/// holds for the whole tree and for every subtree the RFC recursion produces. Such a range is
/// the concatenation of the perfect subtrees given by the binary digits of its length, largest
/// first, and its hash folds them from the right.
fn subtree_hashes<R: HashReader + ?Sized>(
    ranges: &[(u64, u64)],
    reader: &R,
) -> Result<Vec<Hash>, MerkleError> {
    let mut indexes = Vec::new();
    for &(lo, hi) in ranges {
        let mut lo = lo;
        while lo < hi {
            let level = 63 - (hi - lo).leading_zeros();
            indexes.push(stored_hash_index(level as u8, lo >> level));
            lo += 1 << level;
        }
    }
    let hashes = read_exact(reader, &indexes)?;
    let mut rest = hashes.as_slice();
    let mut out = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges {
        let pieces = (hi - lo).count_ones() as usize;
        let (mine, tail) = rest
            .split_at_checked(pieces)
            .ok_or(MerkleError::ShortRead {
                expected: indexes.len(),
                got: hashes.len(),
            })?;
        rest = tail;
        let mut iter = mine.iter().rev();
        let last = iter.next().ok_or(MerkleError::ShortRead {
            expected: indexes.len(),
            got: hashes.len(),
        })?;
        out.push(iter.fold(*last, |acc, left| node_hash(left, &acc)));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const VECTORS: &str = include_str!("../testdata/rfc6962-vectors.json");

    // ---- Reference implementation, straight from the RFC 6962 §2.1 definitions. ----

    fn naive_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => EMPTY_TREE_HASH,
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
            }
        }
    }

    fn naive_path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split_point(n as u64) as usize;
        if m < k {
            let mut p = naive_path(m, &leaves[..k]);
            p.push(naive_root(&leaves[k..]));
            p
        } else {
            let mut p = naive_path(m - k, &leaves[k..]);
            p.push(naive_root(&leaves[..k]));
            p
        }
    }

    fn naive_subproof(m: usize, leaves: &[Hash], whole: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if whole {
                Vec::new()
            } else {
                vec![naive_root(leaves)]
            };
        }
        let k = split_point(n as u64) as usize;
        if m <= k {
            let mut p = naive_subproof(m, &leaves[..k], whole);
            p.push(naive_root(&leaves[k..]));
            p
        } else {
            let mut p = naive_subproof(m - k, &leaves[k..], false);
            p.push(naive_root(&leaves[..k]));
            p
        }
    }

    // ---- Helpers. ----

    /// An in-memory log: the stored hashes plus the leaf hashes for the reference functions.
    struct Log {
        stored: Vec<Hash>,
        leaves: Vec<Hash>,
    }

    impl Log {
        fn new() -> Self {
            Log {
                stored: Vec::new(),
                leaves: Vec::new(),
            }
        }

        fn append(&mut self, entry: &[u8]) {
            let n = self.leaves.len() as u64;
            assert_eq!(self.stored.len() as u64, stored_hash_count(n));
            let new = stored_hashes(n, entry, &self.stored).unwrap();
            self.stored.extend(new);
            self.leaves.push(leaf_hash(entry));
            assert_eq!(self.stored.len() as u64, stored_hash_count(n + 1));
        }

        fn root(&self, size: u64) -> Hash {
            tree_hash(size, &self.stored).unwrap()
        }
    }

    fn random_log(rng: &mut StdRng, size: usize) -> Log {
        let mut log = Log::new();
        for i in 0..size {
            let len = rng.gen_range(0..48);
            let mut entry: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            // Distinct entries, so that no two leaves share a hash.
            entry.extend_from_slice(&(i as u64).to_be_bytes());
            log.append(&entry);
        }
        log
    }

    fn random_hash(rng: &mut StdRng) -> Hash {
        Hash(rng.r#gen())
    }

    fn hex_hashes(v: &serde_json::Value) -> Vec<Hash> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| Hash::from_hex(h.as_str().unwrap()).unwrap())
            .collect()
    }

    /// Every one-component change of a valid inclusion proof, each of which must be refused.
    fn inclusion_mutations(
        rng: &mut StdRng,
        log: &Log,
        proof: &[Hash],
        t: u64,
        n: u64,
    ) -> Vec<(String, Vec<Hash>, u64, Hash, u64, Hash)> {
        let root = log.root(t);
        let leaf = log.leaves[n as usize];
        let mut out = Vec::new();
        for i in 0..proof.len() {
            let mut p = proof.to_vec();
            p[i].0[rng.gen_range(0..HASH_SIZE)] ^= 1 << rng.gen_range(0..8);
            out.push((format!("flipped bit in proof[{i}]"), p, t, root, n, leaf));
            let mut p = proof.to_vec();
            p.remove(i);
            out.push((format!("dropped proof[{i}]"), p, t, root, n, leaf));
        }
        for i in 0..=proof.len() {
            // A random hash, or one that the verifier holds anyway, in turn.
            let extra = [random_hash(rng), root, leaf][i % 3];
            let mut p = proof.to_vec();
            p.insert(i, extra);
            out.push((format!("inserted {extra:?} at {i}"), p, t, root, n, leaf));
        }
        for other in [n.wrapping_sub(1), n + 1, n ^ 1, n ^ 2, t] {
            if other != n {
                out.push((
                    format!("index {other}"),
                    proof.to_vec(),
                    t,
                    root,
                    other,
                    leaf,
                ));
                if let Some(&other_leaf) = log.leaves.get(other as usize) {
                    let p = proof.to_vec();
                    out.push((format!("index+leaf {other}"), p, t, root, other, other_leaf));
                }
            }
        }
        for other in [t - 1, t + 1, t * 2, t / 2] {
            if other != t && other > n && other as usize <= log.leaves.len() {
                let p = proof.to_vec();
                out.push((format!("size {other}"), p, other, log.root(other), n, leaf));
            }
        }
        out.push((
            "empty root".into(),
            proof.to_vec(),
            t,
            EMPTY_TREE_HASH,
            n,
            leaf,
        ));
        out.push((
            "wrong leaf".into(),
            proof.to_vec(),
            t,
            root,
            n,
            leaf_hash(b"x"),
        ));
        if t > 1 {
            // In a one-leaf tree the leaf hash is the root, so this is no mutation there.
            out.push(("leaf as root".into(), proof.to_vec(), t, leaf, n, leaf));
        }
        out
    }

    /// Every one-component change of a valid consistency proof, each of which must be refused.
    fn consistency_mutations(
        rng: &mut StdRng,
        log: &Log,
        proof: &[Hash],
        t: u64,
        n: u64,
    ) -> Vec<(String, Vec<Hash>, u64, Hash, u64, Hash)> {
        let (root_t, root_n) = (log.root(t), log.root(n));
        let mut out = Vec::new();
        for i in 0..proof.len() {
            let mut p = proof.to_vec();
            p[i].0[rng.gen_range(0..HASH_SIZE)] ^= 1 << rng.gen_range(0..8);
            out.push((
                format!("flipped bit in proof[{i}]"),
                p,
                t,
                root_t,
                n,
                root_n,
            ));
            let mut p = proof.to_vec();
            p.remove(i);
            out.push((format!("dropped proof[{i}]"), p, t, root_t, n, root_n));
        }
        for i in 0..=proof.len() {
            let extra = [random_hash(rng), root_t, root_n][i % 3];
            let mut p = proof.to_vec();
            p.insert(i, extra);
            out.push((
                format!("inserted {extra:?} at {i}"),
                p,
                t,
                root_t,
                n,
                root_n,
            ));
        }
        for other in [n - 1, n + 1, n ^ 1, n ^ 2] {
            if other != n && other >= 1 && other < t {
                let p = proof.to_vec();
                out.push((
                    format!("old size {other}"),
                    p,
                    t,
                    root_t,
                    other,
                    log.root(other),
                ));
                let p = proof.to_vec();
                out.push((
                    format!("old size {other}, same root"),
                    p,
                    t,
                    root_t,
                    other,
                    root_n,
                ));
            }
        }
        for other in [t - 1, t + 1, t * 2] {
            if other != t && other > n && other as usize <= log.leaves.len() {
                let p = proof.to_vec();
                out.push((
                    format!("new size {other}"),
                    p,
                    other,
                    log.root(other),
                    n,
                    root_n,
                ));
            }
        }
        out.push(("swapped roots".into(), proof.to_vec(), t, root_n, n, root_t));
        out.push(("empty proof".into(), Vec::new(), t, root_t, n, root_n));
        out.push((
            "wrong old root".into(),
            proof.to_vec(),
            t,
            root_t,
            n,
            random_hash(rng),
        ));
        out.push((
            "wrong new root".into(),
            proof.to_vec(),
            t,
            random_hash(rng),
            n,
            root_n,
        ));
        out
    }

    // ---- Tests. ----

    #[test]
    fn empty_tree_hash_is_sha256_of_nothing() {
        let digest: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(EMPTY_TREE_HASH, Hash(digest));
        assert_eq!(tree_hash(0, &Vec::new()).unwrap(), EMPTY_TREE_HASH);
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        let entry = b"audit entry";
        let mut buf = vec![0x00];
        buf.extend_from_slice(entry);
        let want: [u8; 32] = Sha256::digest(&buf).into();
        assert_eq!(leaf_hash(entry), Hash(want));

        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut buf = vec![0x01];
        buf.extend_from_slice(&a.0);
        buf.extend_from_slice(&b.0);
        let want: [u8; 32] = Sha256::digest(&buf).into();
        assert_eq!(node_hash(&a, &b), Hash(want));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
        // A 64-byte entry must not hash like the node made of its two halves.
        let mut entry64 = a.0.to_vec();
        entry64.extend_from_slice(&b.0);
        assert_ne!(leaf_hash(&entry64), node_hash(&a, &b));
    }

    #[test]
    fn stored_hash_index_follows_go_layout() {
        // (level, n, position): the append order of records 0..=8 in Go's tlog.
        let table = [
            (0, 0, 0),
            (0, 1, 1),
            (1, 0, 2),
            (0, 2, 3),
            (0, 3, 4),
            (1, 1, 5),
            (2, 0, 6),
            (0, 4, 7),
            (0, 5, 8),
            (1, 2, 9),
            (0, 6, 10),
            (0, 7, 11),
            (1, 3, 12),
            (2, 1, 13),
            (3, 0, 14),
            (0, 8, 15),
        ];
        for (level, n, position) in table {
            assert_eq!(stored_hash_index(level, n), position, "({level}, {n})");
            assert_eq!(split_stored_hash_index(position), (level, n));
        }
        // Go's definition, for comparison: level L's n-th hash follows level L+1's, and level
        // 0's n-th hash is at n + n/2 + n/4 + ...
        let go = |level: u8, n: u64| {
            let mut n = n;
            for _ in 0..level {
                n = 2 * n + 1;
            }
            let mut i = 0;
            while n > 0 {
                i += n;
                n >>= 1;
            }
            i + u64::from(level)
        };
        for level in 0..20u8 {
            for n in 0..2000u64 {
                assert_eq!(stored_hash_index(level, n), go(level, n), "({level}, {n})");
            }
        }
        for (size, count) in [(0, 0), (1, 1), (2, 3), (3, 4), (4, 7), (5, 8), (8, 15)] {
            assert_eq!(stored_hash_count(size), count, "count({size})");
        }
        // Near the top of the supported range the closed form is still exact.
        let big = MAX_TREE_SIZE - 1;
        assert_eq!(split_stored_hash_index(stored_hash_index(0, big)), (0, big));
        assert_eq!(split_stored_hash_index(stored_hash_index(62, 0)), (62, 0));
    }

    #[test]
    fn split_stored_hash_index_inverts_every_position() {
        for index in 0..20_000u64 {
            let (level, n) = split_stored_hash_index(index);
            assert_eq!(stored_hash_index(level, n), index, "index {index}");
        }
        // The extreme input must not panic.
        let _ = split_stored_hash_index(u64::MAX);
    }

    #[test]
    fn every_stored_hash_is_the_root_of_its_subtree() {
        let mut rng = StdRng::seed_from_u64(1);
        let log = random_log(&mut rng, 300);
        for (index, stored) in log.stored.iter().enumerate() {
            let (level, n) = split_stored_hash_index(index as u64);
            let lo = (n << level) as usize;
            let hi = ((n + 1) << level) as usize;
            assert_eq!(*stored, naive_root(&log.leaves[lo..hi]), "position {index}");
        }
    }

    #[test]
    fn rfc6962_reference_vectors() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let mut log = Log::new();
        for leaf in v["leaves"].as_array().unwrap() {
            log.append(&hex::decode(leaf.as_str().unwrap()).unwrap());
        }
        let mut roots = Vec::new();
        for r in v["roots"].as_array().unwrap() {
            let size = r["size"].as_u64().unwrap();
            let root = Hash::from_hex(r["root"].as_str().unwrap()).unwrap();
            assert_eq!(log.root(size), root, "root of size {size}");
            assert_eq!(roots.len() as u64, size);
            roots.push(root);
        }
        assert_eq!(roots.len(), 9);

        let mut rng = StdRng::seed_from_u64(6962);
        let inclusion = v["inclusion"].as_array().unwrap();
        assert_eq!(inclusion.len(), 5);
        for case in inclusion {
            let (n, t) = (
                case["index"].as_u64().unwrap(),
                case["size"].as_u64().unwrap(),
            );
            let want = hex_hashes(&case["proof"]);
            assert_eq!(
                prove_record(t, n, &log.stored).unwrap(),
                want,
                "PATH({n}, {t})"
            );
            let leaf = log.leaves[n as usize];
            check_record(&want, t, &roots[t as usize], n, &leaf).unwrap();
            for (desc, p, t2, root, n2, leaf) in inclusion_mutations(&mut rng, &log, &want, t, n) {
                assert!(
                    check_record(&p, t2, &root, n2, &leaf).is_err(),
                    "PATH({n}, {t}) accepted with {desc}"
                );
            }
        }

        let consistency = v["consistency"].as_array().unwrap();
        assert_eq!(consistency.len(), 5);
        for case in consistency {
            let (n, t) = (
                case["size1"].as_u64().unwrap(),
                case["size2"].as_u64().unwrap(),
            );
            let want = hex_hashes(&case["proof"]);
            assert_eq!(
                prove_tree(t, n, &log.stored).unwrap(),
                want,
                "PROOF({n}, {t})"
            );
            check_tree(&want, t, &roots[t as usize], n, &roots[n as usize]).unwrap();
            if n < t {
                for (desc, p, t2, th, n2, h) in consistency_mutations(&mut rng, &log, &want, t, n) {
                    assert!(
                        check_tree(&p, t2, &th, n2, &h).is_err(),
                        "PROOF({n}, {t}) accepted with {desc}"
                    );
                }
            }
        }

        // Every other pair of the eight-leaf tree, against the reference definitions.
        for t in 1..=8u64 {
            for n in 0..t {
                let p = prove_record(t, n, &log.stored).unwrap();
                assert_eq!(p, naive_path(n as usize, &log.leaves[..t as usize]));
                check_record(&p, t, &roots[t as usize], n, &log.leaves[n as usize]).unwrap();
            }
            for n in 0..=t {
                let p = prove_tree(t, n, &log.stored).unwrap();
                check_tree(&p, t, &roots[t as usize], n, &roots[n as usize]).unwrap();
            }
        }
    }

    #[test]
    fn roots_at_edge_sizes_match_the_rfc_definition() {
        let mut rng = StdRng::seed_from_u64(2);
        let log = random_log(&mut rng, 1025);
        let mut sizes = vec![0u64, 1, 2, 3];
        for k in 2..=10 {
            sizes.extend([(1 << k) - 1, 1 << k, (1 << k) + 1]);
        }
        for size in sizes {
            let want = naive_root(&log.leaves[..size as usize]);
            assert_eq!(log.root(size), want, "size {size}");
            if size > 0 {
                // The first, middle and last records of each edge size.
                for n in [0, size / 2, size - 1] {
                    let p = prove_record(size, n, &log.stored).unwrap();
                    assert_eq!(p, naive_path(n as usize, &log.leaves[..size as usize]));
                    check_record(&p, size, &want, n, &log.leaves[n as usize]).unwrap();
                }
            }
        }
    }

    #[test]
    fn proofs_match_the_rfc_definition_for_small_trees() {
        let mut rng = StdRng::seed_from_u64(3);
        let log = random_log(&mut rng, 70);
        for t in 1..=70u64 {
            let leaves = &log.leaves[..t as usize];
            for n in 0..t {
                let p = prove_record(t, n, &log.stored).unwrap();
                assert_eq!(p, naive_path(n as usize, leaves), "PATH({n}, {t})");
            }
            for n in 1..t {
                let p = prove_tree(t, n, &log.stored).unwrap();
                assert_eq!(
                    p,
                    naive_subproof(n as usize, leaves, true),
                    "PROOF({n}, {t})"
                );
            }
        }
    }

    #[test]
    fn property_every_proof_verifies_and_every_mutation_fails() {
        const SIZE: u64 = 300;
        // Every proof of these trees is checked; beyond, a sample (debug-build SHA-256 is slow).
        const EXHAUSTIVE: u64 = 64;
        let mut rng = StdRng::seed_from_u64(0x00c0_ffee);
        let log = random_log(&mut rng, SIZE as usize);
        let roots: Vec<Hash> = (0..=SIZE).map(|size| log.root(size)).collect();
        let (mut accepted, mut refused) = (0u64, 0u64);
        for t in 1..=SIZE {
            let root = roots[t as usize];
            // Mutations for every index of small trees, then the edges and a random sample.
            let picks: Vec<u64> = if t <= 16 {
                (0..t).collect()
            } else {
                let mut v = vec![0, t / 2, t - 1];
                v.push(rng.gen_range(0..t));
                v
            };
            for n in 0..t {
                let mutate = picks.contains(&n);
                if t > EXHAUSTIVE && !mutate {
                    continue;
                }
                let p = prove_record(t, n, &log.stored).unwrap();
                check_record(&p, t, &root, n, &log.leaves[n as usize]).unwrap();
                accepted += 1;
                if mutate {
                    for (desc, q, t2, th, n2, leaf) in inclusion_mutations(&mut rng, &log, &p, t, n)
                    {
                        assert!(
                            check_record(&q, t2, &th, n2, &leaf).is_err(),
                            "inclusion of {n} in {t} accepted with {desc}"
                        );
                        refused += 1;
                    }
                }
                // Consistency from old size n + 1 (1..=t) to t.
                let old = n + 1;
                let p = prove_tree(t, old, &log.stored).unwrap();
                check_tree(&p, t, &root, old, &roots[old as usize]).unwrap();
                accepted += 1;
                if mutate && old < t {
                    for (desc, q, t2, th, n2, h) in
                        consistency_mutations(&mut rng, &log, &p, t, old)
                    {
                        assert!(
                            check_tree(&q, t2, &th, n2, &h).is_err(),
                            "consistency {old} -> {t} accepted with {desc}"
                        );
                        refused += 1;
                    }
                }
            }
        }
        // Guard against a test that silently checks nothing.
        assert!(accepted > 6_000, "only {accepted} proofs checked");
        assert!(refused > 60_000, "only {refused} mutations checked");
    }

    #[test]
    fn trivial_and_out_of_range_cases() {
        let mut rng = StdRng::seed_from_u64(4);
        let log = random_log(&mut rng, 5);
        let (r3, r5) = (log.root(3), log.root(5));
        let leaf = log.leaves[0];

        // A single-leaf tree: its root is the leaf hash and the proof is empty.
        check_record(&[], 1, &leaf, 0, &leaf).unwrap();
        assert!(check_record(&[], 1, &EMPTY_TREE_HASH, 0, &leaf).is_err());
        assert!(matches!(
            check_record(&[], 0, &EMPTY_TREE_HASH, 0, &leaf),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        ));
        assert!(check_record(&[], 2, &leaf, 5, &leaf).is_err());
        assert!(matches!(
            prove_record(5, 5, &log.stored),
            Err(MerkleError::IndexOutOfRange { index: 5, size: 5 })
        ));

        // Equal sizes: empty proof and equal roots only.
        check_tree(&[], 5, &r5, 5, &r5).unwrap();
        assert!(check_tree(&[], 5, &r5, 5, &r3).is_err());
        assert!(check_tree(&[r5], 5, &r5, 5, &r5).is_err());
        // The empty tree is a prefix of every tree, with the empty root and no proof.
        check_tree(&[], 5, &r5, 0, &EMPTY_TREE_HASH).unwrap();
        check_tree(&[], 0, &EMPTY_TREE_HASH, 0, &EMPTY_TREE_HASH).unwrap();
        assert!(check_tree(&[], 5, &r5, 0, &r3).is_err());
        assert!(check_tree(&[EMPTY_TREE_HASH], 5, &r5, 0, &EMPTY_TREE_HASH).is_err());
        assert!(check_tree(&[], 0, &r5, 0, &r5).is_err());
        // Going back in time is refused.
        assert!(matches!(
            check_tree(&[], 3, &r3, 5, &r5),
            Err(MerkleError::SizesOutOfOrder { old: 5, new: 3 })
        ));
        assert!(prove_tree(3, 5, &log.stored).is_err());
        assert_eq!(prove_tree(5, 0, &log.stored).unwrap(), Vec::<Hash>::new());
        assert_eq!(prove_tree(5, 5, &log.stored).unwrap(), Vec::<Hash>::new());

        // Sizes beyond the supported maximum are refused, not computed with overflow.
        assert!(matches!(
            tree_hash(u64::MAX, &log.stored),
            Err(MerkleError::TreeTooLarge { .. })
        ));
        assert!(prove_record(u64::MAX, 1, &log.stored).is_err());
        assert!(prove_tree(u64::MAX, 1, &log.stored).is_err());
        assert!(stored_hashes(u64::MAX, b"x", &log.stored).is_err());
        // Verifiers take any sizes without overflow.
        assert!(check_record(&[r3; 64], u64::MAX, &r5, u64::MAX - 1, &leaf).is_err());
        assert!(check_tree(&[r3; 64], u64::MAX, &r5, u64::MAX - 1, &r3).is_err());
    }

    #[test]
    fn size_and_root_are_checked_as_a_pair() {
        // Why a verifier must take the size and the root from the same checkpoint: the proof
        // of record 0 in the tree of size 3 also closes for "size 4" with the size-3 root,
        // because the last node of size 3 sits where a complete pair would sit in size 4.
        let mut rng = StdRng::seed_from_u64(6);
        let log = random_log(&mut rng, 4);
        let proof = prove_record(3, 0, &log.stored).unwrap();
        let leaf = log.leaves[0];
        check_record(&proof, 3, &log.root(3), 0, &leaf).unwrap();
        assert!(check_record(&proof, 4, &log.root(3), 0, &leaf).is_ok());
        // With the genuine (size, root) pair of size 4 it fails, as it must.
        assert!(check_record(&proof, 4, &log.root(4), 0, &leaf).is_err());
    }

    #[test]
    fn storage_faults_are_errors_not_panics() {
        struct Short;
        impl HashReader for Short {
            fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
                Ok(vec![EMPTY_TREE_HASH; indexes.len().saturating_sub(1)])
            }
        }
        struct Long;
        impl HashReader for Long {
            fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, MerkleError> {
                Ok(vec![EMPTY_TREE_HASH; indexes.len() + 1])
            }
        }
        struct Broken;
        impl HashReader for Broken {
            fn read_hashes(&self, _: &[u64]) -> Result<Vec<Hash>, MerkleError> {
                Err(MerkleError::Storage("disk on fire".into()))
            }
        }
        assert!(matches!(
            tree_hash(5, &Short),
            Err(MerkleError::ShortRead { .. })
        ));
        assert!(matches!(
            tree_hash(5, &Long),
            Err(MerkleError::ShortRead { .. })
        ));
        assert!(matches!(
            prove_record(9, 3, &Short),
            Err(MerkleError::ShortRead { .. })
        ));
        assert!(matches!(
            prove_tree(9, 3, &Long),
            Err(MerkleError::ShortRead { .. })
        ));
        assert!(matches!(
            stored_hashes(3, b"x", &Short),
            Err(MerkleError::ShortRead { .. })
        ));
        assert!(matches!(
            tree_hash(5, &Broken),
            Err(MerkleError::Storage(_))
        ));

        // Asking a three-record log about a four-record tree reports the missing position: the
        // root of records 0..4 is (level 2, 0), stored at 6.
        let mut rng = StdRng::seed_from_u64(5);
        let log = random_log(&mut rng, 3);
        assert!(matches!(
            tree_hash(4, &log.stored),
            Err(MerkleError::MissingHash { index: 6 })
        ));
        assert!(matches!(
            tree_hash(4, log.stored.as_slice()),
            Err(MerkleError::MissingHash { .. })
        ));
    }

    #[test]
    fn hash_text_forms() {
        let h = leaf_hash(b"");
        let b64 = h.to_string();
        assert_eq!(b64, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=");
        assert_eq!(b64.parse::<Hash>().unwrap(), h);
        assert_eq!(
            format!("{h:?}"),
            "Hash(6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d)"
        );
        assert_eq!(Hash::from_hex(&h.to_hex()).unwrap(), h);
        assert_eq!(Hash::from_slice(h.as_bytes()).unwrap(), h);
        // Wrong lengths, alphabets and non-canonical encodings are refused.
        assert!(Hash::from_base64("bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0").is_err());
        assert!(Hash::from_base64("bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB1=").is_err());
        assert!(Hash::from_base64("bjQLnP-zepicpUTmu3gKLHiQHT-zNzh2hRGjBhevoB0=").is_err());
        assert!(Hash::from_base64("AAAA").is_err());
        assert!(Hash::from_hex("00").is_err());
        assert!(Hash::from_slice(&[0; 31]).is_err());
    }
}
