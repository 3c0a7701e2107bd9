//! Message kinds, TLP markings and the validated envelope a sender submits.
//!
//! [`Envelope`] is built from the wire type [`crate::pb::Envelope`] with `TryFrom`, which checks
//! every field's shape. What the broker's policy then decides (agreements, consent) is not here.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    ids::{AgencyId, IdError, MessageId, OrgId},
    pb,
    workflow::{Reference, Step, WorkflowId, qualify_incident},
};

/// The most recipients one envelope may name.
pub const MAX_RECIPIENTS: usize = 32;
/// The longest incident reference or content type accepted.
pub const MAX_LABEL_LEN: usize = 128;
/// The most organisations one envelope may declare (`organisation` and `organisations`
/// together), and so the most consent tokens it may carry.
pub const MAX_ORGANISATIONS: usize = 32;

/// What kind of information an envelope carries.
///
/// Written `threat_assessment`, `incident_record`, `dsar_consultation` and
/// `public_communication` in files, on the command
/// line and in consent tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A cyber threat assessment.
    ThreatAssessment,
    /// Information about a cyber incident.
    IncidentRecord,
    /// A consultation before answering a subject-access request about shared information.
    DsarConsultation,
    /// A public communication proposed before publication, and the answers to it.
    PublicCommunication,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 4] = [
        Kind::ThreatAssessment,
        Kind::IncidentRecord,
        Kind::DsarConsultation,
        Kind::PublicCommunication,
    ];

    /// The name used in files, on the command line and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ThreatAssessment => "threat_assessment",
            Kind::IncidentRecord => "incident_record",
            Kind::DsarConsultation => "dsar_consultation",
            Kind::PublicCommunication => "public_communication",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = EnvelopeError;
    fn from_str(s: &str) -> Result<Self, EnvelopeError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| EnvelopeError::UnknownName {
                what: "kind",
                value: s.chars().take(40).collect(),
            })
    }
}

impl From<Kind> for pb::MessageKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::ThreatAssessment => pb::MessageKind::ThreatAssessment,
            Kind::IncidentRecord => pb::MessageKind::IncidentRecord,
            Kind::DsarConsultation => pb::MessageKind::DsarConsultation,
            Kind::PublicCommunication => pb::MessageKind::PublicCommunication,
        }
    }
}

impl TryFrom<i32> for Kind {
    type Error = EnvelopeError;
    fn try_from(value: i32) -> Result<Self, EnvelopeError> {
        match pb::MessageKind::try_from(value) {
            Ok(pb::MessageKind::ThreatAssessment) => Ok(Kind::ThreatAssessment),
            Ok(pb::MessageKind::IncidentRecord) => Ok(Kind::IncidentRecord),
            Ok(pb::MessageKind::DsarConsultation) => Ok(Kind::DsarConsultation),
            Ok(pb::MessageKind::PublicCommunication) => Ok(Kind::PublicCommunication),
            Ok(pb::MessageKind::Unspecified) | Err(_) => Err(EnvelopeError::Invalid {
                field: "kind",
                problem: "must be THREAT_ASSESSMENT, INCIDENT_RECORD, DSAR_CONSULTATION or \
                          PUBLIC_COMMUNICATION"
                    .into(),
            }),
        }
    }
}

/// A Traffic Light Protocol 2.0 marking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tlp {
    /// TLP:CLEAR — no limit on disclosure.
    #[serde(rename = "clear")]
    Clear,
    /// TLP:GREEN — the community.
    #[serde(rename = "green")]
    Green,
    /// TLP:AMBER — the recipient's organisation and its clients.
    #[serde(rename = "amber")]
    Amber,
    /// TLP:AMBER+STRICT — the recipient's organisation only.
    #[serde(rename = "amber+strict")]
    AmberStrict,
    /// TLP:RED — named recipients only.
    #[serde(rename = "red")]
    Red,
}

impl Tlp {
    /// Every marking, from least to most restrictive.
    pub const ALL: [Tlp; 5] = [
        Tlp::Clear,
        Tlp::Green,
        Tlp::Amber,
        Tlp::AmberStrict,
        Tlp::Red,
    ];

    /// The lowercase name used in files and on the command line (`amber+strict`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tlp::Clear => "clear",
            Tlp::Green => "green",
            Tlp::Amber => "amber",
            Tlp::AmberStrict => "amber+strict",
            Tlp::Red => "red",
        }
    }
}

