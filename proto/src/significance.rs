//! National-significance designations: the signed statement, made by two different authorised
//! officers of the sending agency, that an incident is of national significance, so that
//! incident-specific information about it may travel on the flows it names (the ICO–NCSC MoU:
//! "incident-specific where the matter is of national significance").
//!
//! A designation has two halves, both PASETO `v4.public` tokens (see `crate::paseto`) with the
//! `{"kid":"k4.pid.…"}` footer of consent tokens (`crate::consent`):
//!
//! - the **designation** ([`DESIGNATION_TYP`]), signed by the first officer: the agency, the
//!   incident reference, the flows it opens, when it was made and when it expires;
//! - the **countersignature** ([`COUNTERSIGNATURE_TYP`]), signed by a second officer: the
//!   SHA-256 of the designation token's exact text, and the designation's `jti`.
//!
//! [`verify`] checks both signatures, that the countersignature is over exactly this
//! designation, and the two-person rule: both officers are authorised for the designation's
//! agency and they are two different officers (different officer ids, hence different keys).
//! [`Designation::check`] then says whether a verified designation covers one transfer: its
//! sender, incident, flow and time. Like the rest of `proto`, nothing here does I/O or reads a
//! clock. `docs/national-significance.md` specifies the format.
//!
//! Each half binds its purpose twice, like consent tokens: by its `typ` claim and by the same
//! string as PASETO implicit assertion, so a countersignature never verifies as a designation
//! (nor either as a consent token).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::consent::TokenId;
use crate::ids::AgencyId;
use crate::paserk::{KeyId, PublicKey, SecretKey};
use crate::paseto::{self, PasetoError};
use crate::workflow::incident_for_comparison;

/// The `typ` claim, and the PASETO implicit assertion, of a designation.
pub const DESIGNATION_TYP: &str = "concordat.significance.v1";

/// The `typ` claim, and the PASETO implicit assertion, of a countersignature.
pub const COUNTERSIGNATURE_TYP: &str = "concordat.significance-countersignature.v1";

/// The most flows one designation may open.
pub const MAX_FLOWS: usize = 16;

/// The longest incident reference, in bytes (the envelope's label limit).
pub const MAX_INCIDENT_REF_LEN: usize = 128;

/// The longest statement of grounds, in characters.
pub const MAX_GROUNDS_LEN: usize = 1000;

/// Why a designation was refused (or could not be made). Texts never quote bytes from an
/// unauthenticated token.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignificanceError {
    /// A half is not a well-formed PASETO `v4.public` token with a `{"kid": …}` footer.
    #[error("malformed {half}: {why}")]
    Malformed {
        /// `designation` or `countersignature`.
        half: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A half is signed by a key that is no authorised officer's.
    #[error("the {half} is signed by key {kid}, which is not an authorised officer's")]
    UnknownOfficer {
        /// `designation` or `countersignature`.
        half: &'static str,
        /// The key id the footer names.
        kid: KeyId,
    },
    /// A half's signature does not verify (it was altered, or is another kind of token).
    #[error("the {half}'s signature does not verify")]
    BadSignature {
        /// `designation` or `countersignature`.
        half: &'static str,
    },
    /// The signed claims break the schema or its rules; the text says which.
    #[error("invalid {half} claims: {why}")]
    InvalidClaims {
        /// `designation` or `countersignature`.
        half: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The countersignature is over another designation.
    #[error("the countersignature is over another designation")]
    NotCountersigned,
    /// The same officer signed both halves: the two-person rule is broken.
    #[error("officer {officer} signed both halves; a designation needs two different officers")]
    SameOfficer {
        /// The officer's id.
        officer: String,
    },
    /// An officer is not authorised for the designation's agency, or the designation is of
    /// another agency than the sender.
    #[error("{0}")]
    WrongAgency(String),
    /// The designation has expired.
    #[error("designation {jti} expired at {expired}")]
    Expired {
        /// The designation's id.
        jti: TokenId,
        /// When it expired (RFC 3339).
        expired: String,
    },
    /// The designation was made after the time of the decision (beyond the allowed skew).
    #[error("designation {jti} is not valid before {issued}")]
    NotYetValid {
        /// The designation's id.
        jti: TokenId,
        /// When it was made (RFC 3339).
        issued: String,
    },
    /// The designation is of another incident.
    #[error("designation {jti} is for incident {designated:?}, not {presented:?}")]
    WrongIncident {
        /// The designation's id.
        jti: TokenId,
        /// The incident it designates.
        designated: String,
        /// The incident of the transfer.
        presented: String,
    },
    /// The designation does not open this flow.
    #[error("designation {jti} does not open the flow {from} -> {to}")]
    WrongFlow {
        /// The designation's id.
        jti: TokenId,
        /// The sending agency.
        from: AgencyId,
        /// The receiving agency.
        to: AgencyId,
    },
}

/// One flow a designation opens: `from` may send incident-specific information to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRef {
    /// The sending agency.
    pub from: AgencyId,
    /// The receiving agency.
    pub to: AgencyId,
}

