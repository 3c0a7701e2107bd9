//! The agreements between agencies as code, the consent issuers the broker trusts, and the one
//! decision function that says whether an envelope may be relayed.
//!
//! [`decide`] applies the MoU rules in a fixed order, each failure a [`Refusal`] with a stable
//! reason: the payload's size; every recipient is an agency and an agreement in force permits
//! the flow for this kind; the payload is what its content type says ([`crate::content`]), and
//! an opaque one travels only on flows that allow it, never as an anonymised or aggregate
//! incident record; an organisation-specific envelope carries a consent token that
//! verifies, whose issuer is trusted for this sender and organisation, and whose claims cover
//! this exact transfer (organisation, sender, recipients, kind, incident, payload, time window),
//! and which is neither revoked nor used up. Anonymised envelopes need no token.
//!
//! [`VerifiedTokens`] remembers which tokens' signatures have been verified, so that a token
//! used for many transfers (the records of one incident, say) costs one Ed25519 verification
//! rather than one per transfer; everything else is checked on every envelope.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
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
    content::{Content, ContentKind, Granularity},
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
    /// Whether the flow may carry opaque payloads, which the broker cannot inspect
    /// (`opaque = true`; default false).
    pub opaque: bool,
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

/// Everything [`decide`] looks at besides the envelope.
pub struct Context<'a> {
    /// The rules.
    pub policy: &'a Policy,
    /// Tokens verified before.
    pub verified: &'a VerifiedTokens,
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
    // Opaque payloads need every flow they take to allow them (and there is at least one).
    let mut every_flow_opaque = !envelope.recipients.is_empty();
    for recipient in &envelope.recipients {
        if !cx.agencies.contains_key(recipient) {
            return Err(refuse(
                Reason::UnknownRecipient,
                format!("{recipient} is not an agency of this federation"),
            ));
        }
        let found = authority(cx, sender, recipient, envelope.kind)?;
        every_flow_opaque &= found.opaque;
        authorities.push(found.authority);
    }

    // 2. The payload is what its content type says, and the broker can read it, or the flow
    // allows it not to. The parsed content is where checks of what the payload says (every
    // string, with its place: `Content::for_each_string`) plug in.
    let _content = check_content(envelope, every_flow_opaque)?;

    let payload_digest = cx.payload_digest;

    // 3. Anonymised or aggregate information needs no consent.
    let Some(organisation) = &envelope.organisation else {
        return Ok(Decision {
            authorities,
            consent: None,
            payload_digest,
        });
    };

    // 4. Organisation-specific: a valid consent token must cover this exact transfer.
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

/// Reads the payload as its content type says and checks that the broker may relay it:
/// - a payload that is not what its type says (a STIX bundle or incident record breaking its
///   schema, JSON that does not parse) is `INVALID_CONTENT`;
/// - an incident record must travel as an `incident_record`, and its granularity must agree
///   with the envelope: `incident_specific` names exactly the envelope's organisation (whose
///   consent the token carries); `aggregate` and `anonymised` go without an organisation;
/// - an opaque payload is `UNINSPECTABLE_CONTENT` unless every flow it takes allows opaque
///   payloads, and always as an anonymised or aggregate incident record (an
///   `incident_record` envelope without an organisation), since nobody could check that it
///   identifies no one.
fn check_content(envelope: &Envelope, every_flow_opaque: bool) -> Result<Content, Failure> {
    let invalid = |e: &dyn std::fmt::Display| refuse(Reason::InvalidContent, e.to_string());
    let kind = ContentKind::of(&envelope.content_type).map_err(|e| invalid(&e))?;
    let content = Content::read(kind, &envelope.payload).map_err(|e| invalid(&e))?;
    match &content {
        Content::Opaque => {
            if envelope.kind == Kind::IncidentRecord && envelope.organisation.is_none() {
                return Err(refuse(
                    Reason::UninspectableContent,
                    format!(
                        "an anonymised or aggregate incident record must be inspectable, so that \
                         the broker can check it identifies no one; {:?} is opaque",
                        envelope.content_type
                    ),
                ));
            }
            if !every_flow_opaque {
                return Err(refuse(
                    Reason::UninspectableContent,
                    format!(
                        "{:?} is opaque to the broker and the agreement's flow does not allow \
                         opaque payloads (opaque = true); send JSON, a STIX 2.1 bundle or an \
                         incident record",
                        envelope.content_type
                    ),
                ));
            }
        }
        Content::Incident(record, _) => {
            if envelope.kind != Kind::IncidentRecord {
                return Err(refuse(
                    Reason::InvalidContent,
                    format!("an incident record cannot be sent as {}", envelope.kind),
                ));
            }
            match (
                record.granularity,
                &envelope.organisation,
                record.organisation(),
            ) {
                (Granularity::IncidentSpecific, Some(org), Some(named)) if org == named => {}
                (Granularity::IncidentSpecific, Some(org), _) => {
                    return Err(refuse(
                        Reason::InvalidContent,
                        format!(
                            "the incident_specific record concerns another organisation than \
                             the envelope's, {org}"
                        ),
                    ));
                }
                (Granularity::IncidentSpecific, None, _) => {
                    return Err(refuse(
                        Reason::InvalidContent,
                        "an incident_specific record names its organisation in the envelope, \
                         with that organisation's consent token",
                    ));
                }
                (g, Some(org), _) => {
                    return Err(refuse(
                        Reason::InvalidContent,
                        format!(
                            "the record's granularity is {g}, but the envelope identifies \
                             organisation {org}: send it as incident_specific"
                        ),
                    ));
                }
                (_, None, _) => {}
            }
        }
        Content::Stix(_) | Content::Json(_) => {}
    }
    Ok(content)
}

