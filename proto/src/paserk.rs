//! PASERK serialisation of the Ed25519 keys that sign consent tokens, and their key ids.
//!
//! Three forms are supported, all from the PASERK standard's version 4:
//! - `k4.secret.<base64url(seed || public key)>`: a 64-byte Ed25519 key pair ([`SecretKey`]);
//! - `k4.public.<base64url(public key)>`: a 32-byte Ed25519 public key ([`PublicKey`]);
//! - `k4.pid.<base64url(BLAKE2b-264("k4.pid." || k4.public PASERK))>`: the key id of a public
//!   key ([`KeyId`]), which consent tokens carry in their footer so that a verifier can find
//!   the key to check them with.
//!
//! All base64url is unpadded and must be canonical. Parsing a `k4.secret` checks that its
//! public half really belongs to its secret half, so a key file cannot claim one identity and
//! sign as another. A secret key never prints its secret bytes: its `Debug` shows its key id,
//! and the only way to get its PASERK text is the deliberately named
//! [`SecretKey::expose_paserk`].

use std::fmt;
use std::str::FromStr;

use blake2::digest::consts::U33;
use blake2::{Blake2b, Digest as _};
use ed25519_dalek::{PUBLIC_KEY_LENGTH, SECRET_KEY_LENGTH, SigningKey, VerifyingKey};

use crate::paseto::{b64_decode, b64_encode};

/// PASERK header of a version 4 secret (signing) key.
const SECRET_HEADER: &str = "k4.secret.";
/// PASERK header of a version 4 public key.
const PUBLIC_HEADER: &str = "k4.public.";
/// PASERK header of a version 4 public key id.
const PID_HEADER: &str = "k4.pid.";
/// A key id is a 264-bit (33-byte) BLAKE2b digest.
const KEY_ID_LEN: usize = 33;
/// A `k4.secret` holds the 32-byte seed followed by the 32-byte public key.
const KEYPAIR_LEN: usize = SECRET_KEY_LENGTH + PUBLIC_KEY_LENGTH;

/// Why a PASERK string or key bytes were refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaserkError {
    /// The string does not start with the expected header (another version or another type).
    #[error("expected a PASERK starting with `{expected}`")]
    WrongHeader {
        /// The header that was expected, such as `k4.public.`.
        expected: &'static str,
    },
    /// The data after the header is not canonical unpadded base64url.
    #[error("PASERK data is not canonical unpadded base64url")]
    Encoding,
    /// The key material has the wrong number of bytes.
    #[error("key material is {actual} bytes, expected {expected}")]
    Length {
        /// The number of bytes required.
        expected: usize,
        /// The number of bytes found.
        actual: usize,
    },
    /// The public key bytes are not the encoding of a point on Ed25519.
    #[error("public key is not a valid Ed25519 point")]
    InvalidPublicKey,
    /// The public half of a key pair is not the public key of its secret half.
    #[error("the public half of the key pair does not match its secret half")]
    KeyPairMismatch,
}

/// An Ed25519 signing key, written as `k4.secret.…`.
///
/// It has no `Display` and no `Serialize`, so that it cannot be printed or logged by accident;
/// see [`SecretKey::expose_paserk`]. The secret bytes are zeroed when it is dropped.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Generates a fresh key from the operating system's random number generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Builds the key whose 32-byte Ed25519 seed is `seed` (deterministic: for tests and
    /// known-answer examples, or keys kept as seeds elsewhere).
    pub fn from_seed(seed: &[u8; SECRET_KEY_LENGTH]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// Builds the key from the 64 bytes `seed || public key` of a `k4.secret`, checking that the
    /// public key is the one the seed derives.
    pub fn from_keypair_bytes(bytes: &[u8]) -> Result<Self, PaserkError> {
        let bytes: &[u8; KEYPAIR_LEN] = bytes.try_into().map_err(|_| PaserkError::Length {
            expected: KEYPAIR_LEN,
            actual: bytes.len(),
        })?;
        // `from_keypair_bytes` derives the public key from the seed and compares.
        SigningKey::from_keypair_bytes(bytes)
            .map(Self)
            .map_err(|_| PaserkError::KeyPairMismatch)
    }

    /// The public key of this key pair.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The key id of this key pair's public key.
    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }

    /// The underlying `ed25519-dalek` signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// The `k4.secret.…` PASERK of this key. The result **is the secret**: write it only to a
    /// protected key file, never to a log.
    pub fn expose_paserk(&self) -> String {
        format!("{SECRET_HEADER}{}", b64_encode(&self.0.to_keypair_bytes()))
    }
}

