//! Workflow steps (docs/workflows.md): the subject-access consultation and the public
//! communication agreed in advance, as envelopes carry them, and federation-unique references.
//!
//! [`Step`] is built from [`pb::WorkflowStep`] with `TryFrom`, which checks every field's shape;
//! whether a step fits the workflow's state is the broker's to decide.

use std::{fmt, str::FromStr};

use time::OffsetDateTime;

use crate::{
    envelope::{EnvelopeError, Kind},
    ids::{AgencyId, OrgId},
    pb,
};

/// The longest reference (of a consultation, a statement or an incident), without its prefix.
pub const MAX_REFERENCE_LEN: usize = 64;
/// The most transfers one consultation may concern.
pub const MAX_CONCERNS: usize = 256;
/// The longest free text of a step (an objection's ground or reason), in characters.
pub const MAX_TEXT_CHARS: usize = 2000;

/// An agency's own reference: 1 to [`MAX_REFERENCE_LEN`] printable ASCII characters, no space
/// and no `:` (which separates it from its agency in a [`WorkflowId`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference(String);

impl Reference {
    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Reference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is empty".into());
        }
        if s.len() > MAX_REFERENCE_LEN {
            return Err(format!("is longer than {MAX_REFERENCE_LEN} characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err("must be printable ASCII without spaces or ':'".into());
        }
        Ok(Reference(s.to_owned()))
    }
}

/// A federation-unique id: the agency that chose the reference, and the reference
/// (`ico:INC-2026-0042`, `nca:DSAR-2026-0012`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkflowId {
    /// The agency whose reference it is.
    pub owner: AgencyId,
    /// Its reference.
    pub reference: Reference,
}

impl WorkflowId {
    /// Reads `text` as `<agency>:<reference>`, or, without a prefix, as `owner`'s own
    /// reference.
    pub fn qualify(owner: &AgencyId, text: &str) -> Result<WorkflowId, String> {
        match text.split_once(':') {
            Some(_) => text.parse(),
            None => Ok(WorkflowId {
                owner: owner.clone(),
                reference: text.parse()?,
            }),
        }
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.owner, self.reference)
    }
}

impl FromStr for WorkflowId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (owner, reference) = s
            .split_once(':')
            .ok_or_else(|| "must be <agency>:<reference>".to_owned())?;
        Ok(WorkflowId {
            owner: owner
                .parse()
                .map_err(|e: crate::ids::IdError| format!("names no agency: {e}"))?,
            reference: reference.parse()?,
        })
    }
}

/// The federation-unique form of an incident reference sent by `sender`: a reference that
/// names its agency (`ico:INC-2026-0042`) is kept, one without a prefix is the sender's own.
/// `None` when `text` is neither.
pub fn qualify_incident(sender: &AgencyId, text: &str) -> Option<String> {
    WorkflowId::qualify(sender, text)
        .ok()
        .map(|id| id.to_string())
}

/// Reads a deadline (`respond_by`, `need_more_time`): an RFC 3339 time, or a date
/// (`YYYY-MM-DD`) meaning the end of that day UTC (23:59:59Z), so that "by the 14th" includes
/// the 14th.
pub fn parse_deadline(text: &str) -> Result<OffsetDateTime, String> {
    parse_time(text, time::macros::time!(23:59:59))
}

/// Reads a not-before time (`publish_after`): an RFC 3339 time, or a date (`YYYY-MM-DD`)
/// meaning the start of that day UTC (00:00:00Z).
pub fn parse_not_before(text: &str) -> Result<OffsetDateTime, String> {
    parse_time(text, time::Time::MIDNIGHT)
}

/// An RFC 3339 time, or a date at `time_of_day` UTC.
fn parse_time(text: &str, time_of_day: time::Time) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(date) = time::Date::parse(text, &date_format) {
        return Ok(date.with_time(time_of_day).assume_utc());
    }
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{text:?} is neither a date (YYYY-MM-DD) nor an RFC 3339 time"))
}

/// The form in which an incident reference is compared: [`qualify_incident`], or `text` as
/// written when it is neither form (a reference in a signed artefact made before references
/// were federation-unique, or an incident record's own reference with more than one `:`).
/// Qualifying is idempotent, so both sides of a comparison can go through it whether or not
/// they were qualified before.
pub fn incident_for_comparison(owner: &AgencyId, text: &str) -> String {
    qualify_incident(owner, text).unwrap_or_else(|| text.to_owned())
}

