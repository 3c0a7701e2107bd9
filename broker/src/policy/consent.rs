//! The consent step of the decision: which keys the broker trusts to speak for which
//! organisations, verifying a consent token (or finding that it was verified before), and
//! checking that its claims cover the exact transfer, in the documented order.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use concordat_proto::{
    consent::{self, ConsentClaims, ConsentError, TokenId},
    envelope::Envelope,
    ids::{AgencyId, OrgId},
    paserk::{KeyId, PublicKey},
    workflow::incident_for_comparison,
};
use time::OffsetDateTime;

use super::{Context, organisations::Identified, refuse, rfc3339};
use crate::refusal::{Failure, Internal, Reason};

/// Which organisations an issuer may speak for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Organisations {
    /// Any organisation (`"*"`): an agency's consent desk.
    Any,
    /// Only these.
    Only(BTreeSet<OrgId>),
}

/// A key whose consent tokens the broker trusts, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentIssuer {
    /// The public key.
    pub key: PublicKey,
    /// The agency whose consent desk this key is: its tokens may only authorise transfers from
    /// that agency. `None` for an organisation's own key, which may authorise any sender.
    pub agency: Option<AgencyId>,
    /// The organisations it may speak for.
    pub organisations: Organisations,
}

/// The consent a transfer was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentUse {
    /// The organisation that consented.
    pub organisation: OrgId,
    /// The token's id.
    pub jti: TokenId,
    /// Its issuer's key id.
    pub issuer: KeyId,
    /// When the token was issued (for "every token issued before T" revocations).
    pub issued_at: OffsetDateTime,
    /// How many transfers it may authorise, if limited.
    pub max_uses: Option<u32>,
    /// When the token expires (for `concordat consent list`).
    pub expires_at: OffsetDateTime,
}

/// What the broker has recorded about consent tokens: revocations and uses.
pub trait ConsentLedger: Send + Sync {
    /// Whether the token `jti` of `issuer`, issued at `issued_at`, has been revoked.
    fn is_revoked(
        &self,
        issuer: &KeyId,
        jti: &TokenId,
        issued_at: OffsetDateTime,
    ) -> Result<bool, Internal>;
    /// How many accepted transfers the token has authorised so far.
    fn uses(&self, issuer: &KeyId, jti: &TokenId) -> Result<u32, Internal>;
}

/// Consent tokens whose signature verified under a trusted issuer's key, with their claims.
///
/// An Ed25519 verification is a pure function of the key, the signed message and the
/// signature, so its success for the exact same token (compared byte for byte, never by a
/// digest) under the same key stays true; only successes are remembered. Nothing else is
/// cached: the issuer's permissions, the claims against the envelope, the time window,
/// revocation and use counts are checked for every transfer. At most `2 × capacity` tokens are
/// held, in two generations: when the newer fills, the older is dropped, so tokens in use stay
/// and memory is bounded.
pub struct VerifiedTokens {
    capacity: usize,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    current: HashMap<Box<str>, Arc<ConsentClaims>>,
    previous: HashMap<Box<str>, Arc<ConsentClaims>>,
}