impl FromStr for SecretKey {
    type Err = PaserkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode(s, SECRET_HEADER)?;
        Self::from_keypair_bytes(&bytes)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretKey").field(&self.key_id()).finish()
    }
}

/// An Ed25519 public key, written as `k4.public.…`.
///
/// Any valid point encoding is accepted, as PASERK requires; small-order ("weak") keys are
/// accepted here but no signature ever verifies under them, because verification is strict.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Builds a public key from its 32-byte encoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PaserkError> {
        let bytes: &[u8; PUBLIC_KEY_LENGTH] =
            bytes.try_into().map_err(|_| PaserkError::Length {
                expected: PUBLIC_KEY_LENGTH,
                actual: bytes.len(),
            })?;
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| PaserkError::InvalidPublicKey)
    }

    /// The 32-byte encoding of the key.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LENGTH] {
        self.0.as_bytes()
    }

    /// The underlying `ed25519-dalek` verifying key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    /// The `k4.pid` key id of this key: BLAKE2b-264 of `"k4.pid." || "k4.public.…"`.
    pub fn key_id(&self) -> KeyId {
        KeyId::of_public_paserk(&self.to_string())
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> Self {
        Self(key)
    }
}

impl FromStr for PublicKey {
    type Err = PaserkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(&decode(s, PUBLIC_HEADER)?)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&public_paserk(self.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The id of a public key, written as `k4.pid.…`: what a token's footer names as its `kid`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// Computes the id of the public key whose `k4.public` PASERK is `public_paserk`.
    fn of_public_paserk(public_paserk: &str) -> Self {
        // The output size is part of the type, so the digest is exactly 33 bytes.
        let digest = Blake2b::<U33>::new()
            .chain_update(PID_HEADER)
            .chain_update(public_paserk)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest);
        Self(id)
    }

    /// The 33 digest bytes of the id.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }

    /// The id whose digest bytes are `bytes` (as [`KeyId::as_bytes`] gives them).
    pub fn from_bytes(bytes: [u8; KEY_ID_LEN]) -> Self {
        Self(bytes)
    }
}

impl FromStr for KeyId {
    type Err = PaserkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode(s, PID_HEADER)?;
        let actual = bytes.len();
        bytes.try_into().map(Self).map_err(|_| PaserkError::Length {
            expected: KEY_ID_LEN,
            actual,
        })
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PID_HEADER}{}", b64_encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The `k4.public` PASERK of 32 public key bytes.
///
/// PASERK treats the bytes as opaque (its test vectors include strings that are not curve
/// points); [`PublicKey`] adds the point check on top.
fn public_paserk(bytes: &[u8; PUBLIC_KEY_LENGTH]) -> String {
    format!("{PUBLIC_HEADER}{}", b64_encode(bytes))
}