/// A workflow step, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Opens a subject-access consultation with the envelope's recipients.
    DsarOpen(DsarOpen),
    /// A consulted agency answers.
    DsarAnswer {
        /// The consultation.
        consultation: WorkflowId,
        /// The answer.
        answer: DsarAnswer,
    },
    /// The requester closes the consultation.
    DsarClose {
        /// The consultation.
        consultation: WorkflowId,
    },
    /// Proposes the payload as a public statement to the envelope's recipients.
    CommsPropose {
        /// The proposer's reference.
        reference: Reference,
        /// Not to be published before.
        publish_after: OffsetDateTime,
    },
    /// A party answers a proposed statement.
    CommsAnswer {
        /// The statement.
        statement: WorkflowId,
        /// The answer.
        answer: CommsAnswer,
    },
}

/// Opening a consultation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsarOpen {
    /// The requester's reference.
    pub reference: Reference,
    /// The transfers it concerns, distinct.
    pub concerns: Vec<uuid::Uuid>,
    /// The organisation it concerns.
    pub organisation: Option<OrgId>,
    /// The deadline for answers; `None`: the agreement's default.
    pub respond_by: Option<OffsetDateTime>,
}

/// A consulted agency's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsarAnswer {
    /// No objection.
    NoObjection,
    /// An objection, with its exemption ground.
    Objection(String),
    /// The agency will answer by then.
    NeedMoreTime(OffsetDateTime),
}

/// A party's answer to a proposed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommsAnswer {
    /// Approved.
    Approve,
    /// An objection, with its reason.
    Objection(String),
}

impl Step {
    /// The envelope kind the step travels as.
    pub fn kind(&self) -> Kind {
        match self {
            Step::DsarOpen(_) | Step::DsarAnswer { .. } | Step::DsarClose { .. } => {
                Kind::DsarConsultation
            }
            Step::CommsPropose { .. } | Step::CommsAnswer { .. } => Kind::PublicCommunication,
        }
    }

    /// The step's name in logs, files and on the command line (`dsar_open`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Step::DsarOpen(_) => "dsar_open",
            Step::DsarAnswer { .. } => "dsar_answer",
            Step::DsarClose { .. } => "dsar_close",
            Step::CommsPropose { .. } => "comms_propose",
            Step::CommsAnswer { .. } => "comms_answer",
        }
    }

    /// The free text the step carries (an objection), which the broker reads like a payload.
    pub fn text(&self) -> Option<&str> {
        match self {
            Step::DsarAnswer {
                answer: DsarAnswer::Objection(t),
                ..
            }
            | Step::CommsAnswer {
                answer: CommsAnswer::Objection(t),
                ..
            } => Some(t),
            _ => None,
        }
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn time_of(
    field: &'static str,
    t: &prost_types::Timestamp,
) -> Result<OffsetDateTime, EnvelopeError> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(field, "is not a valid timestamp"));
    }
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| invalid(field, "is out of range"))
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    let nanos = t.unix_timestamp_nanos();
    prost_types::Timestamp {
        seconds: i64::try_from(nanos.div_euclid(1_000_000_000)).unwrap_or(i64::MAX),
        nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

fn text(field: &'static str, value: &str) -> Result<String, EnvelopeError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if trimmed.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid(
            field,
            format!("is longer than {MAX_TEXT_CHARS} characters"),
        ));
    }
    if trimmed
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(field, "must not hold control characters"));
    }
    Ok(trimmed.to_owned())
}

fn id(field: &'static str, value: &str) -> Result<WorkflowId, EnvelopeError> {
    value.parse().map_err(|p: String| invalid(field, p))
}

fn reference(field: &'static str, value: &str) -> Result<Reference, EnvelopeError> {
    value.parse().map_err(|p: String| invalid(field, p))
}

impl TryFrom<&pb::WorkflowStep> for Step {
    type Error = EnvelopeError;