impl VerifiedTokens {
    /// The default number of tokens per generation.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty cache of `capacity` tokens per generation (at least one).
    pub fn new(capacity: usize) -> Self {
        VerifiedTokens {
            capacity: capacity.max(1),
            generations: Mutex::new(Generations::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Every update is a single insert or swap: a panic elsewhere cannot leave it torn.
        self.generations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The claims of `token` if its signature was verified before.
    fn get(&self, token: &str) -> Option<Arc<ConsentClaims>> {
        let mut g = self.lock();
        if let Some(claims) = g.current.get(token) {
            return Some(claims.clone());
        }
        let (token, claims) = g.previous.remove_entry(token)?;
        g.insert(self.capacity, token, claims.clone());
        Some(claims)
    }

    /// Remembers that `token` verified, with its claims.
    fn remember(&self, token: &str, claims: Arc<ConsentClaims>) {
        self.lock().insert(self.capacity, token.into(), claims);
    }

    /// How many tokens are remembered (for tests and diagnostics).
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.current.len() + g.previous.len()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens::new(VerifiedTokens::DEFAULT_CAPACITY)
    }
}

impl Generations {
    fn insert(&mut self, capacity: usize, token: Box<str>, claims: Arc<ConsentClaims>) {
        if self.current.len() >= capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(token, claims);
    }
}

/// Checks the consent of every organisation the transfer identifies, in order, and returns
/// what each transfer uses:
/// - the envelope's `organisation` is covered by its `consent_token`, as it always was;
/// - every other organisation by the token among the rest (`consent_tokens`, and
///   `consent_token` when the envelope declares no `organisation`) whose `sub` names it;
/// - a declared organisation without a token is `CONSENT_MISSING`; one only the payload names
///   is `ORGANISATION_IDENTIFIED`, saying where it was found;
/// - each token must verify, come from an issuer trusted for this sender and organisation,
///   cover this exact transfer, and be neither revoked nor used up;
/// - a token in `consent_tokens` for an organisation the transfer does not identify is
///   `CONSENT_WRONG_ORGANISATION`: the sender believes the payload identifies someone the
///   broker did not find, which it must say (`organisations`) rather than leave to chance.
pub(super) fn check_all(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
    identified: &[Identified],
) -> Result<Vec<ConsentUse>, Failure> {
    // The tokens not bound to the envelope's organisation, verified, to be matched by `sub`.
    let mut rest: Vec<Option<Verified<'_>>> = Vec::new();
    let unbound = envelope
        .consent_token
        .as_deref()
        .filter(|_| envelope.organisation.is_none());
    for token in unbound
        .into_iter()
        .chain(envelope.consent_tokens.iter().map(String::as_str))
    {
        rest.push(Some(verified(cx, token)?));
    }
    let mut uses = Vec::with_capacity(identified.len());
    for who in identified {
        let org = &who.org;
        let bound = envelope
            .consent_token
            .as_deref()
            .filter(|_| envelope.organisation.as_ref() == Some(org));
        let v = if let Some(token) = bound {
            verified(cx, token)?
        } else {
            let found = rest
                .iter_mut()
                .find(|v| v.as_ref().is_some_and(|v| v.claims.sub() == org.as_str()));
            match found.and_then(Option::take) {
                Some(v) => v,
                None => return Err(missing(who)),
            }
        };
        issuer_may(&v, sender, org)?;
        check_claims(cx, &v.claims, sender, org, envelope, &cx.payload_digest)?;
        uses.push(check_ledger(cx, org, &v.claims)?);
    }
    // A spare token from `consent_tokens` (a spare `consent_token` is ignored, as it always was).
    let spare = rest
        .iter()
        .skip(usize::from(unbound.is_some()))
        .flatten()
        .next();
    if let Some(v) = spare {
        return Err(refuse(
            Reason::ConsentWrongOrganisation,
            format!(
                "consent token {} is for organisation {}, which this transfer does not identify: \
                 declare it in organisations, or leave the token out",
                v.claims.jti(),
                v.claims.sub()
            ),
        ));
    }
    Ok(uses)
}

/// The refusal for an identified organisation without a consent token.
fn missing(who: &Identified) -> Failure {
    let org = &who.org;
    match (&who.found_at, who.declared) {
        (Some(place), false) => refuse(
            Reason::OrganisationIdentified,
            format!(
                "the payload identifies organisation {org} ({place}) and the envelope carries no \
                 consent token of {org}: send its consent token (consent_tokens), or remove what \
                 identifies it"
            ),
        ),
        _ => refuse(
            Reason::ConsentMissing,
            format!(
                "information identifying organisation {org} needs that organisation's consent token"
            ),
        ),
    }
}

/// Checks the ledger for a token that covers the transfer: not revoked, not used up.
fn check_ledger(
    cx: &Context<'_>,
    org: &OrgId,
    claims: &ConsentClaims,
) -> Result<ConsentUse, Failure> {
    let max_uses = claims.max_uses().map(|n| n.get());
    if cx
        .ledger
        .is_revoked(claims.iss(), &claims.jti(), claims.issued_at())?
    {
        return Err(refuse(
            Reason::ConsentRevoked,
            format!(
                "consent token {} has been revoked by its issuer",
                claims.jti()
            ),
        ));
    }
    if let Some(max) = max_uses {
        let used = cx.ledger.uses(claims.iss(), &claims.jti())?;
        if used >= max {
            return Err(refuse(
                Reason::ConsentUsedUp,
                format!(
                    "consent token {} allows {max} use(s), all used",
                    claims.jti()
                ),
            ));
        }
    }
    Ok(ConsentUse {
        organisation: org.clone(),
        jti: claims.jti(),
        issuer: *claims.iss(),
        issued_at: claims.issued_at(),
        max_uses,
        expires_at: claims.expires_at(),
    })
}

/// A token whose signature verified under a trusted issuer's key.
struct Verified<'a> {
    key_id: KeyId,
    issuer: &'a ConsentIssuer,
    claims: Arc<ConsentClaims>,
}

/// Finds the token's issuer among the trusted ones and verifies the token, or finds that it
/// was verified before.
fn verified<'a>(cx: &Context<'a>, token: &str) -> Result<Verified<'a>, Failure> {
    match cx.verified.get(token) {
        // Verified before under the key of its issuer, `iss` (consent::verify checks that
        // the claim names the verifying key, and a key id names one key); the issuer is
        // looked up again in the policy in force, which a reload may have changed.
        Some(claims) => match cx.policy.issuers.get(claims.iss()) {
            Some(issuer) => Ok(Verified {
                key_id: *claims.iss(),
                issuer,
                claims,
            }),
            None => Err(unknown_issuer(claims.iss())),
        },
        None => {
            let key_id = consent::key_id_of(token).map_err(consent_refusal)?;
            let Some(issuer) = cx.policy.issuers.get(&key_id) else {
                return Err(unknown_issuer(&key_id));
            };
            let claims = Arc::new(consent::verify(token, &issuer.key).map_err(consent_refusal)?);
            cx.verified.remember(token, claims.clone());
            Ok(Verified {
                key_id,
                issuer,
                claims,
            })
        }
    }
}

