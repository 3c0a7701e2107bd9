//! Fuzz target bodies for the parsers and verifiers of this crate, shared by the cargo-fuzz
//! targets in `proto/fuzz/` and by the stable `cargo test` that replays their committed corpora
//! (`proto/fuzz/corpus/<target>/`).
//!
//! Each function takes arbitrary bytes, drives one parser or verifier with them, and checks
//! invariants that must hold for every input: nothing panics, what parses serialises back to
//! the same text where the format has one spelling, and what verifies verifies only under the
//! real key or for the true root. A broken invariant is an `assert!` failure, which is how the
//! fuzzer reports a finding. Each returns how far the input got ([`Outcome`]), so that the
//! replay test can check that its corpus reaches the verifying code and not only the refusals.
//!
//! The keys here are fixed and public (derived from constant seeds), for fuzzing only: the
//! seed corpus holds artefacts signed with them, so mutations start from inputs that verify.

use std::path::Path;

use prost::Message as _;

use crate::checkpoint::{self, Checkpoint, LogSigner, LogVerifier};
use crate::consent::{self, ConsentClaims, Revocation};
use crate::envelope::Envelope;
use crate::merkle::{self, Hash};
use crate::paserk::{KeyId, PublicKey, SecretKey};
use crate::significance::{self, Officer};
use crate::{paseto, pb};

/// How far an input got through the code under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Refused at the first step (not UTF-8, not the format at all).
    Refused,
    /// Parsed, but refused by a later check (signature, proof, a field rule).
    Parsed,
    /// Accepted by the deepest check: a signature or proof verified, an envelope validated.
    Accepted,
}

/// A fuzz target's body, as the replay test and the cargo-fuzz target call it.
pub type Body = fn(&[u8]) -> Outcome;

/// Replays every committed corpus file (`corpus_root/<target>/*`) through its target's body on
/// stable, without a fuzzer, as every crate's `committed_fuzz_corpora_replay` test does. It
/// panics, naming the file, when an input breaks an invariant, when a corpus is empty or
/// missing, or when no file of a corpus reaches the target's accepting path.
pub fn replay_corpora(corpus_root: &Path, targets: &[(&str, Body)]) {
    for &(target, run) in targets {
        let dir = corpus_root.join(target);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => panic!("{target}: cannot read {}: {e}", dir.display()),
        };
        let mut files = 0;
        let mut deepest = Outcome::Refused;
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(e) => panic!("{target}: cannot list {}: {e}", dir.display()),
            };
            let data = match std::fs::read(&path) {
                Ok(data) => data,
                Err(e) => panic!("{target}: cannot read {}: {e}", path.display()),
            };
            let outcome = std::panic::catch_unwind(|| run(&data))
                .unwrap_or_else(|_| panic!("{target}: {} broke an invariant", path.display()));
            deepest = deepest.max(outcome);
            files += 1;
        }
        assert!(files > 0, "{target}: empty corpus in {}", dir.display());
        assert_eq!(
            deepest,
            Outcome::Accepted,
            "{target}: no corpus file is accepted"
        );
    }
}

/// Writes seed inputs into `corpus_root/<target>/`, each named `seed-` and the first 16 bytes of
/// its SHA-256 in hex, so that seeds already there are simply rewritten. For the ignored
/// `write_fuzz_seeds` tests, run by hand; it panics on an I/O error.
pub fn write_seeds(corpus_root: &Path, target: &str, seeds: &[Vec<u8>]) {
    use sha2::{Digest as _, Sha256};
    let dir = corpus_root.join(target);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    for seed in seeds {
        let name = hex::encode(&Sha256::digest(seed)[..16]);
        let path = dir.join(format!("seed-{name}"));
        if let Err(e) = std::fs::write(&path, seed) {
            panic!("cannot write {}: {e}", path.display());
        }
    }
}

