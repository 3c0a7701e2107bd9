//! The agreements between agencies as code, the consent issuers the broker trusts, and the one
//! decision function that says whether an envelope may be relayed.
//!
//! [`decide`] applies the MoU rules in a fixed order, each failure a [`Refusal`] with a stable
//! reason: the payload's size; every recipient is an agency and an agreement in force permits
//! the flow for this kind; an organisation-specific envelope carries a consent token that
//! verifies, whose issuer is trusted for this sender and organisation, and whose claims cover
//! this exact transfer (organisation, sender, recipients, kind, incident, payload, time window),
//! and which is neither revoked nor used up. Anonymised envelopes need no token.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
};

use concordat_proto::{
    consent::{self, ConsentClaims, ConsentError, TokenId},
    envelope::{Envelope, Kind},
    ids::{AgencyId, OrgId},
    paserk::{KeyId, PublicKey},
};
use time::{Date, Duration, OffsetDateTime};

use crate::{
    config::{Agency, Limits},
    refusal::{Failure, Internal, Reason, Refusal},
};

/// An agreement (memorandum of understanding) between agencies, and the flows it permits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// A short stable id, cited by every decision that relies on it.
    pub id: String,
    /// Its title.
    pub title: String,
    /// The agencies that signed it.
    pub parties: BTreeSet<AgencyId>,
    /// When it was signed: it is in force from that day.
    pub signed: Date,
    /// When it must next be reviewed.
    pub review_by: Date,
    /// The flows it permits.
    pub flows: Vec<Flow>,
}

impl Agreement {
    /// Whether the agreement is in force on `today`.
    pub fn in_force(&self, today: Date) -> bool {
        self.signed <= today
    }

    /// Whether its review is overdue on `today`.
    pub fn review_overdue(&self, today: Date) -> bool {
        self.review_by < today
    }
}

/// One permitted flow: `from` may send `kinds` to `to`, under `clause`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The sending agency.
    pub from: AgencyId,
    /// The receiving agency.
    pub to: AgencyId,
    /// The kinds of message permitted.
    pub kinds: BTreeSet<Kind>,
    /// The clause of the agreement that permits it, cited in decisions.
    pub clause: String,
}

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

/// The rules the broker enforces.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The agreements, in configuration order.
    pub agreements: Vec<Agreement>,
    /// Trusted consent issuers by key id.
    pub issuers: HashMap<KeyId, ConsentIssuer>,
    /// How far a token's time window is stretched for clock differences.
    pub clock_skew: Duration,
    /// Refuse flows whose only agreements are past their review date.
    pub enforce_review: bool,
}

impl Policy {
    /// The agreements whose review is overdue on `today`.
    pub fn overdue(&self, today: Date) -> Vec<&Agreement> {
        self.agreements
            .iter()
            .filter(|a| a.review_overdue(today))
            .collect()
    }
}

/// Why one recipient may receive this envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The recipient.
    pub recipient: AgencyId,
    /// The agreement relied on.
    pub agreement_id: String,
    /// Its clause.
    pub clause: String,
    /// Whether that agreement's review was overdue when the decision was made.
    pub review_overdue: bool,
}

/// The consent a transfer was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentUse {
    /// The token's id.
    pub jti: TokenId,
    /// Its issuer's key id.
    pub issuer: KeyId,
    /// When the token was issued (for "every token issued before T" revocations).
    pub issued_at: OffsetDateTime,
    /// How many transfers it may authorise, if limited.
    pub max_uses: Option<u32>,
}

/// A decision to relay an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// For each recipient, in the envelope's order, the agreement relied on.
    pub authorities: Vec<Authority>,
    /// The consent relied on, for organisation-specific envelopes.
    pub consent: Option<ConsentUse>,
    /// SHA-256 of the payload.
    pub payload_digest: [u8; 32],
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

/// Everything [`decide`] looks at besides the envelope.
pub struct Context<'a> {
    /// The rules.
    pub policy: &'a Policy,
    /// The agencies of the federation.
    pub agencies: &'a BTreeMap<AgencyId, Agency>,
    /// Size limits.
    pub limits: &'a Limits,
    /// Revocations and use counts.
    pub ledger: &'a dyn ConsentLedger,
    /// The time of the decision.
    pub now: OffsetDateTime,
    /// SHA-256 of the envelope's payload, computed once by the caller.
    pub payload_digest: [u8; 32],
}