/// Checks that the token's issuer may speak for `organisation` to authorise `sender`.
fn issuer_may(v: &Verified<'_>, sender: &AgencyId, organisation: &OrgId) -> Result<(), Failure> {
    let key_id = &v.key_id;
    if let Some(desk) = v.issuer.agency.as_ref().filter(|desk| *desk != sender) {
        return Err(refuse(
            Reason::ConsentIssuerNotAllowed,
            format!(
                "consent issuer {key_id} is the consent desk of {desk}; it cannot authorise transfers from {sender}"
            ),
        ));
    }
    if let Organisations::Only(orgs) = &v.issuer.organisations
        && !orgs.contains(organisation)
    {
        return Err(refuse(
            Reason::ConsentIssuerNotAllowed,
            format!("consent issuer {key_id} may not speak for organisation {organisation}"),
        ));
    }
    Ok(())
}

fn unknown_issuer(key_id: &KeyId) -> Failure {
    refuse(
        Reason::ConsentUnknownIssuer,
        format!("consent token signed by {key_id}, which this broker does not trust"),
    )
}

fn consent_refusal(e: ConsentError) -> Failure {
    let reason = match &e {
        ConsentError::TooLong => Reason::ConsentTooLong,
        ConsentError::UnsupportedVersion => Reason::ConsentUnsupportedVersion,
        ConsentError::Malformed(_) => Reason::ConsentMalformed,
        ConsentError::KeyMismatch => Reason::ConsentUnknownIssuer,
        ConsentError::BadSignature => Reason::ConsentBadSignature,
        ConsentError::InvalidClaims(_) => Reason::ConsentInvalidClaims,
        _ => Reason::ConsentMalformed,
    };
    refuse(reason, e.to_string())
}