    fn try_from(wire: &pb::WorkflowStep) -> Result<Step, EnvelopeError> {
        use pb::workflow_step::Step as W;
        let step = wire
            .step
            .as_ref()
            .ok_or_else(|| invalid("workflow", "names no step"))?;
        Ok(match step {
            W::DsarOpen(o) => {
                if o.concerns.len() > MAX_CONCERNS {
                    return Err(invalid(
                        "workflow.dsar_open.concerns",
                        format!("names more than {MAX_CONCERNS} transfers"),
                    ));
                }
                let mut concerns = Vec::with_capacity(o.concerns.len());
                for c in &o.concerns {
                    let t: uuid::Uuid = c.parse().map_err(|_| {
                        invalid(
                            "workflow.dsar_open.concerns",
                            "must be transfer ids (UUIDs)",
                        )
                    })?;
                    if concerns.contains(&t) {
                        return Err(invalid(
                            "workflow.dsar_open.concerns",
                            format!("names {t} twice"),
                        ));
                    }
                    concerns.push(t);
                }
                let organisation = if o.organisation.is_empty() {
                    None
                } else {
                    Some(o.organisation.parse().map_err(|e: crate::ids::IdError| {
                        invalid("workflow.dsar_open.organisation", e.to_string())
                    })?)
                };
                Step::DsarOpen(DsarOpen {
                    reference: reference("workflow.dsar_open.reference", &o.reference)?,
                    concerns,
                    organisation,
                    respond_by: o
                        .respond_by
                        .as_ref()
                        .map(|t| time_of("workflow.dsar_open.respond_by", t))
                        .transpose()?,
                })
            }
            W::DsarAnswer(a) => {
                use pb::dsar_answer::Answer;
                let answer = match &a.answer {
                    Some(Answer::NoObjection(true)) => DsarAnswer::NoObjection,
                    Some(Answer::Objection(t)) => {
                        DsarAnswer::Objection(text("workflow.dsar_answer.objection", t)?)
                    }
                    Some(Answer::NeedMoreTime(t)) => {
                        DsarAnswer::NeedMoreTime(time_of("workflow.dsar_answer.need_more_time", t)?)
                    }
                    Some(Answer::NoObjection(false)) | None => {
                        return Err(invalid(
                            "workflow.dsar_answer",
                            "must give no_objection, objection or need_more_time",
                        ));
                    }
                };
                Step::DsarAnswer {
                    consultation: id("workflow.dsar_answer.consultation_id", &a.consultation_id)?,
                    answer,
                }
            }
            W::DsarClose(c) => Step::DsarClose {
                consultation: id("workflow.dsar_close.consultation_id", &c.consultation_id)?,
            },
            W::CommsPropose(p) => Step::CommsPropose {
                reference: reference("workflow.comms_propose.reference", &p.reference)?,
                publish_after: time_of(
                    "workflow.comms_propose.publish_after",
                    p.publish_after.as_ref().ok_or_else(|| {
                        invalid("workflow.comms_propose.publish_after", "is missing")
                    })?,
                )?,
            },
            W::CommsAnswer(a) => {
                use pb::comms_answer::Answer;
                let answer = match &a.answer {
                    Some(Answer::Approve(true)) => CommsAnswer::Approve,
                    Some(Answer::Objection(t)) => {
                        CommsAnswer::Objection(text("workflow.comms_answer.objection", t)?)
                    }
                    Some(Answer::Approve(false)) | None => {
                        return Err(invalid(
                            "workflow.comms_answer",
                            "must give approve or objection",
                        ));
                    }
                };
                Step::CommsAnswer {
                    statement: id("workflow.comms_answer.statement_id", &a.statement_id)?,
                    answer,
                }
            }
        })
    }
}

