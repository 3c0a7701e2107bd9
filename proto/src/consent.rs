//! Consent tokens: an organisation's signed approval of one specific sharing between agencies,
//! and the revocation statements that withdraw such approvals.
//!
//! A consent token is a PASETO `v4.public` token (see `crate::paseto`) signed with the
//! issuer's Ed25519 key. Its message is the JSON object of [`ConsentClaims`]; its footer is
//! `{"kid":"k4.pid.…"}`, the PASERK id of the signing key (see `crate::paserk`), so a verifier
//! can pick the key before checking anything. `docs/consent-token.md` specifies the format
//! precisely enough for an implementation in another language.
//!
//! This module checks what a token *is*: well formed, signed by the given key, naming that key
//! as issuer, and internally coherent. It does not decide whether a token *permits* a given
//! transfer (time window, sender, recipients, kind, payload digest, use count, revocation):
//! that is the broker's decision function, which reads the typed [`ConsentClaims`].
//!
//! Consent tokens and revocation statements use the same key and footer, so each kind is bound
//! to its purpose twice: by a `typ` claim (`concordat.consent.v1` or `concordat.revocation.v1`)
//! and by using that same string as the PASETO implicit assertion. A revocation therefore fails
//! the signature check when presented as a consent token, and vice versa, before its claims are
//! even read; the `typ` claim keeps a decoded token self-describing.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::paserk::{KeyId, PublicKey, SecretKey};
use crate::paseto::{self, PasetoError};
use crate::workflow::incident_for_comparison;

/// The `typ` claim, and the PASETO implicit assertion, of a consent token.
pub const CONSENT_TYP: &str = "concordat.consent.v1";

/// The `typ` claim, and the PASETO implicit assertion, of a revocation statement.
pub const REVOCATION_TYP: &str = "concordat.revocation.v1";

/// The longest organisation id (`sub`), in bytes.
pub const MAX_ORG_ID_LEN: usize = 128;

/// The longest agency id (`from`, each of `to`), in bytes.
pub const MAX_AGENCY_ID_LEN: usize = 64;

/// The longest incident reference (each of `incident_refs`), in bytes.
pub const MAX_INCIDENT_REF_LEN: usize = 256;

/// Why a consent token or revocation statement was refused (or could not be made).
///
/// Each variant maps to a stable reason code, [`ConsentError::reason`], that the broker returns
/// to clients. Texts never quote bytes from an unauthenticated token.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    /// The token is longer than [`paseto::MAX_TOKEN_LEN`] bytes.
    #[error("consent token is too long")]
    TooLong,
    /// The token is not a PASETO `v4.public` token.
    #[error("consent token has an unsupported version or purpose")]
    UnsupportedVersion,
    /// The token's structure, base64url, footer (missing, not JSON, no valid `kid`) or claims
    /// JSON syntax is broken.
    #[error("malformed consent token: {0}")]
    Malformed(&'static str),
    /// The footer's key id is not the key the token was checked with, or the `iss` claim is
    /// not that key's id (or, when signing, the claims name another issuer than the key).
    #[error("consent token names a different issuer key")]
    KeyMismatch,
    /// The signature does not verify (which includes a token of the other kind: consent
    /// versus revocation).
    #[error("consent token signature does not verify")]
    BadSignature,
    /// The claims are valid JSON but break the schema or its rules; the text says which.
    #[error("invalid consent claims: {0}")]
    InvalidClaims(String),
}

impl ConsentError {
    /// The stable, machine-readable reason code for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLong => "CONSENT_TOO_LONG",
            Self::UnsupportedVersion => "CONSENT_UNSUPPORTED_VERSION",
            Self::Malformed(_) => "CONSENT_MALFORMED",
            Self::KeyMismatch => "CONSENT_UNKNOWN_ISSUER",
            Self::BadSignature => "CONSENT_BAD_SIGNATURE",
            Self::InvalidClaims(_) => "CONSENT_INVALID_CLAIMS",
        }
    }
}

impl From<PasetoError> for ConsentError {
    fn from(err: PasetoError) -> Self {
        match err {
            PasetoError::TooLong => Self::TooLong,
            PasetoError::UnsupportedVersion => Self::UnsupportedVersion,
            PasetoError::Malformed(why) => Self::Malformed(why),
            PasetoError::BadSignature => Self::BadSignature,
        }
    }
}

/// The kinds of information a token can approve: the envelope's kinds, spelt the same way.
pub use crate::envelope::Kind;

/// The unique id of a consent token (`jti`): 128 random bits, written as 32 lowercase hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId([u8; 16]);

impl TokenId {
    /// A fresh id from the operating system's random number generator.
    pub fn random() -> Self {
        use rand::RngCore as _;
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The id with these 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl FromStr for TokenId {
    type Err = ConsentError;

    /// Parses exactly 32 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ConsentError::InvalidClaims("jti must be 32 lowercase hex digits".into());
        if !is_lower_hex(s, 32) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| invalid())?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl Serialize for TokenId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The verified claims of a consent token.
///
/// A value of this type always satisfies the rules listed on [`verify`]: it can only be built
/// by [`ConsentBuilder::build`] or by verifying a token. Times are held in UTC.
///
/// **Unknown claims are refused.** PASETO allows extra claims, but a consent token is a
/// closed, versioned schema: a claim this code does not know could be a restriction the
/// issuer meant to be binding (a narrower scope, say) that would otherwise be silently
/// ignored. Failing closed keeps that from happening; extensions get a new `typ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentClaims {
    jti: TokenId,
    iss: KeyId,
    sub: String,
    from: String,
    to: Vec<String>,
    kinds: Vec<Kind>,
    purpose: String,
    iat: OffsetDateTime,
    nbf: OffsetDateTime,
    exp: OffsetDateTime,
    incident_refs: Vec<String>,
    pdh: Option<String>,
    max_uses: Option<NonZeroU32>,
}

impl ConsentClaims {
    /// Starts building claims in which organisation `sub` approves sharing from agency `from`
    /// for `purpose`. Add recipients, kinds and an expiry, then [`ConsentBuilder::build`].
    pub fn builder(
        sub: impl Into<String>,
        from: impl Into<String>,
        purpose: impl Into<String>,
    ) -> ConsentBuilder {
        ConsentBuilder {
            jti: None,
            sub: sub.into(),
            from: from.into(),
            purpose: purpose.into(),
            to: Vec::new(),
            kinds: Vec::new(),
            nbf: None,
            expiry: None,
            incident_refs: Vec::new(),
            pdh: None,
            max_uses: None,
        }
    }

    /// The lowercase hex SHA-256 of `payload`, as the `pdh` claim carries it.
    pub fn payload_digest(payload: &[u8]) -> String {
        hex::encode(Sha256::digest(payload))
    }

    /// Signs these claims with `key` and returns the consent token.
    ///
    /// Fails with [`ConsentError::KeyMismatch`] if `key` is not the issuer named by the claims.
    pub fn sign(&self, key: &SecretKey) -> Result<String, ConsentError> {
        if key.key_id() != self.iss {
            return Err(ConsentError::KeyMismatch);
        }
        let message = to_json(&self.to_wire())?;
        Ok(sign_with_footer(key, &message, CONSENT_TYP))
    }

    /// `jti`: the token's unique id.
    pub fn jti(&self) -> TokenId {
        self.jti
    }

    /// `iss`: the key id of the issuer, equal to the footer's `kid`.
    pub fn iss(&self) -> &KeyId {
        &self.iss
    }

    /// `sub`: the organisation that gave consent.
    pub fn sub(&self) -> &str {
        &self.sub
    }

    /// `from`: the agency allowed to send.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// `to`: the agencies allowed to receive (never empty, no duplicates).
    pub fn to(&self) -> &[String] {
        &self.to
    }

    /// `kinds`: the kinds of information allowed (never empty, no duplicates).
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// `purpose`: the stated purpose, free text.
    pub fn purpose(&self) -> &str {
        &self.purpose
    }

    /// `iat`: when the consent was issued.
    pub fn issued_at(&self) -> OffsetDateTime {
        self.iat
    }

    /// `nbf`: the start of the validity window.
    pub fn not_before(&self) -> OffsetDateTime {
        self.nbf
    }

    /// `exp`: the end of the validity window.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.exp
    }

