//! The legal-bases step of the decision: whether organisation-specific or incident-specific
//! content may travel on each flow at all, and under which basis (`docs/national-significance.md`).
//!
//! Each flow lists the legal bases it accepts for such content ([`LegalBases`]; the
//! configuration's `legal_bases`, default `["consent"]`):
//!
//! - `consent`: the envelope names the organisation, whose consent token the consent step then
//!   verifies;
//! - `national_significance`: the envelope carries a designation of the incident as of national
//!   significance, signed by two different authorised officers of the sender
//!   (`concordat_proto::significance`), that opens this flow and has not expired.
//!
//! A flow with no basis carries only anonymised and aggregate content. This step never
//! replaces consent: an envelope that names an organisation still needs that organisation's
//! token in the consent step, whatever basis opened the flow. A designation attached to an
//! envelope is always verified, even where it is not needed, so that a forged or broken one is
//! refused rather than ignored.

use std::{collections::BTreeSet, fmt, str::FromStr};

use concordat_proto::{
    envelope::Envelope,
    ids::AgencyId,
    significance::{self, Designation, SignificanceError},
};

use super::{Authority, Context, refuse};
use crate::{
    content::{Content, Granularity},
    refusal::{Citation, Failure, Reason},
};

/// A legal basis on which a flow may carry organisation- or incident-specific content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LegalBasis {
    /// The organisation's consent (a consent token, checked by the consent step).
    Consent,
    /// A two-officer designation of the incident as of national significance.
    NationalSignificance,
}

impl LegalBasis {
    /// The name used in the configuration: `consent`, `national_significance`.
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::NationalSignificance => "national_significance",
        }
    }
}

impl fmt::Display for LegalBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LegalBasis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "consent" => Ok(LegalBasis::Consent),
            "national_significance" => Ok(LegalBasis::NationalSignificance),
            _ => Err(format!(
                "unknown legal basis {:?}; known: consent, national_significance",
                s.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// The legal bases a flow accepts. The default is consent alone, which is what every flow
/// accepted before legal bases were configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalBases(BTreeSet<LegalBasis>);

impl Default for LegalBases {
    fn default() -> Self {
        LegalBases::of(&[LegalBasis::Consent])
    }
}

impl LegalBases {
    /// The set of `bases` (none: the flow carries only anonymised and aggregate content).
    pub fn of(bases: &[LegalBasis]) -> Self {
        LegalBases(bases.iter().copied().collect())
    }

    /// Whether `basis` is accepted.
    pub fn accepts(&self, basis: LegalBasis) -> bool {
        self.0.contains(&basis)
    }

    /// The bases, in order.
    pub fn iter(&self) -> impl Iterator<Item = LegalBasis> + '_ {
        self.0.iter().copied()
    }
}

impl fmt::Display for LegalBases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none (anonymised and aggregate only)");
        }
        let names: Vec<&str> = self.iter().map(LegalBasis::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

/// One recipient's flow, as the legal step sees it, with the agreement that permits it (which
/// every refusal of this step cites).
pub(super) struct FlowBases<'a> {
    pub(super) recipient: &'a AgencyId,
    pub(super) bases: &'a LegalBases,
    pub(super) authority: &'a Authority,
}