impl fmt::Display for Tlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tlp {
    type Err = EnvelopeError;
    fn from_str(s: &str) -> Result<Self, EnvelopeError> {
        let lower = s.to_ascii_lowercase();
        let lower = lower.strip_prefix("tlp:").unwrap_or(&lower);
        Tlp::ALL
            .into_iter()
            .find(|t| t.as_str() == lower || (lower == "amber_strict" && *t == Tlp::AmberStrict))
            .ok_or_else(|| EnvelopeError::UnknownName {
                what: "TLP level",
                value: s.chars().take(40).collect(),
            })
    }
}

impl From<Tlp> for pb::Tlp {
    fn from(tlp: Tlp) -> Self {
        match tlp {
            Tlp::Clear => pb::Tlp::Clear,
            Tlp::Green => pb::Tlp::Green,
            Tlp::Amber => pb::Tlp::Amber,
            Tlp::AmberStrict => pb::Tlp::AmberStrict,
            Tlp::Red => pb::Tlp::Red,
        }
    }
}

impl TryFrom<i32> for Tlp {
    type Error = EnvelopeError;
    fn try_from(value: i32) -> Result<Self, EnvelopeError> {
        match pb::Tlp::try_from(value) {
            Ok(pb::Tlp::Clear) => Ok(Tlp::Clear),
            Ok(pb::Tlp::Green) => Ok(Tlp::Green),
            Ok(pb::Tlp::Amber) => Ok(Tlp::Amber),
            Ok(pb::Tlp::AmberStrict) => Ok(Tlp::AmberStrict),
            Ok(pb::Tlp::Red) => Ok(Tlp::Red),
            Ok(pb::Tlp::Unspecified) | Err(_) => Err(EnvelopeError::Invalid {
                field: "tlp",
                problem: "must be set: CLEAR, GREEN, AMBER, AMBER_STRICT or RED".into(),
            }),
        }
    }
}

/// Why an envelope (or a name in one) was refused. Every variant maps to the reason `MALFORMED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A field has the wrong shape.
    #[error("{field} {problem}")]
    Invalid {
        /// The field's name on the wire.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A kind or TLP name is not one of the known ones.
    #[error("unknown {what} {value:?}")]
    UnknownName {
        /// What was being named.
        what: &'static str,
        /// The name given (truncated).
        value: String,
    },
}

impl EnvelopeError {
    fn id(field: &'static str, e: IdError) -> Self {
        EnvelopeError::Invalid {
            field,
            problem: e.to_string(),
        }
    }
}

/// A submitted envelope whose every field has been checked for shape.
///
/// It has no sender: the broker knows the sender from the client certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The sender-chosen idempotency key.
    pub message_id: MessageId,
    /// Distinct recipients, at least one, in the order given.
    pub recipients: Vec<AgencyId>,
    /// What the envelope carries.
    pub kind: Kind,
    /// The organisation the payload identifies; `None` for anonymised or aggregate information.
    pub organisation: Option<OrgId>,
    /// The incident it concerns: `<agency>:<reference>` (`ico:INC-2026-0042`), or the
    /// sender's own reference without a prefix until [`Envelope::qualify_incident_ref`] has
    /// made it federation-unique.
    pub incident_ref: Option<String>,
    /// The payload's media type (`application/octet-stream` when not given).
    pub content_type: String,
    /// The TLP marking.
    pub tlp: Tlp,
    /// The payload: opaque, never logged.
    pub payload: Vec<u8>,
    /// The consent token, if one was given.
    pub consent_token: Option<String>,
    /// Further organisations the envelope declares, distinct, none equal to `organisation`.
    pub organisations: Vec<OrgId>,
    /// Further consent tokens (`consent_tokens` on the wire), none empty.
    pub consent_tokens: Vec<String>,
    /// The national-significance designation, if one was given (both halves).
    pub significance: Option<SignificanceTokens>,
    /// The workflow step it carries (its kind is the step's).
    pub workflow: Option<Step>,
}

impl Envelope {
    /// Makes `incident_ref` federation-unique: a reference without an agency prefix is
    /// `sender`'s own (`INC-7` sent by `ico` becomes `ico:INC-7`); one that names its agency
    /// (`nca` referring to `ico:INC-7`) is kept. Validation admits only references that
    /// qualify, so nothing else changes.
    pub fn qualify_incident_ref(&mut self, sender: &AgencyId) {
        if let Some(r) = &mut self.incident_ref
            && let Some(q) = qualify_incident(sender, r)
        {
            *r = q;
        }
    }