    /// `incident_refs`: references to the incidents concerned (empty when absent).
    pub fn incident_refs(&self) -> &[String] {
        &self.incident_refs
    }

    /// Whether `incident_refs` names `incident`, an envelope's federation-unique reference
    /// (`ico:INC-7`). Each entry is read as an envelope's is: without an agency prefix, it is
    /// the reference of the token's sender (`from`), so a token naming `INC-7` for sender `ico`
    /// covers `ico:INC-7`; an entry that is neither form is compared as written.
    pub fn covers_incident(&self, incident: &str) -> bool {
        let Ok(from) = self.from.parse::<crate::ids::AgencyId>() else {
            return self.incident_refs.iter().any(|r| r == incident);
        };
        let incident = incident_for_comparison(&from, incident);
        self.incident_refs
            .iter()
            .any(|r| incident_for_comparison(&from, r) == incident)
    }

    /// `pdh`: the lowercase hex SHA-256 of the one payload this consent covers, if bound.
    pub fn pdh(&self) -> Option<&str> {
        self.pdh.as_deref()
    }

    /// `max_uses`: how many transfers the token may authorise, if limited.
    pub fn max_uses(&self) -> Option<NonZeroU32> {
        self.max_uses
    }

    fn to_wire(&self) -> ConsentWire {
        ConsentWire {
            typ: ConsentTyp::V1,
            jti: self.jti,
            iss: self.iss,
            sub: self.sub.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            kinds: self.kinds.clone(),
            purpose: self.purpose.clone(),
            iat: self.iat,
            nbf: self.nbf,
            exp: self.exp,
            incident_refs: (!self.incident_refs.is_empty()).then(|| self.incident_refs.clone()),
            pdh: self.pdh.clone(),
            max_uses: self.max_uses,
        }
    }

    /// Checks the rules and turns wire claims into validated claims.
    fn from_wire(wire: ConsentWire) -> Result<Self, ConsentError> {
        let ConsentTyp::V1 = wire.typ;
        check_id("sub", &wire.sub, MAX_ORG_ID_LEN)?;
        check_id("from", &wire.from, MAX_AGENCY_ID_LEN)?;
        check_list("to", &wire.to)?;
        for to in &wire.to {
            check_id("to", to, MAX_AGENCY_ID_LEN)?;
        }
        check_list("kinds", &wire.kinds)?;
        if wire.purpose.trim().is_empty() {
            return Err(invalid("purpose must not be empty"));
        }
        if wire
            .purpose
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(invalid("purpose must not contain control characters"));
        }
        let iat = utc("iat", wire.iat)?;
        let nbf = utc("nbf", wire.nbf)?;
        let exp = utc("exp", wire.exp)?;
        if nbf > exp {
            return Err(invalid("nbf must not be after exp"));
        }
        if iat > exp {
            return Err(invalid("iat must not be after exp"));
        }
        let incident_refs = match wire.incident_refs {
            None => Vec::new(),
            Some(refs) => {
                check_list("incident_refs", &refs)?;
                for r in &refs {
                    check_reference("incident_refs", r)?;
                }
                refs
            }
        };
        if let Some(pdh) = &wire.pdh
            && !is_lower_hex(pdh, 64)
        {
            return Err(invalid("pdh must be 64 lowercase hex digits"));
        }
        Ok(Self {
            jti: wire.jti,
            iss: wire.iss,
            sub: wire.sub,
            from: wire.from,
            to: wire.to,
            kinds: wire.kinds,
            purpose: wire.purpose,
            iat,
            nbf,
            exp,
            incident_refs,
            pdh: wire.pdh,
            max_uses: wire.max_uses,
        })
    }
}

/// Builds [`ConsentClaims`]. `jti` is random unless set, `iat` is given to
/// [`ConsentBuilder::build`] (this crate reads no clock), `nbf` defaults to `iat`, and an expiry
/// is required. Times are truncated to whole seconds, as the format's issuers write them.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConsentBuilder {
    jti: Option<TokenId>,
    sub: String,
    from: String,
    purpose: String,
    to: Vec<String>,
    kinds: Vec<Kind>,
    nbf: Option<OffsetDateTime>,
    expiry: Option<Expiry>,
    incident_refs: Vec<String>,
    pdh: Option<String>,
    max_uses: Option<u32>,
}

/// How the builder was told to set `exp`.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    At(OffsetDateTime),
    AfterNotBefore(Duration),
}

impl ConsentBuilder {
    /// Adds a recipient agency (ignored if already present).
    pub fn recipient(mut self, agency: impl Into<String>) -> Self {
        push_unique(&mut self.to, agency.into());
        self
    }

    /// Adds a kind of information (ignored if already present).
    pub fn kind(mut self, kind: Kind) -> Self {
        push_unique(&mut self.kinds, kind);
        self
    }

    /// Adds an incident reference (ignored if already present).
    pub fn incident_ref(mut self, reference: impl Into<String>) -> Self {
        push_unique(&mut self.incident_refs, reference.into());
        self
    }

    /// Sets `jti` instead of a random one (for tests and known-answer examples).
    pub fn jti(mut self, jti: TokenId) -> Self {
        self.jti = Some(jti);
        self
    }

    /// Sets `nbf` instead of `iat`.
    pub fn not_before(mut self, at: OffsetDateTime) -> Self {
        self.nbf = Some(at);
        self
    }

    /// Sets `exp`.
    pub fn expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expiry = Some(Expiry::At(at));
        self
    }

    /// Sets `exp` to `nbf + duration`.
    pub fn valid_for(mut self, duration: Duration) -> Self {
        self.expiry = Some(Expiry::AfterNotBefore(duration));
        self
    }

    /// Binds the consent to one payload by its SHA-256 digest (`pdh`).
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.pdh = Some(ConsentClaims::payload_digest(payload));
        self
    }

    /// Limits the number of transfers the token may authorise (`max_uses`, at least 1).
    pub fn max_uses(mut self, uses: u32) -> Self {
        self.max_uses = Some(uses);
        self
    }

    /// Checks every rule and returns the claims, issued at `issued_at` (usually now) by the key
    /// with id `issuer`.
    pub fn build(
        self,
        issuer: KeyId,
        issued_at: OffsetDateTime,
    ) -> Result<ConsentClaims, ConsentError> {
        let iat = whole_seconds(issued_at);
        let nbf = self.nbf.map_or(iat, whole_seconds);
        let exp = match self.expiry {
            None => return Err(invalid("exp is required")),
            Some(Expiry::At(at)) => at,
            Some(Expiry::AfterNotBefore(duration)) => nbf
                .checked_add(duration)
                .ok_or_else(|| invalid("exp is out of range"))?,
        };
        let exp = whole_seconds(exp);
        let max_uses = match self.max_uses {
            None => None,
            Some(n) => {
                Some(NonZeroU32::new(n).ok_or_else(|| invalid("max_uses must be at least 1"))?)
            }
        };
        ConsentClaims::from_wire(ConsentWire {
            typ: ConsentTyp::V1,
            jti: self.jti.unwrap_or_else(TokenId::random),
            iss: issuer,
            sub: self.sub,
            from: self.from,
            to: self.to,
            kinds: self.kinds,
            purpose: self.purpose,
            iat,
            nbf,
            exp,
            incident_refs: (!self.incident_refs.is_empty()).then_some(self.incident_refs),
            pdh: self.pdh,
            max_uses,
        })
    }
}

/// Reads the issuer key id from a token's footer **without verifying anything**, so that the
/// caller can look the key up in its trust configuration before calling [`verify`] or
/// [`verify_revocation`]. An unknown id is the caller's decision, not an error here.
pub fn key_id_of(token: &str) -> Result<KeyId, ConsentError> {
    let footer = paseto::footer_of(token)?;
    serde_json::from_slice::<Footer>(&footer)
        .map(|footer| footer.kid)
        .map_err(|_| ConsentError::Malformed("footer is not {\"kid\":\"k4.pid.…\"}"))
}