/// Checks that every flow of the envelope has a legal basis for what it carries, and returns
/// the designation relied on, if a flow needed one.
///
/// Content is specific when the transfer identifies an organisation (`organisation_named`: declared, or named by the payload) or the payload is an
/// `incident_specific` incident record. For specific content, each flow needs either
/// `consent` with an organisation named (its token is checked next), or
/// `national_significance` with a valid designation covering the incident, the sender and
/// this flow at this time; otherwise `NATIONAL_SIGNIFICANCE_REQUIRED` (the flow accepts that
/// basis and none other applies) or `NO_LEGAL_BASIS`. A designation that fails verification
/// or does not cover the transfer is `DESIGNATION_INVALID`, or `DESIGNATION_EXPIRED` past its
/// expiry.
pub(super) fn check(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
    content: &Content<'_>,
    flows: &[FlowBases<'_>],
    organisation_named: bool,
) -> Result<Option<Designation>, Failure> {
    let designation = match &envelope.significance {
        None => None,
        Some(tokens) => Some(
            significance::verify(&tokens.designation, &tokens.countersignature, |kid| {
                cx.policy.significance_officers.get(kid)
            })
            .map_err(designation_refused)?,
        ),
    };
    let incident_specific = matches!(
        content,
        Content::Incident(record, _) if record.granularity == Granularity::IncidentSpecific
    );
    if !incident_specific && !organisation_named {
        return Ok(None);
    }
    // The incident the designation must name: the record's own reference, else the
    // envelope's (`Designation::check` reads both federation-unique, qualified with the
    // sender).
    let incident_ref = match content {
        Content::Incident(record, _) => Some(record.incident.reference.as_str()),
        _ => envelope.incident_ref.as_deref(),
    };
    let what = if incident_specific {
        "incident-specific information"
    } else {
        "organisation-specific information"
    };
    let mut relied_on = false;
    for flow in flows {
        if organisation_named && flow.bases.accepts(LegalBasis::Consent) {
            continue;
        }
        let cited = |reason: Reason, message: String| {
            refuse(
                reason,
                format!(
                    "{message} (agreement {}, clause: {})",
                    flow.authority.agreement_id, flow.authority.clause
                ),
            )
            .cited(|| {
                Citation::Clauses(vec![(
                    flow.authority.agreement_id.clone(),
                    flow.authority.clause.clone(),
                )])
            })
        };
        if !flow.bases.accepts(LegalBasis::NationalSignificance) {
            return Err(cited(
                Reason::NoLegalBasis,
                format!(
                    "the flow {sender} -> {} accepts no legal basis for {what} (legal bases: {}); \
                     send it anonymised or aggregate",
                    flow.recipient, flow.bases
                ),
            ));
        }
        let Some(d) = &designation else {
            return Err(cited(
                Reason::NationalSignificanceRequired,
                format!(
                    "the flow {sender} -> {} carries {what} only for an incident designated of \
                     national significance by two officers of {sender}; attach a designation \
                     (concordat significance designate / countersign)",
                    flow.recipient
                ),
            ));
        };
        let Some(incident_ref) = incident_ref else {
            return Err(cited(
                Reason::DesignationInvalid,
                "a designation covers one incident, but the envelope names no incident \
                 reference (incident_ref)"
                    .into(),
            ));
        };
        if let Err(e) = d.check(
            sender,
            flow.recipient,
            incident_ref,
            cx.now,
            cx.policy.clock_skew,
        ) {
            let (reason, message) = designation_refusal(e);
            return Err(cited(reason, message));
        }
        relied_on = true;
    }
    Ok(designation.filter(|_| relied_on))
}

/// The refusal for a designation that fails: expired ones have their own reason.
fn designation_refusal(e: SignificanceError) -> (Reason, String) {
    let reason = match e {
        SignificanceError::Expired { .. } => Reason::DesignationExpired,
        _ => Reason::DesignationInvalid,
    };
    (reason, format!("national-significance designation: {e}"))
}

fn designation_refused(e: SignificanceError) -> Failure {
    let (reason, message) = designation_refusal(e);
    refuse(reason, message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use concordat_proto::{
        envelope::{Kind, SignificanceTokens, Tlp},
        ids::MessageId,
        paserk::{KeyId, SecretKey},
        significance::{DesignationClaims, FlowRef, Officer, countersign},
    };
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::{
        content::ContentKind,
        policy::{Policy, VerifiedTokens},
        refusal::Internal,
    };

    struct NoProvenance;
    impl crate::policy::Provenance for NoProvenance {
        fn received(
            &self,
            _: &AgencyId,
            _: &str,
        ) -> Result<Option<crate::policy::tlp::Received>, Internal> {
            Ok(None)
        }
    }

    struct NoLedger;
    impl crate::policy::ConsentLedger for NoLedger {
        fn is_revoked(
            &self,
            _: &KeyId,
            _: &concordat_proto::consent::TokenId,
            _: OffsetDateTime,
        ) -> Result<bool, Internal> {
            Ok(false)
        }
        fn uses(&self, _: &KeyId, _: &concordat_proto::consent::TokenId) -> Result<u32, Internal> {
            Ok(0)
        }
    }

    fn id(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    fn record(granularity: &str, orgs: &[&str]) -> Content<'static> {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "incident": {
                "reference": "ICO-2026-0042",
                "first_seen": "2026-11-30T09:15:00Z",
                "categories": ["ransomware"],
                "summary": "Ransomware on the file servers."
            },
            "granularity": granularity,
            "organisations": orgs,
        }))
        .unwrap();
        let kind = ContentKind::of("application/vnd.concordat.incident+json;version=1").unwrap();
        // Content borrows its payload; a test's few records may live as long as the test.
        Content::read(kind, Vec::leak(bytes)).unwrap()
    }

    #[test]
    fn each_flow_needs_a_basis_for_specific_content() {
        let a = SecretKey::generate();
        let a2 = SecretKey::generate();
        let b = SecretKey::generate();
        let c = SecretKey::generate();
        let mut officers = HashMap::new();
        for (name, agency, key) in [
            ("ico-a", "ico", &a),
            ("ico-a", "ico", &a2),
            ("ico-b", "ico", &b),
            ("ncsc-c", "ncsc", &c),
        ] {
            officers.insert(
                key.key_id(),
                Officer {
                    id: name.into(),
                    agency: id(agency),
                    key: key.public(),
                },
            );
        }
        let policy = Policy {
            significance_officers: officers,
            clock_skew: Duration::seconds(60),
            ..Policy::default()
        };
        let now = OffsetDateTime::now_utc();
        let designate = |incident: &str,
                         to: &str,
                         first: &SecretKey,
                         second: &SecretKey,
                         exp: OffsetDateTime| {
            let d = DesignationClaims::new(
                first.key_id(),
                id("ico"),
                incident,
                vec![FlowRef {
                    from: id("ico"),
                    to: id(to),
                }],
                "National significance: test",
                now - Duration::minutes(5),
                exp,
            )
            .unwrap()
            .sign(first)
            .unwrap();
            let (cs, _) = countersign(&d, second, now).unwrap();
            Some(SignificanceTokens {
                designation: d,
                countersignature: cs,
            })
        };
        let soon = now + Duration::days(1);
        let valid = designate("ICO-2026-0042", "ncsc", &a, &b, soon);
        let ns = LegalBases::of(&[LegalBasis::NationalSignificance]);
        let consent = LegalBases::default();
        let both = LegalBases::of(&[LegalBasis::Consent, LegalBasis::NationalSignificance]);
        let none = LegalBases::of(&[]);

        // (what, bases, organisation named, content, designation, expected)
        type Row<'a> = (
            &'a str,
            &'a LegalBases,
            bool,
            Content<'static>,
            Option<SignificanceTokens>,
            Result<bool, Reason>,
        );
        let rows: Vec<Row<'_>> = vec![
            (
                "aggregate, no basis needed",
                &none,
                false,
                record("aggregate", &[]),
                None,
                Ok(false),
            ),
            (
                "anonymised on a significance flow",
                &ns,
                false,
                record("anonymised", &[]),
                None,
                Ok(false),
            ),
            (
                "specific with consent",
                &consent,
                true,
                record("incident_specific", &["acme-ltd"]),
                None,
                Ok(false),
            ),
            (
                "specific, consent flow, designation unused",
                &consent,
                true,
                record("incident_specific", &["acme-ltd"]),
                valid.clone(),
                Ok(false),
            ),
            (
                "specific, significance flow, none",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                None,
                Err(Reason::NationalSignificanceRequired),
            ),
            (
                "specific, significance flow, valid",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                valid.clone(),
                Ok(true),
            ),
            (
                "specific, either basis, consent suffices",
                &both,
                true,
                record("incident_specific", &["acme-ltd"]),
                None,
                Ok(false),
            ),
            (
                "specific, no basis at all",
                &none,
                true,
                record("incident_specific", &["acme-ltd"]),
                None,
                Err(Reason::NoLegalBasis),
            ),
            (
                "organisation-specific JSON, significance flow",
                &ns,
                true,
                Content::read(ContentKind::Json, b"{}").unwrap(),
                None,
                Err(Reason::NationalSignificanceRequired),
            ),
            (
                "same officer twice (two keys)",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0042", "ncsc", &a, &a2, soon),
                Err(Reason::DesignationInvalid),
            ),
            (
                "countersigned by another agency's officer",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0042", "ncsc", &a, &c, soon),
                Err(Reason::DesignationInvalid),
            ),
            (
                "expired",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0042", "ncsc", &a, &b, now - Duration::minutes(2)),
                Err(Reason::DesignationExpired),
            ),
            (
                "wrong incident",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0099", "ncsc", &a, &b, soon),
                Err(Reason::DesignationInvalid),
            ),
            (
                "wrong flow",
                &ns,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0042", "nca", &a, &b, soon),
                Err(Reason::DesignationInvalid),
            ),
            (
                "broken designation on a consent flow",
                &consent,
                true,
                record("incident_specific", &["acme-ltd"]),
                designate("ICO-2026-0042", "ncsc", &a, &c, soon),
                Err(Reason::DesignationInvalid),
            ),
        ];
        let verified = VerifiedTokens::default();
        let ledger = NoLedger;
        let matcher = crate::registry::Matcher::new(&crate::registry::Registry::default()).unwrap();
        let cx = Context {
            policy: &policy,
            organisations: &matcher,
            verified: &verified,
            max_payload_bytes: 1 << 20,
            ledger: &ledger,
            provenance: &NoProvenance,
            now,
            payload_digest: [0; 32],
        };
        let ncsc = id("ncsc");
        let authority = Authority {
            recipient: ncsc.clone(),
            agreement_id: "ico-ncsc-test".into(),
            clause: "national significance".into(),
            review: crate::policy::ReviewStage::Current,
        };
        for (what, bases, organisation_named, content, significance, want) in rows {
            let envelope = Envelope {
                message_id: MessageId::new_random(),
                recipients: vec![ncsc.clone()],
                kind: Kind::IncidentRecord,
                organisation: organisation_named.then(|| "acme-ltd".parse().unwrap()),
                incident_ref: Some("ICO-2026-0042".into()),
                content_type: "application/json".into(),
                tlp: Tlp::Amber,
                payload: Vec::new(),
                consent_token: None,
                significance,
                organisations: Vec::new(),
                consent_tokens: Vec::new(),
                workflow: None,
            };
            let flows = [FlowBases {
                recipient: &ncsc,
                bases,
                authority: &authority,
            }];
            let got = match check(
                &cx,
                &id("ico"),
                &envelope,
                &content,
                &flows,
                organisation_named,
            ) {
                Ok(d) => Ok(d.is_some()),
                Err(Failure::Refused(r)) => {
                    // A refusal about the flow cites its agreement and clause.
                    if r.reason != Reason::DesignationInvalid || what.contains("wrong") {
                        assert!(
                            r.message
                                .contains("agreement ico-ncsc-test, clause: national significance"),
                            "{what}: {}",
                            r.message
                        );
                    }
                    Err(r.reason)
                }
                Err(Failure::Internal(e)) => panic!("{what}: internal {e}"),
            };
            assert_eq!(got, want, "{what}");
        }
    }
}