/// The agreement found for one recipient, and whether its flow allows opaque payloads.
struct FoundFlow {
    authority: Authority,
    opaque: bool,
}

/// Finds the agreement that permits `sender` → `recipient` for `kind`, preferring one whose
/// review is not overdue.
fn authority(
    cx: &Context<'_>,
    sender: &AgencyId,
    recipient: &AgencyId,
    kind: Kind,
) -> Result<FoundFlow, Failure> {
    let today = cx.now.date();
    let mut overdue: Option<FoundFlow> = None;
    for agreement in cx.policy.agreements.iter().filter(|a| a.in_force(today)) {
        let Some(flow) = agreement
            .flows
            .iter()
            .find(|f| &f.from == sender && &f.to == recipient && f.kinds.contains(&kind))
        else {
            continue;
        };
        let found = FoundFlow {
            authority: Authority {
                recipient: recipient.clone(),
                agreement_id: agreement.id.clone(),
                clause: flow.clause.clone(),
                review_overdue: agreement.review_overdue(today),
            },
            opaque: flow.opaque,
        };
        if !found.authority.review_overdue {
            return Ok(found);
        }
        overdue.get_or_insert(found);
    }
    match overdue {
        Some(found) if cx.policy.enforce_review => Err(refuse(
            Reason::AgreementReviewOverdue,
            format!(
                "agreement {} would permit {kind} from {sender} to {recipient}, but its review is overdue",
                found.authority.agreement_id
            ),
        )),
        Some(found) => {
            // Logged at start-up and by check-config; per decision it is only a debug note.
            tracing::debug!(agreement = %found.authority.agreement_id, "relying on an agreement whose review is overdue");
            Ok(found)
        }
        None => Err(refuse(
            Reason::NoAgreement,
            format!("no agreement in force permits {kind} from {sender} to {recipient}"),
        )),
    }
}