/// The seed of the consent-token key whose tokens the paseto corpus carries.
const CONSENT_SEED: [u8; 32] = [0x46; 32];
/// The seed of the log key whose checkpoints the checkpoint and audit corpora carry.
const LOG_SEED: [u8; 32] = [0x4c; 32];
/// The origin and key name of the fuzzing log.
pub const LOG_NAME: &str = "fuzz.concordat.invalid/audit";
/// The public key of the official PASETO v4 test vectors (`4-S-*` in `testdata/paseto-v4.json`).
const VECTOR_PUBLIC_KEY: [u8; 32] = [
    0x1e, 0xb9, 0xdb, 0xbb, 0xbc, 0x04, 0x7c, 0x03, 0xfd, 0x70, 0x60, 0x4e, 0x00, 0x71, 0xf0, 0x98,
    0x7e, 0x16, 0xb2, 0x8b, 0x75, 0x72, 0x25, 0xc1, 0x1f, 0x00, 0x41, 0x5d, 0x0e, 0x20, 0xb1, 0xa2,
];

/// The fixed consent-token key of the fuzz corpora.
pub fn consent_key() -> SecretKey {
    SecretKey::from_seed(&CONSENT_SEED)
}

/// The fixed log signer of the fuzz corpora.
pub fn log_signer() -> LogSigner {
    match LogSigner::new(LOG_NAME, ed25519_dalek::SigningKey::from_bytes(&LOG_SEED)) {
        Ok(signer) => signer,
        Err(e) => panic!("the fuzzing log name is valid: {e}"),
    }
}

/// PASETO v4.public parsing and verification, and the consent-token and revocation layers on
/// top of it. The input is the token text.
pub fn paseto(data: &[u8]) -> Outcome {
    let Ok(token) = std::str::from_utf8(data) else {
        return Outcome::Refused;
    };
    let message = paseto::message_unverified(token);
    let footer = paseto::footer_of(token);
    assert_eq!(
        message.as_ref().err(),
        footer.as_ref().err(),
        "message_unverified and footer_of must refuse the same tokens"
    );
    let (Ok(message), Ok(footer)) = (message, footer) else {
        return Outcome::Refused;
    };
    let mut outcome = Outcome::Parsed;
    check_paseto_encoding(token, &message, &footer);

    let secret = consent_key();
    let fuzz_key = *secret.public().verifying_key();
    let vector_key = match ed25519_dalek::VerifyingKey::from_bytes(&VECTOR_PUBLIC_KEY) {
        Ok(key) => key,
        Err(e) => panic!("the vector key is a valid point: {e}"),
    };
    let implicits: [&[u8]; 3] = [
        b"",
        consent::CONSENT_TYP.as_bytes(),
        consent::REVOCATION_TYP.as_bytes(),
    ];
    let mut verified_under = 0;
    for key in [&fuzz_key, &vector_key] {
        for implicit in implicits {
            if let Ok(v) = paseto::verify(token, key, implicit) {
                assert_eq!(v.message, message, "verify returns the parsed message");
                assert_eq!(v.footer, footer, "verify returns the parsed footer");
                verified_under += 1;
                outcome = Outcome::Accepted;
            }
        }
    }
    // One signature binds one key and one implicit assertion.
    assert!(
        verified_under <= 1,
        "a token verified under {verified_under} key/assertion pairs"
    );

    let public = secret.public();
    let claims = consent::verify(token, &public);
    let revocation = consent::verify_revocation(token, &public);
    assert!(
        !(claims.is_ok() && revocation.is_ok()),
        "a token is both a consent token and a revocation"
    );
    if let Ok(claims) = &claims {
        assert_eq!(consent::key_id_of(token).ok(), Some(public.key_id()));
        assert_eq!(consent::decode_unverified(token).as_ref(), Ok(claims));
        outcome = Outcome::Accepted;
    }
    if let Ok(revocation) = &revocation {
        check_revocation_round_trip(revocation, &secret);
        outcome = Outcome::Accepted;
    }
    // National-significance halves: the verifier never panics, a token is never both a
    // consent token and a designation, and a token never countersigns itself (one officer).
    let officer = Officer {
        id: "fuzz-officer".into(),
        agency: match "ico".parse() {
            Ok(a) => a,
            Err(e) => panic!("a valid agency id: {e}"),
        },
        key: public,
    };
    let lookup = |k: &KeyId| (k == &officer.key.key_id()).then_some(&officer);
    assert!(
        significance::verify(token, token, lookup).is_err(),
        "a token countersigned itself"
    );
    if let Ok(decoded) = significance::decode_unverified(token) {
        assert!(
            claims.is_err(),
            "a token is both a consent token and a designation"
        );
        let _ = significance::countersign(token, &secret, time::OffsetDateTime::UNIX_EPOCH);
        let _ = decoded.jti();
    }
    // Claims the fuzzer invents without a signature still go through the claim rules; those
    // that name the fuzzing key as issuer must survive signing and verifying unchanged.
    if let Ok(decoded) = consent::decode_unverified(token)
        && decoded.iss() == &public.key_id()
    {
        check_claims_round_trip(&decoded, &secret);
    }
    outcome
}

