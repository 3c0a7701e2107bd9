//! The rules the broker enforces, and [`decide`], the one function that says whether an
//! envelope may be relayed. It reads as the whole rule, in order; each step lives in a room of
//! its own:
//!
//! 1. the payload is no larger than the broker accepts (`PAYLOAD_TOO_LARGE`);
//! 2. [`agreements`]: every recipient is an agency of the federation and an agreement in force
//!    permits the flow for this kind of message;
//! 3. [`payload`]: the payload is what its content type says ([`crate::content`]); an opaque
//!    one travels only on flows that allow it, never as an anonymised or aggregate incident
//!    record;
//! 4. [`tlp`]: TLP 2.0, enforced: a STIX bundle's markings agree with its envelope, no flow
//!    carries more than its `max_tlp`, TLP:RED goes to one recipient, and nothing the sender
//!    received under TLP:AMBER+STRICT or TLP:RED goes on to a third agency;
//! 5. [`organisations`]: the organisations the transfer identifies, those its envelope
//!    declares and those its payload names (the leak check against the registry);
//! 6. [`legal`]: organisation- or incident-specific content travels only on flows whose legal
//!    bases cover it: consent (the organisations' tokens, checked next), or national
//!    significance (a valid two-officer designation of the incident for this flow);
//! 7. [`consent`]: each organisation identified consented, by a token that verifies, whose
//!    issuer is trusted for this sender and organisation, whose claims cover this exact
//!    transfer (organisation, sender, recipients, kind, incident, payload, time window), and
//!    which is neither revoked nor used up; a named organisation without a token is
//!    `ORGANISATION_IDENTIFIED`. Information that identifies nobody needs no token.
//!
//! Every refusal cites the agreements and clauses of the flows found
//! ([`crate::refusal::Citation`]), or says that no agreement covers the flow.
//!
//! Each failure is a [`Refusal`] with a stable reason. The configuration builds these types
//! (`crate::config`); nothing here reads the configuration.
//!
//! [`VerifiedTokens`] remembers which tokens' signatures have been verified, so that a token
//! used for many transfers (the records of one incident, say) costs one Ed25519 verification
//! rather than one per transfer; everything else is checked on every envelope.

pub mod agreements;
pub mod consent;
pub mod legal;
pub mod organisations;
pub mod payload;
pub mod tlp;

use std::collections::{BTreeSet, HashMap};

use concordat_proto::{
    envelope::Envelope,
    ids::{AgencyId, OrgId},
    paserk::KeyId,
    significance::Officer,
};
use time::{Date, Duration, OffsetDateTime};

pub use self::{
    agreements::{Agreement, Flow, ReviewBasis, ReviewStage, ReviewTerms},
    consent::{ConsentIssuer, ConsentLedger, ConsentUse, Organisations, VerifiedTokens},
    legal::{LegalBases, LegalBasis},
    tlp::{Carried, Provenance},
};
use crate::{
    refusal::{Citation, Failure, Reason, Refusal},
    registry::Matcher,
};

/// The rules the broker enforces.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The agreements, in configuration order.
    pub agreements: Vec<Agreement>,
    /// Trusted consent issuers by key id.
    pub issuers: HashMap<KeyId, ConsentIssuer>,
    /// How far a token's time window is stretched for clock differences.
    pub clock_skew: Duration,
    /// Refuse flows whose only agreements are past their review date and grace period
    /// (`enforce_review`; lapsed, [`ReviewStage::Lapsed`]).
    pub enforce_review: bool,
    /// The agencies of the federation.
    pub agencies: BTreeSet<AgencyId>,
    /// The officers authorised to designate incidents of national significance, by key id.
    pub significance_officers: HashMap<KeyId, Officer>,
    /// The workflows' settings: deadlines and reminders (docs/workflows.md).
    pub workflows: crate::workflow::WorkflowRules,
}