/// Checks that the claims cover this transfer, in the documented order.
fn check_claims(
    cx: &Context<'_>,
    claims: &ConsentClaims,
    sender: &AgencyId,
    organisation: &OrgId,
    envelope: &Envelope,
    payload_digest: &[u8; 32],
) -> Result<(), Failure> {
    let jti = claims.jti();
    if claims.sub() != organisation.as_str() {
        return Err(refuse(
            Reason::ConsentWrongOrganisation,
            format!("consent token {jti} is for another organisation, not {organisation}"),
        ));
    }
    if claims.from() != sender.as_str() {
        return Err(refuse(
            Reason::ConsentWrongSender,
            format!(
                "consent token {jti} authorises transfers from {}, not {sender}",
                claims.from()
            ),
        ));
    }
    let uncovered: Vec<&str> = envelope
        .recipients
        .iter()
        .map(AgencyId::as_str)
        .filter(|r| !claims.to().iter().any(|t| t == r))
        .collect();
    if !uncovered.is_empty() {
        return Err(refuse(
            Reason::ConsentWrongRecipient,
            format!(
                "consent token {jti} does not cover recipient(s) {}",
                uncovered.join(", ")
            ),
        ));
    }
    if !claims.kinds().contains(&envelope.kind) {
        return Err(refuse(
            Reason::ConsentWrongKind,
            format!("consent token {jti} does not cover {}", envelope.kind),
        ));
    }
    if !claims.incident_refs().is_empty() {
        // Both sides are read as federation-unique references: the envelope's qualified with
        // its sender (the broker has done so already; qualifying again changes nothing), the
        // token's with its own `from`, which is the sender (checked above).
        let covered = envelope
            .incident_ref
            .as_ref()
            .is_some_and(|r| claims.covers_incident(&incident_for_comparison(sender, r)));
        if !covered {
            return Err(refuse(
                Reason::ConsentWrongIncident,
                format!("consent token {jti} is bound to other incident(s)"),
            ));
        }
    }
    if let Some(pdh) = claims.pdh() {
        let mut actual = String::with_capacity(64);
        for b in payload_digest {
            let _ = write!(actual, "{b:02x}");
        }
        if pdh != actual {
            return Err(refuse(
                Reason::ConsentPayloadMismatch,
                format!("consent token {jti} is bound to another payload"),
            ));
        }
    }
    let skew = cx.policy.clock_skew;
    // A token "issued" in the future would escape "every token issued before T" revocations.
    if cx.now + skew < claims.issued_at() {
        return Err(refuse(
            Reason::ConsentNotYetValid,
            format!(
                "consent token {jti} claims to be issued in the future, at {}",
                rfc3339(claims.issued_at())
            ),
        ));
    }
    if cx.now + skew < claims.not_before() {
        return Err(refuse(
            Reason::ConsentNotYetValid,
            format!(
                "consent token {jti} is not valid before {}",
                rfc3339(claims.not_before())
            ),
        ));
    }
    if cx.now - skew >= claims.expires_at() {
        return Err(refuse(
            Reason::ConsentExpired,
            format!(
                "consent token {jti} expired at {}",
                rfc3339(claims.expires_at())
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use concordat_proto::{envelope::Kind, paserk::SecretKey};
    use time::Duration;

    use super::*;

    #[test]
    fn the_cache_keeps_two_generations() {
        let desk = SecretKey::generate();
        let now = OffsetDateTime::now_utc();
        let verified = VerifiedTokens::new(2);
        let claims = Arc::new(
            ConsentClaims::builder("acme-ltd", "ncsc", "a test")
                .recipient("ico")
                .kind(Kind::IncidentRecord)
                .valid_for(Duration::hours(1))
                .build(desk.key_id(), now)
                .unwrap(),
        );
        for t in ["a", "b", "c"] {
            verified.remember(t, claims.clone());
        }
        // "a" and "b" filled the first generation; "c" started the second.
        assert_eq!(verified.len(), 3);
        // Looking "a" up promotes it into the current generation ...
        assert!(verified.get("a").is_some());
        // ... which is now full, so the next token drops the generation holding "b".
        verified.remember("d", claims.clone());
        assert!(verified.get("b").is_none());
        assert!(verified.get("a").is_some() && verified.get("d").is_some());
        assert!(verified.len() <= 4);
    }
}