/// A token that parses is the one canonical encoding of its pieces.
fn check_paseto_encoding(token: &str, message: &[u8], footer: &[u8]) {
    let rest = token
        .strip_prefix(paseto::HEADER)
        .unwrap_or_else(|| panic!("a parsed token starts with {}", paseto::HEADER));
    let (body, footer_text) = match rest.split_once('.') {
        Some((body, footer_text)) => (body, Some(footer_text)),
        None => (rest, None),
    };
    let decoded = paseto::b64_decode(body).unwrap_or_else(|| panic!("a parsed body decodes"));
    assert_eq!(
        &decoded[..message.len()],
        message,
        "the message leads the body"
    );
    assert_eq!(
        decoded.len(),
        message.len() + 64,
        "the body ends with a signature"
    );
    let mut again = String::from(paseto::HEADER);
    again.push_str(&paseto::b64_encode(&decoded));
    if let Some(footer_text) = footer_text {
        assert!(!footer.is_empty(), "an empty footer is never written");
        assert_eq!(paseto::b64_decode(footer_text).as_deref(), Some(footer));
        again.push('.');
        again.push_str(&paseto::b64_encode(footer));
    }
    assert_eq!(again, token, "a parsed token re-encodes to itself");
}

/// Claims signed with their issuer's key verify back to the same claims.
fn check_claims_round_trip(claims: &ConsentClaims, secret: &SecretKey) {
    let token = match claims.sign(secret) {
        Ok(token) => token,
        Err(e) => panic!("claims with the key's own iss sign: {e}"),
    };
    match consent::verify(&token, &secret.public()) {
        Ok(again) => assert_eq!(&again, claims, "claims survive signing and verifying"),
        Err(e) => panic!("a freshly signed consent token fails to verify: {e}"),
    }
}

/// A verified revocation signed again verifies back to itself.
fn check_revocation_round_trip(revocation: &Revocation, secret: &SecretKey) {
    let token = match revocation.sign(secret) {
        Ok(token) => token,
        Err(e) => panic!("a verified revocation signs again: {e}"),
    };
    match consent::verify_revocation(&token, &secret.public()) {
        Ok(again) => assert_eq!(&again, revocation),
        Err(e) => panic!("a freshly signed revocation fails to verify: {e}"),
    }
}