impl fmt::Display for FlowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.from, self.to)
    }
}

/// An officer authorised to designate incidents of national significance for an agency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Officer {
    /// The officer's id, unique in the federation: two keys of one officer are still one
    /// person for the two-person rule.
    pub id: String,
    /// The agency the officer may designate for.
    pub agency: AgencyId,
    /// The officer's public key.
    pub key: PublicKey,
}

/// The claims of the first half, as signed by the designating officer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesignationClaims {
    jti: TokenId,
    iss: KeyId,
    agency: AgencyId,
    incident_ref: String,
    flows: Vec<FlowRef>,
    grounds: String,
    iat: OffsetDateTime,
    exp: OffsetDateTime,
}

impl DesignationClaims {
    /// Claims in which the holder of key `iss` designates `incident_ref` of `agency` as of
    /// national significance for `flows`, from `iat` until `exp`, for the stated `grounds`
    /// (kept by the sender; never logged by the broker).
    pub fn new(
        iss: KeyId,
        agency: AgencyId,
        incident_ref: impl Into<String>,
        flows: Vec<FlowRef>,
        grounds: impl Into<String>,
        iat: OffsetDateTime,
        exp: OffsetDateTime,
    ) -> Result<Self, SignificanceError> {
        let claims = DesignationClaims {
            jti: TokenId::random(),
            iss,
            agency,
            incident_ref: incident_ref.into(),
            flows,
            grounds: grounds.into(),
            iat: utc("designation", "iat", iat)?,
            exp: utc("designation", "exp", exp)?,
        };
        claims.check_rules()?;
        Ok(claims)
    }

    /// Signs the claims with `key`, which must be the key named by `iss`.
    pub fn sign(&self, key: &SecretKey) -> Result<String, SignificanceError> {
        if key.key_id() != self.iss {
            return Err(invalid(
                "designation",
                "the signing key is not the issuer named by the claims",
            ));
        }
        let wire = DesignationWire {
            typ: DesignationTyp::V1,
            jti: self.jti,
            iss: self.iss,
            agency: self.agency.clone(),
            incident_ref: self.incident_ref.clone(),
            flows: self.flows.clone(),
            grounds: self.grounds.clone(),
            iat: self.iat,
            exp: self.exp,
        };
        let message =
            serde_json::to_vec(&wire).map_err(|e| invalid("designation", &e.to_string()))?;
        Ok(sign_with_footer(key, &message, DESIGNATION_TYP))
    }

    /// `jti`: the designation's unique id.
    pub fn jti(&self) -> TokenId {
        self.jti
    }

    /// `iss`: the key id of the designating officer.
    pub fn iss(&self) -> &KeyId {
        &self.iss
    }

    /// The agency whose officers designate, and which sends under the designation.
    pub fn agency(&self) -> &AgencyId {
        &self.agency
    }

    /// The incident designated, as the sender references it.
    pub fn incident_ref(&self) -> &str {
        &self.incident_ref
    }

