//! The workflows the broker tracks (docs/workflows.md): subject-access consultations, public
//! statements agreed in advance, and the agencies involved in an incident; and the timers that
//! remind and enforce deadlines.
//!
//! Everything here is a pure function of a stored record and what happened: the store
//! ([`crate::store`]) reads the record, calls these inside its transaction, and writes what they
//! return (the record, new timers, notices with their audit entries), so a step and the transfer
//! that carries it commit or fail together, whatever the engine.
//!
//! Records are protobuf messages: a consultation is stored as the [`pb::ConsultationStatus`] the
//! Workflows service shows (its `state` and `may_close` computed when read), a statement as a
//! [`pb::StatementStatus`], an incident as an [`IncidentRecord`]. Timers are keyed by the time
//! they fire; a timer that no longer matches its record when it fires (the deadline moved, the
//! party answered, the consultation closed) does nothing, so steps never need to find and delete
//! the timers they make obsolete.

use std::collections::{BTreeMap, BTreeSet};

use concordat_proto::{
    ids::AgencyId,
    pb,
    workflow::{CommsAnswer, DsarAnswer, Step, WorkflowId},
};
use prost::Message;
use time::{Duration, OffsetDateTime};

use crate::{
    policy::rfc3339,
    refusal::{Internal, Reason, Refusal},
    store::timestamp,
};

/// The deadline for answers to a consultation when neither the request nor its agreement
/// sets one.
pub const DEFAULT_DSAR_RESPONSE_DAYS: u32 = 20;
/// How long before a consulted agency's deadline it is reminded, by default.
pub const DEFAULT_REMINDER_BEFORE: std::time::Duration =
    std::time::Duration::from_secs(3 * 24 * 3600);

/// The furthest ahead a consultation's deadline may be set (by the request or a
/// need-more-time answer).
pub const MAX_DEADLINE_AHEAD: Duration = Duration::days(366);

/// The party states of a consultation, as stored and shown.
const AWAITING: &str = "awaiting";
const NO_OBJECTION: &str = "no_objection";
const OBJECTION: &str = "objection";
const OVERDUE: &str = "overdue";
/// The party states of a statement.
const PENDING: &str = "pending";
const APPROVED: &str = "approved";
const OBJECTED: &str = "objected";

/// The configuration's workflow settings (`[workflows]`, and each agreement's
/// `dsar_response_days`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowRules {
    /// How long before a consulted agency's deadline it is reminded (`dsar_reminder_before`).
    pub reminder_before: Duration,
    /// Each agreement's `dsar_response_days`, by agreement id, where it sets one.
    pub response_days: BTreeMap<String, u32>,
}

impl Default for WorkflowRules {
    fn default() -> Self {
        WorkflowRules {
            reminder_before: Duration::try_from(DEFAULT_REMINDER_BEFORE)
                .unwrap_or(Duration::days(3)),
            response_days: BTreeMap::new(),
        }
    }
}

impl WorkflowRules {
    /// The deadline for an answer to a consultation opened `at` under agreement `agreement`.
    pub fn default_due(&self, agreement: &str, at: OffsetDateTime) -> OffsetDateTime {
        let days = self
            .response_days
            .get(agreement)
            .copied()
            .unwrap_or(DEFAULT_DSAR_RESPONSE_DAYS);
        at + Duration::days(i64::from(days))
    }
}

/// What a step needs besides its envelope, worked out when the transfer is decided.
#[derive(Debug, Clone, Default)]
pub struct StepContext {
    /// For each recipient, its deadline if the request sets none: now plus the
    /// `dsar_response_days` of the agreement the flow to it relies on.
    pub default_due: BTreeMap<AgencyId, OffsetDateTime>,
    /// How long before a deadline the consulted agency is reminded.
    pub reminder_before: Duration,
}

/// The key of the record a step belongs to: `dsar/<id>`, `comms/<id>`.
pub fn key_of(sender: &AgencyId, step: &Step) -> String {
    match step {
        Step::DsarOpen(o) => dsar_key(&WorkflowId {
            owner: sender.clone(),
            reference: o.reference.clone(),
        }),
        Step::DsarAnswer { consultation, .. } | Step::DsarClose { consultation } => {
            dsar_key(consultation)
        }
        Step::CommsPropose { reference, .. } => comms_key(&WorkflowId {
            owner: sender.clone(),
            reference: reference.clone(),
        }),
        Step::CommsAnswer { statement, .. } => comms_key(statement),
    }
}

/// The key of a consultation's record.
pub fn dsar_key(id: &WorkflowId) -> String {
    format!("dsar/{id}")
}

/// The key of a statement's record.
pub fn comms_key(id: &WorkflowId) -> String {
    format!("comms/{id}")
}