impl Policy {
    /// The agreements whose review is overdue on `today`.
    pub fn overdue(&self, today: Date) -> Vec<&Agreement> {
        self.agreements
            .iter()
            .filter(|a| a.review_overdue(today))
            .collect()
    }

    /// The agreement with this id.
    pub fn agreement(&self, id: &str) -> Option<&Agreement> {
        self.agreements.iter().find(|a| a.id == id)
    }

    /// The review warnings of a decision that relied on (or cited) `agreement_ids` on
    /// `today`: one per agreement not current, each agreement once, in order.
    pub fn review_warnings<'a>(
        &self,
        agreement_ids: impl IntoIterator<Item = &'a str>,
        today: Date,
    ) -> Vec<ReviewWarning> {
        let mut out: Vec<ReviewWarning> = Vec::new();
        for id in agreement_ids {
            if out.iter().any(|w| w.agreement == id) {
                continue;
            }
            let Some(a) = self.agreement(id) else {
                continue;
            };
            if let Some(sentence) = a.review_warning(today, self.enforce_review) {
                out.push(ReviewWarning {
                    agreement: a.id.clone(),
                    stage: a.review_stage(today),
                    sentence,
                });
            }
        }
        out
    }
}

/// A decision's warning about the review of an agreement it relied on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewWarning {
    /// The agreement.
    pub agreement: String,
    /// Its stage (never current).
    pub stage: ReviewStage,
    /// The sentence a receipt or refusal carries.
    pub sentence: String,
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
    /// Where that agreement stood against its review date when the decision was made.
    pub review: ReviewStage,
}

/// A decision to relay an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// For each recipient, in the envelope's order, the agreement relied on.
    pub authorities: Vec<Authority>,
    /// Every organisation the transfer identifies: those the envelope declares, in its order,
    /// then those only its payload names.
    pub organisations: Vec<OrgId>,
    /// The consent relied on for each of them, in the same order.
    pub consents: Vec<ConsentUse>,
    /// The national-significance designation relied on, if a flow needed one.
    pub designation: Option<concordat_proto::significance::Designation>,
    /// SHA-256 of the payload.
    pub payload_digest: [u8; 32],
    /// The STIX objects it carries: every id for the audit entry, and those each recipient
    /// may not pass on (TLP:AMBER+STRICT and TLP:RED).
    pub carried: Carried,
}

impl Decision {
    /// The agreements and clauses relied on, for a refusal made after the decision (a token
    /// revoked meanwhile, a full queue).
    pub fn citation(&self) -> Citation {
        citation(&self.authorities)
    }
}

/// The agreements and clauses of `authorities`.
fn citation(authorities: &[Authority]) -> Citation {
    if authorities.is_empty() {
        return Citation::NoAgreement;
    }
    Citation::Clauses(
        authorities
            .iter()
            .map(|a| (a.agreement_id.clone(), a.clause.clone()))
            .collect(),
    )
}

/// Everything [`decide`] looks at besides the envelope.
pub struct Context<'a> {
    /// The rules.
    pub policy: &'a Policy,
    /// The registered organisations, compiled for the leak check.
    pub organisations: &'a Matcher,
    /// Tokens verified before.
    pub verified: &'a VerifiedTokens,
    /// The largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Revocations and use counts.
    pub ledger: &'a dyn ConsentLedger,
    /// What was delivered to each agency under TLP:AMBER+STRICT or TLP:RED.
    pub provenance: &'a dyn Provenance,
    /// The time of the decision.
    pub now: OffsetDateTime,
    /// SHA-256 of the envelope's payload, computed once by the caller.
    pub payload_digest: [u8; 32],
}

