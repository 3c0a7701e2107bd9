//! Signed checkpoints of the audit log: a C2SP `tlog-checkpoint` body (the log's origin, tree
//! size and root hash) carried in a C2SP `signed-note` with an Ed25519 signature by the broker's
//! log key.
//!
//! ```text
//! concordat.example/audit
//! 8
//! XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=
//!
//! — concordat.example/audit 9KvpFtGB6eL/uO5dRxowCkBRuCauVT5nmXEyFu1sbw+NXXi9tw5gf7eywDJMSn2TGRvycXCEdv9YcVop0DoBA7I2Mgs=
//! ```
//!
//! The text is the origin (the log's name, equal to the key name), the tree size in decimal
//! and the root hash in base64; after a blank line, each signature line holds an em dash, the
//! key name and `base64(key ID || Ed25519 signature)`.
//!
//! The key ID is the first four bytes of `SHA-256(key name || 0x0A || 0x01 || public key)`. Keys
//! travel as text: the verifier key `<name>+<8 hex key ID>+<base64(0x01 || public key)>`, and
//! the signer key `PRIVATE+KEY+<name>+<8 hex key ID>+<base64(0x01 || 32-byte seed)>`.
//!
//! # Convention: origin equals key name
//!
//! C2SP says a log's key name SHOULD match its origin line. Concordat makes it a rule: [`sign`]
//! refuses to sign a checkpoint whose origin is not the signer's name, and [`open`] refuses a
//! checkpoint whose origin is not the verifier's name, so a key can never vouch for another
//! log's tree.
//!
//! # Hostile input
//!
//! [`open`] refuses a note longer than [`MAX_NOTE_SIZE`] bytes or with more than
//! [`MAX_SIGNATURES`] signature lines before parsing anything else, ignores signatures by other
//! keys (witness cosignatures, a rotated key) as C2SP requires, refuses the note if the
//! signature by the expected key does not verify (with `verify_strict`), and never panics.
//!
//! # Crates
//!
//! The signed-note envelope (splitting text from signatures, the signature lines, key IDs,
//! refusing notes whose known-key signature fails) comes from the `signed_note` crate
//! (cloudflare/azul, a port of Go's `sumdb/note`). It builds on the same `ed25519-dalek` 2 and
//! `sha2` 0.10, adding only `base64` 0.21 and `thiserror` 1 as second, small versions. Its own
//! Ed25519 verifier uses the lenient `verify`, so this module plugs in one that calls
//! `verify_strict`; and its key types do not give the keys back, so key strings are parsed
//! here. The checkpoint body is parsed here too: `tlog_tiles`, which has a parser, was not
//! taken (see the `merkle` module).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::merkle::{self, Hash, MerkleError};

/// The largest signed note [`open`] accepts, in bytes.
pub const MAX_NOTE_SIZE: usize = 16 * 1024;

/// The most signature lines [`open`] accepts in one note (C2SP: at least 16 must be accepted).
pub const MAX_SIGNATURES: usize = 16;

/// The longest key string (verifier or signer) that is parsed at all.
const MAX_KEY_STRING: usize = 1024;

/// The C2SP signed-note signature type of Ed25519.
const ALG_ED25519: u8 = 0x01;