/// PASERK keys: `k4.secret`, `k4.public` and `k4.pid` text, their JSON (serde) form, and raw
/// key bytes. What parses prints back exactly as given.
pub fn paserk(data: &[u8]) -> Outcome {
    let mut outcome = Outcome::Refused;
    if let Ok(secret) = SecretKey::from_keypair_bytes(data) {
        assert_eq!(
            &data[32..],
            secret.public().as_bytes(),
            "the pair's own public key"
        );
        outcome = Outcome::Parsed;
    }
    if let Ok(public) = PublicKey::from_bytes(data) {
        assert_eq!(public.as_bytes().as_slice(), data);
        outcome = Outcome::Parsed;
    }
    if let Ok(public) = serde_json::from_slice::<PublicKey>(data) {
        let json = serde_json::to_string(&public).unwrap_or_default();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).ok(), Some(public));
        outcome = Outcome::Parsed;
    }
    if let Ok(id) = serde_json::from_slice::<KeyId>(data) {
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(serde_json::from_str::<KeyId>(&json).ok(), Some(id));
        outcome = Outcome::Parsed;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return outcome;
    };
    let secret = text.parse::<SecretKey>();
    let public = text.parse::<PublicKey>();
    let id = text.parse::<KeyId>();
    let parsed =
        usize::from(secret.is_ok()) + usize::from(public.is_ok()) + usize::from(id.is_ok());
    assert!(parsed <= 1, "one PASERK string parsed as {parsed} types");
    if let Ok(secret) = secret {
        assert_eq!(
            secret.expose_paserk(),
            text,
            "k4.secret prints back as given"
        );
        let public = secret.public();
        assert_eq!(public.to_string().parse::<PublicKey>().ok(), Some(public));
        assert_eq!(secret.key_id(), public.key_id());
        // The key signs, and its own public key (only) verifies what it signs.
        let token = paseto::sign(secret.signing_key(), b"fuzz", b"", b"");
        assert!(paseto::verify(&token, public.verifying_key(), b"").is_ok());
        let other = consent_key().public();
        if other != public {
            assert!(paseto::verify(&token, other.verifying_key(), b"").is_err());
        }
        outcome = Outcome::Accepted;
    }
    if let Ok(public) = public {
        assert_eq!(public.to_string(), text, "k4.public prints back as given");
        let id = public.key_id();
        assert_eq!(id.to_string().parse::<KeyId>().ok(), Some(id));
        outcome = Outcome::Accepted;
    }
    if let Ok(id) = id {
        assert_eq!(id.to_string(), text, "k4.pid prints back as given");
        outcome = Outcome::Accepted;
    }
    outcome
}

/// `Envelope` from arbitrary protobuf bytes: decode with prost, validate with `from_wire`.
/// A refused envelope is handed back unchanged; a valid one survives the trip to the wire and
/// back (and through the protobuf encoding) unchanged.
pub fn envelope(data: &[u8]) -> Outcome {
    let Ok(wire) = pb::Envelope::decode(data) else {
        return Outcome::Refused;
    };
    match Envelope::from_wire(wire.clone()) {
        Err((_, back)) => {
            assert_eq!(*back, wire, "a refused envelope is handed back whole");
            Outcome::Parsed
        }
        Ok(envelope) => {
            let again = pb::Envelope::from(envelope.clone());
            let bytes = again.encode_to_vec();
            let decoded = match pb::Envelope::decode(bytes.as_slice()) {
                Ok(decoded) => decoded,
                Err(e) => panic!("an encoded envelope decodes: {e}"),
            };
            assert_eq!(decoded, again, "protobuf round trip");
            match Envelope::try_from(decoded) {
                Ok(validated) => assert_eq!(validated, envelope, "wire round trip"),
                Err(e) => panic!("a valid envelope converted to the wire is refused: {e}"),
            }
            Outcome::Accepted
        }
    }
}