    /// The incident designated as a federation-unique reference (`ico:INC-2026-0042`): a
    /// reference without an agency prefix is the designating agency's own; one that is
    /// neither form is kept as written.
    pub fn qualified_incident_ref(&self) -> String {
        incident_for_comparison(&self.agency, &self.incident_ref)
    }

    /// The flows the designation opens.
    pub fn flows(&self) -> &[FlowRef] {
        &self.flows
    }

    /// The grounds stated by the designating officer.
    pub fn grounds(&self) -> &str {
        &self.grounds
    }

    /// When it was made.
    pub fn issued_at(&self) -> OffsetDateTime {
        self.iat
    }

    /// When it expires.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.exp
    }

    fn from_wire(wire: DesignationWire) -> Result<Self, SignificanceError> {
        let claims = DesignationClaims {
            jti: wire.jti,
            iss: wire.iss,
            agency: wire.agency,
            incident_ref: wire.incident_ref,
            flows: wire.flows,
            grounds: wire.grounds,
            iat: utc("designation", "iat", wire.iat)?,
            exp: utc("designation", "exp", wire.exp)?,
        };
        claims.check_rules()?;
        Ok(claims)
    }

    fn check_rules(&self) -> Result<(), SignificanceError> {
        let bad = |why: &str| Err(invalid("designation", why));
        let r = &self.incident_ref;
        if r.is_empty() || r.len() > MAX_INCIDENT_REF_LEN {
            return bad(&format!(
                "incident_ref must be 1 to {MAX_INCIDENT_REF_LEN} bytes"
            ));
        }
        if !r.chars().all(|c| c.is_ascii_graphic()) {
            return bad("incident_ref must be printable ASCII without spaces");
        }
        if self.flows.is_empty() || self.flows.len() > MAX_FLOWS {
            return bad(&format!("flows must name 1 to {MAX_FLOWS} flows"));
        }
        for (i, flow) in self.flows.iter().enumerate() {
            if flow.from != self.agency {
                return bad(&format!(
                    "flow {i} is from {}, not from the designating agency {}",
                    flow.from, self.agency
                ));
            }
            if flow.to == flow.from {
                return bad(&format!("flow {i} is from an agency to itself"));
            }
            if self.flows[..i].contains(flow) {
                return bad(&format!("flow {i} is named twice"));
            }
        }
        let g = self.grounds.trim();
        if g.is_empty() || self.grounds.chars().count() > MAX_GROUNDS_LEN {
            return bad(&format!(
                "grounds must be 1 to {MAX_GROUNDS_LEN} characters, not only spaces"
            ));
        }
        if self
            .grounds
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return bad("grounds must not contain control characters");
        }
        if self.exp <= self.iat {
            return bad("exp must be after iat");
        }
        Ok(())
    }
}

/// The second half: officer `iss` countersigns the designation whose token text has SHA-256
/// `designation`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CountersignatureClaims {
    iss: KeyId,
    jti: TokenId,
    designation: [u8; 32],
    iat: OffsetDateTime,
}

/// The SHA-256 of a designation token's exact text: what the countersignature signs, and what
/// the audit log records.
pub fn digest(designation: &str) -> [u8; 32] {
    Sha256::digest(designation.as_bytes()).into()
}

/// Countersigns `designation` with `key` at `now`: the second half of the two-person rule.
///
/// The designation's signature is not checked here (the countersigning officer need not hold
/// the first officer's key); its claims are decoded and checked for shape, and returned so that
/// the officer can see what they countersign. The broker checks everything.
pub fn countersign(
    designation: &str,
    key: &SecretKey,
    now: OffsetDateTime,
) -> Result<(String, DesignationClaims), SignificanceError> {
    let claims = decode_unverified(designation)?;
    if claims.iss == key.key_id() {
        return Err(SignificanceError::SameOfficer {
            officer: claims.iss.to_string(),
        });
    }
    let wire = CountersignatureWire {
        typ: CountersignatureTyp::V1,
        iss: key.key_id(),
        jti: claims.jti,
        designation: hex::encode(digest(designation)),
        iat: utc("countersignature", "iat", now)?,
    };
    let message =
        serde_json::to_vec(&wire).map_err(|e| invalid("countersignature", &e.to_string()))?;
    Ok((
        sign_with_footer(key, &message, COUNTERSIGNATURE_TYP),
        claims,
    ))
}