/// Why a checkpoint, a signed note or a key could not be made, opened or trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The signed note is longer than [`MAX_NOTE_SIZE`] bytes.
    #[error("signed note of {len} bytes exceeds the limit of {max}")]
    NoteTooLarge {
        /// The note's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signed note has more than [`MAX_SIGNATURES`] signature lines.
    #[error("signed note has {count} signature lines, the limit is {max}")]
    TooManySignatures {
        /// The number of signature lines.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The text is not a well-formed signed note.
    #[error("malformed signed note: {0}")]
    MalformedNote(&'static str),
    /// The note text is not a well-formed checkpoint, or a checkpoint field is invalid.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// A verifier or signer key string, or a key name, is malformed.
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// The note carries no signature by the expected key (only other keys' signatures).
    #[error("no signature by the expected key")]
    NotSigned,
    /// The note carries a signature by the expected key, and it does not verify.
    #[error("signature by the expected key does not verify")]
    BadSignature,
    /// The checkpoint's origin is not the expected one: the key's name when signing or
    /// opening, the older checkpoint's origin when checking consistency.
    #[error("checkpoint origin {found:?} is not the expected {expected:?}")]
    OriginMismatch {
        /// The expected origin.
        expected: String,
        /// The origin found.
        found: String,
    },
    /// The newer checkpoint has a smaller tree than the older one: the log went back in time.
    #[error("tree size went down from {old} to {new}")]
    SizeDecreased {
        /// The older checkpoint's size.
        old: u64,
        /// The newer checkpoint's size.
        new: u64,
    },
    /// Two checkpoints of the same size have different roots: the log has forked.
    #[error("two different roots for tree size {size}: the log has forked")]
    Fork {
        /// The common tree size.
        size: u64,
    },
    /// The consistency proof between the two checkpoints does not verify.
    #[error("checkpoints are not consistent")]
    Inconsistent(#[source] MerkleError),
}

/// A tree head of the audit log: the C2SP `tlog-checkpoint` note text, before signing or after
/// [`open`] verified it.
///
/// Every value is well-formed by construction: the origin and extension lines are non-empty
/// and hold no control characters (so no newline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    origin: String,
    size: u64,
    root: Hash,
    extensions: Vec<String>,
}

impl Checkpoint {
    /// Makes a checkpoint of the log `origin` at tree size `size` with root hash `root`.
    pub fn new(origin: impl Into<String>, size: u64, root: Hash) -> Result<Self, CheckpointError> {
        let origin = origin.into();
        check_line(&origin, "origin line is empty or holds a control character")?;
        Ok(Checkpoint {
            origin,
            size,
            root,
            extensions: Vec::new(),
        })
    }

    /// Adds extension lines (opaque, after the root hash). C2SP does not recommend them, as log
    /// monitors cannot audit them; each must be non-empty and free of control characters.
    pub fn with_extensions(mut self, extensions: Vec<String>) -> Result<Self, CheckpointError> {
        for line in &extensions {
            check_line(line, "extension line is empty or holds a control character")?;
        }
        self.extensions = extensions;
        Ok(self)
    }

    /// The origin: the log's unique name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of entries in the tree.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RFC 6962 root hash of the tree.
    pub fn root(&self) -> &Hash {
        &self.root
    }

    /// The extension lines, usually none.
    pub fn extensions(&self) -> &[String] {
        &self.extensions
    }

    /// Formats the note text: origin, size, base64 root and extension lines, each ending in a
    /// newline.
    pub fn to_note_body(&self) -> String {
        let mut body = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            self.root.to_base64()
        );
        for line in &self.extensions {
            body.push_str(line);
            body.push('\n');
        }
        body
    }

    /// Parses a note text (not yet a signed note: see [`open`]) in the C2SP form: at least
    /// three non-empty lines each ending in a newline, the size without leading zeros and the
    /// root as the canonical base64 of 32 bytes.
    pub fn parse(body: &str) -> Result<Self, CheckpointError> {
        if body.len() > MAX_NOTE_SIZE {
            return Err(CheckpointError::NoteTooLarge {
                len: body.len(),
                max: MAX_NOTE_SIZE,
            });
        }
        let text = body
            .strip_suffix('\n')
            .ok_or(CheckpointError::MalformedCheckpoint(
                "text must end with a newline",
            ))?;
        let mut lines = text.split('\n');
        let origin = lines.next().unwrap_or_default();
        let size = lines
            .next()
            .ok_or(CheckpointError::MalformedCheckpoint("no tree size line"))?;
        let root = lines
            .next()
            .ok_or(CheckpointError::MalformedCheckpoint("no root hash line"))?;
        let size = parse_size(size)?;
        let root = Hash::from_base64(root).map_err(|_| {
            CheckpointError::MalformedCheckpoint("root hash is not the base64 of 32 bytes")
        })?;
        Checkpoint::new(origin, size, root)?.with_extensions(lines.map(str::to_owned).collect())
    }
}

/// Refuses an empty line or one with a character below U+0020 (which includes the newline).
fn check_line(line: &str, why: &'static str) -> Result<(), CheckpointError> {
    if line.is_empty() || line.chars().any(|c| c < '\u{20}') {
        return Err(CheckpointError::MalformedCheckpoint(why));
    }
    Ok(())
}

/// Parses the tree size: ASCII decimal digits only, no sign, no leading zero unless it is `0`.
fn parse_size(line: &str) -> Result<u64, CheckpointError> {
    let digits_only = !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (line.len() > 1 && line.starts_with('0')) {
        return Err(CheckpointError::MalformedCheckpoint(
            "tree size is not a decimal number without leading zeros",
        ));
    }
    line.parse()
        .map_err(|_| CheckpointError::MalformedCheckpoint("tree size does not fit in 64 bits"))
}

/// The key ID of an Ed25519 key: the first four bytes, big-endian, of
/// `SHA-256(name || 0x0A || 0x01 || public key)`.
fn key_id(name: &str, key: &VerifyingKey) -> u32 {
    signed_note::key_id(name, &typed_key(&key.to_bytes()))
}

/// `0x01 || key`: a key tagged with the Ed25519 signature type, as encoded in key strings.
fn typed_key(key: &[u8; 32]) -> [u8; 33] {
    let mut out = [ALG_ED25519; 33];
    out[1..].copy_from_slice(key);
    out
}

/// Refuses a key name that is empty or holds a Unicode space or a `+`.
fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    if !signed_note::is_key_name_valid(name) || name.chars().any(|c| c < '\u{20}') {
        return Err(CheckpointError::MalformedKey(
            "key name is empty or holds a space, a '+' or a control character",
        ));
    }
    Ok(())
}

/// Parses `<8 hex digits>+<base64(0x01 || 32 bytes)>`, the tail shared by both key strings.
fn parse_key_tail(tail: &str) -> Result<(u32, [u8; 32]), CheckpointError> {
    let (id_hex, key_b64) = tail
        .split_once('+')
        .ok_or(CheckpointError::MalformedKey("missing '+' before the key"))?;
    if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CheckpointError::MalformedKey("key ID is not 8 hex digits"));
    }
    let id = u32::from_str_radix(id_hex, 16)
        .map_err(|_| CheckpointError::MalformedKey("key ID is not 8 hex digits"))?;
    let typed = BASE64
        .decode(key_b64)
        .map_err(|_| CheckpointError::MalformedKey("key is not standard base64"))?;
    match typed.split_first() {
        Some((&ALG_ED25519, key)) => {
            let key = <[u8; 32]>::try_from(key)
                .map_err(|_| CheckpointError::MalformedKey("Ed25519 key is not 32 bytes"))?;
            Ok((id, key))
        }
        _ => Err(CheckpointError::MalformedKey(
            "key type is not Ed25519 (0x01)",
        )),
    }
}

/// The broker's log signing key with its name (which is also the log's origin).
///
/// `Debug` shows the name and key ID only, never the key.
pub struct LogSigner {
    name: String,
    key_id: u32,
    key: SigningKey,
}