/// Finds the token's issuer among the trusted ones, verifies the token (or finds that it was
/// verified before), and checks that the issuer may speak for this organisation to authorise
/// this sender.
fn verify_token(
    cx: &Context<'_>,
    sender: &AgencyId,
    organisation: &OrgId,
    token: Option<&str>,
) -> Result<Arc<ConsentClaims>, Failure> {
    let Some(token) = token else {
        return Err(refuse(
            Reason::ConsentMissing,
            format!(
                "information identifying organisation {organisation} needs that organisation's consent token"
            ),
        ));
    };
    let (key_id, issuer, claims) = match cx.verified.get(token) {
        // Verified before under the key of its issuer, `iss` (consent::verify checks that
        // the claim names the verifying key); the policy is fixed for the broker's lifetime,
        // but the issuer is looked up again all the same.
        Some(claims) => match cx.policy.issuers.get(claims.iss()) {
            Some(issuer) => (*claims.iss(), issuer, claims),
            None => return Err(unknown_issuer(claims.iss())),
        },
        None => {
            let key_id = consent::key_id_of(token).map_err(consent_refusal)?;
            let Some(issuer) = cx.policy.issuers.get(&key_id) else {
                return Err(unknown_issuer(&key_id));
            };
            let claims = Arc::new(consent::verify(token, &issuer.key).map_err(consent_refusal)?);
            cx.verified.remember(token, claims.clone());
            (key_id, issuer, claims)
        }
    };
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use concordat_proto::{envelope::Tlp, ids::MessageId, paserk::SecretKey};

    use super::*;
    use crate::config::Config;

    /// A ledger with nothing revoked and nothing used, or everything revoked.
    struct Ledger {
        revoked: bool,
    }

    impl ConsentLedger for Ledger {
        fn is_revoked(&self, _: &KeyId, _: &TokenId, _: OffsetDateTime) -> Result<bool, Internal> {
            Ok(self.revoked)
        }

        fn uses(&self, _: &KeyId, _: &TokenId) -> Result<u32, Internal> {
            Ok(0)
        }
    }

    /// The default federation with `desk` as the NCSC's consent desk.
    fn config(desk: &SecretKey) -> Config {
        let mut config = Config::embedded_default().unwrap();
        config.policy.issuers.clear();
        config.policy.issuers.insert(
            desk.key_id(),
            ConsentIssuer {
                key: desk.public(),
                agency: Some("ncsc".parse().unwrap()),
                organisations: Organisations::Any,
            },
        );
        config
    }

    /// A token of `desk` for acme-ltd's incident records from the NCSC to the ICO.
    fn token(desk: &SecretKey, now: OffsetDateTime) -> String {
        ConsentClaims::builder("acme-ltd", "ncsc", "a test")
            .recipient("ico")
            .kind(Kind::IncidentRecord)
            .valid_for(Duration::hours(1))
            .build(desk.key_id(), now)
            .unwrap()
            .sign(desk)
            .unwrap()
    }

    fn envelope(to: &str, token: &str) -> Envelope {
        Envelope {
            message_id: MessageId::new_random(),
            recipients: vec![to.parse().unwrap()],
            kind: Kind::IncidentRecord,
            organisation: Some("acme-ltd".parse().unwrap()),
            incident_ref: None,
            content_type: "application/json".into(),
            tlp: Tlp::Amber,
            payload: b"{}".to_vec(),
            consent_token: Some(token.into()),
        }
    }

    fn reason(result: Result<Decision, Failure>) -> Option<Reason> {
        match result {
            Err(Failure::Refused(r)) => Some(r.reason),
            Err(Failure::Internal(e)) => panic!("internal error: {e}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn a_remembered_token_still_has_every_claim_and_the_ledger_checked() {
        let desk = SecretKey::generate();
        let config = config(&desk);
        let verified = VerifiedTokens::default();
        let now = OffsetDateTime::now_utc();
        let token = token(&desk, now);
        let ncsc: AgencyId = "ncsc".parse().unwrap();
        let decide_with = |e: &Envelope, ledger: &Ledger, now: OffsetDateTime| {
            let cx = Context {
                policy: &config.policy,
                verified: &verified,
                agencies: &config.agencies,
                limits: &config.limits,
                ledger,
                now,
                payload_digest: [0; 32],
            };
            decide(&cx, &ncsc, e)
        };
        let open = Ledger { revoked: false };

        assert_eq!(
            reason(decide_with(&envelope("ico", &token), &open, now)),
            None
        );
        assert_eq!(verified.len(), 1, "the verified token is remembered");
        // Served from memory, the claims are still checked against each envelope ...
        assert_eq!(
            reason(decide_with(&envelope("nca", &token), &open, now)),
            Some(Reason::NoAgreement)
        );
        let mut other_org = envelope("ico", &token);
        other_org.organisation = Some("other-ltd".parse().unwrap());
        assert_eq!(
            reason(decide_with(&other_org, &open, now)),
            Some(Reason::ConsentWrongOrganisation)
        );
        // ... against the clock ...
        assert_eq!(
            reason(decide_with(
                &envelope("ico", &token),
                &open,
                now + Duration::hours(2)
            )),
            Some(Reason::ConsentExpired)
        );
        // ... and against the ledger.
        assert_eq!(
            reason(decide_with(
                &envelope("ico", &token),
                &Ledger { revoked: true },
                now
            )),
            Some(Reason::ConsentRevoked)
        );
        // The same token with one signature byte changed is a different token: verified, and
        // refused.
        let mut forged = token.clone().into_bytes();
        // A character inside the signature, the last part of the body.
        let at = token.rfind('.').unwrap() - 5;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(
            reason(decide_with(&envelope("ico", &forged), &open, now)),
            Some(Reason::ConsentBadSignature)
        );
        assert_eq!(verified.len(), 1, "refused tokens are not remembered");
    }

    #[test]
    fn content_rules_come_after_the_agreement_and_before_consent() {
        let desk = SecretKey::generate();
        let config = config(&desk);
        let verified = VerifiedTokens::default();
        let now = OffsetDateTime::now_utc();
        let token = token(&desk, now);
        let open = Ledger { revoked: false };
        let record = |granularity: &str, orgs: &[&str]| {
            serde_json::to_vec(&serde_json::json!({
                "incident": {
                    "reference": "INC-1",
                    "first_seen": "2026-11-30T09:15:00Z",
                    "categories": ["ransomware"],
                    "summary": "Ransomware on the file servers."
                },
                "granularity": granularity,
                "organisations": orgs,
            }))
            .unwrap()
        };
        const INCIDENT: &str = "application/vnd.concordat.incident+json; version=1";
        const STIX: &str = "application/stix+json;version=2.1";
        // (what, sender, recipient, kind, with the token, content type, payload, reason)
        type Row<'a> = (
            &'a str,
            &'a str,
            &'a str,
            Kind,
            bool,
            &'a str,
            Vec<u8>,
            Option<Reason>,
        );
        let rows: Vec<Row<'_>> = vec![
            (
                "anonymised JSON record",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                "application/json",
                b"{}".to_vec(),
                None,
            ),
            (
                "JSON that does not parse",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                "application/json",
                b"{".to_vec(),
                Some(Reason::InvalidContent),
            ),
            (
                "malformed content type",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                "application/json;",
                b"{}".to_vec(),
                None,
            ),
            (
                "unparseable content type",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                "json",
                b"{}".to_vec(),
                Some(Reason::InvalidContent),
            ),
            (
                "opaque anonymised record",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                "application/octet-stream",
                b"x".to_vec(),
                Some(Reason::UninspectableContent),
            ),
            (
                "opaque on a closed flow",
                "ico",
                "ncsc",
                Kind::ThreatAssessment,
                false,
                "application/pdf",
                b"x".to_vec(),
                Some(Reason::UninspectableContent),
            ),
            (
                "opaque on an opaque flow",
                "ico",
                "nca",
                Kind::DsarConsultation,
                false,
                "application/pdf",
                b"x".to_vec(),
                None,
            ),
            (
                "no agreement comes first",
                "ncsc",
                "nca",
                Kind::ThreatAssessment,
                false,
                "application/pdf",
                b"x".to_vec(),
                Some(Reason::NoAgreement),
            ),
            (
                "empty STIX bundle",
                "ncsc",
                "ico",
                Kind::ThreatAssessment,
                false,
                STIX,
                br#"{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e"}"#
                    .to_vec(),
                None,
            ),
            (
                "invalid STIX bundle",
                "ncsc",
                "ico",
                Kind::ThreatAssessment,
                false,
                STIX,
                br#"{"type":"bundle","id":"bundle--1"}"#.to_vec(),
                Some(Reason::InvalidContent),
            ),
            (
                "aggregate record",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                INCIDENT,
                record("aggregate", &[]),
                None,
            ),
            (
                "aggregate record with an organisation",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                true,
                INCIDENT,
                record("aggregate", &[]),
                Some(Reason::InvalidContent),
            ),
            (
                "specific record",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                true,
                INCIDENT,
                record("incident_specific", &["acme-ltd"]),
                None,
            ),
            (
                "specific record, other organisation",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                true,
                INCIDENT,
                record("incident_specific", &["beta-plc"]),
                Some(Reason::InvalidContent),
            ),
            (
                "specific record, no organisation",
                "ncsc",
                "ico",
                Kind::IncidentRecord,
                false,
                INCIDENT,
                record("incident_specific", &["acme-ltd"]),
                Some(Reason::InvalidContent),
            ),
            (
                "record as a threat assessment",
                "ico",
                "ncsc",
                Kind::ThreatAssessment,
                false,
                INCIDENT,
                record("aggregate", &[]),
                Some(Reason::InvalidContent),
            ),
        ];
        for (what, sender, to, kind, with_token, content_type, payload, want) in rows {
            let mut e = envelope(to, &token);
            e.kind = kind;
            e.content_type = content_type.into();
            e.payload = payload;
            if !with_token {
                e.organisation = None;
                e.consent_token = None;
            }
            let cx = Context {
                policy: &config.policy,
                verified: &verified,
                agencies: &config.agencies,
                limits: &config.limits,
                ledger: &open,
                now,
                payload_digest: [0; 32],
            };
            let got = reason(decide(&cx, &sender.parse().unwrap(), &e));
            assert_eq!(got, want, "{what}");
        }
    }

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