/// Decodes a designation's claims **without checking its signature**, for display and for
/// countersigning. Never base a decision on the result.
pub fn decode_unverified(designation: &str) -> Result<DesignationClaims, SignificanceError> {
    let message =
        paseto::message_unverified(designation).map_err(|e| malformed("designation", e))?;
    DesignationClaims::from_wire(from_json("designation", &message)?)
}

/// A designation whose two halves have verified, signed by two different authorised officers
/// of its agency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designation {
    /// The designation's claims.
    pub claims: DesignationClaims,
    /// The designating officer's id.
    pub designated_by: String,
    /// The countersigning officer's id.
    pub countersigned_by: String,
    /// The countersigning officer's key id.
    pub countersigned_by_key: KeyId,
    /// When it was countersigned.
    pub countersigned_at: OffsetDateTime,
    /// SHA-256 of the designation token ([`digest`]).
    pub digest: [u8; 32],
}

/// Verifies both halves of a designation, with `officer` looking up an authorised officer by
/// key id.
///
/// Checks, in order: each half's structure and footer, that its key is an authorised
/// officer's, its signature (strict Ed25519 with its own implicit assertion), its claims
/// (closed schema, `typ`, `iss` equal to the key; the designation's rules: incident reference
/// of printable ASCII, 1–[`MAX_FLOWS`] distinct flows all from the designation's agency,
/// grounds, `iat < exp`); that the countersignature names this designation's `jti` and the
/// SHA-256 of its exact text; that both officers are authorised for the designation's agency;
/// and that they are different officers. It does not check the time or the transfer:
/// [`Designation::check`] does.
pub fn verify<'a>(
    designation: &str,
    countersignature: &str,
    officer: impl Fn(&KeyId) -> Option<&'a Officer>,
) -> Result<Designation, SignificanceError> {
    let first = lookup("designation", designation, &officer)?;
    let message = verify_half("designation", designation, first, DESIGNATION_TYP)?;
    let claims = DesignationClaims::from_wire(from_json("designation", &message)?)?;
    if claims.iss != first.key.key_id() {
        return Err(invalid("designation", "iss is not the signing key"));
    }

    let second = lookup("countersignature", countersignature, &officer)?;
    let message = verify_half(
        "countersignature",
        countersignature,
        second,
        COUNTERSIGNATURE_TYP,
    )?;
    let counter = CountersignatureClaims::from_wire(from_json("countersignature", &message)?)?;
    if counter.iss != second.key.key_id() {
        return Err(invalid("countersignature", "iss is not the signing key"));
    }
    let digest = digest(designation);
    if counter.designation != digest || counter.jti != claims.jti {
        return Err(SignificanceError::NotCountersigned);
    }

    for (role, o) in [("designating", first), ("countersigning", second)] {
        if o.agency != claims.agency {
            return Err(SignificanceError::WrongAgency(format!(
                "the {role} officer {} is authorised for {}, not for {}",
                o.id, o.agency, claims.agency
            )));
        }
    }
    if first.id == second.id || first.key == second.key {
        return Err(SignificanceError::SameOfficer {
            officer: first.id.clone(),
        });
    }
    Ok(Designation {
        designated_by: first.id.clone(),
        countersigned_by: second.id.clone(),
        countersigned_by_key: counter.iss,
        countersigned_at: counter.iat,
        digest,
        claims,
    })
}