/// The checkpoint body parser, signed-note opening with the fuzzing log key, and the log key
/// strings. What parses prints back as given; what opens was signed by the key.
pub fn checkpoint(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Refused;
    };
    let mut outcome = Outcome::Refused;
    if let Ok(cp) = Checkpoint::parse(text) {
        assert_eq!(
            cp.to_note_body(),
            text,
            "a checkpoint body prints back as given"
        );
        outcome = Outcome::Parsed;
    }
    if let Ok(verifier) = text.parse::<LogVerifier>() {
        assert_eq!(
            verifier.to_string().parse::<LogVerifier>().ok(),
            Some(verifier)
        );
        outcome = outcome.max(Outcome::Parsed);
    }
    if let Ok(signer) = LogSigner::from_secret_string(text) {
        let again = LogSigner::from_secret_string(&signer.to_secret_string());
        assert_eq!(again.ok().map(|s| s.verifier()), Some(signer.verifier()));
        outcome = outcome.max(Outcome::Parsed);
    }

    let signer = log_signer();
    let verifier = signer.verifier();
    match checkpoint::open(text, &verifier) {
        Ok(cp) => {
            assert_eq!(cp.origin(), verifier.name());
            let body = cp.to_note_body();
            assert!(
                text.starts_with(&body) && text[body.len()..].starts_with('\n'),
                "an opened note's text is its checkpoint's body"
            );
            // Signing the same checkpoint again gives a note that opens to it.
            let note = match checkpoint::sign(&cp, &signer) {
                Ok(note) => note,
                Err(e) => panic!("an opened checkpoint signs again: {e}"),
            };
            assert_eq!(checkpoint::open(&note, &verifier).ok(), Some(cp));
            // Another key of the same name never opens it.
            let other = match LogSigner::new(
                LOG_NAME,
                ed25519_dalek::SigningKey::from_bytes(&CONSENT_SEED),
            ) {
                Ok(other) => other.verifier(),
                Err(e) => panic!("the fuzzing log name is valid: {e}"),
            };
            assert!(checkpoint::open(text, &other).is_err());
            Outcome::Accepted
        }
        Err(_) => outcome,
    }
}

/// Inclusion and consistency proof verification against a real tree built from the input.
///
/// The input chooses a tree size (1 to 130 leaves), a record or an older size, and edits to
/// the true proof (or a proof of raw bytes), the leaf and the roots. Whatever the edits, a
/// proof verifies only if it is the true proof for the true leaf and the true roots; and the
/// true proof always verifies. A last mode feeds arbitrary sizes and hashes to the checkers,
/// which must refuse them without panicking.
pub fn merkle(data: &[u8]) -> Outcome {
    let mut input = Input(data);
    let mode = input.byte();
    if mode % 4 == 3 {
        return merkle_arbitrary(&mut input);
    }
    let t = 1 + u64::from(input.byte()) % 130;
    let tree = Tree::new(t);
    let a = u64::from(input.byte());
    let raw = mode & 0x80 != 0;
    if mode % 2 == 0 {
        // Inclusion of record n in the tree of size t.
        let n = a % t;
        let true_proof = match merkle::prove_record(t, n, &tree.stored) {
            Ok(p) => p,
            Err(e) => panic!("proving record {n} of {t}: {e}"),
        };
        let true_leaf = tree.leaves[n as usize];
        assert!(merkle::check_record(&true_proof, t, &tree.root(t), n, &true_leaf).is_ok());
        let leaf = if mode & 0x40 != 0 {
            tree.leaves[input.byte() as usize % tree.leaves.len()]
        } else {
            true_leaf
        };
        let proof = fuzzed_proof(&mut input, &true_proof, raw);
        let ok = merkle::check_record(&proof, t, &tree.root(t), n, &leaf).is_ok();
        assert_eq!(
            ok,
            proof == true_proof && leaf == true_leaf,
            "inclusion of {n} in {t}: a proof verifies if and only if it is the true one"
        );
        if ok {
            Outcome::Accepted
        } else {
            Outcome::Parsed
        }
    } else {
        // Consistency from the tree of size m to the tree of size t.
        let m = a % (t + 1);
        let true_proof = match merkle::prove_tree(t, m, &tree.stored) {
            Ok(p) => p,
            Err(e) => panic!("proving {m} to {t}: {e}"),
        };
        let (old_root, new_root) = (tree.root(m), tree.root(t));
        assert!(merkle::check_tree(&true_proof, t, &new_root, m, &old_root).is_ok());
        // The old root may be swapped for the root of another size.
        let h = if mode & 0x40 != 0 {
            tree.root(u64::from(input.byte()) % (t + 1))
        } else {
            old_root
        };
        let proof = fuzzed_proof(&mut input, &true_proof, raw);
        let ok = merkle::check_tree(&proof, t, &new_root, m, &h).is_ok();
        assert_eq!(
            ok,
            proof == true_proof && h == old_root,
            "consistency of {m} with {t}: a proof verifies if and only if it is the true one"
        );
        // The checkpoint-level check agrees with the tree-level one.
        let old = Checkpoint::new(LOG_NAME, m, h);
        let new = Checkpoint::new(LOG_NAME, t, new_root);
        if let (Ok(old), Ok(new)) = (old, new) {
            let consistent = checkpoint::check_consistent(&old, &new, &proof).is_ok();
            assert_eq!(consistent, ok, "check_consistent agrees with check_tree");
        }
        if ok {
            Outcome::Accepted
        } else {
            Outcome::Parsed
        }
    }
}