/// The key of an incident's record.
pub fn incident_key(id: &WorkflowId) -> String {
    format!("incident/{id}")
}

/// The agencies involved in an incident, in the order they declared it.
#[derive(Clone, PartialEq, Message)]
pub struct IncidentRecord {
    /// The federation-unique reference.
    #[prost(string, tag = "1")]
    pub incident_ref: String,
    /// The agencies involved.
    #[prost(string, repeated, tag = "2")]
    pub involved: Vec<String>,
}

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// Remind a consulted agency that its answer is due.
    Reminder = 1,
    /// A consulted agency's deadline.
    Deadline = 2,
}

/// A stored timer.
#[derive(Clone, PartialEq, Message)]
pub struct Timer {
    /// A [`TimerKind`].
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// The record it concerns.
    #[prost(string, tag = "2")]
    pub key: String,
    /// The consulted agency.
    #[prost(string, tag = "3")]
    pub party: String,
    /// The deadline it was set for (nanoseconds since the epoch): it does nothing if the
    /// party's deadline has moved since.
    #[prost(int64, tag = "4")]
    pub due_nanos: i64,
    /// When it fires.
    #[prost(int64, tag = "5")]
    pub at_nanos: i64,
}

impl Timer {
    /// Its key in the timer store: the time it fires first (big-endian, so that a scan reads
    /// timers in the order they fall due), then what it is about.
    pub fn storage_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(16 + self.key.len() + self.party.len());
        k.extend_from_slice(&timer_prefix(self.at_nanos));
        k.push(u8::try_from(self.kind).unwrap_or(0));
        k.extend_from_slice(self.key.as_bytes());
        k.push(0);
        k.extend_from_slice(self.party.as_bytes());
        k
    }

    /// When it fires.
    pub fn at(&self) -> OffsetDateTime {
        from_nanos(self.at_nanos)
    }
}

/// The first 8 bytes of the key of a timer firing at `nanos`: timers due by then sort before
/// it.
pub fn timer_prefix(nanos: i64) -> [u8; 8] {
    u64::try_from(nanos.max(0)).unwrap_or(0).to_be_bytes()
}

/// When a timer keyed `key` fires, from its first 8 bytes.
pub fn timer_key_time(key: &[u8]) -> Option<OffsetDateTime> {
    let b: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let n = i64::try_from(u64::from_be_bytes(b)).ok()?;
    Some(from_nanos(n))
}

fn nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

fn from_nanos(n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn time_of(t: Option<&prost_types::Timestamp>) -> Option<OffsetDateTime> {
    let t = t?;
    OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
    )
    .ok()
}

fn conflict(message: impl Into<String>) -> Refusal {
    Refusal::new(Reason::WorkflowConflict, message)
}

fn unknown(what: &str, id: &str) -> Refusal {
    Refusal::new(
        Reason::WorkflowUnknown,
        format!("there is no {what} {id} that you are a party to"),
    )
}

fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, Internal> {
    M::decode(bytes).map_err(|e| Internal::new(what, e))
}

/// What applying a step changes.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The record's key and new bytes.
    pub key: String,
    /// The record, encoded.
    pub record: Vec<u8>,
    /// Timers to add.
    pub timers: Vec<Timer>,
}

/// A step and the transfer that carries it.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The sending agency.
    pub sender: &'a AgencyId,
    /// The transfer's recipients.
    pub recipients: &'a [AgencyId],
    /// The step.
    pub step: &'a Step,
    /// What the decision worked out for it.
    pub cx: &'a StepContext,
    /// When the transfer was accepted.
    pub at: OffsetDateTime,
    /// The transfer's id.
    pub transfer_id: &'a str,
    /// The SHA-256 of its payload.
    pub payload_digest: &'a [u8],
}