impl LogSigner {
    /// Names an Ed25519 signing key. The name must be a valid key name: non-empty, without
    /// spaces or `+` (a schema-less URL such as `concordat.example/audit` is recommended).
    pub fn new(name: &str, key: SigningKey) -> Result<Self, CheckpointError> {
        check_key_name(name)?;
        Ok(LogSigner {
            name: name.to_owned(),
            key_id: key_id(name, &key.verifying_key()),
            key,
        })
    }

    /// Generates a new key from the operating system's random number generator.
    pub fn generate(name: &str) -> Result<Self, CheckpointError> {
        Self::new(name, SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The key name, which is also the origin of the checkpoints it signs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key ID that prefixes its signatures.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The verifier for this key.
    pub fn verifier(&self) -> LogVerifier {
        LogVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// The verifier key string, `<name>+<key ID>+<base64(0x01 || public key)>`, to hand to
    /// agents and auditors.
    pub fn verifier_key(&self) -> String {
        self.verifier().to_string()
    }

    /// The secret key string, `PRIVATE+KEY+<name>+<key ID>+<base64(0x01 || seed)>` (the form
    /// of Go's `sumdb/note`), for storing beside the broker's data. It is a secret: store it
    /// readable by the broker only and never log it.
    pub fn to_secret_string(&self) -> String {
        let typed = typed_key(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.key_id,
            BASE64.encode(typed)
        )
    }

    /// Parses a secret key string written by [`to_secret_string`](Self::to_secret_string) (or
    /// by Go's `note.GenerateKey`), checking that its key ID matches the key.
    pub fn from_secret_string(s: &str) -> Result<Self, CheckpointError> {
        if s.len() > MAX_KEY_STRING {
            return Err(CheckpointError::MalformedKey("key string too long"));
        }
        let rest = s
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(CheckpointError::MalformedKey("missing PRIVATE+KEY+ prefix"))?;
        let (name, tail) = rest
            .split_once('+')
            .ok_or(CheckpointError::MalformedKey("missing '+' after the name"))?;
        let (id, seed) = parse_key_tail(tail)?;
        let signer = Self::new(name, SigningKey::from_bytes(&seed))?;
        if signer.key_id != id {
            return Err(CheckpointError::MalformedKey(
                "key ID does not match the key",
            ));
        }
        Ok(signer)
    }
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .finish_non_exhaustive()
    }
}

/// A log's public key with its name: what agents and auditors trust checkpoints with.
///
/// Parsed from, and displayed as, the verifier key string
/// `<name>+<8 hex key ID>+<base64(0x01 || 32-byte public key)>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogVerifier {
    name: String,
    key_id: u32,
    key: VerifyingKey,
}

impl LogVerifier {
    /// Names an Ed25519 public key. Small-order ("weak") keys are refused: with one, a
    /// signature can be forged for any message.
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, CheckpointError> {
        check_key_name(name)?;
        if key.is_weak() {
            return Err(CheckpointError::MalformedKey("small-order public key"));
        }
        Ok(LogVerifier {
            name: name.to_owned(),
            key_id: key_id(name, &key),
            key,
        })
    }

    /// The key name, which is also the origin of the checkpoints it accepts.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key ID that prefixes its signatures.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The Ed25519 public key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }
}

impl FromStr for LogVerifier {
    type Err = CheckpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_KEY_STRING {
            return Err(CheckpointError::MalformedKey("key string too long"));
        }
        let (name, tail) = s
            .split_once('+')
            .ok_or(CheckpointError::MalformedKey("missing '+' after the name"))?;
        let (id, key) = parse_key_tail(tail)?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| CheckpointError::MalformedKey("not an Ed25519 public key"))?;
        let verifier = Self::new(name, key)?;
        if verifier.key_id != id {
            return Err(CheckpointError::MalformedKey(
                "key ID does not match the key",
            ));
        }
        Ok(verifier)
    }
}

impl fmt::Display for LogVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let typed = typed_key(self.key.as_bytes());
        write!(
            f,
            "{}+{:08x}+{}",
            self.name,
            self.key_id,
            BASE64.encode(typed)
        )
    }
}

/// Signs a checkpoint and returns the whole signed note: the note text, a blank line and the
/// signature line `— <name> <base64(key ID || signature)>`.
///
/// Refuses a checkpoint whose origin is not the signer's name, and one whose note would exceed
/// [`MAX_NOTE_SIZE`] (which [`open`] would refuse).
pub fn sign(cp: &Checkpoint, signer: &LogSigner) -> Result<String, CheckpointError> {
    if cp.origin() != signer.name() {
        return Err(CheckpointError::OriginMismatch {
            expected: signer.name.clone(),
            found: cp.origin.clone(),
        });
    }
    let note = sign_text(&cp.to_note_body(), signer)?;
    if note.len() > MAX_NOTE_SIZE {
        return Err(CheckpointError::NoteTooLarge {
            len: note.len(),
            max: MAX_NOTE_SIZE,
        });
    }
    Ok(note)
}

/// Verifies a signed note with the log's key and returns the checkpoint it carries.
///
/// Refuses, in this order: a note over [`MAX_NOTE_SIZE`] bytes or with over
/// [`MAX_SIGNATURES`] signature lines; a malformed note; a note with no signature by this key
/// ([`CheckpointError::NotSigned`], signatures by other keys being ignored); a signature by
/// this key that fails `verify_strict`; a malformed checkpoint; and an origin other than the
/// key's name.
pub fn open(note: &str, verifier: &LogVerifier) -> Result<Checkpoint, CheckpointError> {
    let text = open_text(note, verifier)?;
    let cp = Checkpoint::parse(&text)?;
    if cp.origin() != verifier.name() {
        return Err(CheckpointError::OriginMismatch {
            expected: verifier.name.clone(),
            found: cp.origin,
        });
    }
    Ok(cp)
}