    /// Every organisation the envelope declares: `organisation` first, then `organisations`.
    pub fn declared_organisations(&self) -> impl Iterator<Item = &OrgId> {
        self.organisation.iter().chain(&self.organisations)
    }

    /// Every consent token the envelope carries: `consent_token` first, then
    /// `consent_tokens`.
    pub fn all_consent_tokens(&self) -> impl Iterator<Item = &str> {
        self.consent_token
            .iter()
            .chain(&self.consent_tokens)
            .map(String::as_str)
    }
}

/// The two halves of a national-significance designation as an envelope carries them
/// (`crate::significance`), checked for shape only: both present, each at most
/// [`crate::paseto::MAX_TOKEN_LEN`] bytes of printable ASCII.
#[derive(Clone, PartialEq, Eq)]
pub struct SignificanceTokens {
    /// The designating officer's token.
    pub designation: String,
    /// The countersigning officer's token.
    pub countersignature: String,
}

impl fmt::Debug for SignificanceTokens {
    // Token bytes never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignificanceTokens(<redacted>)")
    }
}

impl SignificanceTokens {
    /// Checks the wire fields: both empty (no designation) or both set, each at most
    /// [`crate::paseto::MAX_TOKEN_LEN`] bytes of printable ASCII.
    fn check(designation: &str, countersignature: &str) -> Result<bool, EnvelopeError> {
        match (designation.is_empty(), countersignature.is_empty()) {
            (true, true) => return Ok(false),
            (false, false) => {}
            _ => {
                return Err(EnvelopeError::Invalid {
                    field: "significance_designation",
                    problem: "and significance_countersignature must be given together".into(),
                });
            }
        }
        for (field, token) in [
            ("significance_designation", designation),
            ("significance_countersignature", countersignature),
        ] {
            if token.len() > crate::paseto::MAX_TOKEN_LEN {
                return Err(EnvelopeError::Invalid {
                    field,
                    problem: format!("is longer than {} bytes", crate::paseto::MAX_TOKEN_LEN),
                });
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(EnvelopeError::Invalid {
                    field,
                    problem: "must be printable ASCII".into(),
                });
            }
        }
        Ok(true)
    }
}

impl fmt::Debug for Envelope {
    // Payload and token bytes never reach a log, even through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("message_id", &self.message_id)
            .field("recipients", &self.recipients)
            .field("kind", &self.kind)
            .field("organisation", &self.organisation)
            .field("incident_ref", &self.incident_ref)
            .field("content_type", &self.content_type)
            .field("tlp", &self.tlp)
            .field("payload_len", &self.payload.len())
            .field(
                "consent_token",
                &self.consent_token.as_ref().map(|_| "<redacted>"),
            )
            .field("organisations", &self.organisations)
            .field("consent_tokens", &self.consent_tokens.len())
            .field("significance", &self.significance)
            .field("workflow", &self.workflow.as_ref().map(Step::name))
            .finish()
    }
}

/// Checks an optional label: empty (absent), or at most [`MAX_LABEL_LEN`] printable ASCII bytes.
fn check_label(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    if value.len() > MAX_LABEL_LEN {
        return Err(EnvelopeError::Invalid {
            field,
            problem: format!("is longer than {MAX_LABEL_LEN} bytes"),
        });
    }
    if !value.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(EnvelopeError::Invalid {
            field,
            problem: "must be printable ASCII".into(),
        });
    }
    Ok(())
}

/// Checks an optional incident reference: empty (absent), `<agency>:<reference>`, or the
/// sender's own reference without a prefix (1 to [`crate::workflow::MAX_REFERENCE_LEN`]
/// printable ASCII characters, no space and no `:`).
fn check_incident_ref(value: &str) -> Result<(), EnvelopeError> {
    if value.is_empty() {
        return Ok(());
    }
    let checked = if value.contains(':') {
        value.parse::<WorkflowId>().map(|_| ())
    } else {
        value.parse::<Reference>().map(|_| ())
    };
    checked.map_err(|problem| EnvelopeError::Invalid {
        field: "incident_ref",
        problem: format!(
            "must be your own reference (printable ASCII, no spaces or ':') or \
             <agency>:<reference> for another agency's incident, such as ico:INC-2026-0042; \
             this one {problem}"
        ),
    })
}