/// The step `input` applied to the record of its workflow (`key_of(sender, step)`), `stored`:
/// the new record and timers, or why the step is refused.
pub fn apply_step(
    input: &StepInput<'_>,
    stored: Option<&[u8]>,
) -> Result<Result<Applied, Refusal>, Internal> {
    let StepInput {
        sender,
        recipients,
        step,
        cx,
        at,
        transfer_id,
        payload_digest,
    } = *input;
    let key = key_of(sender, step);
    let recipient_set: BTreeSet<String> = recipients.iter().map(ToString::to_string).collect();
    match step {
        Step::DsarOpen(o) => {
            let id = WorkflowId {
                owner: sender.clone(),
                reference: o.reference.clone(),
            };
            if let Some(bytes) = stored {
                let c: pb::ConsultationStatus = decode(bytes, "decoding a consultation")?;
                return Ok(Err(conflict(format!(
                    "consultation {id} was already opened (transfer {}); choose another reference",
                    c.transfer_id
                ))));
            }
            if let Some(by) = o.respond_by
                && (by <= at || by > at + MAX_DEADLINE_AHEAD)
            {
                return Ok(Err(conflict(format!(
                    "respond_by {} must be in the future and at most {} days ahead",
                    rfc3339(by),
                    MAX_DEADLINE_AHEAD.whole_days()
                ))));
            }
            let mut timers = Vec::new();
            let mut parties = Vec::with_capacity(recipients.len());
            for r in recipients {
                let Some(due) = o.respond_by.or_else(|| cx.default_due.get(r).copied()) else {
                    return Err(Internal::new(
                        "opening a consultation",
                        format!("no default deadline for {r}"),
                    ));
                };
                timers.extend(party_timers(&key, r.as_str(), due, at, cx.reminder_before));
                parties.push(pb::ConsultationParty {
                    agency: r.to_string(),
                    state: AWAITING.into(),
                    due: Some(timestamp(due)),
                    ..Default::default()
                });
            }
            let record = pb::ConsultationStatus {
                consultation_id: id.to_string(),
                requester: sender.to_string(),
                reference: o.reference.to_string(),
                concerns: o.concerns.iter().map(ToString::to_string).collect(),
                organisation: o
                    .organisation
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                opened_at: Some(timestamp(at)),
                parties,
                transfer_id: transfer_id.to_owned(),
                ..Default::default()
            };
            Ok(Ok(Applied {
                key,
                record: record.encode_to_vec(),
                timers,
            }))
        }
        Step::DsarAnswer {
            consultation,
            answer,
        } => {
            let id = consultation.to_string();
            let Some(bytes) = stored else {
                return Ok(Err(unknown("consultation", &id)));
            };
            let mut c: pb::ConsultationStatus = decode(bytes, "decoding a consultation")?;
            let opened = time_of(c.opened_at.as_ref());
            let Some(party) = c.parties.iter_mut().find(|p| p.agency == sender.as_str()) else {
                return Ok(Err(unknown("consultation", &id)));
            };
            if c.closed_at.is_some() {
                return Ok(Err(conflict(format!("consultation {id} is closed"))));
            }
            if recipient_set.len() != 1 || !recipient_set.contains(&c.requester) {
                return Ok(Err(conflict(format!(
                    "an answer to consultation {id} goes to its requester {} alone",
                    c.requester
                ))));
            }
            let mut timers = Vec::new();
            match answer {
                DsarAnswer::NoObjection => {
                    party.state = NO_OBJECTION.into();
                    party.objection.clear();
                }
                DsarAnswer::Objection(ground) => {
                    party.state = OBJECTION.into();
                    party.objection.clone_from(ground);
                }
                DsarAnswer::NeedMoreTime(until) => {
                    let current = time_of(party.due.as_ref());
                    // However often it asks, an agency's deadline stays within
                    // MAX_DEADLINE_AHEAD of the consultation's opening.
                    let latest = opened.unwrap_or(at) + MAX_DEADLINE_AHEAD;
                    if *until <= at || current.is_some_and(|d| *until <= d) || *until > latest {
                        return Ok(Err(conflict(format!(
                            "need_more_time {} must be later than the current deadline {} and \
                             than now, and no later than {} ({} days after the consultation \
                             opened)",
                            rfc3339(*until),
                            current.map(rfc3339).unwrap_or_default(),
                            rfc3339(latest),
                            MAX_DEADLINE_AHEAD.whole_days()
                        ))));
                    }
                    party.state = AWAITING.into();
                    party.objection.clear();
                    party.due = Some(timestamp(*until));
                    party.reminded = false;
                    timers.extend(party_timers(
                        &key,
                        sender.as_str(),
                        *until,
                        at,
                        cx.reminder_before,
                    ));
                }
            }
            party.answered_at = Some(timestamp(at));
            Ok(Ok(Applied {
                key,
                record: c.encode_to_vec(),
                timers,
            }))
        }
        Step::DsarClose { consultation } => {
            let id = consultation.to_string();
            let Some(bytes) = stored else {
                return Ok(Err(unknown("consultation", &id)));
            };
            let mut c: pb::ConsultationStatus = decode(bytes, "decoding a consultation")?;
            if c.requester != sender.as_str() {
                return Ok(Err(
                    if c.parties.iter().any(|p| p.agency == sender.as_str()) {
                        conflict(format!(
                            "only the requester {} may close consultation {id}",
                            c.requester
                        ))
                    } else {
                        unknown("consultation", &id)
                    },
                ));
            }
            if c.closed_at.is_some() {
                return Ok(Err(conflict(format!(
                    "consultation {id} is already closed"
                ))));
            }
            let parties: BTreeSet<String> = c.parties.iter().map(|p| p.agency.clone()).collect();
            if parties != recipient_set {
                return Ok(Err(conflict(format!(
                    "closing consultation {id} tells every consulted agency: send it to {}",
                    parties.into_iter().collect::<Vec<_>>().join(", ")
                ))));
            }
            let waiting: Vec<String> = c
                .parties
                .iter()
                .filter(|p| party_state(p, at) == AWAITING)
                .map(|p| {
                    format!(
                        "{} (due {})",
                        p.agency,
                        time_of(p.due.as_ref()).map(rfc3339).unwrap_or_default()
                    )
                })
                .collect();
            if !waiting.is_empty() {
                return Ok(Err(Refusal::new(
                    Reason::ConsultationOpen,
                    format!(
                        "consultation {id} cannot be closed yet: awaiting the answer of {}; it \
                         can be closed once each has answered or its deadline has passed",
                        waiting.join(", ")
                    ),
                )));
            }
            for p in &mut c.parties {
                p.state = party_state(p, at).into();
            }
            c.closed_at = Some(timestamp(at));
            Ok(Ok(Applied {
                key,
                record: c.encode_to_vec(),
                timers: Vec::new(),
            }))
        }
        Step::CommsPropose {
            reference,
            publish_after,
        } => {
            let id = WorkflowId {
                owner: sender.clone(),
                reference: reference.clone(),
            };
            if stored.is_some() {
                return Ok(Err(conflict(format!(
                    "statement {id} was already proposed; propose a revision under another \
                     reference"
                ))));
            }
            let record = pb::StatementStatus {
                statement_id: id.to_string(),
                proposer: sender.to_string(),
                reference: reference.to_string(),
                proposed_at: Some(timestamp(at)),
                publish_after: Some(timestamp(*publish_after)),
                parties: recipients
                    .iter()
                    .map(|r| pb::StatementParty {
                        agency: r.to_string(),
                        state: PENDING.into(),
                        ..Default::default()
                    })
                    .collect(),
                transfer_id: transfer_id.to_owned(),
                statement_sha256: payload_digest.to_vec(),
                ..Default::default()
            };
            Ok(Ok(Applied {
                key,
                record: record.encode_to_vec(),
                timers: Vec::new(),
            }))
        }
        Step::CommsAnswer { statement, answer } => {
            let id = statement.to_string();
            let Some(bytes) = stored else {
                return Ok(Err(unknown("statement", &id)));
            };
            let mut s: pb::StatementStatus = decode(bytes, "decoding a statement")?;
            let proposer = s.proposer.clone();
            let Some(party) = s.parties.iter_mut().find(|p| p.agency == sender.as_str()) else {
                return Ok(Err(unknown("statement", &id)));
            };
            if recipient_set.len() != 1 || !recipient_set.contains(&proposer) {
                return Ok(Err(conflict(format!(
                    "an answer to statement {id} goes to its proposer {proposer} alone"
                ))));
            }
            match answer {
                CommsAnswer::Approve => {
                    party.state = APPROVED.into();
                    party.objection.clear();
                }
                CommsAnswer::Objection(reason) => {
                    party.state = OBJECTED.into();
                    party.objection.clone_from(reason);
                }
            }
            party.answered_at = Some(timestamp(at));
            Ok(Ok(Applied {
                key,
                record: s.encode_to_vec(),
                timers: Vec::new(),
            }))
        }
    }
}