impl Designation {
    /// Whether this designation covers incident-specific information about `incident_ref`
    /// sent by `sender` to `recipient` at `now`, with `skew` allowed for clock differences.
    ///
    /// Checks, in order: the designation is the sender's agency's; it was made no later than
    /// `now + skew` and expires after `now - skew`; its incident is `incident_ref` (both read
    /// as federation-unique references: `ICO-2026-0042` of `ico` is `ico:ICO-2026-0042`);
    /// it opens the flow `sender -> recipient`.
    pub fn check(
        &self,
        sender: &AgencyId,
        recipient: &AgencyId,
        incident_ref: &str,
        now: OffsetDateTime,
        skew: Duration,
    ) -> Result<(), SignificanceError> {
        let c = &self.claims;
        if &c.agency != sender {
            return Err(SignificanceError::WrongAgency(format!(
                "designation {} was made by {}'s officers, not {sender}'s",
                c.jti, c.agency
            )));
        }
        if now.saturating_sub(skew) >= c.exp {
            return Err(SignificanceError::Expired {
                jti: c.jti,
                expired: rfc3339(c.exp),
            });
        }
        if now.saturating_add(skew) < c.iat {
            return Err(SignificanceError::NotYetValid {
                jti: c.jti,
                issued: rfc3339(c.iat),
            });
        }
        // Both read as federation-unique references: the designation's without a prefix is
        // its agency's own, the presented one without a prefix the sender's (who is that
        // agency, checked above).
        let designated = c.qualified_incident_ref();
        let presented = incident_for_comparison(sender, incident_ref);
        if designated != presented {
            return Err(SignificanceError::WrongIncident {
                jti: c.jti,
                designated,
                presented: presented.chars().take(MAX_INCIDENT_REF_LEN).collect(),
            });
        }
        if !c
            .flows
            .iter()
            .any(|f| &f.from == sender && &f.to == recipient)
        {
            return Err(SignificanceError::WrongFlow {
                jti: c.jti,
                from: sender.clone(),
                to: recipient.clone(),
            });
        }
        Ok(())
    }
}

impl CountersignatureClaims {
    fn from_wire(wire: CountersignatureWire) -> Result<Self, SignificanceError> {
        let mut designation = [0u8; 32];
        if wire.designation.len() != 64
            || !wire
                .designation
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            || hex::decode_to_slice(&wire.designation, &mut designation).is_err()
        {
            return Err(invalid(
                "countersignature",
                "designation must be 64 lowercase hex digits",
            ));
        }
        Ok(CountersignatureClaims {
            iss: wire.iss,
            jti: wire.jti,
            designation,
            iat: utc("countersignature", "iat", wire.iat)?,
        })
    }
}

/// The footer of both halves, as read back.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Footer {
    kid: KeyId,
}

#[derive(Serialize, Deserialize)]
enum DesignationTyp {
    #[serde(rename = "concordat.significance.v1")]
    V1,
}

#[derive(Serialize, Deserialize)]
enum CountersignatureTyp {
    #[serde(rename = "concordat.significance-countersignature.v1")]
    V1,
}

/// Designation claims as JSON carries them, in the order written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DesignationWire {
    typ: DesignationTyp,
    jti: TokenId,
    iss: KeyId,
    agency: AgencyId,
    incident_ref: String,
    flows: Vec<FlowRef>,
    grounds: String,
    #[serde(with = "time::serde::rfc3339")]
    iat: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    exp: OffsetDateTime,
}

/// Countersignature claims as JSON carries them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountersignatureWire {
    typ: CountersignatureTyp,
    iss: KeyId,
    jti: TokenId,
    designation: String,
    #[serde(with = "time::serde::rfc3339")]
    iat: OffsetDateTime,
}

/// Reads a half's footer key id and finds its officer.
fn lookup<'a>(
    half: &'static str,
    token: &str,
    officer: &impl Fn(&KeyId) -> Option<&'a Officer>,
) -> Result<&'a Officer, SignificanceError> {
    let footer = paseto::footer_of(token).map_err(|e| malformed(half, e))?;
    let kid = serde_json::from_slice::<Footer>(&footer)
        .map_err(|_| SignificanceError::Malformed {
            half,
            why: "footer is not {\"kid\":\"k4.pid.…\"}".into(),
        })?
        .kid;
    officer(&kid).ok_or(SignificanceError::UnknownOfficer { half, kid })
}