/// What validating a wire envelope parses, before its strings and payload are moved.
struct Checked {
    message_id: MessageId,
    recipients: Vec<AgencyId>,
    kind: Kind,
    organisation: Option<OrgId>,
    organisations: Vec<OrgId>,
    tlp: Tlp,
    /// Whether both halves of a designation are present (and well formed).
    significance: bool,
    workflow: Option<Step>,
}

impl Checked {
    fn of(wire: &pb::Envelope) -> Result<Checked, EnvelopeError> {
        let message_id = wire
            .message_id
            .parse()
            .map_err(|e| EnvelopeError::id("message_id", e))?;
        if wire.recipients.is_empty() {
            return Err(EnvelopeError::Invalid {
                field: "recipients",
                problem: "must name at least one agency".into(),
            });
        }
        if wire.recipients.len() > MAX_RECIPIENTS {
            return Err(EnvelopeError::Invalid {
                field: "recipients",
                problem: format!("names more than {MAX_RECIPIENTS} agencies"),
            });
        }
        let mut recipients: Vec<AgencyId> = Vec::with_capacity(wire.recipients.len());
        for r in &wire.recipients {
            let id: AgencyId = r.parse().map_err(|e| EnvelopeError::id("recipients", e))?;
            if recipients.contains(&id) {
                return Err(EnvelopeError::Invalid {
                    field: "recipients",
                    problem: format!("names {id} twice"),
                });
            }
            recipients.push(id);
        }
        let organisation = if wire.organisation.is_empty() {
            None
        } else {
            Some(
                wire.organisation
                    .parse()
                    .map_err(|e| EnvelopeError::id("organisation", e))?,
            )
        };
        let mut organisations: Vec<OrgId> = Vec::with_capacity(wire.organisations.len());
        for o in &wire.organisations {
            let id: OrgId = o
                .parse()
                .map_err(|e| EnvelopeError::id("organisations", e))?;
            if organisation.as_ref() == Some(&id) || organisations.contains(&id) {
                return Err(EnvelopeError::Invalid {
                    field: "organisations",
                    problem: format!("names {id} twice"),
                });
            }
            organisations.push(id);
        }
        let declared = organisations.len() + usize::from(organisation.is_some());
        let tokens = wire.consent_tokens.len() + usize::from(!wire.consent_token.is_empty());
        if declared > MAX_ORGANISATIONS || tokens > MAX_ORGANISATIONS {
            return Err(EnvelopeError::Invalid {
                field: "organisations",
                problem: format!(
                    "an envelope declares at most {MAX_ORGANISATIONS} organisations and carries \
                     at most as many consent tokens"
                ),
            });
        }
        if wire.consent_tokens.iter().any(String::is_empty) {
            return Err(EnvelopeError::Invalid {
                field: "consent_tokens",
                problem: "must not hold an empty token".into(),
            });
        }
        let kind = Kind::try_from(wire.kind)?;
        check_incident_ref(&wire.incident_ref)?;
        check_label("content_type", &wire.content_type)?;
        let significance = SignificanceTokens::check(
            &wire.significance_designation,
            &wire.significance_countersignature,
        )?;
        let workflow = wire.workflow.as_ref().map(Step::try_from).transpose()?;
        if let Some(step) = &workflow
            && step.kind() != kind
        {
            return Err(EnvelopeError::Invalid {
                field: "kind",
                problem: format!("must be {} for a {} step", step.kind(), step.name()),
            });
        }
        Ok(Checked {
            workflow,
            significance,
            message_id,
            recipients,
            kind,
            organisation,
            organisations,
            tlp: Tlp::try_from(wire.tlp)?,
        })
    }
}

impl Envelope {
    /// Validates `wire`. On failure it is handed back with the reason, so that the caller can
    /// still describe what it refused without having copied it beforehand.
    pub fn from_wire(wire: pb::Envelope) -> Result<Envelope, (EnvelopeError, Box<pb::Envelope>)> {
        let c = match Checked::of(&wire) {
            Ok(c) => c,
            Err(e) => return Err((e, Box::new(wire))),
        };
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(Envelope {
            message_id: c.message_id,
            recipients: c.recipients,
            kind: c.kind,
            organisation: c.organisation,
            incident_ref: some(wire.incident_ref),
            content_type: some(wire.content_type)
                .unwrap_or_else(|| "application/octet-stream".into()),
            tlp: c.tlp,
            payload: wire.payload,
            consent_token: some(wire.consent_token),
            organisations: c.organisations,
            consent_tokens: wire.consent_tokens,
            significance: c.significance.then_some(SignificanceTokens {
                designation: wire.significance_designation,
                countersignature: wire.significance_countersignature,
            }),
            workflow: c.workflow,
        })
    }
}