/// The reminder (if it is still ahead) and the deadline timers of one consulted agency.
fn party_timers(
    key: &str,
    party: &str,
    due: OffsetDateTime,
    now: OffsetDateTime,
    reminder_before: Duration,
) -> Vec<Timer> {
    let mut timers = Vec::with_capacity(2);
    let remind_at = due - reminder_before;
    if reminder_before > Duration::ZERO && remind_at > now {
        timers.push(Timer {
            kind: TimerKind::Reminder as i32,
            key: key.to_owned(),
            party: party.to_owned(),
            due_nanos: nanos(due),
            at_nanos: nanos(remind_at),
        });
    }
    timers.push(Timer {
        kind: TimerKind::Deadline as i32,
        key: key.to_owned(),
        party: party.to_owned(),
        due_nanos: nanos(due),
        at_nanos: nanos(due),
    });
    timers
}

/// A consulted agency's state at `now`: awaiting becomes overdue once its deadline has passed,
/// whether or not its timer has fired yet.
fn party_state(p: &pb::ConsultationParty, now: OffsetDateTime) -> &str {
    if p.state == AWAITING && time_of(p.due.as_ref()).is_some_and(|d| d <= now) {
        OVERDUE
    } else {
        &p.state
    }
}

/// What a timer changed when it fired.
#[derive(Debug, Clone)]
pub struct Fired {
    /// The record's new bytes.
    pub record: Vec<u8>,
    /// Notices to queue, with their recipients.
    pub notices: Vec<(AgencyId, pb::Notice)>,
}