/// Arbitrary sizes, indexes, roots and proof hashes: the checkers and provers must not panic.
fn merkle_arbitrary(input: &mut Input<'_>) -> Outcome {
    let t = input.u64();
    let n = input.u64();
    let root = input.hash();
    let leaf = input.hash();
    let proof: Vec<Hash> = (0..input.byte() % 70).map(|_| input.hash()).collect();
    let record = merkle::check_record(&proof, t, &root, n, &leaf);
    let tree = merkle::check_tree(&proof, t, &root, n, &leaf);
    // A tree of 8 leaves: asking it for proofs in larger trees fails cleanly.
    let small = Tree::new(8);
    let _ = merkle::prove_record(t, n, &small.stored);
    let _ = merkle::prove_tree(t, n, &small.stored);
    let _ = merkle::tree_hash(t, &small.stored);
    if record.is_ok() || tree.is_ok() {
        Outcome::Accepted
    } else {
        Outcome::Parsed
    }
}

/// The true proof edited by the input, or (`raw`) a proof made of the input's bytes.
fn fuzzed_proof(input: &mut Input<'_>, true_proof: &[Hash], raw: bool) -> Vec<Hash> {
    if raw {
        return (0..input.byte() % 16).map(|_| input.hash()).collect();
    }
    let mut proof = true_proof.to_vec();
    for _ in 0..input.byte() % 4 {
        let op = input.byte();
        let at = input.byte() as usize;
        match op % 4 {
            0 if !proof.is_empty() => {
                let i = at % proof.len();
                proof[i].0[usize::from(op >> 2) % merkle::HASH_SIZE] ^= 1 << (op & 7);
            }
            1 if !proof.is_empty() => {
                proof.remove(at % proof.len());
            }
            2 => {
                let h = merkle::leaf_hash(&[op]);
                proof.insert(at % (proof.len() + 1), h);
            }
            3 if proof.len() > 1 => {
                let len = proof.len();
                proof.swap(at % len, (at + 1) % len);
            }
            _ => {}
        }
    }
    proof
}

/// A tree of leaves `leaf_hash([i])` in the stored-hash layout.
struct Tree {
    leaves: Vec<Hash>,
    stored: Vec<Hash>,
}

impl Tree {
    fn new(size: u64) -> Tree {
        let mut stored: Vec<Hash> = Vec::new();
        let mut leaves = Vec::new();
        for i in 0..size {
            let entry = i.to_be_bytes();
            leaves.push(merkle::leaf_hash(&entry));
            match merkle::stored_hashes(i, &entry, &stored) {
                Ok(hashes) => stored.extend(hashes),
                Err(e) => panic!("appending record {i}: {e}"),
            }
        }
        Tree { leaves, stored }
    }

    fn root(&self, size: u64) -> Hash {
        match merkle::tree_hash(size, &self.stored) {
            Ok(root) => root,
            Err(e) => panic!("root of {size}: {e}"),
        }
    }
}