/// Checks that `new` extends `old`: same log, no smaller, and `proof` (from
/// `merkle::prove_tree(new.size, old.size, …)`) proves the old tree a prefix of the new one.
/// Equal sizes need equal roots (else [`CheckpointError::Fork`]) and an empty proof.
///
/// Both checkpoints must come from [`open`]: this checks the trees, not the signatures. It is
/// pure, so an agent can run it on every new checkpoint against the last one it trusted.
pub fn check_consistent(
    old: &Checkpoint,
    new: &Checkpoint,
    proof: &[Hash],
) -> Result<(), CheckpointError> {
    if old.origin != new.origin {
        return Err(CheckpointError::OriginMismatch {
            expected: old.origin.clone(),
            found: new.origin.clone(),
        });
    }
    if new.size < old.size {
        return Err(CheckpointError::SizeDecreased {
            old: old.size,
            new: new.size,
        });
    }
    if new.size == old.size && new.root != old.root {
        return Err(CheckpointError::Fork { size: new.size });
    }
    merkle::check_tree(proof, new.size, &new.root, old.size, &old.root)
        .map_err(CheckpointError::Inconsistent)
}

/// Signs arbitrary note text (which must end in a newline) and returns the signed note.
fn sign_text(text: &str, signer: &LogSigner) -> Result<String, CheckpointError> {
    let mut note = signed_note::Note::new(text.as_bytes(), &[])
        .map_err(|_| CheckpointError::MalformedNote("text is not valid note text"))?;
    note.add_sigs(&[&NoteSigner(signer)])
        .map_err(|_| CheckpointError::MalformedNote("cannot sign this text"))?;
    String::from_utf8(note.to_bytes())
        .map_err(|_| CheckpointError::MalformedNote("signed note is not UTF-8"))
}

/// Verifies a signed note with one key and returns its text.
fn open_text(note: &str, verifier: &LogVerifier) -> Result<String, CheckpointError> {
    if note.len() > MAX_NOTE_SIZE {
        return Err(CheckpointError::NoteTooLarge {
            len: note.len(),
            max: MAX_NOTE_SIZE,
        });
    }
    // Count the signature lines (after the last blank line) before any decoding.
    let (_, signatures) = note
        .rsplit_once("\n\n")
        .ok_or(CheckpointError::MalformedNote(
            "no blank line before the signatures",
        ))?;
    let count = signatures.split('\n').filter(|l| !l.is_empty()).count();
    if count > MAX_SIGNATURES {
        return Err(CheckpointError::TooManySignatures {
            count,
            max: MAX_SIGNATURES,
        });
    }
    let parsed = signed_note::Note::from_bytes(note.as_bytes())
        .map_err(|_| CheckpointError::MalformedNote("not a signed note"))?;
    match parsed.verify(&NoteVerifier(verifier)) {
        Ok(_) => {}
        Err(signed_note::NoteError::UnverifiedNote) => return Err(CheckpointError::NotSigned),
        Err(signed_note::NoteError::InvalidSignature { .. }) => {
            return Err(CheckpointError::BadSignature);
        }
        Err(_) => {
            return Err(CheckpointError::MalformedNote(
                "signatures cannot be checked",
            ));
        }
    }
    String::from_utf8(parsed.text().to_vec())
        .map_err(|_| CheckpointError::MalformedNote("note text is not UTF-8"))
}

/// Adapts a [`LogSigner`] to `signed_note`'s signer trait.
struct NoteSigner<'a>(&'a LogSigner);

impl signed_note::Signer for NoteSigner<'_> {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn key_id(&self) -> u32 {
        self.0.key_id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.0.key.sign(msg).to_bytes().to_vec())
    }
}

/// Adapts a [`LogVerifier`] to `signed_note`'s traits, with strict Ed25519 verification: it
/// refuses non-canonical signatures and small-order keys, so a signature is accepted by
/// exactly one encoding.
struct NoteVerifier<'a>(&'a LogVerifier);

impl signed_note::Verifier for NoteVerifier<'_> {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn key_id(&self) -> u32 {
        self.0.key_id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match Signature::from_slice(sig) {
            Ok(sig) => self.0.key.verify_strict(msg, &sig).is_ok(),
            Err(_) => false,
        }
    }
}