/// Verifies a consent token against `key` and returns its claims.
///
/// Checks, in order: the length and structure of the token and that it is `v4.public`; that
/// its footer is `{"kid": …}` naming `key`; the signature (strict Ed25519, implicit assertion
/// [`CONSENT_TYP`]); that the claims are JSON with exactly the known claims and
/// `typ` = [`CONSENT_TYP`]; that `iss` is `key`'s id; and the claim rules: `sub` an
/// organisation id and `from` and each of `to` agency ids (lowercase ASCII letters, digits,
/// `-`, `_`, starting with a letter or digit; at most [`MAX_ORG_ID_LEN`] and
/// [`MAX_AGENCY_ID_LEN`] bytes); `to` and `kinds` non-empty without duplicates;
/// `incident_refs`, if present, non-empty without duplicates, each at most
/// [`MAX_INCIDENT_REF_LEN`] bytes without control characters or surrounding whitespace;
/// `purpose` non-blank without control characters other than line feed and tab;
/// `nbf <= exp` and `iat <= exp`; times within years 0000 to 9999 in UTC; `pdh` 64 lowercase
/// hex digits; `max_uses` at least 1.
///
/// It does **not** check the time window or the request (sender, recipients, kind, payload):
/// the broker does, with the returned claims.
pub fn verify(token: &str, key: &PublicKey) -> Result<ConsentClaims, ConsentError> {
    let message = verify_with_footer(token, key, CONSENT_TYP)?;
    let claims = ConsentClaims::from_wire(from_json(&message)?)?;
    if claims.iss != key.key_id() {
        return Err(ConsentError::KeyMismatch);
    }
    Ok(claims)
}

/// Decodes a consent token's claims **without checking its signature**, for display only:
/// `concordat consent inspect` shows what a token says before (or without) verifying it.
/// The claims' own rules are still checked. Never base a decision on the result.
pub fn decode_unverified(token: &str) -> Result<ConsentClaims, ConsentError> {
    let message = paseto::message_unverified(token)?;
    ConsentClaims::from_wire(from_json(&message)?)
}

/// What a revocation statement withdraws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationTarget {
    /// The one token with this `jti` (claim `"jti"`).
    Token(TokenId),
    /// Every token of the issuer's key whose `iat` is strictly before this time (claim
    /// `"before"`), for example after a key compromise.
    IssuedBefore(OffsetDateTime),
}

/// A verified (or ready to sign) revocation statement: the issuer withdraws consent tokens it
/// signed earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    iss: KeyId,
    iat: OffsetDateTime,
    target: RevocationTarget,
}

impl Revocation {
    /// A revocation by the key with id `issuer`, made at `issued_at`.
    ///
    /// An [`RevocationTarget::IssuedBefore`] time must not be after `issued_at`: a statement
    /// cannot revoke tokens that did not exist when it was made.
    pub fn new(
        issuer: KeyId,
        target: RevocationTarget,
        issued_at: OffsetDateTime,
    ) -> Result<Self, ConsentError> {
        let (jti, before) = match target {
            RevocationTarget::Token(jti) => (Some(jti), None),
            RevocationTarget::IssuedBefore(at) => (None, Some(at)),
        };
        Self::from_wire(RevocationWire {
            typ: RevocationTyp::V1,
            iss: issuer,
            iat: issued_at,
            jti,
            before,
        })
    }

    /// `iss`: the key id of the issuer.
    pub fn iss(&self) -> &KeyId {
        &self.iss
    }

    /// `iat`: when the statement was made.
    pub fn issued_at(&self) -> OffsetDateTime {
        self.iat
    }

    /// What is revoked.
    pub fn target(&self) -> RevocationTarget {
        self.target
    }

    /// Whether this statement revokes the token with `claims`: same issuer, and either the same
    /// `jti` or an `iat` strictly before the cut-off.
    pub fn revokes(&self, claims: &ConsentClaims) -> bool {
        self.iss == claims.iss
            && match self.target {
                RevocationTarget::Token(jti) => jti == claims.jti,
                RevocationTarget::IssuedBefore(before) => claims.iat < before,
            }
    }

    /// Signs the statement with `key`; fails with [`ConsentError::KeyMismatch`] if `key` is not
    /// its issuer.
    pub fn sign(&self, key: &SecretKey) -> Result<String, ConsentError> {
        if key.key_id() != self.iss {
            return Err(ConsentError::KeyMismatch);
        }
        let (jti, before) = match self.target {
            RevocationTarget::Token(jti) => (Some(jti), None),
            RevocationTarget::IssuedBefore(at) => (None, Some(at)),
        };
        let message = to_json(&RevocationWire {
            typ: RevocationTyp::V1,
            iss: self.iss,
            iat: self.iat,
            jti,
            before,
        })?;
        Ok(sign_with_footer(key, &message, REVOCATION_TYP))
    }

    fn from_wire(wire: RevocationWire) -> Result<Self, ConsentError> {
        let RevocationTyp::V1 = wire.typ;
        let iat = utc("iat", wire.iat)?;
        let target = match (wire.jti, wire.before) {
            (Some(jti), None) => RevocationTarget::Token(jti),
            (None, Some(before)) => {
                let before = utc("before", before)?;
                if before > iat {
                    return Err(invalid("before must not be after iat"));
                }
                RevocationTarget::IssuedBefore(before)
            }
            _ => return Err(invalid("exactly one of jti and before is required")),
        };
        Ok(Self {
            iss: wire.iss,
            iat,
            target,
        })
    }
}

/// Verifies a revocation statement against `key`: the same checks as [`verify`], with
/// [`REVOCATION_TYP`] as implicit assertion and `typ`, and the revocation's own claims.
pub fn verify_revocation(token: &str, key: &PublicKey) -> Result<Revocation, ConsentError> {
    let message = verify_with_footer(token, key, REVOCATION_TYP)?;
    let revocation = Revocation::from_wire(from_json(&message)?)?;
    if revocation.iss != key.key_id() {
        return Err(ConsentError::KeyMismatch);
    }
    Ok(revocation)
}

/// The footer of both token kinds, as read back.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Footer {
    kid: KeyId,
}

/// The `typ` of a consent token; any other string fails to deserialize.
#[derive(Serialize, Deserialize)]
enum ConsentTyp {
    #[serde(rename = "concordat.consent.v1")]
    V1,
}

/// The `typ` of a revocation statement; any other string fails to deserialize.
#[derive(Serialize, Deserialize)]
enum RevocationTyp {
    #[serde(rename = "concordat.revocation.v1")]
    V1,
}

/// Consent claims as JSON carries them, before the rules are checked. Field order here is the
/// order in which they are written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentWire {
    typ: ConsentTyp,
    jti: TokenId,
    iss: KeyId,
    sub: String,
    from: String,
    to: Vec<String>,
    kinds: Vec<Kind>,
    purpose: String,
    #[serde(with = "time::serde::rfc3339")]
    iat: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    nbf: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    exp: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incident_refs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pdh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_uses: Option<NonZeroU32>,
}

/// Revocation claims as JSON carries them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationWire {
    typ: RevocationTyp,
    iss: KeyId,
    #[serde(with = "time::serde::rfc3339")]
    iat: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<TokenId>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    before: Option<OffsetDateTime>,
}

/// Signs `message` with the `{"kid": …}` footer of `key` and `typ` as implicit assertion.
fn sign_with_footer(key: &SecretKey, message: &[u8], typ: &str) -> String {
    paseto::sign(
        key.signing_key(),
        message,
        footer_for(&key.key_id()).as_bytes(),
        typ.as_bytes(),
    )
}

/// The footer naming `kid`. A key id is written in base64url characters only, so it needs no
/// JSON escaping.
fn footer_for(kid: &KeyId) -> String {
    format!("{{\"kid\":\"{kid}\"}}")
}

/// Checks the footer names `key`, then the signature with `typ` as implicit assertion, and
/// returns the signed message.
fn verify_with_footer(token: &str, key: &PublicKey, typ: &str) -> Result<Vec<u8>, ConsentError> {
    // The footer is read before the signature is checked only to refuse early a token that
    // names another key; the signature then covers the footer too.
    if key_id_of(token)? != key.key_id() {
        return Err(ConsentError::KeyMismatch);
    }
    Ok(paseto::verify(token, key.verifying_key(), typ.as_bytes())?.message)
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ConsentError> {
    serde_json::to_vec(value).map_err(|err| invalid(&err.to_string()))
}

/// Parses signed claims. Broken JSON is malformed; JSON that does not fit the schema is
/// invalid claims, with serde's explanation (the bytes are authenticated by now).
fn from_json<T: DeserializeOwned>(message: &[u8]) -> Result<T, ConsentError> {
    serde_json::from_slice(message).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => invalid(&err.to_string()),
        _ => ConsentError::Malformed("claims are not valid JSON"),
    })
}