fn verify_half(
    half: &'static str,
    token: &str,
    officer: &Officer,
    typ: &str,
) -> Result<Vec<u8>, SignificanceError> {
    match paseto::verify(token, officer.key.verifying_key(), typ.as_bytes()) {
        Ok(v) => Ok(v.message),
        Err(PasetoError::BadSignature) => Err(SignificanceError::BadSignature { half }),
        Err(e) => Err(malformed(half, e)),
    }
}

fn sign_with_footer(key: &SecretKey, message: &[u8], typ: &str) -> String {
    let footer = format!("{{\"kid\":\"{}\"}}", key.key_id());
    paseto::sign(
        key.signing_key(),
        message,
        footer.as_bytes(),
        typ.as_bytes(),
    )
}

fn from_json<T: DeserializeOwned>(
    half: &'static str,
    message: &[u8],
) -> Result<T, SignificanceError> {
    serde_json::from_slice(message).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => invalid(half, &err.to_string()),
        _ => SignificanceError::Malformed {
            half,
            why: "claims are not valid JSON".into(),
        },
    })
}

fn malformed(half: &'static str, e: PasetoError) -> SignificanceError {
    SignificanceError::Malformed {
        half,
        why: e.to_string(),
    }
}

fn invalid(half: &'static str, why: &str) -> SignificanceError {
    SignificanceError::InvalidClaims {
        half,
        why: why.to_owned(),
    }
}