impl signed_note::Verifiers for NoteVerifier<'_> {
    fn verifier(
        &self,
        name: &str,
        id: u32,
    ) -> Result<&dyn signed_note::Verifier, signed_note::VerificationError> {
        // Only the exact (name, key ID) pair is known; other signatures are ignored.
        if name == self.0.name && id == self.0.key_id {
            Ok(self)
        } else {
            Err(signed_note::VerificationError::UnknownKey {
                name: name.to_owned(),
                id,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::merkle::{EMPTY_TREE_HASH, leaf_hash, prove_tree, stored_hashes, tree_hash};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const VECTORS: &str = include_str!("../testdata/signed-note-vectors.json");
    const ORIGIN: &str = "concordat.example/audit";

    fn vectors() -> serde_json::Value {
        serde_json::from_str(VECTORS).unwrap()
    }

    fn str_of<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
        v[key].as_str().unwrap()
    }

    /// A signer from a fixed seed, so that failures reproduce.
    fn signer(name: &str, seed: u8) -> LogSigner {
        LogSigner::new(name, SigningKey::from_bytes(&[seed; 32])).unwrap()
    }

    /// An in-memory log of `size` entries: its stored hashes.
    fn log_of(size: u64) -> Vec<Hash> {
        let mut stored = Vec::new();
        for n in 0..size {
            let new = stored_hashes(n, format!("entry {n}").as_bytes(), &stored).unwrap();
            stored.extend(new);
        }
        stored
    }

    fn checkpoint_of(stored: &[Hash], size: u64) -> Checkpoint {
        Checkpoint::new(ORIGIN, size, tree_hash(size, stored).unwrap()).unwrap()
    }

    #[test]
    fn checkpoint_body_round_trips() {
        let root = leaf_hash(b"root");
        let cp = Checkpoint::new(ORIGIN, 1_048_576, root).unwrap();
        let body = cp.to_note_body();
        assert_eq!(body, format!("{ORIGIN}\n1048576\n{}\n", root.to_base64()));
        assert_eq!(Checkpoint::parse(&body).unwrap(), cp);

        let cp = cp
            .with_extensions(vec!["ext one".into(), "ext two".into()])
            .unwrap();
        let body = cp.to_note_body();
        assert!(body.ends_with("\next one\next two\n"));
        assert_eq!(Checkpoint::parse(&body).unwrap(), cp);

        let zero = Checkpoint::new(ORIGIN, 0, EMPTY_TREE_HASH).unwrap();
        assert_eq!(Checkpoint::parse(&zero.to_note_body()).unwrap(), zero);
        let max = Checkpoint::new(ORIGIN, u64::MAX, root).unwrap();
        assert_eq!(Checkpoint::parse(&max.to_note_body()).unwrap(), max);
    }

    #[test]
    fn c2sp_checkpoint_example_parses() {
        let body = str_of(&vectors(), "c2sp_checkpoint_body").to_owned();
        let cp = Checkpoint::parse(&body).unwrap();
        assert_eq!(cp.origin(), "example.com/behind-the-sofa");
        assert_eq!(cp.size(), 20_852_163);
        assert_eq!(
            cp.root().to_string(),
            "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
        );
        assert_eq!(cp.to_note_body(), body);
    }

    #[test]
    fn malformed_checkpoint_bodies_are_refused() {
        let root = "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=";
        let cases: Vec<(&str, String)> = vec![
            ("no final newline", format!("log\n1\n{root}")),
            ("empty", String::new()),
            ("only origin", "log\n".into()),
            ("no root", "log\n1\n".into()),
            ("empty origin", format!("\n1\n{root}\n")),
            ("tab in origin", format!("l\tog\n1\n{root}\n")),
            ("carriage return", format!("log\r\n1\n{root}\n")),
            ("leading zero", format!("log\n01\n{root}\n")),
            ("plus sign", format!("log\n+1\n{root}\n")),
            ("minus sign", format!("log\n-1\n{root}\n")),
            ("space in size", format!("log\n 1\n{root}\n")),
            ("hex size", format!("log\n0x1\n{root}\n")),
            ("empty size", format!("log\n\n{root}\n")),
            (
                "size overflow",
                format!("log\n18446744073709551616\n{root}\n"),
            ),
            (
                "short root",
                "log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I\n".into(),
            ),
            (
                "url-safe root",
                "log\n1\nCsUYapGGPo4dkMgIAUqom_Xajj7h2fB2MPA3j2jxq2I=\n".into(),
            ),
            (
                "non-canonical root",
                "log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n".into(),
            ),
            (
                "hex root",
                format!("log\n1\n{}\n", EMPTY_TREE_HASH.to_hex()),
            ),
            ("empty extension", format!("log\n1\n{root}\n\n")),
            (
                "empty middle extension",
                format!("log\n1\n{root}\na\n\nb\n"),
            ),
        ];
        for (why, body) in cases {
            assert!(
                matches!(
                    Checkpoint::parse(&body),
                    Err(CheckpointError::MalformedCheckpoint(_))
                ),
                "{why}: {body:?} was not refused as malformed"
            );
        }
        let huge = format!("log\n1\n{root}\n{}\n", "x".repeat(MAX_NOTE_SIZE));
        assert!(matches!(
            Checkpoint::parse(&huge),
            Err(CheckpointError::NoteTooLarge { .. })
        ));
        assert!(Checkpoint::new("two\nlines", 1, EMPTY_TREE_HASH).is_err());
        assert!(Checkpoint::new("", 1, EMPTY_TREE_HASH).is_err());
        let cp = Checkpoint::new("log", 1, EMPTY_TREE_HASH).unwrap();
        assert!(cp.clone().with_extensions(vec![String::new()]).is_err());
        assert!(cp.with_extensions(vec!["a\nb".into()]).is_err());
    }

    #[test]
    fn go_note_vector_signs_and_verifies_byte_for_byte() {
        let v = vectors();
        let g = &v["go_note"];
        let signer = LogSigner::from_secret_string(str_of(g, "signer_key")).unwrap();
        assert_eq!(signer.name(), "PeterNeumann");
        assert_eq!(signer.key_id(), 0xc74f_20a3);
        assert_eq!(signer.verifier_key(), str_of(g, "verifier_key"));
        assert_eq!(signer.to_secret_string(), str_of(g, "signer_key"));

        let text = str_of(g, "text");
        let want = format!("{text}\n{}", str_of(g, "peter_signature"));
        assert_eq!(sign_text(text, &signer).unwrap(), want);

        let peter: LogVerifier = str_of(g, "verifier_key").parse().unwrap();
        let enoch: LogVerifier = str_of(g, "enoch_verifier_key").parse().unwrap();
        assert_eq!(peter, signer.verifier());
        assert_eq!(enoch.key_id(), 0xaf0c_fe78);
        assert_eq!(enoch.to_string(), str_of(g, "enoch_verifier_key"));
        assert_eq!(open_text(&want, &peter).unwrap(), text);
        assert!(matches!(
            open_text(&want, &enoch),
            Err(CheckpointError::NotSigned)
        ));

        // Two signatures: each key finds its own and ignores the other.
        let both = format!(
            "{text}\n{}{}",
            str_of(g, "peter_signature"),
            str_of(g, "enoch_signature")
        );
        assert_eq!(open_text(&both, &peter).unwrap(), text);
        assert_eq!(open_text(&both, &enoch).unwrap(), text);
        // Not a checkpoint, so open() refuses it after the signature checks out.
        assert!(matches!(
            open(&both, &peter),
            Err(CheckpointError::MalformedCheckpoint(_))
        ));
    }

    #[test]
    fn concordat_checkpoint_vector_signs_and_opens_byte_for_byte() {
        let v = vectors();
        let c = &v["concordat_checkpoint"];
        let seed: [u8; 32] = hex::decode(str_of(c, "seed_hex"))
            .unwrap()
            .try_into()
            .unwrap();
        let signer = LogSigner::new(ORIGIN, SigningKey::from_bytes(&seed)).unwrap();
        assert_eq!(signer.to_secret_string(), str_of(c, "signer_key"));
        assert_eq!(signer.verifier_key(), str_of(c, "verifier_key"));
        let root = Hash::from_hex(str_of(c, "root_hex")).unwrap();
        let cp = Checkpoint::new(ORIGIN, c["size"].as_u64().unwrap(), root).unwrap();
        assert_eq!(sign(&cp, &signer).unwrap(), str_of(c, "note"));
        let verifier: LogVerifier = str_of(c, "verifier_key").parse().unwrap();
        assert_eq!(open(str_of(c, "note"), &verifier).unwrap(), cp);
        // The root is that of the eight-leaf RFC 6962 reference tree.
        let rfc: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/rfc6962-vectors.json")).unwrap();
        assert_eq!(rfc["roots"][8]["root"].as_str().unwrap(), root.to_hex());
    }

    #[test]
    fn c2sp_note_example_verifies() {
        let v = vectors();
        let c = &v["c2sp_example"];
        let verifier: LogVerifier = str_of(c, "verifier_key").parse().unwrap();
        assert_eq!(verifier.name(), "example.com/foo");
        assert_eq!(
            open_text(str_of(c, "note"), &verifier).unwrap(),
            str_of(c, "text")
        );
    }

    #[test]
    fn sum_golang_org_checkpoints_verify_but_break_our_origin_rule() {
        let v = vectors();
        let s = &v["sumdb_checkpoints"];
        let verifier: LogVerifier = str_of(s, "verifier_key").parse().unwrap();
        let notes = s["notes"].as_array().unwrap();
        assert_eq!(notes.len(), 4);
        for case in notes {
            let note = str_of(case, "note");
            let cp = Checkpoint::parse(&open_text(note, &verifier).unwrap()).unwrap();
            assert_eq!(cp.origin(), "go.sum database tree");
            assert_eq!(cp.size(), case["size"].as_u64().unwrap());
            assert_eq!(cp.root().to_string(), str_of(case, "root"));
            assert!(matches!(
                open(note, &verifier),
                Err(CheckpointError::OriginMismatch { .. })
            ));
        }
        // One checkpoint's body with another's signature is refused.
        let a = str_of(&notes[0], "note");
        let b = str_of(&notes[1], "note");
        let spliced = format!(
            "{}{}",
            &a[..a.find("\n\n").unwrap() + 2],
            &b[b.find("— ").unwrap()..]
        );
        assert!(matches!(
            open_text(&spliced, &verifier),
            Err(CheckpointError::BadSignature)
        ));
    }

    #[test]
    fn key_strings_round_trip_and_mangled_ones_are_refused() {
        let generated = LogSigner::generate(ORIGIN).unwrap();
        let vkey = generated.verifier_key();
        let verifier: LogVerifier = vkey.parse().unwrap();
        assert_eq!(verifier, generated.verifier());
        assert_eq!(verifier.to_string(), vkey);
        let secret = generated.to_secret_string();
        let again = LogSigner::from_secret_string(&secret).unwrap();
        assert_eq!(again.verifier_key(), vkey);
        // Debug output names the key but does not show it.
        let debug = format!("{generated:?}");
        assert!(debug.contains(ORIGIN), "{debug}");
        assert!(!debug.contains(&secret[secret.len() - 44..]), "{debug}");

        let signer = signer(ORIGIN, 9);
        let vkey = signer.verifier_key();

        // As in Go's note tests: every proper substring and every one-byte change is refused.
        let b = vkey.as_bytes();
        for i in 0..=b.len() {
            for j in i + 1..=b.len() {
                if (i, j) != (0, b.len()) {
                    let s = std::str::from_utf8(&b[i..j]).unwrap();
                    assert!(s.parse::<LogVerifier>().is_err(), "accepted {s:?}");
                }
            }
        }
        for i in 0..b.len() {
            let mut m = b.to_vec();
            m[i] = m[i].wrapping_add(1);
            if let Ok(s) = std::str::from_utf8(&m) {
                assert!(s.parse::<LogVerifier>().is_err(), "accepted {s:?}");
            }
        }

        let secret = signer.to_secret_string();
        let cases = [
            secret.replacen("PRIVATE", "private", 1),
            secret.replacen("+KEY+", "+KEYS+", 1),
            secret.replacen(ORIGIN, "other.example/audit", 1),
            secret[..secret.len() - 4].to_owned(),
            format!("{secret}A"),
            secret.replacen(&format!("{:08x}", signer.key_id()), "00000000", 1),
            "PRIVATE+KEY+".to_owned(),
            String::new(),
            "x".repeat(MAX_KEY_STRING + 1),
        ];
        for bad in cases {
            assert!(
                LogSigner::from_secret_string(&bad).is_err(),
                "accepted {bad:?}"
            );
        }

        let key = SigningKey::from_bytes(&[7; 32]);
        for name in ["", "has space", "has+plus", "tab\there", "nbsp\u{a0}here"] {
            assert!(LogSigner::new(name, key.clone()).is_err(), "name {name:?}");
            assert!(
                LogVerifier::new(name, key.verifying_key()).is_err(),
                "name {name:?}"
            );
        }
        // A key of type 0x04 (witness cosignature) is not an Ed25519 note key here.
        let typed = {
            let mut t = typed_key(key.verifying_key().as_bytes());
            t[0] = 0x04;
            t
        };
        let id = signed_note::key_id("w", &typed);
        let other = format!("w+{id:08x}+{}", BASE64.encode(typed));
        assert!(matches!(
            other.parse::<LogVerifier>(),
            Err(CheckpointError::MalformedKey(_))
        ));
    }

    #[test]
    fn weak_keys_and_their_forgeries_are_refused() {
        // The identity point is a valid encoding of a small-order key. With it, R = identity
        // and S = 0 satisfy the lenient verification equation for every message.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let mut forged = [0u8; 64];
        forged[0] = 1;
        let msg = b"concordat.example/audit\n1\nAAAA\n";
        let lenient = ed25519_dalek::Verifier::verify(&weak, msg, &Signature::from_bytes(&forged));
        assert!(lenient.is_ok());

        // Strict verification refuses it even if such a key got in...
        let smuggled = LogVerifier {
            name: ORIGIN.into(),
            key_id: key_id(ORIGIN, &weak),
            key: weak,
        };
        assert!(!signed_note::Verifier::verify(
            &NoteVerifier(&smuggled),
            msg,
            &forged
        ));
        // ...and no such key gets in.
        assert!(matches!(
            LogVerifier::new(ORIGIN, weak),
            Err(CheckpointError::MalformedKey(_))
        ));
        let typed = typed_key(&identity);
        let vkey = format!(
            "{ORIGIN}+{:08x}+{}",
            key_id(ORIGIN, &weak),
            BASE64.encode(typed)
        );
        assert!(matches!(
            vkey.parse::<LogVerifier>(),
            Err(CheckpointError::MalformedKey(_))
        ));
    }

    #[test]
    fn sign_and_open_round_trip() {
        let signer = signer(ORIGIN, 1);
        let verifier = signer.verifier();
        let stored = log_of(10);
        let cp = checkpoint_of(&stored, 10);
        let note = sign(&cp, &signer).unwrap();
        let sig_line = format!("\n— {ORIGIN} ");
        assert!(note.starts_with(&cp.to_note_body()));
        assert!(note.contains(&sig_line));
        assert_eq!(open(&note, &verifier).unwrap(), cp);

        let cp = cp.with_extensions(vec!["policy v1".into()]).unwrap();
        assert_eq!(open(&sign(&cp, &signer).unwrap(), &verifier).unwrap(), cp);

        // A note may carry up to MAX_SIGNATURES signatures; unknown ones are ignored.
        let others: String = (0..MAX_SIGNATURES as u8 - 1)
            .map(|i| signer_line(&self::signer(&format!("witness{i}.example"), 100 + i), &cp))
            .collect();
        let cosigned = format!("{note}{others}", note = sign(&cp, &signer).unwrap());
        assert_eq!(open(&cosigned, &verifier).unwrap(), cp);
    }

    /// The signature line another key would add to this checkpoint.
    fn signer_line(other: &LogSigner, cp: &Checkpoint) -> String {
        let note = sign_text(&cp.to_note_body(), other).unwrap();
        note[note.rfind("— ").unwrap()..].to_owned()
    }

    #[test]
    fn hostile_notes_are_refused() {
        let signer = signer(ORIGIN, 1);
        let verifier = signer.verifier();
        let stored = log_of(10);
        let cp = checkpoint_of(&stored, 10);
        let note = sign(&cp, &signer).unwrap();
        let body = cp.to_note_body();
        let sig = &note[body.len() + 1..];

        // Signed by another key with the same name, and by another name: no signature by ours.
        let impostor = signer_line(&self::signer(ORIGIN, 2), &cp);
        assert!(matches!(
            open(&format!("{body}\n{impostor}"), &verifier),
            Err(CheckpointError::NotSigned)
        ));
        let other_log = signer_line(&self::signer("other.example/log", 3), &cp);
        assert!(matches!(
            open(&format!("{body}\n{other_log}"), &verifier),
            Err(CheckpointError::NotSigned)
        ));

        // Tampered text: size, root, origin, extension added.
        let root_b64 = cp.root().to_base64();
        let other_root = leaf_hash(b"other").to_base64();
        let tampered = [
            note.replacen("\n10\n", "\n11\n", 1),
            note.replacen(&root_b64, &other_root, 1),
            note.replacen(&format!("{ORIGIN}\n"), "concordat.example/audiT\n", 1),
            note.replacen(&format!("{root_b64}\n"), &format!("{root_b64}\nextra\n"), 1),
        ];
        for t in &tampered {
            assert_ne!(t, &note);
            assert!(
                matches!(open(t, &verifier), Err(CheckpointError::BadSignature)),
                "{t:?} was not refused as badly signed"
            );
        }

        // Structure.
        assert!(matches!(
            open(&body, &verifier),
            Err(CheckpointError::MalformedNote(_))
        ));
        assert!(matches!(
            open(&format!("{body}\n"), &verifier),
            Err(CheckpointError::MalformedNote(_))
        ));
        assert!(matches!(
            open(note.trim_end_matches('\n'), &verifier),
            Err(CheckpointError::MalformedNote(_))
        ));
        assert!(matches!(
            open(&note.replacen("— ", "-- ", 1), &verifier),
            Err(CheckpointError::MalformedNote(_))
        ));
        assert!(matches!(
            open("", &verifier),
            Err(CheckpointError::MalformedNote(_))
        ));

        // Limits come before parsing.
        let too_many = format!("{note}{}", sig.repeat(MAX_SIGNATURES));
        assert!(matches!(
            open(&too_many, &verifier),
            Err(CheckpointError::TooManySignatures { count: 17, max: 16 })
        ));
        let too_big = format!("{note}{}", "x".repeat(MAX_NOTE_SIZE));
        assert!(matches!(
            open(&too_big, &verifier),
            Err(CheckpointError::NoteTooLarge { .. })
        ));

        // Origin rule: the signer refuses, and a note made anyway is refused by open().
        let foreign = Checkpoint::new("other.example/log", 10, *cp.root()).unwrap();
        assert!(matches!(
            sign(&foreign, &signer),
            Err(CheckpointError::OriginMismatch { .. })
        ));
        let forced = sign_text(&foreign.to_note_body(), &signer).unwrap();
        assert!(matches!(
            open(&forced, &verifier),
            Err(CheckpointError::OriginMismatch { .. })
        ));
        // An over-long checkpoint cannot be signed into a note that open() would refuse.
        let long = cp
            .clone()
            .with_extensions(vec!["x".repeat(MAX_NOTE_SIZE)])
            .unwrap();
        assert!(matches!(
            sign(&long, &signer),
            Err(CheckpointError::NoteTooLarge { .. })
        ));
    }

    #[test]
    fn every_single_byte_change_or_truncation_is_refused() {
        let signer = signer(ORIGIN, 1);
        let verifier = signer.verifier();
        let cp = checkpoint_of(&log_of(5), 5);
        let note = sign(&cp, &signer).unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let mut tried = 0;
        for i in 0..note.len() {
            // Replace the byte with another printable ASCII character or a newline.
            let mut bytes = note.clone().into_bytes();
            let mut with = bytes[i];
            while with == bytes[i] {
                with = match rng.gen_range(0..20) {
                    0 => b'\n',
                    _ => rng.gen_range(0x20..0x7f),
                };
            }
            bytes[i] = with;
            if let Ok(changed) = String::from_utf8(bytes) {
                assert!(open(&changed, &verifier).is_err(), "accepted change at {i}");
                tried += 1;
            }
            if note.is_char_boundary(i) {
                assert!(
                    open(&note[..i], &verifier).is_err(),
                    "accepted truncation at {i}"
                );
            }
        }
        // Only the bytes of the em dash cannot be replaced by one ASCII byte.
        assert!(
            tried >= note.len() - 3,
            "only {tried} changes were valid UTF-8"
        );
    }

    #[test]
    fn consistency_between_checkpoints() {
        let signer = signer(ORIGIN, 1);
        let verifier = signer.verifier();
        let stored = log_of(20);
        let opened = |size: u64| {
            open(
                &sign(&checkpoint_of(&stored, size), &signer).unwrap(),
                &verifier,
            )
            .unwrap()
        };
        let (cp7, cp20) = (opened(7), opened(20));
        let proof = prove_tree(20, 7, &stored).unwrap();
        check_consistent(&cp7, &cp20, &proof).unwrap();
        check_consistent(&cp20, &cp20, &[]).unwrap();
        check_consistent(&opened(0), &cp20, &[]).unwrap();

        // A wrong proof, or the right proof for other sizes.
        let mut bad = proof.clone();
        bad[1].0[0] ^= 1;
        assert!(matches!(
            check_consistent(&cp7, &cp20, &bad),
            Err(CheckpointError::Inconsistent(MerkleError::InvalidProof))
        ));
        assert!(check_consistent(&opened(8), &cp20, &proof).is_err());
        assert!(check_consistent(&cp7, &opened(19), &proof).is_err());
        assert!(check_consistent(&cp20, &cp20, &proof).is_err());

        // Going back in time.
        assert!(matches!(
            check_consistent(&cp20, &cp7, &proof),
            Err(CheckpointError::SizeDecreased { old: 20, new: 7 })
        ));

        // A fork: a validly signed checkpoint of the same size with another root.
        let mut forked_log = log_of(19);
        let extra = stored_hashes(19, b"a different entry 19", &forked_log).unwrap();
        forked_log.extend(extra);
        let fork = open(
            &sign(&checkpoint_of(&forked_log, 20), &signer).unwrap(),
            &verifier,
        )
        .unwrap();
        assert_ne!(fork.root(), cp20.root());
        assert!(matches!(
            check_consistent(&cp20, &fork, &[]),
            Err(CheckpointError::Fork { size: 20 })
        ));
        // The fork is not an extension of the honest checkpoint of size 7's successor either.
        let honest_proof = prove_tree(20, 7, &stored).unwrap();
        assert!(check_consistent(&cp7, &fork, &honest_proof).is_err());

        // Another log's checkpoint.
        let other = Checkpoint::new("other.example/log", 20, *cp20.root()).unwrap();
        assert!(matches!(
            check_consistent(&cp7, &other, &proof),
            Err(CheckpointError::OriginMismatch { .. })
        ));
    }
}