impl TryFrom<pb::Envelope> for Envelope {
    type Error = EnvelopeError;

    fn try_from(wire: pb::Envelope) -> Result<Self, EnvelopeError> {
        Envelope::from_wire(wire).map_err(|(e, _)| e)
    }
}

impl From<Envelope> for pb::Envelope {
    fn from(e: Envelope) -> Self {
        pb::Envelope {
            message_id: e.message_id.to_string(),
            recipients: e.recipients.into_iter().map(String::from).collect(),
            kind: pb::MessageKind::from(e.kind) as i32,
            organisation: e.organisation.map(String::from).unwrap_or_default(),
            incident_ref: e.incident_ref.unwrap_or_default(),
            content_type: e.content_type,
            tlp: pb::Tlp::from(e.tlp) as i32,
            payload: e.payload,
            consent_token: e.consent_token.unwrap_or_default(),
            consent_tokens: e.consent_tokens,
            organisations: e.organisations.into_iter().map(String::from).collect(),
            significance_designation: e
                .significance
                .as_ref()
                .map(|s| s.designation.clone())
                .unwrap_or_default(),
            significance_countersignature: e
                .significance
                .map(|s| s.countersignature)
                .unwrap_or_default(),
            workflow: e.workflow.as_ref().map(pb::WorkflowStep::from),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn valid() -> pb::Envelope {
        pb::Envelope {
            message_id: "0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b".into(),
            recipients: vec!["ico".into(), "nca".into()],
            kind: pb::MessageKind::IncidentRecord as i32,
            organisation: "acme-ltd".into(),
            incident_ref: "INC-2026-0042".into(),
            content_type: "application/json".into(),
            tlp: pb::Tlp::Amber as i32,
            payload: b"{}".to_vec(),
            consent_token: "v4.public.x".into(),
            consent_tokens: vec!["v4.public.y".into()],
            organisations: vec!["globex-plc".into()],
            significance_designation: String::new(),
            significance_countersignature: String::new(),
            workflow: None,
        }
    }

    #[test]
    fn a_refused_wire_envelope_is_handed_back_whole() {
        for (field, wire) in [
            ("tlp", pb::Envelope { tlp: 99, ..valid() }),
            (
                "incident_ref",
                pb::Envelope {
                    incident_ref: "bad\tlabel".into(),
                    ..valid()
                },
            ),
        ] {
            let (_, back) = Envelope::from_wire(wire.clone()).unwrap_err();
            assert_eq!(*back, wire, "{field}");
        }
    }

    #[test]
    fn valid_envelope_round_trips() {
        let env = Envelope::try_from(valid()).unwrap();
        assert_eq!(env.kind, Kind::IncidentRecord);
        assert_eq!(env.tlp, Tlp::Amber);
        assert_eq!(env.organisation.as_ref().unwrap().as_str(), "acme-ltd");
        assert_eq!(pb::Envelope::from(env), valid());
    }

    #[test]
    fn malformed_envelopes_name_the_field() {
        type Mutate = fn(&mut pb::Envelope);
        let cases: &[(&str, Mutate)] = &[
            ("message_id", |e| e.message_id = "not-a-uuid".into()),
            ("recipients", |e| e.recipients.clear()),
            ("recipients", |e| {
                e.recipients = vec!["ico".into(), "ico".into()]
            }),
            ("recipients", |e| e.recipients = vec!["I C O".into()]),
            ("recipients", |e| e.recipients = vec!["a".into(); 33]),
            ("kind", |e| e.kind = 0),
            ("kind", |e| e.kind = 99),
            ("tlp", |e| e.tlp = 0),
            ("organisation", |e| e.organisation = "Acme Ltd".into()),
            ("incident_ref", |e| e.incident_ref = "x".repeat(129)),
            ("incident_ref", |e| e.incident_ref = "x".repeat(65)),
            ("incident_ref", |e| e.incident_ref = "bad\nref".into()),
            ("incident_ref", |e| e.incident_ref = "INC 2026 0042".into()),
            ("incident_ref", |e| e.incident_ref = "a:b:c".into()),
            ("incident_ref", |e| e.incident_ref = "ICO:INC-1".into()),
            ("incident_ref", |e| e.incident_ref = ":INC-1".into()),
            ("incident_ref", |e| e.incident_ref = "ico:".into()),
            ("content_type", |e| e.content_type = "text/\u{7}".into()),
            ("organisations", |e| e.organisations = vec!["Globex".into()]),
            ("organisations", |e| {
                e.organisations = vec!["acme-ltd".into()]
            }),
            ("organisations", |e| {
                e.organisations = vec!["globex-plc".into(), "globex-plc".into()]
            }),
            ("organisations", |e| {
                e.organisations = (0..32).map(|i| format!("org-{i}")).collect()
            }),
            ("organisations", |e| {
                e.consent_tokens = vec!["v4.public.y".into(); 32]
            }),
            ("consent_tokens", |e| e.consent_tokens = vec![String::new()]),
            ("significance_designation", |e| {
                e.significance_designation = "v4.public.x".into()
            }),
            ("significance_designation", |e| {
                e.significance_countersignature = "v4.public.x".into()
            }),
            ("significance_designation", |e| {
                e.significance_designation = "x".repeat(8 * 1024 + 1);
                e.significance_countersignature = "v4.public.x".into();
            }),
            ("significance_countersignature", |e| {
                e.significance_designation = "v4.public.x".into();
                e.significance_countersignature = "v4.public.\n".into();
            }),
        ];
        for (field, mutate) in cases {
            let mut wire = valid();
            mutate(&mut wire);
            match Envelope::try_from(wire) {
                Err(EnvelopeError::Invalid { field: f, .. }) => assert_eq!(f, *field),
                other => panic!("expected {field} to be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn incident_refs_are_qualified_with_the_sender_unless_they_name_an_agency() {
        let ico: AgencyId = "ico".parse().unwrap();
        let nca: AgencyId = "nca".parse().unwrap();
        // (sent, by, becomes)
        let rows = [
            ("INC-7", &ico, "ico:INC-7"),
            ("ico:INC-7", &ico, "ico:INC-7"),
            ("ico:INC-7", &nca, "ico:INC-7"),
            ("INC-2026/0042", &nca, "nca:INC-2026/0042"),
        ];
        for (sent, sender, want) in rows {
            let mut env = Envelope::try_from(pb::Envelope {
                incident_ref: sent.into(),
                ..valid()
            })
            .unwrap();
            env.qualify_incident_ref(sender);
            assert_eq!(
                env.incident_ref.as_deref(),
                Some(want),
                "{sent} by {sender}"
            );
        }
        let mut none = Envelope::try_from(pb::Envelope {
            incident_ref: String::new(),
            ..valid()
        })
        .unwrap();
        none.qualify_incident_ref(&ico);
        assert_eq!(none.incident_ref, None);
    }

    #[test]
    fn a_malformed_incident_ref_says_what_is_expected() {
        let err = Envelope::try_from(pb::Envelope {
            incident_ref: "INC 7".into(),
            ..valid()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("incident_ref"), "{err}");
        assert!(err.contains("<agency>:<reference>"), "{err}");
    }

    #[test]
    fn empty_optionals_become_none() {
        let mut wire = valid();
        wire.organisation.clear();
        wire.incident_ref.clear();
        wire.content_type.clear();
        wire.consent_token.clear();
        let env = Envelope::try_from(wire).unwrap();
        assert!(env.organisation.is_none());
        assert!(env.incident_ref.is_none());
        assert!(env.consent_token.is_none());
        assert_eq!(env.content_type, "application/octet-stream");
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            "incident_record".parse::<Kind>().unwrap(),
            Kind::IncidentRecord
        );
        assert!("incident".parse::<Kind>().is_err());
        assert_eq!("AMBER+STRICT".parse::<Tlp>().unwrap(), Tlp::AmberStrict);
        assert_eq!("tlp:red".parse::<Tlp>().unwrap(), Tlp::Red);
        assert!("purple".parse::<Tlp>().is_err());
    }

    #[test]
    fn debug_redacts_payload_and_token() {
        let env = Envelope::try_from(valid()).unwrap();
        let shown = format!("{env:?}");
        assert!(!shown.contains("v4.public.x"));
        assert!(shown.contains("payload_len: 2"));
    }
}