/// Fires `timer` against its record `stored` at `now`: `None` when it no longer applies.
pub fn fire(
    timer: &Timer,
    stored: Option<&[u8]>,
    now: OffsetDateTime,
) -> Result<Option<Fired>, Internal> {
    let Some(bytes) = stored else {
        return Ok(None);
    };
    let mut c: pb::ConsultationStatus = decode(bytes, "decoding a consultation")?;
    if c.closed_at.is_some() {
        return Ok(None);
    }
    let id = c.consultation_id.clone();
    let requester = c.requester.clone();
    let Some(party) = c.parties.iter_mut().find(|p| p.agency == timer.party) else {
        return Ok(None);
    };
    let due = time_of(party.due.as_ref());
    if party.state != AWAITING || due.map(nanos) != Some(timer.due_nanos) {
        return Ok(None);
    }
    let due = from_nanos(timer.due_nanos);
    let agency = |s: &str| {
        s.parse::<AgencyId>()
            .map_err(|e| Internal::new("firing a timer", e))
    };
    let notice = |kind: pb::NoticeKind, message: String| pb::Notice {
        notice_id: uuid::Uuid::new_v4().to_string(),
        kind: kind as i32,
        subject: id.clone(),
        agencies: vec![timer.party.clone()],
        due: Some(timestamp(due)),
        issued_at: Some(timestamp(now)),
        message,
    };
    let notices = if timer.kind == TimerKind::Reminder as i32 {
        // A reminder that fires only once its deadline has passed (the broker was down over
        // both) would remind of a date already gone: the deadline's own notices say it.
        if party.reminded || due <= now {
            return Ok(None);
        }
        party.reminded = true;
        vec![(
            agency(&timer.party)?,
            notice(
                pb::NoticeKind::DsarReminder,
                format!(
                    "Reminder: {requester} awaits your answer to subject-access consultation \
                     {id} by {}.",
                    rfc3339(due)
                ),
            ),
        )]
    } else if timer.kind == TimerKind::Deadline as i32 {
        party.state = OVERDUE.into();
        let message = format!(
            "The deadline {} for {}'s answer to subject-access consultation {id} has passed \
             without an answer; {requester} may now close it.",
            rfc3339(due),
            timer.party
        );
        vec![
            (
                agency(&requester)?,
                notice(pb::NoticeKind::DsarDeadlinePassed, message.clone()),
            ),
            (
                agency(&timer.party)?,
                notice(pb::NoticeKind::DsarDeadlinePassed, message),
            ),
        ]
    } else {
        return Ok(None);
    };
    Ok(Some(Fired {
        record: c.encode_to_vec(),
        notices,
    }))
}

/// What declaring involvement in an incident changes.
#[derive(Debug, Clone)]
pub struct Involved {
    /// The record's key and new bytes.
    pub key: String,
    /// The record, encoded.
    pub record: Vec<u8>,
    /// The audit entry.
    pub entry: pb::InvolvementDeclared,
    /// Coordination notices to queue.
    pub notices: Vec<(AgencyId, pb::Notice)>,
}

/// `agency` declares itself involved in `incident`, whose record is `stored`; the agencies
/// already involved that are among its `partners` (those it shares an agreement with) and it
/// are told about each other.
pub fn involve(
    agency: &AgencyId,
    incident: &WorkflowId,
    partners: &BTreeSet<AgencyId>,
    stored: Option<&[u8]>,
    now: OffsetDateTime,
) -> Result<Involved, Internal> {
    let key = incident_key(incident);
    let mut record = match stored {
        Some(bytes) => decode(bytes, "decoding an incident")?,
        None => IncidentRecord {
            incident_ref: incident.to_string(),
            involved: Vec::new(),
        },
    };
    let duplicate = record.involved.iter().any(|a| a == agency.as_str());
    let mut notified: Vec<AgencyId> = Vec::new();
    if !duplicate {
        for a in &record.involved {
            if let Ok(other) = a.parse::<AgencyId>()
                && partners.contains(&other)
            {
                notified.push(other);
            }
        }
        record.involved.push(agency.to_string());
    }
    let notice = |agencies: Vec<String>, message: String| pb::Notice {
        notice_id: uuid::Uuid::new_v4().to_string(),
        kind: pb::NoticeKind::IncidentCoordination as i32,
        subject: incident.to_string(),
        agencies,
        due: None,
        issued_at: Some(timestamp(now)),
        message,
    };
    let mut notices = Vec::new();
    if !notified.is_empty() {
        let names: Vec<String> = notified.iter().map(ToString::to_string).collect();
        for other in &notified {
            notices.push((
                other.clone(),
                notice(
                    vec![agency.to_string()],
                    format!(
                        "{agency} has declared that it is involved in incident {incident}, in \
                         which you are involved too: coordinate with {agency} to minimise \
                         disruption."
                    ),
                ),
            ));
        }
        notices.push((
            agency.clone(),
            notice(
                names.clone(),
                format!(
                    "{} {} also involved in incident {incident}: coordinate with {} to minimise \
                     disruption.",
                    names.join(", "),
                    if names.len() == 1 { "is" } else { "are" },
                    if names.len() == 1 { "it" } else { "them" },
                ),
            ),
        ));
    }
    Ok(Involved {
        key,
        entry: pb::InvolvementDeclared {
            agency: agency.to_string(),
            incident_ref: incident.to_string(),
            notified: notified.iter().map(ToString::to_string).collect(),
            involved: record.involved.clone(),
            duplicate,
        },
        record: record.encode_to_vec(),
        notices,
    })
}