fn utc(
    half: &'static str,
    claim: &str,
    at: OffsetDateTime,
) -> Result<OffsetDateTime, SignificanceError> {
    at.checked_to_offset(UtcOffset::UTC)
        .filter(|at| (0..=9999).contains(&at.year()))
        .ok_or_else(|| invalid(half, &format!("{claim} is out of range")))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Fixture {
        a: SecretKey,
        b: SecretKey,
        officers: HashMap<KeyId, Officer>,
        now: OffsetDateTime,
    }

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    /// Officers a and b of the ICO, a second key of a, and c of the NCSC.
    fn fixture() -> (Fixture, SecretKey, SecretKey) {
        let a = SecretKey::generate();
        let a2 = SecretKey::generate();
        let b = SecretKey::generate();
        let c = SecretKey::generate();
        let mut officers = HashMap::new();
        for (id, ag, key) in [
            ("ico-a", "ico", &a),
            ("ico-a", "ico", &a2),
            ("ico-b", "ico", &b),
            ("ncsc-c", "ncsc", &c),
        ] {
            officers.insert(
                key.key_id(),
                Officer {
                    id: id.into(),
                    agency: agency(ag),
                    key: key.public(),
                },
            );
        }
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        (
            Fixture {
                a,
                b,
                officers,
                now,
            },
            a2,
            c,
        )
    }

    fn claims(f: &Fixture, key: &SecretKey, exp: OffsetDateTime) -> DesignationClaims {
        DesignationClaims::new(
            key.key_id(),
            agency("ico"),
            "ICO-2026-0042",
            vec![FlowRef {
                from: agency("ico"),
                to: agency("ncsc"),
            }],
            "Ransomware across the NHS supply chain.",
            f.now,
            exp,
        )
        .unwrap()
    }

    #[test]
    fn the_two_person_rule_and_the_transfer_are_checked() {
        let (f, a2, c) = fixture();
        let later = f.now + Duration::days(7);
        let d = claims(&f, &f.a, later).sign(&f.a).unwrap();
        let (cs, _) = countersign(&d, &f.b, f.now).unwrap();
        let lookup = |k: &KeyId| f.officers.get(k);
        let ico = agency("ico");
        let ncsc = agency("ncsc");
        let nca = agency("nca");
        let skew = Duration::seconds(60);

        // A second key of the same officer countersigns: refused, though the keys differ.
        let (same_officer, _) = countersign(&d, &a2, f.now).unwrap();
        // A designation by an NCSC officer, countersigned by an ICO one.
        let by_ncsc = claims(&f, &c, later).sign(&c).unwrap();
        let (by_ncsc_cs, _) = countersign(&by_ncsc, &f.b, f.now).unwrap();
        // ICO officer A designates, NCSC officer C countersigns.
        let (wrong_cs, _) = countersign(&d, &c, f.now).unwrap();
        // A countersignature over another designation.
        let other = claims(&f, &f.a, later).sign(&f.a).unwrap();
        let (other_cs, _) = countersign(&other, &f.b, f.now).unwrap();
        // One character changed inside each half's signed body.
        let tamper = |t: &str| {
            let mut bytes = t.as_bytes().to_vec();
            let at = paseto::HEADER.len() + 20;
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            String::from_utf8(bytes).unwrap()
        };
        // The first officer countersigns their own designation, with a hand-made second half
        // (`countersign` itself refuses to).
        let own_cs = {
            let wire = CountersignatureWire {
                typ: CountersignatureTyp::V1,
                iss: f.a.key_id(),
                jti: decode_unverified(&d).unwrap().jti(),
                designation: hex::encode(digest(&d)),
                iat: f.now,
            };
            sign_with_footer(
                &f.a,
                &serde_json::to_vec(&wire).unwrap(),
                COUNTERSIGNATURE_TYP,
            )
        };
        let stranger = SecretKey::generate();
        let (stranger_cs, _) = countersign(&d, &stranger, f.now).unwrap();

        type Row<'a> = (&'a str, String, String, Option<&'static str>);
        let rows: Vec<Row<'_>> = vec![
            ("two officers", d.clone(), cs.clone(), None),
            (
                "same officer, second key",
                d.clone(),
                same_officer,
                Some("SameOfficer"),
            ),
            (
                "same officer, same key",
                d.clone(),
                own_cs,
                Some("SameOfficer"),
            ),
            (
                "the designation as its own countersignature",
                d.clone(),
                d.clone(),
                Some("BadSignature"),
            ),
            (
                "designation by another agency's officer",
                by_ncsc,
                by_ncsc_cs,
                Some("WrongAgency"),
            ),
            (
                "countersigned by another agency's officer",
                d.clone(),
                wrong_cs,
                Some("WrongAgency"),
            ),
            (
                "countersignature over another designation",
                d.clone(),
                other_cs,
                Some("NotCountersigned"),
            ),
            (
                "tampered designation",
                tamper(&d),
                cs.clone(),
                Some("BadSignature"),
            ),
            (
                "tampered countersignature",
                d.clone(),
                tamper(&cs),
                Some("BadSignature"),
            ),
            (
                "halves swapped",
                cs.clone(),
                d.clone(),
                Some("BadSignature"),
            ),
            (
                "unknown countersigner",
                d.clone(),
                stranger_cs,
                Some("UnknownOfficer"),
            ),
            (
                "garbage",
                "v4.public.x".into(),
                cs.clone(),
                Some("Malformed"),
            ),
        ];
        for (what, designation, counter, want) in rows {
            let got = verify(&designation, &counter, lookup)
                .err()
                .map(|e| format!("{e:?}"));
            match want {
                None => assert_eq!(got, None, "{what}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.starts_with(w)),
                    "{what}: got {got:?}, want {w}"
                ),
            }
        }

        let v = verify(&d, &cs, lookup).unwrap();
        assert_eq!(v.designated_by, "ico-a");
        assert_eq!(v.countersigned_by, "ico-b");
        assert_eq!(v.digest, digest(&d));
        // (what, sender, recipient, incident, at, expected)
        type Use<'a> = (
            &'a str,
            &'a AgencyId,
            &'a AgencyId,
            &'a str,
            OffsetDateTime,
            Option<&'static str>,
        );
        let uses: Vec<Use<'_>> = vec![
            ("covered", &ico, &ncsc, "ICO-2026-0042", f.now, None),
            (
                "within the skew before",
                &ico,
                &ncsc,
                "ICO-2026-0042",
                f.now - Duration::seconds(30),
                None,
            ),
            (
                "too early",
                &ico,
                &ncsc,
                "ICO-2026-0042",
                f.now - Duration::hours(1),
                Some("NotYetValid"),
            ),
            (
                "expired",
                &ico,
                &ncsc,
                "ICO-2026-0042",
                later + Duration::seconds(61),
                Some("Expired"),
            ),
            (
                "wrong incident",
                &ico,
                &ncsc,
                "ICO-2026-0043",
                f.now,
                Some("WrongIncident"),
            ),
            (
                "the same incident, qualified with the agency",
                &ico,
                &ncsc,
                "ico:ICO-2026-0042",
                f.now,
                None,
            ),
            (
                "the same reference of another agency",
                &ico,
                &ncsc,
                "nca:ICO-2026-0042",
                f.now,
                Some("WrongIncident"),
            ),
            (
                "incident differs in case",
                &ico,
                &ncsc,
                "ico-2026-0042",
                f.now,
                Some("WrongIncident"),
            ),
            (
                "wrong flow",
                &ico,
                &nca,
                "ICO-2026-0042",
                f.now,
                Some("WrongFlow"),
            ),
            (
                "wrong sender",
                &ncsc,
                &ico,
                "ICO-2026-0042",
                f.now,
                Some("WrongAgency"),
            ),
        ];
        for (what, from, to, incident, at, want) in uses {
            let got = v
                .check(from, to, incident, at, skew)
                .err()
                .map(|e| format!("{e:?}"));
            match want {
                None => assert_eq!(got, None, "{what}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.starts_with(w)),
                    "{what}: got {got:?}, want {w}"
                ),
            }
        }
    }

    #[test]
    fn claims_rules_refuse_bad_designations() {
        let (f, _, _) = fixture();
        let flow = |from: &str, to: &str| FlowRef {
            from: agency(from),
            to: agency(to),
        };
        type Row<'a> = (&'a str, &'a str, Vec<FlowRef>, &'a str, OffsetDateTime);
        let later = f.now + Duration::days(1);
        let rows: Vec<Row<'_>> = vec![
            ("empty incident", "", vec![flow("ico", "ncsc")], "g", later),
            (
                "spaces in incident",
                "A B",
                vec![flow("ico", "ncsc")],
                "g",
                later,
            ),
            ("no flows", "I-1", vec![], "g", later),
            (
                "flow from another agency",
                "I-1",
                vec![flow("ncsc", "ico")],
                "g",
                later,
            ),
            (
                "flow to itself",
                "I-1",
                vec![flow("ico", "ico")],
                "g",
                later,
            ),
            (
                "flow twice",
                "I-1",
                vec![flow("ico", "ncsc"), flow("ico", "ncsc")],
                "g",
                later,
            ),
            (
                "blank grounds",
                "I-1",
                vec![flow("ico", "ncsc")],
                "  ",
                later,
            ),
            (
                "expires when made",
                "I-1",
                vec![flow("ico", "ncsc")],
                "g",
                f.now,
            ),
        ];
        for (what, incident, flows, grounds, exp) in rows {
            let got = DesignationClaims::new(
                f.a.key_id(),
                agency("ico"),
                incident,
                flows,
                grounds,
                f.now,
                exp,
            );
            assert!(
                matches!(got, Err(SignificanceError::InvalidClaims { .. })),
                "{what}: {got:?}"
            );
        }
        // The countersigning officer cannot be the designating one.
        let d = claims(&f, &f.a, later).sign(&f.a).unwrap();
        assert!(matches!(
            countersign(&d, &f.a, f.now),
            Err(SignificanceError::SameOfficer { .. })
        ));
        // Signing with another key than the issuer's is refused.
        assert!(claims(&f, &f.a, later).sign(&f.b).is_err());
        // A consent-token-shaped token is not a designation.
        assert!(decode_unverified("v4.public.eyJ0eXAiOiJ4In0").is_err());
    }
}