/// Decides whether `sender` may send `envelope`. The sender is the authenticated caller.
///
/// Every refusal cites the agreements and clauses of the flows found, or says that no
/// agreement covers the flow.
pub fn decide(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
) -> Result<Decision, Failure> {
    // 1. The payload fits (checked first: nothing more is read of an oversized envelope).
    if envelope.payload.len() > cx.max_payload_bytes {
        let refusal = refuse(
            Reason::PayloadTooLarge,
            format!(
                "the payload is {} bytes; this broker accepts at most {}",
                envelope.payload.len(),
                cx.max_payload_bytes
            ),
        );
        return Err(
            refusal.cited(|| match agreements::find(cx, sender, envelope) {
                Ok(flows) => citation(&flows.authorities),
                Err(_) => Citation::NoAgreement,
            }),
        );
    }

    // 2. Every recipient is an agency, and an agreement in force permits the flow.
    let flows =
        agreements::find(cx, sender, envelope).map_err(|f| f.cited(|| Citation::NoAgreement))?;
    let cited = |f: Failure| f.cited(|| citation(&flows.authorities));

    // 3. The payload is what its content type says, and the broker can read it, or every flow
    // allows it not to.
    let content = payload::check_content(envelope, flows.every_flow_opaque).map_err(cited)?;

    // 4. The TLP marking agrees with the bundle, the flows permit it, and nothing received
    // under AMBER+STRICT or RED goes on to a third agency.
    let carried = tlp::check(cx, sender, envelope, &content, &flows.tlp_limits).map_err(cited)?;

    // 5. The organisations the transfer identifies: those the envelope declares and those
    // its payload names.
    let identified = organisations::identified(cx.organisations, envelope, &content);

    // 6. Organisation- or incident-specific content needs a legal basis on every flow:
    // consent, or a designation of national significance.
    let bases: Vec<legal::FlowBases<'_>> = envelope
        .recipients
        .iter()
        .zip(&flows.legal_bases)
        .zip(&flows.authorities)
        .map(|((recipient, bases), authority)| legal::FlowBases {
            recipient,
            bases,
            authority,
        })
        .collect();
    let designation = legal::check(
        cx,
        sender,
        envelope,
        &content,
        &bases,
        !identified.is_empty(),
    )
    .map_err(cited)?;

    // 7. Each organisation identified consented, by a valid token that covers this exact
    // transfer; a named organisation without a token is ORGANISATION_IDENTIFIED. Anonymised
    // or aggregate information identifies nobody and needs no consent.
    // A flow may add a note to every consent refusal (`consent_refusal_note`): the NCA, for
    // one, tells the sender that the organisation must report to the ICO itself.
    let consents = consent::check_all(cx, sender, envelope, &identified)
        .map_err(|f| with_consent_notes(f, &flows.consent_notes))
        .map_err(cited)?;

    Ok(Decision {
        authorities: flows.authorities,
        organisations: identified.into_iter().map(|i| i.org).collect(),
        consents,
        payload_digest: cx.payload_digest,
        carried,
        designation,
    })
}

/// Whether `reason` refuses a transfer for its consent: a missing token for an organisation
/// identified, or one that does not cover the transfer.
pub fn is_consent_refusal(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::OrganisationIdentified
            | Reason::ConsentMissing
            | Reason::ConsentTooLong
            | Reason::ConsentUnsupportedVersion
            | Reason::ConsentMalformed
            | Reason::ConsentBadSignature
            | Reason::ConsentUnknownIssuer
            | Reason::ConsentIssuerNotAllowed
            | Reason::ConsentExpired
            | Reason::ConsentNotYetValid
            | Reason::ConsentInvalidClaims
            | Reason::ConsentWrongOrganisation
            | Reason::ConsentWrongSender
            | Reason::ConsentWrongRecipient
            | Reason::ConsentWrongKind
            | Reason::ConsentWrongIncident
            | Reason::ConsentPayloadMismatch
            | Reason::ConsentRevoked
            | Reason::ConsentUsedUp
    )
}