/// Decides whether `sender` may send `envelope`. The sender is the authenticated caller.
pub fn decide(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
) -> Result<Decision, Failure> {
    if envelope.payload.len() > cx.limits.max_message_bytes {
        return Err(refuse(
            Reason::PayloadTooLarge,
            format!(
                "the payload is {} bytes; this broker accepts at most {}",
                envelope.payload.len(),
                cx.limits.max_message_bytes
            ),
        ));
    }

    // 1. Every recipient is an agency, and an agreement in force permits the flow.
    let mut authorities = Vec::with_capacity(envelope.recipients.len());
    for recipient in &envelope.recipients {
        if !cx.agencies.contains_key(recipient) {
            return Err(refuse(
                Reason::UnknownRecipient,
                format!("{recipient} is not an agency of this federation"),
            ));
        }
        authorities.push(authority(cx, sender, recipient, envelope.kind)?);
    }

    let payload_digest = cx.payload_digest;

    // 3. Anonymised or aggregate information needs no consent.
    let Some(organisation) = &envelope.organisation else {
        return Ok(Decision {
            authorities,
            consent: None,
            payload_digest,
        });
    };

    // 2. Organisation-specific: a valid consent token must cover this exact transfer.
    let claims = verify_token(cx, sender, organisation, envelope.consent_token.as_deref())?;
    check_claims(cx, &claims, sender, organisation, envelope, &payload_digest)?;
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
    Ok(Decision {
        authorities,
        consent: Some(ConsentUse {
            jti: claims.jti(),
            issuer: *claims.iss(),
            issued_at: claims.issued_at(),
            max_uses,
        }),
        payload_digest,
    })
}

fn refuse(reason: Reason, message: impl Into<String>) -> Failure {
    Failure::Refused(Refusal::new(reason, message))
}

/// Finds the agreement that permits `sender` → `recipient` for `kind`, preferring one whose
/// review is not overdue.
fn authority(
    cx: &Context<'_>,
    sender: &AgencyId,
    recipient: &AgencyId,
    kind: Kind,
) -> Result<Authority, Failure> {
    let today = cx.now.date();
    let mut overdue: Option<Authority> = None;
    for agreement in cx.policy.agreements.iter().filter(|a| a.in_force(today)) {
        let Some(flow) = agreement
            .flows
            .iter()
            .find(|f| &f.from == sender && &f.to == recipient && f.kinds.contains(&kind))
        else {
            continue;
        };
        let found = Authority {
            recipient: recipient.clone(),
            agreement_id: agreement.id.clone(),
            clause: flow.clause.clone(),
            review_overdue: agreement.review_overdue(today),
        };
        if !found.review_overdue {
            return Ok(found);
        }
        overdue.get_or_insert(found);
    }
    match overdue {
        Some(found) if cx.policy.enforce_review => Err(refuse(
            Reason::AgreementReviewOverdue,
            format!(
                "agreement {} would permit {kind} from {sender} to {recipient}, but its review is overdue",
                found.agreement_id
            ),
        )),
        Some(found) => {
            // Logged at start-up and by check-config; per decision it is only a debug note.
            tracing::debug!(agreement = %found.agreement_id, "relying on an agreement whose review is overdue");
            Ok(found)
        }
        None => Err(refuse(
            Reason::NoAgreement,
            format!("no agreement in force permits {kind} from {sender} to {recipient}"),
        )),
    }
}

/// Finds the token's issuer among the trusted ones, verifies the token, and checks that the
/// issuer may speak for this organisation to authorise this sender.
fn verify_token(
    cx: &Context<'_>,
    sender: &AgencyId,
    organisation: &OrgId,
    token: Option<&str>,
) -> Result<ConsentClaims, Failure> {
    let Some(token) = token else {
        return Err(refuse(
            Reason::ConsentMissing,
            format!(
                "information identifying organisation {organisation} needs that organisation's consent token"
            ),
        ));
    };
    let key_id = consent::key_id_of(token).map_err(consent_refusal)?;
    let Some(issuer) = cx.policy.issuers.get(&key_id) else {
        return Err(refuse(
            Reason::ConsentUnknownIssuer,
            format!("consent token signed by {key_id}, which this broker does not trust"),
        ));
    };
    let claims = consent::verify(token, &issuer.key).map_err(consent_refusal)?;
    if issuer.agency.as_ref().is_some_and(|desk| desk != sender) {
        return Err(refuse(
            Reason::ConsentIssuerNotAllowed,
            format!(
                "consent issuer {key_id} is the consent desk of {}; it cannot authorise transfers from {sender}",
                issuer
                    .agency
                    .as_ref()
                    .map(AgencyId::as_str)
                    .unwrap_or_default()
            ),
        ));
    }
    if let Organisations::Only(orgs) = &issuer.organisations
        && !orgs.contains(organisation)
    {
        return Err(refuse(
            Reason::ConsentIssuerNotAllowed,
            format!("consent issuer {key_id} may not speak for organisation {organisation}"),
        ));
    }
    Ok(claims)
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
        let covered = envelope
            .incident_ref
            .as_ref()
            .is_some_and(|r| claims.incident_refs().iter().any(|c| c == r));
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

/// An RFC 3339 rendering for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