fn invalid(why: &str) -> ConsentError {
    ConsentError::InvalidClaims(why.to_owned())
}

/// Converts a time to UTC, refusing one that RFC 3339 cannot write (years outside 0000–9999).
fn utc(claim: &str, at: OffsetDateTime) -> Result<OffsetDateTime, ConsentError> {
    at.checked_to_offset(UtcOffset::UTC)
        .filter(|at| (0..=9999).contains(&at.year()))
        .ok_or_else(|| invalid(&format!("{claim} is out of range")))
}

/// An organisation or agency id: 1 to `max` bytes of lowercase ASCII letters, digits, `-` and
/// `_`, starting with a letter or digit (the rules of `crate::ids`, so that the broker's
/// conversion to its typed ids cannot fail on a valid token).
fn check_id(claim: &str, value: &str, max: usize) -> Result<(), ConsentError> {
    if value.is_empty() {
        return Err(invalid(&format!("{claim} must not be empty")));
    }
    if value.len() > max {
        return Err(invalid(&format!("{claim} is longer than {max} bytes")));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
    let first_ok = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !first_ok || !value.bytes().all(allowed) {
        return Err(invalid(&format!(
            "{claim} must be lowercase letters, digits, '-' or '_', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// An incident reference: free-form but bounded, without control characters or surrounding
/// whitespace.
fn check_reference(claim: &str, value: &str) -> Result<(), ConsentError> {
    if value.is_empty() {
        return Err(invalid(&format!("{claim} must not be empty")));
    }
    if value.len() > MAX_INCIDENT_REF_LEN {
        return Err(invalid(&format!(
            "{claim} is longer than {MAX_INCIDENT_REF_LEN} bytes"
        )));
    }
    if value.chars().any(char::is_control) || value.trim() != value {
        return Err(invalid(&format!(
            "{claim} must not contain control characters or surrounding whitespace"
        )));
    }
    Ok(())
}

/// A list claim: non-empty and without duplicates.
fn check_list<T: PartialEq>(claim: &str, values: &[T]) -> Result<(), ConsentError> {
    if values.is_empty() {
        return Err(invalid(&format!("{claim} must not be empty")));
    }
    for (i, value) in values.iter().enumerate() {
        if values[..i].contains(value) {
            return Err(invalid(&format!("{claim} must not contain duplicates")));
        }
    }
    Ok(())
}

/// Drops the fraction of a second.
fn whole_seconds(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).unwrap_or(at)
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, value: T) {
    if !list.contains(&value) {
        list.push(value);
    }
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};
    use serde_json::{Value, json};
    use time::macros::datetime;

    /// The example issuer key of `docs/consent-token.md`: seed bytes 0x00, 0x01, …, 0x1f.
    fn issuer() -> SecretKey {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        SecretKey::from_seed(&seed)
    }

    fn other_key() -> SecretKey {
        SecretKey::from_seed(&[0xa5; 32])
    }

    fn example_builder() -> ConsentBuilder {
        ConsentClaims::builder(
            "acme-water",
            "ncsc",
            "Joint response to the ransomware incident reported on 2025-02-27",
        )
        .jti("3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30".parse().unwrap())
        .recipient("nca")
        .recipient("ico")
        .kind(Kind::ThreatAssessment)
        .kind(Kind::IncidentRecord)
        .incident_ref("NCSC-INC-2025-0117")
        .not_before(datetime!(2025-03-01 09:00 UTC))
        .expires_at(datetime!(2025-03-31 23:59:59 UTC))
        .payload(b"example payload")
        .max_uses(3)
    }

    fn example_claims() -> ConsentClaims {
        example_builder()
            .build(issuer().key_id(), datetime!(2025-03-01 09:00 UTC))
            .unwrap()
    }

    /// The claims of the example as a JSON value, to be edited by the table tests.
    fn example_json() -> Value {
        serde_json::to_value(example_claims().to_wire()).unwrap()
    }

    /// Signs arbitrary claim bytes exactly as a consent token is signed (correct footer and
    /// implicit assertion), so that tests reach the claim checks.
    fn sign_raw(key: &SecretKey, message: &[u8], typ: &str) -> String {
        sign_with_footer(key, message, typ)
    }

    fn sign_json(value: &Value) -> String {
        sign_raw(&issuer(), &serde_json::to_vec(value).unwrap(), CONSENT_TYP)
    }

    /// The worked example of `docs/consent-token.md`; this test keeps the two in step.
    const EXAMPLE_TOKEN: &str = concat!(
        "v4.public.eyJ0eXAiOiJjb25jb3JkYXQuY29uc2VudC52MSIsImp0aSI6IjNmOWMyYTdlNGIxZDRlMG",
        "Y4YTZiMmM5ZDFlN2Y1YTMwIiwiaXNzIjoiazQucGlkLmFGeVBKbjhKUjBkcGdkdWU2Y0JYY3BiYXp0dT",
        "NUd1pYTG5adXllMGRYWXR6Iiwic3ViIjoiYWNtZS13YXRlciIsImZyb20iOiJuY3NjIiwidG8iOlsibm",
        "NhIiwiaWNvIl0sImtpbmRzIjpbInRocmVhdF9hc3Nlc3NtZW50IiwiaW5jaWRlbnRfcmVjb3JkIl0sIn",
        "B1cnBvc2UiOiJKb2ludCByZXNwb25zZSB0byB0aGUgcmFuc29td2FyZSBpbmNpZGVudCByZXBvcnRlZC",
        "BvbiAyMDI1LTAyLTI3IiwiaWF0IjoiMjAyNS0wMy0wMVQwOTowMDowMFoiLCJuYmYiOiIyMDI1LTAzLT",
        "AxVDA5OjAwOjAwWiIsImV4cCI6IjIwMjUtMDMtMzFUMjM6NTk6NTlaIiwiaW5jaWRlbnRfcmVmcyI6Wy",
        "JOQ1NDLUlOQy0yMDI1LTAxMTciXSwicGRoIjoiZGVkYzI5OThhMzBlODU0MTM4OGRhOTg0OWQ0MDQzMT",
        "c3ZWMxMzNiZDNmNDU0ZGQ5MDNhNzVlZGJjZDY4ODhkYiIsIm1heF91c2VzIjozfcLSioVRZMtf1vOmce",
        "Djimz87v4_9ZRt4lP8FTR98CKMcVjFBYw1WhXg09etq166_xBo-eFOb8Q6QaiVt3bZzgI.eyJraWQiOi",
        "JrNC5waWQuYUZ5UEpuOEpSMGRwZ2R1ZTZjQlhjcGJhenR1M1R3WlhMblp1eWUwZFhZdHoifQ",
    );

    #[test]
    fn round_trip() {
        let key = issuer();
        let claims = example_claims();
        let token = claims.sign(&key).unwrap();
        assert_eq!(key_id_of(&token).unwrap(), key.key_id());
        assert_eq!(verify(&token, &key.public()).unwrap(), claims);
        assert_eq!(claims.iss(), &key.key_id());
        assert_eq!(claims.to().len(), 2);
        assert_eq!(
            claims.kinds(),
            [Kind::ThreatAssessment, Kind::IncidentRecord]
        );
        assert_eq!(claims.max_uses(), NonZeroU32::new(3));
        assert_eq!(
            claims.pdh(),
            Some(ConsentClaims::payload_digest(b"example payload").as_str())
        );
    }

    #[test]
    fn documented_example_token() {
        let key = issuer();
        assert_eq!(
            key.public().to_string(),
            "k4.public.A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg"
        );
        assert_eq!(
            key.key_id().to_string(),
            "k4.pid.aFyPJn8JR0dpgdue6cBXcpbaztu3TwZXLnZuye0dXYtz"
        );
        let token = example_claims().sign(&key).unwrap();
        if token != EXAMPLE_TOKEN {
            let verified =
                paseto::verify(&token, key.public().verifying_key(), CONSENT_TYP.as_bytes())
                    .unwrap();
            println!("token: {token}");
            println!("message: {}", String::from_utf8(verified.message).unwrap());
            println!("footer: {}", String::from_utf8(verified.footer).unwrap());
        }
        assert_eq!(token, EXAMPLE_TOKEN);
        assert_eq!(
            verify(EXAMPLE_TOKEN, &key.public()).unwrap(),
            example_claims()
        );
    }

    #[test]
    fn documented_example_revocation_and_secret_key() {
        let key = issuer();
        assert_eq!(
            key.expose_paserk(),
            "k4.secret.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8DoQe_884Qvh1w3RjnS8CZZ-TWMJulDV8d3IZkElUxuA"
        );
        let token = revocation_of_example().sign(&key).unwrap();
        let verified = paseto::verify(
            &token,
            key.public().verifying_key(),
            REVOCATION_TYP.as_bytes(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(verified.message).unwrap(),
            concat!(
                r#"{"typ":"concordat.revocation.v1","#,
                r#""iss":"k4.pid.aFyPJn8JR0dpgdue6cBXcpbaztu3TwZXLnZuye0dXYtz","#,
                r#""iat":"2025-03-02T12:00:00Z","jti":"3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30"}"#
            )
        );
        assert_eq!(
            verified.footer,
            br#"{"kid":"k4.pid.aFyPJn8JR0dpgdue6cBXcpbaztu3TwZXLnZuye0dXYtz"}"#
        );
    }

    #[test]
    fn every_error_has_its_reason_code() {
        let cases = [
            (ConsentError::TooLong, "CONSENT_TOO_LONG"),
            (
                ConsentError::UnsupportedVersion,
                "CONSENT_UNSUPPORTED_VERSION",
            ),
            (ConsentError::Malformed("x"), "CONSENT_MALFORMED"),
            (ConsentError::KeyMismatch, "CONSENT_UNKNOWN_ISSUER"),
            (ConsentError::BadSignature, "CONSENT_BAD_SIGNATURE"),
            (
                ConsentError::InvalidClaims("x".into()),
                "CONSENT_INVALID_CLAIMS",
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.reason(), code, "{err:?}");
        }
    }

    #[test]
    fn too_long() {
        let key = issuer();
        let mut builder = example_builder();
        for i in 0..600 {
            builder = builder.recipient(format!("agency-{i:04}"));
        }
        let claims = builder.build(key.key_id(), datetime!(2025-03-01 09:00 UTC));
        let token = claims.unwrap().sign(&key).unwrap();
        assert!(token.len() > paseto::MAX_TOKEN_LEN);
        let err = verify(&token, &key.public()).unwrap_err();
        assert_eq!(err, ConsentError::TooLong);
        assert_eq!(err.reason(), "CONSENT_TOO_LONG");
        assert_eq!(key_id_of(&token).unwrap_err(), ConsentError::TooLong);
    }

    #[test]
    fn unsupported_version() {
        let key = issuer();
        let token = example_claims().sign(&key).unwrap();
        let rest = token.strip_prefix("v4.public.").unwrap();
        for header in ["v4.local.", "v3.public.", "v2.public.", "v1.local."] {
            let other = format!("{header}{rest}");
            let err = verify(&other, &key.public()).unwrap_err();
            assert_eq!(err, ConsentError::UnsupportedVersion, "{header}");
            assert_eq!(err.reason(), "CONSENT_UNSUPPORTED_VERSION");
            assert_eq!(
                key_id_of(&other).unwrap_err(),
                ConsentError::UnsupportedVersion
            );
        }
    }

    #[test]
    fn malformed() {
        let key = issuer();
        let signing = key.signing_key();
        let claims = serde_json::to_vec(&example_json()).unwrap();
        let kid = key.key_id().to_string();
        let token = example_claims().sign(&key).unwrap();
        let with_footer = |footer: &str| {
            paseto::sign(signing, &claims, footer.as_bytes(), CONSENT_TYP.as_bytes())
        };
        let cases = [
            ("no footer", with_footer("")),
            ("footer not JSON", with_footer("kid")),
            ("footer is a bare PASERK", with_footer(&kid)),
            ("footer kid missing", with_footer("{}")),
            (
                "footer has another field",
                with_footer(&format!(r#"{{"kid":"{kid}","x":1}}"#)),
            ),
            (
                "footer kid not a key id",
                with_footer(r#"{"kid":"k4.pid.abc"}"#),
            ),
            (
                "footer kid is a public key",
                with_footer(&format!(r#"{{"kid":"{}"}}"#, key.public())),
            ),
            ("footer kid not a string", with_footer(r#"{"kid":7}"#)),
            ("claims not JSON", sign_raw(&key, b"not json", CONSENT_TYP)),
            (
                "claims truncated JSON",
                sign_raw(&key, &claims[..claims.len() - 1], CONSENT_TYP),
            ),
            (
                "claims with trailing bytes",
                sign_raw(&key, &[&claims[..], b"x"].concat(), CONSENT_TYP),
            ),
            ("padding", format!("{token}==")),
            ("extra part", format!("{token}.e30")),
            ("not a token", "consent".to_owned()),
            (
                "body too short",
                format!("v4.public.AAAA.{}", token.rsplit_once('.').unwrap().1),
            ),
        ];
        for (name, token) in cases {
            let err = verify(&token, &key.public()).unwrap_err();
            assert!(matches!(err, ConsentError::Malformed(_)), "{name}: {err:?}");
            assert_eq!(err.reason(), "CONSENT_MALFORMED", "{name}");
        }
    }

    #[test]
    fn key_mismatch() {
        let key = issuer();
        let other = other_key();
        let token = example_claims().sign(&key).unwrap();

        // Checked with another key than the footer names.
        let err = verify(&token, &other.public()).unwrap_err();
        assert_eq!(err, ConsentError::KeyMismatch);
        assert_eq!(err.reason(), "CONSENT_UNKNOWN_ISSUER");

        // Signed and footed by `key`, but the claims name another issuer.
        let mut claims = example_json();
        claims["iss"] = json!(other.key_id().to_string());
        assert_eq!(
            verify(&sign_json(&claims), &key.public()).unwrap_err(),
            ConsentError::KeyMismatch
        );

        // Signing with a key that is not the claims' issuer is refused.
        assert_eq!(
            example_claims().sign(&other).unwrap_err(),
            ConsentError::KeyMismatch
        );
        let revocation = Revocation::new(
            key.key_id(),
            RevocationTarget::Token(example_claims().jti()),
            datetime!(2025-03-02 00:00 UTC),
        )
        .unwrap();
        assert_eq!(
            revocation.sign(&other).unwrap_err(),
            ConsentError::KeyMismatch
        );
    }

    #[test]
    fn bad_signature() {
        let key = issuer();
        let other = other_key();
        let claims = serde_json::to_vec(&example_json()).unwrap();
        let footer = footer_for(&key.key_id());

        // The footer names `key` but another key signed.
        let forged = paseto::sign(
            other.signing_key(),
            &claims,
            footer.as_bytes(),
            CONSENT_TYP.as_bytes(),
        );
        let err = verify(&forged, &key.public()).unwrap_err();
        assert_eq!(err, ConsentError::BadSignature);
        assert_eq!(err.reason(), "CONSENT_BAD_SIGNATURE");

        // Signed without the implicit assertion (a plain PASETO library used naively).
        let plain = paseto::sign(key.signing_key(), &claims, footer.as_bytes(), b"");
        assert_eq!(
            verify(&plain, &key.public()).unwrap_err(),
            ConsentError::BadSignature
        );

        // A claim changed after signing.
        let token = example_claims().sign(&key).unwrap();
        let (body, foot) = token
            .strip_prefix("v4.public.")
            .unwrap()
            .split_once('.')
            .unwrap();
        let mut raw = paseto::b64_decode(body).unwrap();
        let at = raw.windows(3).position(|w| w == b"\"3f").unwrap() + 1;
        raw[at] = b'4';
        let tampered = format!("v4.public.{}.{foot}", paseto::b64_encode(&raw));
        assert_eq!(
            verify(&tampered, &key.public()).unwrap_err(),
            ConsentError::BadSignature
        );
    }

    /// One row per rule: an edit of the example claims, all properly signed, and the fact that
    /// verification must refuse it as invalid claims.
    #[test]
    fn invalid_claims_table() {
        let key = issuer();
        // The unedited claims verify, so each row fails only for its own edit.
        assert!(verify(&sign_json(&example_json()), &key.public()).is_ok());

        // (row, claim, new value; `None` removes the claim)
        let rows: Vec<(&str, &str, Option<Value>)> = vec![
            ("missing typ", "typ", None),
            ("missing jti", "jti", None),
            ("missing iss", "iss", None),
            ("missing sub", "sub", None),
            ("missing from", "from", None),
            ("missing to", "to", None),
            ("missing kinds", "kinds", None),
            ("missing purpose", "purpose", None),
            ("missing iat", "iat", None),
            ("missing nbf", "nbf", None),
            ("missing exp", "exp", None),
            ("unknown claim", "scope", Some(json!("all"))),
            ("typ of a revocation", "typ", Some(json!(REVOCATION_TYP))),
            (
                "typ of a later version",
                "typ",
                Some(json!("concordat.consent.v2")),
            ),
            (
                "jti uppercase",
                "jti",
                Some(json!("3F9C2A7E4B1D4E0F8A6B2C9D1E7F5A30")),
            ),
            ("jti too short", "jti", Some(json!("3f9c2a7e"))),
            (
                "jti a UUID",
                "jti",
                Some(json!("3f9c2a7e-4b1d-4e0f-8a6b-2c9d1e7f5a30")),
            ),
            ("iss not a key id", "iss", Some(json!("issuer"))),
            ("sub empty", "sub", Some(json!(""))),
            ("sub with a newline", "sub", Some(json!("acme\nwater"))),
            ("sub padded", "sub", Some(json!(" acme"))),
            ("sub uppercase", "sub", Some(json!("Acme"))),
            ("sub with a colon", "sub", Some(json!("org:acme"))),
            ("from starting with a dash", "from", Some(json!("-ncsc"))),
            (
                "from too long",
                "from",
                Some(json!("a".repeat(MAX_AGENCY_ID_LEN + 1))),
            ),
            (
                "sub too long",
                "sub",
                Some(json!("x".repeat(MAX_ORG_ID_LEN + 1))),
            ),
            ("from a number", "from", Some(json!(5))),
            ("to empty", "to", Some(json!([]))),
            ("to a string", "to", Some(json!("nca"))),
            ("to duplicated", "to", Some(json!(["nca", "nca"]))),
            ("to with an empty id", "to", Some(json!(["nca", ""]))),
            (
                "to with a space",
                "to",
                Some(json!(["nca", "national crime agency"])),
            ),
            ("kinds empty", "kinds", Some(json!([]))),
            ("kinds unknown", "kinds", Some(json!(["medical_record"]))),
            (
                "kinds wrong case",
                "kinds",
                Some(json!(["ThreatAssessment"])),
            ),
            (
                "kinds duplicated",
                "kinds",
                Some(json!(["incident_record", "incident_record"])),
            ),
            ("purpose blank", "purpose", Some(json!("  "))),
            ("purpose with a bell", "purpose", Some(json!("a\u{7}b"))),
            ("iat a number", "iat", Some(json!(1_740_819_600))),
            ("iat a date only", "iat", Some(json!("2025-03-01"))),
            (
                "exp without offset",
                "exp",
                Some(json!("2025-03-31T23:59:59")),
            ),
            ("nbf after exp", "nbf", Some(json!("2025-04-01T00:00:00Z"))),
            ("iat after exp", "iat", Some(json!("2025-04-01T00:00:00Z"))),
            ("incident_refs empty", "incident_refs", Some(json!([]))),
            (
                "incident_refs padded",
                "incident_refs",
                Some(json!(["I-1 "])),
            ),
            (
                "incident_refs with a tab",
                "incident_refs",
                Some(json!(["I\t1"])),
            ),
            (
                "incident_refs too long",
                "incident_refs",
                Some(json!(["I".repeat(MAX_INCIDENT_REF_LEN + 1)])),
            ),
            (
                "incident_refs duplicated",
                "incident_refs",
                Some(json!(["I-1", "I-1"])),
            ),
            (
                "pdh uppercase",
                "pdh",
                Some(json!(ConsentClaims::payload_digest(b"x").to_uppercase())),
            ),
            ("pdh too short", "pdh", Some(json!("dedc2998"))),
            ("max_uses zero", "max_uses", Some(json!(0))),
            ("max_uses negative", "max_uses", Some(json!(-1))),
            (
                "max_uses too large",
                "max_uses",
                Some(json!(u64::from(u32::MAX) + 1)),
            ),
            ("max_uses a string", "max_uses", Some(json!("3"))),
        ];
        for (name, claim, value) in rows {
            let mut claims = example_json();
            let map = claims.as_object_mut().unwrap();
            match value {
                Some(value) => map.insert(claim.to_owned(), value),
                None => map.remove(claim),
            };
            let err = verify(&sign_json(&claims), &key.public()).unwrap_err();
            assert!(
                matches!(err, ConsentError::InvalidClaims(_)),
                "{name}: {err:?}"
            );
            assert_eq!(err.reason(), "CONSENT_INVALID_CLAIMS", "{name}");
        }

        // Claims that are JSON but not an object, and a claim given twice.
        for message in [&b"[]"[..], b"\"claims\"", b"null"] {
            let err = verify(&sign_raw(&key, message, CONSENT_TYP), &key.public()).unwrap_err();
            assert!(matches!(err, ConsentError::InvalidClaims(_)), "{err:?}");
        }
        let json = serde_json::to_string(&example_json()).unwrap();
        let twice = json.replacen("\"sub\":", "\"sub\":\"other-org\",\"sub\":", 1);
        let err = verify(
            &sign_raw(&key, twice.as_bytes(), CONSENT_TYP),
            &key.public(),
        )
        .unwrap_err();
        assert!(matches!(err, ConsentError::InvalidClaims(_)), "{err:?}");
    }

    #[test]
    fn accepted_claim_variations() {
        let key = issuer();
        let base = example_claims();

        // Optional claims may be absent (or null, which means the same).
        let mut claims = example_json();
        let map = claims.as_object_mut().unwrap();
        map.remove("incident_refs");
        map.remove("max_uses");
        map.insert("pdh".into(), Value::Null);
        let verified = verify(&sign_json(&claims), &key.public()).unwrap();
        assert!(verified.incident_refs().is_empty());
        assert_eq!((verified.pdh(), verified.max_uses()), (None, None));

        // Any RFC 3339 offset is accepted and normalised to UTC; fractions are kept.
        let mut claims = example_json();
        claims["iat"] = json!("2025-03-01T10:00:00+01:00");
        claims["nbf"] = json!("2025-03-01T09:00:00.25+00:00");
        let verified = verify(&sign_json(&claims), &key.public()).unwrap();
        assert_eq!(verified.issued_at(), base.issued_at());
        assert_eq!(verified.issued_at().offset(), UtcOffset::UTC);
        assert_eq!(verified.not_before(), datetime!(2025-03-01 09:00:00.25 UTC));

        // nbf == exp and iat == exp are allowed (an empty window is the broker's business).
        let mut claims = example_json();
        claims["nbf"] = claims["exp"].clone();
        claims["iat"] = claims["exp"].clone();
        assert!(verify(&sign_json(&claims), &key.public()).is_ok());
    }

    #[test]
    fn builder_rules_and_defaults() {
        let key = issuer();
        let now = datetime!(2025-06-01 12:34:56.789 UTC);
        let no_exp = ConsentClaims::builder("org", "a", "p")
            .recipient("b")
            .kind(Kind::DsarConsultation);
        assert!(matches!(
            no_exp.clone().build(key.key_id(), now),
            Err(ConsentError::InvalidClaims(_))
        ));

        let claims = no_exp
            .clone()
            .recipient("b")
            .kind(Kind::DsarConsultation)
            .valid_for(Duration::days(7))
            .build(key.key_id(), now)
            .unwrap();
        assert_eq!(claims.to(), ["b"], "duplicates are dropped");
        assert_eq!(claims.kinds(), [Kind::DsarConsultation]);
        assert_eq!(claims.issued_at(), datetime!(2025-06-01 12:34:56 UTC));
        assert_eq!(claims.not_before(), claims.issued_at());
        assert_eq!(claims.expires_at(), datetime!(2025-06-08 12:34:56 UTC));
        assert_eq!(claims.max_uses(), None);
        assert_eq!(claims.pdh(), None);
        let again = no_exp
            .clone()
            .valid_for(Duration::days(7))
            .build(key.key_id(), now)
            .unwrap();
        assert_ne!(again.jti(), claims.jti(), "jti is random");
        assert_eq!(
            verify(&claims.sign(&key).unwrap(), &key.public()).unwrap(),
            claims
        );

        // Times given with another offset are held in UTC.
        let offset = no_exp
            .clone()
            .expires_at(datetime!(2025-06-02 00:00 +01:00))
            .build(key.key_id(), datetime!(2025-06-01 13:00 +01:00))
            .unwrap();
        assert_eq!(offset.issued_at(), datetime!(2025-06-01 12:00 UTC));
        assert_eq!(offset.expires_at().offset(), UtcOffset::UTC);

        let refused = [
            (
                "max_uses 0",
                no_exp.clone().valid_for(Duration::days(1)).max_uses(0),
                now,
            ),
            (
                "no recipient",
                ConsentClaims::builder("org", "a", "p")
                    .kind(Kind::IncidentRecord)
                    .valid_for(Duration::days(1)),
                now,
            ),
            (
                "no kind",
                ConsentClaims::builder("org", "a", "p")
                    .recipient("b")
                    .valid_for(Duration::days(1)),
                now,
            ),
            (
                "exp before nbf",
                no_exp.clone().valid_for(Duration::days(-1)),
                now,
            ),
            (
                "nbf after exp",
                no_exp
                    .clone()
                    .not_before(datetime!(2025-07-01 00:00 UTC))
                    .expires_at(datetime!(2025-06-30 00:00 UTC)),
                now,
            ),
            (
                "empty purpose",
                ConsentClaims::builder("org", "a", "")
                    .recipient("b")
                    .kind(Kind::IncidentRecord)
                    .valid_for(Duration::days(1)),
                now,
            ),
            (
                "agency id with a colon",
                ConsentClaims::builder("org", "agency:a", "p")
                    .recipient("b")
                    .kind(Kind::IncidentRecord)
                    .valid_for(Duration::days(1)),
                now,
            ),
            (
                "exp past year 9999 in UTC",
                no_exp
                    .clone()
                    .expires_at(datetime!(9999-12-31 23:00 -05:00)),
                now,
            ),
            (
                "iat before year 0",
                no_exp.clone().valid_for(Duration::days(1)),
                datetime!(-0001-06-01 00:00 UTC),
            ),
        ];
        for (name, builder, issued_at) in refused {
            assert!(
                matches!(
                    builder.build(key.key_id(), issued_at),
                    Err(ConsentError::InvalidClaims(_))
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn incident_refs_cover_the_federation_unique_reference() {
        // (the token's incident_refs, sender ncsc; the envelope's qualified reference; covered)
        let rows: &[(&[&str], &str, bool)] = &[
            (&["NCSC-INC-1"], "ncsc:NCSC-INC-1", true),
            (&["ncsc:NCSC-INC-1"], "ncsc:NCSC-INC-1", true),
            (&["NCSC-INC-1"], "NCSC-INC-1", true),
            (&["NCSC-INC-1"], "ico:NCSC-INC-1", false),
            (&["ico:INC-7"], "ico:INC-7", true),
            (&["INC-7"], "ico:INC-7", false),
            (&["INC 7"], "INC 7", true),
            (&["INC 7"], "ncsc:INC", false),
            (&["other", "NCSC-INC-1"], "ncsc:NCSC-INC-1", true),
        ];
        for (refs, incident, covered) in rows {
            let mut b = example_builder();
            b.incident_refs.clear();
            for r in *refs {
                b = b.incident_ref(*r);
            }
            let claims = b
                .build(issuer().key_id(), datetime!(2025-03-01 09:00 UTC))
                .unwrap();
            assert_eq!(
                claims.covers_incident(incident),
                *covered,
                "{refs:?} {incident}"
            );
        }
    }

    #[test]
    fn payload_digest_is_lowercase_sha256() {
        assert_eq!(
            ConsentClaims::payload_digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn token_id_parsing() {
        let id: TokenId = "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30".parse().unwrap();
        assert_eq!(id.to_string(), "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30");
        for bad in [
            "",
            "3F9C2A7E4B1D4E0F8A6B2C9D1E7F5A30",
            "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a3",
            "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a300",
            "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a3g",
            "+f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30",
        ] {
            assert!(bad.parse::<TokenId>().is_err(), "{bad}");
        }
        assert_ne!(TokenId::random(), TokenId::random());
    }

    fn revocation_of_example() -> Revocation {
        Revocation::new(
            issuer().key_id(),
            RevocationTarget::Token(example_claims().jti()),
            datetime!(2025-03-02 12:00 UTC),
        )
        .unwrap()
    }

    #[test]
    fn revocation_round_trips_and_applies() {
        let key = issuer();
        let consent = example_claims();

        let by_id = revocation_of_example();
        let token = by_id.sign(&key).unwrap();
        assert_eq!(key_id_of(&token).unwrap(), key.key_id());
        let verified = verify_revocation(&token, &key.public()).unwrap();
        assert_eq!(verified, by_id);
        assert!(verified.revokes(&consent));

        let cut_off = datetime!(2025-03-01 09:00:01 UTC);
        let before = Revocation::new(
            key.key_id(),
            RevocationTarget::IssuedBefore(cut_off),
            cut_off,
        )
        .unwrap();
        let verified = verify_revocation(&before.sign(&key).unwrap(), &key.public()).unwrap();
        assert_eq!(verified.target(), RevocationTarget::IssuedBefore(cut_off));
        assert!(verified.revokes(&consent));
        let at_iat = Revocation::new(
            key.key_id(),
            RevocationTarget::IssuedBefore(consent.issued_at()),
            cut_off,
        )
        .unwrap();
        assert!(!at_iat.revokes(&consent), "strictly before");

        // Another issuer's statement never revokes this issuer's token.
        let other = other_key();
        let foreign = Revocation::new(
            other.key_id(),
            RevocationTarget::Token(consent.jti()),
            cut_off,
        )
        .unwrap();
        assert!(!foreign.revokes(&consent));
        let other_jti = Revocation::new(
            key.key_id(),
            RevocationTarget::Token(TokenId::random()),
            cut_off,
        )
        .unwrap();
        assert!(!other_jti.revokes(&consent));

        // Checked with another key.
        assert_eq!(
            verify_revocation(&token, &other.public()).unwrap_err(),
            ConsentError::KeyMismatch
        );
    }

    #[test]
    fn revocation_claim_rules() {
        let key = issuer();
        let sign =
            |value: Value| sign_raw(&key, &serde_json::to_vec(&value).unwrap(), REVOCATION_TYP);
        let kid = key.key_id().to_string();
        let jti = "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30";
        let ok =
            json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": jti});
        assert!(verify_revocation(&sign(ok.clone()), &key.public()).is_ok());

        let rows = [
            (
                "both jti and before",
                json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": jti, "before": "2025-03-01T00:00:00Z"}),
            ),
            (
                "neither",
                json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z"}),
            ),
            (
                "before after iat",
                json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "before": "2025-03-03T00:00:00Z"}),
            ),
            (
                "unknown claim",
                json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": jti, "reason": "x"}),
            ),
            (
                "consent typ",
                json!({"typ": CONSENT_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": jti}),
            ),
            (
                "missing typ",
                json!({"iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": jti}),
            ),
            (
                "missing iat",
                json!({"typ": REVOCATION_TYP, "iss": kid, "jti": jti}),
            ),
            (
                "bad jti",
                json!({"typ": REVOCATION_TYP, "iss": kid, "iat": "2025-03-02T12:00:00Z", "jti": "x"}),
            ),
        ];
        for (name, value) in rows {
            let err = verify_revocation(&sign(value), &key.public()).unwrap_err();
            assert!(
                matches!(err, ConsentError::InvalidClaims(_)),
                "{name}: {err:?}"
            );
        }
        let mut wrong_iss = ok;
        wrong_iss["iss"] = json!(other_key().key_id().to_string());
        assert_eq!(
            verify_revocation(&sign(wrong_iss), &key.public()).unwrap_err(),
            ConsentError::KeyMismatch
        );

        assert!(matches!(
            Revocation::new(
                key.key_id(),
                RevocationTarget::IssuedBefore(datetime!(2025-03-03 00:00 UTC)),
                datetime!(2025-03-02 00:00 UTC)
            ),
            Err(ConsentError::InvalidClaims(_))
        ));
    }

    /// A revocation can never pass as a consent token, nor the reverse: the implicit assertion
    /// refuses it at the signature, and the `typ` claim would refuse it again at the claims.
    #[test]
    fn consent_and_revocation_cannot_be_confused() {
        let key = issuer();
        let consent = example_claims().sign(&key).unwrap();
        let revocation = revocation_of_example().sign(&key).unwrap();
        assert_eq!(
            verify(&revocation, &key.public()).unwrap_err(),
            ConsentError::BadSignature
        );
        assert_eq!(
            verify_revocation(&consent, &key.public()).unwrap_err(),
            ConsentError::BadSignature
        );

        // Even signed under the other purpose's assertion, the claims do not fit.
        let wire = serde_json::to_vec(&json!({"typ": REVOCATION_TYP, "iss": key.key_id().to_string(), "iat": "2025-03-02T12:00:00Z", "jti": "3f9c2a7e4b1d4e0f8a6b2c9d1e7f5a30"})).unwrap();
        let err = verify(&sign_raw(&key, &wire, CONSENT_TYP), &key.public()).unwrap_err();
        assert!(matches!(err, ConsentError::InvalidClaims(_)), "{err:?}");
        let consent_wire = serde_json::to_vec(&example_json()).unwrap();
        let err = verify_revocation(
            &sign_raw(&key, &consent_wire, REVOCATION_TYP),
            &key.public(),
        )
        .unwrap_err();
        assert!(matches!(err, ConsentError::InvalidClaims(_)), "{err:?}");
    }

    /// Random corruptions of a valid token never verify and never panic; each is refused with
    /// an error, and the corruptions reach every layer of the checks.
    #[test]
    fn mutated_tokens_are_always_refused() {
        // Ed25519 in an unoptimised test build costs milliseconds per check: 2,000 keeps the
        // test to seconds.
        const ITERATIONS: usize = 2000;
        const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

        let key = issuer();
        let public = key.public();
        let token = example_claims().sign(&key).unwrap();
        let (head, own_footer) = token.rsplit_once('.').unwrap();
        let other = other_key();
        let foreign_footer = paseto::b64_encode(footer_for(&other.key_id()).as_bytes());
        let spaced_footer =
            paseto::b64_encode(format!("{{ \"kid\": \"{}\" }}", key.key_id()).as_bytes());
        let revocation = revocation_of_example().sign(&key).unwrap();
        let (revocation_head, _) = revocation.rsplit_once('.').unwrap();

        let mut rng = StdRng::seed_from_u64(0x00c0_ffee_2025);
        let mut seen = std::collections::BTreeMap::<&'static str, usize>::new();
        let mut tried = 0;
        while tried < ITERATIONS {
            let bytes = token.as_bytes();
            let mutated: String = match rng.gen_range(0..8) {
                0 => {
                    let mut b = bytes.to_vec();
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= 1 << rng.gen_range(0..8);
                    String::from_utf8_lossy(&b).into_owned()
                }
                1 => token[..rng.gen_range(0..token.len())].to_owned(),
                2 => {
                    let mut t = token.clone();
                    let c = if rng.gen_bool(0.2) {
                        *[b'.', b'=', b' ', b'+', b'/']
                            .get(rng.gen_range(0..5))
                            .unwrap() as char
                    } else {
                        B64URL[rng.gen_range(0..B64URL.len())] as char
                    };
                    t.insert(rng.gen_range(0..=t.len()), c);
                    t
                }
                3 => {
                    // Substitute a base64url character after the header with a different one.
                    let mut b = bytes.to_vec();
                    let i = rng.gen_range("v4.public.".len()..b.len());
                    if b[i] == b'.' {
                        continue;
                    }
                    let mut c = b[i];
                    while c == b[i] {
                        c = B64URL[rng.gen_range(0..B64URL.len())];
                    }
                    b[i] = c;
                    String::from_utf8(b).unwrap()
                }
                4 => {
                    let mut t = token.clone();
                    t.remove(rng.gen_range(0..t.len()));
                    t
                }
                5 => match rng.gen_range(0..4) {
                    0 => format!("{head}.{foreign_footer}"),
                    1 => format!("{head}.{spaced_footer}"),
                    2 => head.to_owned(),
                    _ => format!("{revocation_head}.{own_footer}"),
                },
                6 => {
                    // Swap two characters of the body.
                    let mut b = bytes.to_vec();
                    let i = rng.gen_range("v4.public.".len()..b.len());
                    let j = rng.gen_range("v4.public.".len()..b.len());
                    b.swap(i, j);
                    String::from_utf8(b).unwrap()
                }
                _ => {
                    // Several bit flips at once.
                    let mut b = bytes.to_vec();
                    for _ in 0..rng.gen_range(2..6) {
                        let i = rng.gen_range(0..b.len());
                        b[i] ^= 1 << rng.gen_range(0..8);
                    }
                    String::from_utf8_lossy(&b).into_owned()
                }
            };
            if mutated == token {
                continue;
            }
            tried += 1;
            let err = verify(&mutated, &public).expect_err(&mutated);
            // The unverified footer reader may well succeed on a corrupted token (any 33 bytes
            // make a key id), but whenever it names another key, verification says so.
            if let Ok(kid) = key_id_of(&mutated)
                && kid != key.key_id()
            {
                assert_eq!(err, ConsentError::KeyMismatch, "{mutated}");
            }
            // A sample also goes through the revocation verifier. (Splicing the revocation's
            // body onto the shared footer rebuilds that valid revocation, which must still
            // never pass as consent, as checked above.)
            if tried % 8 == 0 && mutated != revocation {
                assert!(verify_revocation(&mutated, &public).is_err(), "{mutated}");
            }
            *seen.entry(err.reason()).or_default() += 1;
        }
        for reason in [
            "CONSENT_UNSUPPORTED_VERSION",
            "CONSENT_MALFORMED",
            "CONSENT_UNKNOWN_ISSUER",
            "CONSENT_BAD_SIGNATURE",
        ] {
            assert!(
                seen.get(reason).copied().unwrap_or(0) > 0,
                "{reason} never reached: {seen:?}"
            );
        }
        assert_eq!(seen.values().sum::<usize>(), ITERATIONS);
    }

    /// Consent tokens interoperate with an independent PASETO implementation, `pasetors`,
    /// given the implicit assertion.
    mod pasetors_interop {
        use super::*;
        use pasetors::Public;
        use pasetors::keys::{AsymmetricPublicKey, AsymmetricSecretKey};
        use pasetors::token::UntrustedToken;
        use pasetors::version4::{PublicToken, V4};

        #[test]
        fn ours_verifies_with_pasetors() {
            let key = issuer();
            let public = AsymmetricPublicKey::<V4>::from(key.public().as_bytes()).unwrap();
            let token = example_claims().sign(&key).unwrap();
            let untrusted = UntrustedToken::<Public, V4>::try_from(&token).unwrap();
            let footer = footer_for(&key.key_id());
            let trusted = PublicToken::verify(
                &public,
                &untrusted,
                Some(footer.as_bytes()),
                Some(CONSENT_TYP.as_bytes()),
            )
            .unwrap();
            let claims: Value = serde_json::from_str(trusted.payload()).unwrap();
            assert_eq!(claims, example_json());
            assert!(
                PublicToken::verify(&public, &untrusted, None, Some(REVOCATION_TYP.as_bytes()))
                    .is_err()
            );
        }

        #[test]
        fn pasetors_tokens_verify_with_ours() {
            let key = issuer();
            let secret =
                AsymmetricSecretKey::<V4>::from(&key.signing_key().to_keypair_bytes()).unwrap();
            let footer = format!(r#"{{"kid":"{}"}}"#, key.key_id());
            let message = to_json(&example_claims().to_wire()).unwrap();
            let token = PublicToken::sign(
                &secret,
                &message,
                Some(footer.as_bytes()),
                Some(CONSENT_TYP.as_bytes()),
            )
            .unwrap();
            assert_eq!(verify(&token, &key.public()).unwrap(), example_claims());
            assert_eq!(token, example_claims().sign(&key).unwrap());
        }
    }
}