/// `failure` with the flows' consent-refusal notes appended, if it is a consent refusal.
fn with_consent_notes(failure: Failure, notes: &[String]) -> Failure {
    match failure {
        Failure::Refused(mut r) if is_consent_refusal(r.reason) && !notes.is_empty() => {
            for note in notes {
                let base = r.message.trim_end().trim_end_matches('.').to_owned();
                r.message = format!("{base}. {}", note.trim());
            }
            Failure::Refused(r)
        }
        other => other,
    }
}

pub(crate) fn refuse(reason: Reason, message: impl Into<String>) -> Failure {
    Failure::Refused(Refusal::new(reason, message))
}

/// An RFC 3339 rendering for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use concordat_proto::{
        consent::{ConsentClaims, TokenId},
        envelope::{Kind, Tlp},
        ids::MessageId,
        paserk::SecretKey,
    };

    use super::*;
    use crate::{config::Config, refusal::Internal};

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

    /// Nothing was ever delivered under TLP:AMBER+STRICT or TLP:RED.
    struct Nothing;

    impl Provenance for Nothing {
        fn received(&self, _: &AgencyId, _: &str) -> Result<Option<tlp::Received>, Internal> {
            Ok(None)
        }
    }

    /// The context of a decision by `policy` at `now`: payloads up to 1 MiB, `ledger`, nothing
    /// delivered under restrictive TLP, a zero payload digest.
    fn context<'a>(
        policy: &'a Policy,
        organisations: &'a Matcher,
        verified: &'a VerifiedTokens,
        ledger: &'a Ledger,
        now: OffsetDateTime,
    ) -> Context<'a> {
        Context {
            policy,
            organisations,
            verified,
            max_payload_bytes: 1 << 20,
            ledger,
            provenance: &Nothing,
            now,
            payload_digest: [0; 32],
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
            organisations: Vec::new(),
            consent_tokens: Vec::new(),
            significance: None,
            workflow: None,
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
        let matcher = Matcher::new(&config.registry).unwrap();
        let verified = VerifiedTokens::default();
        let now = OffsetDateTime::now_utc();
        let token = token(&desk, now);
        let ncsc: AgencyId = "ncsc".parse().unwrap();
        let decide_with = |e: &Envelope, ledger: &Ledger, now: OffsetDateTime| {
            let cx = Context {
                policy: &config.policy,
                organisations: &matcher,
                verified: &verified,
                max_payload_bytes: config.limits.max_message_bytes,
                ledger,
                provenance: &Nothing,
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

    /// The default configuration models the MoUs: an incident-specific record with the
    /// organisation's consent goes NCSC → ICO and ICO → NCA, but ICO → NCSC only with a
    /// designation of national significance. (Before legal bases, the ICO → NCSC one was
    /// accepted on consent alone.)
    #[test]
    fn the_default_flows_apply_the_mous_legal_bases() {
        let now = OffsetDateTime::now_utc();
        let mut config = Config::embedded_default().unwrap();
        let desks: Vec<(&str, SecretKey)> = ["ico", "ncsc"]
            .into_iter()
            .map(|a| (a, SecretKey::generate()))
            .collect();
        for (agency, desk) in &desks {
            config.policy.issuers.insert(
                desk.key_id(),
                ConsentIssuer {
                    key: desk.public(),
                    agency: Some(agency.parse().unwrap()),
                    organisations: Organisations::Any,
                },
            );
        }
        let payload = serde_json::to_vec(&serde_json::json!({
            "incident": {
                "reference": "ICO-1",
                "first_seen": "2026-11-30T09:15:00Z",
                "categories": ["ransomware"],
                "summary": "Ransomware."
            },
            "granularity": "incident_specific",
            "organisations": ["acme-ltd"],
        }))
        .unwrap();
        let verified = VerifiedTokens::default();
        let open = Ledger { revoked: false };
        let matcher = Matcher::new(&config.registry).unwrap();
        let cx = context(&config.policy, &matcher, &verified, &open, now);
        for (from, to, want) in [
            ("ico", "ncsc", Some(Reason::NationalSignificanceRequired)),
            ("ncsc", "ico", None),
            ("ico", "nca", None),
        ] {
            let desk = &desks.iter().find(|(a, _)| *a == from).unwrap().1;
            let token = ConsentClaims::builder("acme-ltd", from, "a test")
                .recipient(to)
                .kind(Kind::IncidentRecord)
                .valid_for(Duration::hours(1))
                .build(desk.key_id(), now)
                .unwrap()
                .sign(desk)
                .unwrap();
            let mut e = envelope(to, &token);
            e.content_type = "application/vnd.concordat.incident+json;version=1".into();
            e.payload = payload.clone();
            let got = reason(decide(&cx, &from.parse().unwrap(), &e));
            assert_eq!(got, want, "{from} -> {to}");
        }
    }

    /// Reviews in the decision, on the default federation's NCA -> ICO threat assessments
    /// (agreement ico-nca-2024, review by 2026-09-10, grace until 2026-12-09). Each row: the
    /// day, whether reviews are enforced, whether a second agreement (current) also permits
    /// the flow, and the outcome: the agreement relied on, or the refusal.
    #[test]
    fn a_lapsed_agreement_is_refused_only_when_enforced_and_never_preferred() {
        use time::macros::datetime;
        let mut config = Config::embedded_default().unwrap();
        let matcher = Matcher::new(&config.registry).unwrap();
        let verified = VerifiedTokens::default();
        let open = Ledger { revoked: false };
        let nca: AgencyId = "nca".parse().unwrap();
        let mut e = envelope("ico", "");
        e.kind = Kind::ThreatAssessment;
        e.organisation = None;
        e.consent_token = None;
        let mut current = config.policy.agreements[1].clone();
        current.id = "ico-nca-2026".into();
        current.signed = time::macros::date!(2026 - 01 - 01);
        current.review_by = time::macros::date!(2028 - 01 - 01);
        let rows = [
            (
                datetime!(2026-12-09 12:00 UTC),
                true,
                false,
                Ok("ico-nca-2024"),
            ),
            (
                datetime!(2026-12-10 12:00 UTC),
                false,
                false,
                Ok("ico-nca-2024"),
            ),
            (
                datetime!(2026-12-10 12:00 UTC),
                true,
                false,
                Err(Reason::AgreementReviewOverdue),
            ),
            (
                datetime!(2026-12-10 12:00 UTC),
                true,
                true,
                Ok("ico-nca-2026"),
            ),
            (
                datetime!(2026-12-10 12:00 UTC),
                false,
                true,
                Ok("ico-nca-2026"),
            ),
        ];
        for (now, enforced, second, want) in rows {
            config.policy.enforce_review = enforced;
            config.policy.agreements.truncate(2);
            if second {
                config.policy.agreements.push(current.clone());
            }
            let cx = context(&config.policy, &matcher, &verified, &open, now);
            let got = match decide(&cx, &nca, &e) {
                Ok(d) => Ok(d.authorities[0].agreement_id.clone()),
                Err(Failure::Refused(r)) => {
                    assert!(
                        r.message.contains("due by 2026-09-10")
                            && r.message.contains("grace period ended 2026-12-09"),
                        "{}",
                        r.message
                    );
                    Err(r.reason)
                }
                Err(other) => panic!("{other:?}"),
            };
            assert_eq!(
                got,
                want.map(str::to_owned),
                "{now} enforced {enforced} second {second}"
            );
        }
    }

    /// The NCA rule: a consent refusal on the default NCA -> ICO incident flow says that the
    /// organisation must report to the ICO itself; other refusals, and other flows', do not.
    #[test]
    fn consent_refusals_on_the_nca_ico_incident_flow_carry_its_note() {
        let config = Config::embedded_default().unwrap();
        let matcher = Matcher::new(&config.registry).unwrap();
        let verified = VerifiedTokens::default();
        let open = Ledger { revoked: false };
        let cx = context(
            &config.policy,
            &matcher,
            &verified,
            &open,
            OffsetDateTime::now_utc(),
        );
        const NOTE: &str = "the organisation must report the incident to the ICO itself";
        let named = br#"{"summary": "Ransomware at ACME Limited."}"#.to_vec();
        /// (what, sender, declared organisation, payload, reason, note expected)
        type Row<'a> = (&'a str, &'a str, bool, Vec<u8>, Reason, bool);
        let rows: [Row<'_>; 4] = [
            (
                "declared, no token",
                "nca",
                true,
                b"{}".to_vec(),
                Reason::ConsentMissing,
                true,
            ),
            (
                "named in the payload",
                "nca",
                false,
                named.clone(),
                Reason::OrganisationIdentified,
                true,
            ),
            (
                "not JSON",
                "nca",
                false,
                b"{".to_vec(),
                Reason::InvalidContent,
                false,
            ),
            (
                "the NCSC's flow to the ICO",
                "ncsc",
                false,
                named,
                Reason::OrganisationIdentified,
                false,
            ),
        ];
        for (what, from, declared, payload, reason, noted) in rows {
            let mut e = envelope("ico", "");
            e.consent_token = None;
            if !declared {
                e.organisation = None;
            }
            e.payload = payload;
            match decide(&cx, &from.parse().unwrap(), &e) {
                Err(Failure::Refused(r)) => {
                    assert_eq!(r.reason, reason, "{what}: {}", r.message);
                    assert_eq!(r.message.contains(NOTE), noted, "{what}: {}", r.message);
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    /// The default federation lets the ICO and the NCSC propose Markdown or text drafts of
    /// public statements to each other (`concordat comms propose --file statement.md`), and
    /// the broker reads them for the organisations they name. (At first it could not read
    /// text: every draft was refused UNINSPECTABLE_CONTENT.)
    #[test]
    fn the_default_flows_carry_markdown_drafts_of_public_statements() {
        let desk = SecretKey::generate();
        let config = config(&desk);
        let matcher = Matcher::new(&config.registry).unwrap();
        let verified = VerifiedTokens::default();
        let open = Ledger { revoked: false };
        let cx = context(
            &config.policy,
            &matcher,
            &verified,
            &open,
            OffsetDateTime::now_utc(),
        );
        for (from, to) in [("ico", "ncsc"), ("ncsc", "ico")] {
            for content_type in ["text/markdown", "text/plain"] {
                let mut e = envelope(to, "");
                e.kind = Kind::PublicCommunication;
                e.organisation = None;
                e.consent_token = None;
                e.content_type = content_type.into();
                e.payload = b"# Joint statement\n\nWe are investigating.\n".to_vec();
                let got = reason(decide(&cx, &from.parse().unwrap(), &e));
                assert_eq!(got, None, "{from} -> {to} ({content_type})");
                // A draft naming an organisation needs its consent, like any payload.
                e.payload = b"Acme Ltd reported the incident to us.\n".to_vec();
                let got = reason(decide(&cx, &from.parse().unwrap(), &e));
                assert_eq!(
                    got,
                    Some(Reason::OrganisationIdentified),
                    "{from} -> {to} ({content_type})"
                );
                e.payload = b"caf\xe9".to_vec();
                let got = reason(decide(&cx, &from.parse().unwrap(), &e));
                assert_eq!(got, Some(Reason::InvalidContent), "{content_type}");
            }
        }
    }

    #[test]
    fn content_rules_come_after_the_agreement_and_before_consent() {
        let desk = SecretKey::generate();
        let config = config(&desk);
        let matcher = Matcher::new(&config.registry).unwrap();
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
                organisations: &matcher,
                verified: &verified,
                max_payload_bytes: config.limits.max_message_bytes,
                ledger: &open,
                provenance: &Nothing,
                now,
                payload_digest: [0; 32],
            };
            let got = reason(decide(&cx, &sender.parse().unwrap(), &e));
            assert_eq!(got, want, "{what}");
        }
    }
}