impl From<&Step> for pb::WorkflowStep {
    fn from(step: &Step) -> pb::WorkflowStep {
        use pb::workflow_step::Step as W;
        let step = match step {
            Step::DsarOpen(o) => W::DsarOpen(pb::DsarOpen {
                reference: o.reference.to_string(),
                concerns: o.concerns.iter().map(ToString::to_string).collect(),
                organisation: o
                    .organisation
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                respond_by: o.respond_by.map(timestamp),
            }),
            Step::DsarAnswer {
                consultation,
                answer,
            } => {
                use pb::dsar_answer::Answer;
                W::DsarAnswer(pb::DsarAnswer {
                    consultation_id: consultation.to_string(),
                    answer: Some(match answer {
                        DsarAnswer::NoObjection => Answer::NoObjection(true),
                        DsarAnswer::Objection(t) => Answer::Objection(t.clone()),
                        DsarAnswer::NeedMoreTime(t) => Answer::NeedMoreTime(timestamp(*t)),
                    }),
                })
            }
            Step::DsarClose { consultation } => W::DsarClose(pb::DsarClose {
                consultation_id: consultation.to_string(),
            }),
            Step::CommsPropose {
                reference,
                publish_after,
            } => W::CommsPropose(pb::CommsPropose {
                reference: reference.to_string(),
                publish_after: Some(timestamp(*publish_after)),
            }),
            Step::CommsAnswer { statement, answer } => {
                use pb::comms_answer::Answer;
                W::CommsAnswer(pb::CommsAnswer {
                    statement_id: statement.to_string(),
                    answer: Some(match answer {
                        CommsAnswer::Approve => Answer::Approve(true),
                        CommsAnswer::Objection(t) => Answer::Objection(t.clone()),
                    }),
                })
            }
        };
        pb::WorkflowStep { step: Some(step) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    #[test]
    fn references_qualify_with_the_sender_unless_they_name_their_agency() {
        assert_eq!(
            qualify_incident(&agency("ico"), "INC-2026-0042").as_deref(),
            Some("ico:INC-2026-0042")
        );
        assert_eq!(
            qualify_incident(&agency("nca"), "ico:INC-2026-0042").as_deref(),
            Some("ico:INC-2026-0042")
        );
        assert_eq!(qualify_incident(&agency("ico"), "a:b:c"), None);
        assert_eq!(qualify_incident(&agency("ico"), "has space"), None);
        assert_eq!(qualify_incident(&agency("ico"), ""), None);
        assert_eq!(qualify_incident(&agency("ico"), "Bad Agency:x"), None);
    }

    #[test]
    fn dates_are_whole_days_and_times_are_kept() {
        let at = |s: &str| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        type Parse = fn(&str) -> Result<OffsetDateTime, String>;
        let rows: [(&str, Parse, Option<&str>); 8] = [
            ("2026-12-14", parse_deadline, Some("2026-12-14T23:59:59Z")),
            ("2026-12-14", parse_not_before, Some("2026-12-14T00:00:00Z")),
            (" 2026-12-14 ", parse_deadline, Some("2026-12-14T23:59:59Z")),
            (
                "2026-12-14T10:30:00+01:00",
                parse_deadline,
                Some("2026-12-14T09:30:00Z"),
            ),
            (
                "2026-12-14T10:30:00Z",
                parse_not_before,
                Some("2026-12-14T10:30:00Z"),
            ),
            ("2026-02-30", parse_deadline, None),
            ("14/12/2026", parse_not_before, None),
            ("", parse_deadline, None),
        ];
        for (text, parse, expected) in rows {
            match expected {
                Some(e) => assert_eq!(parse(text).unwrap(), at(e), "{text:?}"),
                None => assert!(parse(text).unwrap_err().contains("YYYY-MM-DD"), "{text:?}"),
            }
        }
    }

    #[test]
    fn references_compare_qualified_or_as_written() {
        // (owner, text, compared as)
        let rows = [
            ("ico", "INC-7", "ico:INC-7"),
            ("ico", "ico:INC-7", "ico:INC-7"),
            ("nca", "ico:INC-7", "ico:INC-7"),
            ("ico", "INC 7", "INC 7"),
            ("ico", "a:b:c", "a:b:c"),
        ];
        for (owner, text, want) in rows {
            assert_eq!(
                incident_for_comparison(&agency(owner), text),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn a_step_round_trips_and_bad_shapes_are_refused() {
        let open = Step::DsarOpen(DsarOpen {
            reference: "DSAR-2026-0012".parse().unwrap(),
            concerns: vec![uuid::Uuid::from_u128(7)],
            organisation: Some("acme-ltd".parse().unwrap()),
            respond_by: Some(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()),
        });
        let answer = Step::DsarAnswer {
            consultation: "nca:DSAR-2026-0012".parse().unwrap(),
            answer: DsarAnswer::Objection("Schedule 2, paragraph 2".into()),
        };
        let comms = Step::CommsAnswer {
            statement: "ico:press-1".parse().unwrap(),
            answer: CommsAnswer::Approve,
        };
        for step in [open, answer, comms] {
            let wire = pb::WorkflowStep::from(&step);
            assert_eq!(Step::try_from(&wire).unwrap(), step);
        }
        let bad = [
            pb::WorkflowStep { step: None },
            pb::WorkflowStep {
                step: Some(pb::workflow_step::Step::DsarAnswer(pb::DsarAnswer {
                    consultation_id: "nca:X".into(),
                    answer: Some(pb::dsar_answer::Answer::NoObjection(false)),
                })),
            },
            pb::WorkflowStep {
                step: Some(pb::workflow_step::Step::DsarAnswer(pb::DsarAnswer {
                    consultation_id: "no-prefix".into(),
                    answer: Some(pb::dsar_answer::Answer::NoObjection(true)),
                })),
            },
            pb::WorkflowStep {
                step: Some(pb::workflow_step::Step::CommsAnswer(pb::CommsAnswer {
                    statement_id: "ico:x".into(),
                    answer: Some(pb::comms_answer::Answer::Objection("  ".into())),
                })),
            },
            pb::WorkflowStep {
                step: Some(pb::workflow_step::Step::DsarOpen(pb::DsarOpen {
                    reference: "R".into(),
                    concerns: vec!["not-a-uuid".into()],
                    ..Default::default()
                })),
            },
            pb::WorkflowStep {
                step: Some(pb::workflow_step::Step::CommsPropose(pb::CommsPropose {
                    reference: "R".into(),
                    publish_after: None,
                })),
            },
        ];
        for wire in bad {
            assert!(Step::try_from(&wire).is_err(), "{wire:?}");
        }
    }
}