/// Strips `header` from a PASERK string and decodes the rest as canonical base64url.
fn decode(paserk: &str, header: &'static str) -> Result<Vec<u8>, PaserkError> {
    let data = paserk
        .strip_prefix(header)
        .ok_or(PaserkError::WrongHeader { expected: header })?;
    b64_decode(data).ok_or(PaserkError::Encoding)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct VectorFile {
        tests: Vec<Vector>,
    }

    #[derive(Deserialize)]
    struct Vector {
        name: String,
        key: String,
        #[serde(rename = "secret-key-seed")]
        secret_key_seed: Option<String>,
        #[serde(rename = "public-key")]
        public_key: Option<String>,
        paserk: Option<String>,
    }

    fn load(json: &str) -> Vec<Vector> {
        serde_json::from_str::<VectorFile>(json).unwrap().tests
    }

    // Success cases carry a PASERK; failure cases carry `"paserk": null`. (The upstream
    // k4.pid file spells one failure flag `expectfail`, so the flag itself is not relied on.)

    /// The 32 bytes of a success vector's key.
    fn key32(v: &Vector) -> [u8; 32] {
        hex::decode(&v.key).unwrap().try_into().unwrap()
    }

    #[test]
    fn official_k4_public_vectors() {
        let vectors = load(include_str!("../testdata/paserk-k4-public.json"));
        let (mut ok, mut points, mut failed) = (0, 0, 0);
        for v in vectors {
            let bytes = hex::decode(&v.key).unwrap();
            match &v.paserk {
                Some(expected) => {
                    // The encoding layer, on the raw bytes as PASERK defines it.
                    assert_eq!(&public_paserk(&key32(&v)), expected, "{}", v.name);
                    assert_eq!(
                        decode(expected, PUBLIC_HEADER).unwrap(),
                        bytes,
                        "{}",
                        v.name
                    );
                    // The typed key, for the vectors whose bytes are a curve point.
                    match PublicKey::from_bytes(&bytes) {
                        Ok(key) => {
                            assert_eq!(&key.to_string(), expected, "{}", v.name);
                            assert_eq!(expected.parse::<PublicKey>().unwrap(), key, "{}", v.name);
                            points += 1;
                        }
                        Err(err) => {
                            assert_eq!(err, PaserkError::InvalidPublicKey, "{}", v.name);
                            assert_eq!(
                                expected.parse::<PublicKey>().unwrap_err(),
                                PaserkError::InvalidPublicKey
                            );
                        }
                    }
                    ok += 1;
                }
                None => {
                    assert!(
                        matches!(
                            PublicKey::from_bytes(&bytes),
                            Err(PaserkError::Length { expected: 32, .. })
                        ),
                        "{}",
                        v.name
                    );
                    failed += 1;
                }
            }
        }
        assert_eq!((ok, failed), (3, 1));
        assert!(points >= 1, "at least the all-zero key is a point");
    }

    #[test]
    fn official_k4_secret_vectors() {
        let vectors = load(include_str!("../testdata/paserk-k4-secret.json"));
        let (mut ok, mut failed) = (0, 0);
        for v in vectors {
            let bytes = hex::decode(&v.key).unwrap();
            match v.paserk {
                Some(expected) => {
                    let seed: [u8; 32] = hex::decode(v.secret_key_seed.unwrap())
                        .unwrap()
                        .try_into()
                        .unwrap();
                    let key = SecretKey::from_seed(&seed);
                    assert_eq!(key.expose_paserk(), expected, "{}", v.name);
                    assert_eq!(
                        hex::encode(key.public().as_bytes()),
                        v.public_key.unwrap(),
                        "{}",
                        v.name
                    );
                    let parsed: SecretKey = expected.parse().unwrap();
                    assert_eq!(parsed.signing_key().to_keypair_bytes().to_vec(), bytes);
                    assert_eq!(
                        SecretKey::from_keypair_bytes(&bytes).unwrap().public(),
                        key.public()
                    );
                    ok += 1;
                }
                None => {
                    assert!(SecretKey::from_keypair_bytes(&bytes).is_err(), "{}", v.name);
                    failed += 1;
                }
            }
        }
        assert_eq!((ok, failed), (3, 2));
    }

    #[test]
    fn official_k4_pid_vectors() {
        let vectors = load(include_str!("../testdata/paserk-k4-pid.json"));
        let (mut ok, mut failed) = (0, 0);
        for v in vectors {
            let bytes = hex::decode(&v.key).unwrap();
            match &v.paserk {
                Some(expected) => {
                    let id = KeyId::of_public_paserk(&public_paserk(&key32(&v)));
                    assert_eq!(&id.to_string(), expected, "{}", v.name);
                    assert_eq!(expected.parse::<KeyId>().unwrap(), id, "{}", v.name);
                    if let Ok(key) = PublicKey::from_bytes(&bytes) {
                        assert_eq!(key.key_id(), id, "{}", v.name);
                    }
                    ok += 1;
                }
                None => {
                    assert!(
                        matches!(
                            PublicKey::from_bytes(&bytes),
                            Err(PaserkError::Length { expected: 32, .. })
                        ),
                        "{}",
                        v.name
                    );
                    failed += 1;
                }
            }
        }
        assert_eq!((ok, failed), (3, 2));
    }

    #[test]
    fn secret_key_with_foreign_public_half_is_refused() {
        let a = SecretKey::from_seed(&[1; 32]);
        let b = SecretKey::from_seed(&[2; 32]);
        let mut bytes = a.signing_key().to_keypair_bytes();
        bytes[32..].copy_from_slice(b.public().as_bytes());
        assert_eq!(
            SecretKey::from_keypair_bytes(&bytes).unwrap_err(),
            PaserkError::KeyPairMismatch
        );
        let text = format!("{SECRET_HEADER}{}", b64_encode(&bytes));
        assert_eq!(
            text.parse::<SecretKey>().unwrap_err(),
            PaserkError::KeyPairMismatch
        );
    }

    #[test]
    fn parse_errors_are_specific() {
        let key = SecretKey::from_seed(&[3; 32]);
        let public = key.public().to_string();
        let id = key.key_id().to_string();
        assert_eq!(
            public
                .replace("k4.", "k3.")
                .parse::<PublicKey>()
                .unwrap_err(),
            PaserkError::WrongHeader {
                expected: PUBLIC_HEADER
            }
        );
        assert_eq!(
            id.parse::<PublicKey>().unwrap_err(),
            PaserkError::WrongHeader {
                expected: PUBLIC_HEADER
            }
        );
        assert_eq!(
            public.parse::<KeyId>().unwrap_err(),
            PaserkError::WrongHeader {
                expected: PID_HEADER
            }
        );
        assert_eq!(
            public.parse::<SecretKey>().unwrap_err(),
            PaserkError::WrongHeader {
                expected: SECRET_HEADER
            }
        );
        assert_eq!(
            format!("{public}=").parse::<PublicKey>().unwrap_err(),
            PaserkError::Encoding
        );
        assert_eq!(
            format!("{id}A").parse::<KeyId>().unwrap_err(),
            PaserkError::Encoding
        );
        assert_eq!(
            format!("{PID_HEADER}{}", b64_encode(&[0; 32]))
                .parse::<KeyId>()
                .unwrap_err(),
            PaserkError::Length {
                expected: 33,
                actual: 32
            }
        );
        assert_eq!(
            format!("{PUBLIC_HEADER}{}", b64_encode(&[0; 33]))
                .parse::<PublicKey>()
                .unwrap_err(),
            PaserkError::Length {
                expected: 32,
                actual: 33
            }
        );
        // y = 2 is not the y-coordinate of any point on the curve.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert_eq!(
            PublicKey::from_bytes(&not_a_point).unwrap_err(),
            PaserkError::InvalidPublicKey
        );
    }

    #[test]
    fn round_trips() {
        let key = SecretKey::generate();
        let again: SecretKey = key.expose_paserk().parse().unwrap();
        assert_eq!(again.public(), key.public());
        let public: PublicKey = key.public().to_string().parse().unwrap();
        assert_eq!(public, key.public());
        let id: KeyId = key.key_id().to_string().parse().unwrap();
        assert_eq!(id, public.key_id());
        assert_ne!(SecretKey::generate().key_id(), key.key_id());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
        let json = serde_json::to_string(&public).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), public);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = SecretKey::from_seed(&[9; 32]);
        let debug = format!("{key:?}");
        let secret_b64 = key.expose_paserk();
        let secret_data = secret_b64.strip_prefix(SECRET_HEADER).unwrap();
        assert_eq!(debug, format!("SecretKey(KeyId({}))", key.key_id()));
        assert!(!debug.contains(&secret_data[..20]));
        assert!(!debug.contains(&hex::encode([9u8; 32])));
    }

    #[test]
    fn key_ids_and_paserks_agree_with_pasetors() {
        use pasetors::keys::{AsymmetricPublicKey, AsymmetricSecretKey};
        use pasetors::paserk::{FormatAsPaserk, Id};
        use pasetors::version4::V4;

        for seed in [[1u8; 32], [5; 32], [0xfe; 32]] {
            let ours = SecretKey::from_seed(&seed);
            let their_public = AsymmetricPublicKey::<V4>::from(ours.public().as_bytes()).unwrap();
            let their_secret =
                AsymmetricSecretKey::<V4>::from(&ours.signing_key().to_keypair_bytes()).unwrap();

            let mut id = String::new();
            Id::from(&their_public).fmt(&mut id).unwrap();
            assert_eq!(id, ours.key_id().to_string());

            let mut public = String::new();
            their_public.fmt(&mut public).unwrap();
            assert_eq!(public, ours.public().to_string());

            let mut secret = String::new();
            their_secret.fmt(&mut secret).unwrap();
            assert_eq!(secret, ours.expose_paserk());
            assert_eq!(secret.parse::<SecretKey>().unwrap().key_id(), ours.key_id());
        }
    }
}