/// A stored consultation as the Workflows service shows it at `now`.
pub fn consultation_view(
    bytes: &[u8],
    now: OffsetDateTime,
) -> Result<pb::ConsultationStatus, Internal> {
    let mut c: pb::ConsultationStatus = decode(bytes, "decoding a consultation")?;
    for p in &mut c.parties {
        p.state = party_state(p, now).into();
    }
    let states: Vec<&str> = c.parties.iter().map(|p| p.state.as_str()).collect();
    c.state = if c.closed_at.is_some() {
        "closed"
    } else if states.contains(&OVERDUE) {
        OVERDUE
    } else if states.contains(&AWAITING) {
        "open"
    } else {
        "answered"
    }
    .into();
    c.may_close = c.closed_at.is_none() && !states.contains(&AWAITING);
    Ok(c)
}

/// A stored statement as the Workflows service shows it at `now`.
pub fn statement_view(bytes: &[u8], now: OffsetDateTime) -> Result<pb::StatementStatus, Internal> {
    let mut s: pb::StatementStatus = decode(bytes, "decoding a statement")?;
    let states: Vec<&str> = s.parties.iter().map(|p| p.state.as_str()).collect();
    s.state = if states.contains(&OBJECTED) {
        OBJECTED
    } else if states.iter().all(|st| *st == APPROVED) {
        APPROVED
    } else {
        PENDING
    }
    .into();
    s.may_publish =
        s.state == APPROVED && time_of(s.publish_after.as_ref()).is_some_and(|t| t <= now);
    Ok(s)
}

/// Whether `agency` is a party to a consultation (requester or consulted).
pub fn consultation_party(c: &pb::ConsultationStatus, agency: &str) -> bool {
    c.requester == agency || c.parties.iter().any(|p| p.agency == agency)
}