/// Reads fuzz input front to back; past the end it yields zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        for b in &mut bytes {
            *b = self.byte();
        }
        u64::from_be_bytes(bytes)
    }

    fn hash(&mut self) -> Hash {
        let mut h = [0u8; merkle::HASH_SIZE];
        for b in &mut h {
            *b = self.byte();
        }
        Hash(h)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::consent::RevocationTarget;
    use crate::envelope::Kind;
    use std::path::PathBuf;
    use time::OffsetDateTime;

    /// The fuzz targets of this crate, by the name of their corpus directory.
    const TARGETS: [(&str, Body); 5] = [
        ("paseto", paseto),
        ("paserk", paserk),
        ("envelope", envelope),
        ("checkpoint", checkpoint),
        ("merkle", merkle),
    ];

    fn corpus_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
    }

    /// Replays every committed corpus file through its target on stable, without a fuzzer:
    /// no invariant may fail, and each corpus must reach the target's verifying code.
    #[test]
    fn committed_fuzz_corpora_replay() {
        replay_corpora(&corpus_root(), &TARGETS);
    }

    /// Regenerates the seed inputs of the corpora (run with `--ignored`; files are named by
    /// the SHA-256 of their contents, so seeds already there are simply rewritten).
    #[test]
    #[ignore = "writes proto/fuzz/corpus; run by hand to regenerate the seeds"]
    fn write_fuzz_seeds() {
        for (target, seeds) in seeds() {
            write_seeds(&corpus_root(), target, &seeds);
        }
    }

    /// Every string under `field` anywhere in a JSON test-vector file.
    fn strings_named(json: &str, field: &str) -> Vec<Vec<u8>> {
        fn walk(v: &serde_json::Value, field: &str, out: &mut Vec<Vec<u8>>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match v {
                            serde_json::Value::String(s) if field == "*" || k == field => {
                                out.push(s.clone().into_bytes());
                            }
                            _ => walk(v, field, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => {
                    for v in items {
                        walk(v, field, out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&serde_json::from_str(json).unwrap(), field, &mut out);
        out
    }

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(seconds).unwrap()
    }

    fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
        let key = consent_key();
        let kid = key.key_id();

        // PASETO: the official vectors, and consent tokens and revocations of the fuzzing key.
        let mut paseto_seeds = strings_named(include_str!("../testdata/paseto-v4.json"), "token");
        let base = ConsentClaims::builder("acme-ltd", "ncsc", "incident response")
            .recipient("ico")
            .kind(Kind::IncidentRecord)
            .jti(crate::consent::TokenId::from_bytes([7; 16]))
            .valid_for(time::Duration::days(30));
        let claims = [
            base.clone().build(kid, at(1_780_000_000)).unwrap(),
            base.clone()
                .recipient("nca")
                .kind(Kind::ThreatAssessment)
                .incident_ref("INC-2026-0042")
                .payload(b"{}")
                .max_uses(3)
                .build(kid, at(1_780_000_000))
                .unwrap(),
        ];
        for c in &claims {
            paseto_seeds.push(c.sign(&key).unwrap().into_bytes());
        }
        for target in [
            RevocationTarget::Token(claims[0].jti()),
            RevocationTarget::IssuedBefore(at(1_780_000_000)),
        ] {
            let r = Revocation::new(kid, target, at(1_790_000_000)).unwrap();
            paseto_seeds.push(r.sign(&key).unwrap().into_bytes());
        }
        paseto_seeds.push(paseto::sign(key.signing_key(), b"{}", b"footer", b"").into_bytes());

        // PASERK: the official vectors, the fuzzing key in every form, and raw key bytes.
        let mut paserk_seeds = Vec::new();
        for file in [
            include_str!("../testdata/paserk-k4-pid.json"),
            include_str!("../testdata/paserk-k4-public.json"),
            include_str!("../testdata/paserk-k4-secret.json"),
        ] {
            paserk_seeds.extend(strings_named(file, "paserk"));
        }
        let public = key.public();
        paserk_seeds.extend([
            key.expose_paserk().into_bytes(),
            public.to_string().into_bytes(),
            kid.to_string().into_bytes(),
            serde_json::to_vec(&public).unwrap(),
            serde_json::to_vec(&kid).unwrap(),
            public.as_bytes().to_vec(),
            key.signing_key().to_keypair_bytes().to_vec(),
        ]);

        // Envelopes: valid ones, and one refused for each of a few fields.
        let valid = pb::Envelope {
            message_id: "0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b".into(),
            recipients: vec!["ico".into(), "nca".into()],
            kind: pb::MessageKind::IncidentRecord as i32,
            organisation: "acme-ltd".into(),
            incident_ref: "INC-2026-0042".into(),
            content_type: "application/json".into(),
            tlp: pb::Tlp::Amber as i32,
            payload: b"{\"a\":1}".to_vec(),
            consent_token: String::from_utf8(paseto_seeds.last().unwrap().clone()).unwrap(),
            consent_tokens: Vec::new(),
            organisations: Vec::new(),
            significance_designation: String::new(),
            significance_countersignature: String::new(),
            workflow: None,
        };
        let envelopes = [
            valid.clone(),
            pb::Envelope {
                organisation: String::new(),
                incident_ref: String::new(),
                content_type: String::new(),
                consent_token: String::new(),
                recipients: vec!["ico".into()],
                kind: pb::MessageKind::ThreatAssessment as i32,
                tlp: pb::Tlp::Clear as i32,
                ..valid.clone()
            },
            pb::Envelope {
                tlp: 99,
                ..valid.clone()
            },
            pb::Envelope {
                recipients: vec!["ico".into(), "ico".into()],
                ..valid.clone()
            },
            pb::Envelope {
                message_id: "not-a-uuid".into(),
                ..valid.clone()
            },
        ];
        let envelope_seeds = envelopes.iter().map(|e| e.encode_to_vec()).collect();

        // Checkpoints: signed notes of the fuzzing log, bodies, keys, and the vectors.
        let signer = log_signer();
        let mut checkpoint_seeds =
            strings_named(include_str!("../testdata/signed-note-vectors.json"), "*");
        let tree = Tree::new(8);
        for (size, extensions) in [(0, vec![]), (8, vec![]), (5, vec!["ext line".to_owned()])] {
            let cp = Checkpoint::new(LOG_NAME, size, tree.root(size))
                .unwrap()
                .with_extensions(extensions)
                .unwrap();
            checkpoint_seeds.push(cp.to_note_body().into_bytes());
            let note = checkpoint::sign(&cp, &signer).unwrap();
            checkpoint_seeds.push(note.clone().into_bytes());
            // A cosignature by another key, which `open` ignores.
            let witness = LogSigner::new(
                "witness.example",
                ed25519_dalek::SigningKey::from_bytes(&[0x57; 32]),
            )
            .unwrap();
            let cosigned = checkpoint::sign(
                &Checkpoint::new("witness.example", size, tree.root(size)).unwrap(),
                &witness,
            )
            .unwrap();
            let cosig = cosigned.rsplit_once("\n\n").unwrap().1;
            checkpoint_seeds.push(format!("{note}{cosig}").into_bytes());
        }
        checkpoint_seeds.push(signer.verifier().to_string().into_bytes());
        checkpoint_seeds.push(signer.to_secret_string().into_bytes());

        // Merkle: each mode, a few tree shapes, true and edited proofs.
        let mut merkle_seeds = Vec::new();
        for (mode, t, a) in [
            (0u8, 7u8, 3u8),
            (0, 8, 0),
            (0, 129, 100),
            (1, 7, 3),
            (1, 8, 4),
            (1, 100, 64),
            (1, 5, 0),
            (1, 5, 5),
        ] {
            merkle_seeds.push(vec![mode, t, a]);
            merkle_seeds.push(vec![mode, t, a, 1, 0, 0]);
            merkle_seeds.push(vec![mode | 0x40, t, a, a.wrapping_add(1), 1, 1, 0]);
        }
        merkle_seeds.push(vec![0x80, 8, 3, 3]);
        let mut arbitrary = vec![3u8];
        arbitrary.extend(1u64.to_be_bytes());
        arbitrary.extend(0u64.to_be_bytes());
        arbitrary.extend([0xaa; 64]);
        arbitrary.push(1);
        merkle_seeds.push(arbitrary);

        vec![
            ("paseto", paseto_seeds),
            ("paserk", paserk_seeds),
            ("envelope", envelope_seeds),
            ("checkpoint", checkpoint_seeds),
            ("merkle", merkle_seeds),
        ]
    }
}