/// Whether `agency` is a party to a statement (proposer or asked).
pub fn statement_party(s: &pb::StatementStatus, agency: &str) -> bool {
    s.proposer == agency || s.parties.iter().any(|p| p.agency == agency)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use concordat_proto::workflow::DsarOpen;

    use super::*;

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    fn cx() -> StepContext {
        StepContext {
            default_due: [(agency("ico"), t(1000))].into_iter().collect(),
            reminder_before: Duration::seconds(100),
        }
    }

    fn open() -> Step {
        Step::DsarOpen(DsarOpen {
            reference: "DSAR-1".parse().unwrap(),
            concerns: Vec::new(),
            organisation: None,
            respond_by: None,
        })
    }

    fn step(
        sender: &str,
        to: &[&str],
        s: &Step,
        stored: Option<&[u8]>,
        at: i64,
    ) -> Result<Applied, Refusal> {
        let to: Vec<AgencyId> = to.iter().map(|a| agency(a)).collect();
        let input = StepInput {
            sender: &agency(sender),
            recipients: &to,
            step: s,
            cx: &cx(),
            at: t(at),
            transfer_id: "t-1",
            payload_digest: &[0; 32],
        };
        apply_step(&input, stored).unwrap()
    }

    fn answer(a: DsarAnswer) -> Step {
        Step::DsarAnswer {
            consultation: "nca:DSAR-1".parse().unwrap(),
            answer: a,
        }
    }

    fn close() -> Step {
        Step::DsarClose {
            consultation: "nca:DSAR-1".parse().unwrap(),
        }
    }

    #[test]
    fn a_consultation_opens_is_answered_and_closes() {
        let opened = step("nca", &["ico"], &open(), None, 0).unwrap();
        assert_eq!(opened.key, "dsar/nca:DSAR-1");
        // A reminder 100 s before the agreement's deadline, and the deadline.
        let at: Vec<_> = opened.timers.iter().map(|x| x.at()).collect();
        assert_eq!(at, [t(900), t(1000)]);
        let view = consultation_view(&opened.record, t(1)).unwrap();
        assert_eq!((view.state.as_str(), view.may_close), ("open", false));
        // Opening it again, or closing it now, is refused.
        let again = step("nca", &["ico"], &open(), Some(&opened.record), 1).unwrap_err();
        assert_eq!(again.reason, Reason::WorkflowConflict);
        let early = step("nca", &["ico"], &close(), Some(&opened.record), 1).unwrap_err();
        assert_eq!(early.reason, Reason::ConsultationOpen);
        assert!(early.message.contains("ico"), "{}", early.message);
        // Only a consulted agency answers, and only to the requester.
        let stranger = step(
            "ncsc",
            &["nca"],
            &answer(DsarAnswer::NoObjection),
            Some(&opened.record),
            2,
        )
        .unwrap_err();
        assert_eq!(stranger.reason, Reason::WorkflowUnknown);
        let misaddressed = step(
            "ico",
            &["ncsc"],
            &answer(DsarAnswer::NoObjection),
            Some(&opened.record),
            2,
        )
        .unwrap_err();
        assert_eq!(misaddressed.reason, Reason::WorkflowConflict);
        let answered = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::Objection("Schedule 2 para 2".into())),
            Some(&opened.record),
            3,
        )
        .unwrap();
        let view = consultation_view(&answered.record, t(4)).unwrap();
        assert_eq!((view.state.as_str(), view.may_close), ("answered", true));
        assert_eq!(view.parties[0].objection, "Schedule 2 para 2");
        // The consulted agency cannot close it; the requester closes it to its parties only.
        let by_ico = step("ico", &["nca"], &close(), Some(&answered.record), 5).unwrap_err();
        assert_eq!(by_ico.reason, Reason::WorkflowConflict);
        let wrong = step("nca", &["ncsc"], &close(), Some(&answered.record), 5).unwrap_err();
        assert_eq!(wrong.reason, Reason::WorkflowConflict);
        let closed = step("nca", &["ico"], &close(), Some(&answered.record), 5).unwrap();
        assert_eq!(
            consultation_view(&closed.record, t(6)).unwrap().state,
            "closed"
        );
        let late = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NoObjection),
            Some(&closed.record),
            7,
        )
        .unwrap_err();
        assert_eq!(late.reason, Reason::WorkflowConflict);
    }

    #[test]
    fn deadlines_remind_expire_and_move() {
        let opened = step("nca", &["ico"], &open(), None, 0).unwrap();
        let [reminder, deadline] = &opened.timers[..] else {
            panic!("two timers");
        };
        let fired = fire(reminder, Some(&opened.record), t(900))
            .unwrap()
            .unwrap();
        assert_eq!(fired.notices.len(), 1);
        assert_eq!(fired.notices[0].0, agency("ico"));
        assert_eq!(fired.notices[0].1.kind, pb::NoticeKind::DsarReminder as i32);
        // Fired twice (a restart between commit and removal): nothing more.
        assert!(
            fire(reminder, Some(&fired.record), t(901))
                .unwrap()
                .is_none()
        );
        // More time: the old deadline does nothing, the new one fires.
        let more = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NeedMoreTime(t(2000))),
            Some(&fired.record),
            950,
        )
        .unwrap();
        assert_eq!(more.timers.len(), 2);
        assert!(
            fire(deadline, Some(&more.record), t(1000))
                .unwrap()
                .is_none()
        );
        let late = fire(&more.timers[1], Some(&more.record), t(2000))
            .unwrap()
            .unwrap();
        let to: Vec<_> = late.notices.iter().map(|(a, _)| a.to_string()).collect();
        assert_eq!(to, ["nca", "ico"]);
        let view = consultation_view(&late.record, t(2001)).unwrap();
        assert_eq!((view.state.as_str(), view.may_close), ("overdue", true));
        // A deadline years ahead is refused.
        let far = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NeedMoreTime(t(400 * 86_400))),
            Some(&more.record),
            960,
        )
        .unwrap_err();
        assert_eq!(far.reason, Reason::WorkflowConflict);
        // Nor can repeated requests carry it past a year after the opening.
        let year = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NeedMoreTime(t(360 * 86_400))),
            Some(&more.record),
            970,
        )
        .unwrap();
        let beyond = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NeedMoreTime(t(367 * 86_400))),
            Some(&year.record),
            300 * 86_400,
        )
        .unwrap_err();
        assert_eq!(beyond.reason, Reason::WorkflowConflict);
        assert!(
            beyond
                .message
                .contains("days after the consultation opened")
        );
        // Less time than before is refused.
        let less = step(
            "ico",
            &["nca"],
            &answer(DsarAnswer::NeedMoreTime(t(1500))),
            Some(&more.record),
            960,
        )
        .unwrap_err();
        assert_eq!(less.reason, Reason::WorkflowConflict);
        // A deadline past while its timer has not fired yet counts as passed.
        let view = consultation_view(&opened.record, t(1001)).unwrap();
        assert_eq!(view.state, "overdue");
        step("nca", &["ico"], &close(), Some(&opened.record), 1001).unwrap();
    }

    #[test]
    fn a_reminder_that_fires_after_its_deadline_says_nothing() {
        // The broker was down from before the reminder until after the deadline: at restart
        // both fire, and only the deadline's notices are sent, not a reminder of a past date.
        let opened = step("nca", &["ico"], &open(), None, 0).unwrap();
        let [reminder, deadline] = &opened.timers[..] else {
            panic!("two timers");
        };
        assert!(
            fire(reminder, Some(&opened.record), t(1000))
                .unwrap()
                .is_none()
        );
        let late = fire(deadline, Some(&opened.record), t(1000))
            .unwrap()
            .unwrap();
        let kinds: Vec<_> = late.notices.iter().map(|(_, n)| n.kind).collect();
        assert_eq!(kinds, [pb::NoticeKind::DsarDeadlinePassed as i32; 2]);
        // Late but before the deadline, it still reminds.
        let fired = fire(reminder, Some(&opened.record), t(999))
            .unwrap()
            .unwrap();
        assert_eq!(fired.notices[0].1.kind, pb::NoticeKind::DsarReminder as i32);
    }

    #[test]
    fn a_statement_may_be_published_once_every_party_approved_and_its_time_came() {
        let propose = Step::CommsPropose {
            reference: "press-1".parse().unwrap(),
            publish_after: t(100),
        };
        let p = step("ico", &["ncsc", "nca"], &propose, None, 0).unwrap();
        let answer = |a| Step::CommsAnswer {
            statement: "ico:press-1".parse().unwrap(),
            answer: a,
        };
        let a = step(
            "ncsc",
            &["ico"],
            &answer(CommsAnswer::Approve),
            Some(&p.record),
            1,
        )
        .unwrap();
        assert_eq!(statement_view(&a.record, t(200)).unwrap().state, "pending");
        let b = step(
            "nca",
            &["ico"],
            &answer(CommsAnswer::Objection("not yet".into())),
            Some(&a.record),
            2,
        )
        .unwrap();
        let v = statement_view(&b.record, t(200)).unwrap();
        assert_eq!((v.state.as_str(), v.may_publish), ("objected", false));
        let c = step(
            "nca",
            &["ico"],
            &answer(CommsAnswer::Approve),
            Some(&b.record),
            3,
        )
        .unwrap();
        assert!(!statement_view(&c.record, t(99)).unwrap().may_publish);
        assert!(statement_view(&c.record, t(100)).unwrap().may_publish);
        let stranger = step(
            "ico",
            &["ico"],
            &answer(CommsAnswer::Approve),
            Some(&c.record),
            4,
        );
        assert_eq!(stranger.unwrap_err().reason, Reason::WorkflowUnknown);
    }

    #[test]
    fn involvement_tells_the_partners_about_each_other() {
        let inc: WorkflowId = "ico:INC-1".parse().unwrap();
        let partners = |list: &[&str]| list.iter().map(|a| agency(a)).collect::<BTreeSet<_>>();
        let first = involve(&agency("ico"), &inc, &partners(&["nca"]), None, t(0)).unwrap();
        assert!(first.notices.is_empty());
        let second = involve(
            &agency("nca"),
            &inc,
            &partners(&["ico"]),
            Some(&first.record),
            t(1),
        )
        .unwrap();
        assert_eq!(second.entry.notified, ["ico"]);
        let to: Vec<_> = second
            .notices
            .iter()
            .map(|(a, n)| (a.to_string(), n.agencies.clone()))
            .collect();
        assert_eq!(
            to,
            [
                ("ico".into(), vec!["nca".into()]),
                ("nca".into(), vec!["ico".into()])
            ]
        );
        // No agreement with the others: recorded, nobody told.
        let third = involve(
            &agency("ncsc"),
            &inc,
            &partners(&[]),
            Some(&second.record),
            t(2),
        )
        .unwrap();
        assert!(third.notices.is_empty());
        assert_eq!(third.entry.involved, ["ico", "nca", "ncsc"]);
        let again = involve(
            &agency("nca"),
            &inc,
            &partners(&["ico"]),
            Some(&third.record),
            t(3),
        )
        .unwrap();
        assert!(again.entry.duplicate && again.notices.is_empty());
    }
}
