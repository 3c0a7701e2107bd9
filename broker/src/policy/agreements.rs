//! Step 1 of the decision: the agreements (memoranda of understanding) between agencies as
//! code, and the search for the flow that permits a transfer to one recipient.
//!
//! Each MoU is reviewed every two years. An agreement's review date ([`Agreement::review_by`])
//! is, in order of precedence: an explicit `review_by`; two years after its last completed
//! review (`reviewed`); two years after it was signed ([`review_due`]). Against it, a decision
//! finds the agreement at one [`ReviewStage`]: current; due (within the warning window before
//! the date); overdue (past it, within the grace period); lapsed (past the grace period). The
//! flow search prefers the agreement at the earliest stage; a lapsed one is refused with
//! `AGREEMENT_REVIEW_OVERDUE` when reviews are enforced, and every other stage but current is
//! a warning the decision carries (`crate::reviews`).

use std::collections::BTreeSet;

use concordat_proto::{
    envelope::{Envelope, Kind, Tlp},
    ids::AgencyId,
};
use time::Date;

use super::{Authority, Context, legal::LegalBases, refuse};
use crate::refusal::{Citation, Failure, Reason};

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
    /// When it must next be reviewed ([`review_due`]).
    pub review_by: Date,
    /// Where `review_by` comes from, and the warning window and grace period around it.
    pub review: ReviewTerms,
    /// The flows it permits.
    pub flows: Vec<Flow>,
}

/// How often an agreement is reviewed: every two years.
pub const REVIEW_INTERVAL_YEARS: i32 = 2;
/// The default warning window before `review_by`, in days (`review_warning_days`).
pub const DEFAULT_REVIEW_WARNING_DAYS: u16 = 90;
/// The default grace period after `review_by`, in days (`review_grace_days`).
pub const DEFAULT_REVIEW_GRACE_DAYS: u16 = 90;

/// Where an agreement's review date comes from, and the days around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReviewTerms {
    /// What `review_by` was derived from.
    pub basis: ReviewBasis,
    /// From this many days before `review_by`, decisions under the agreement carry a warning.
    pub warning_days: u16,
    /// For this many days after `review_by`, its flows still run (with a warning); after
    /// them they are refused when reviews are enforced.
    pub grace_days: u16,
}

impl Default for ReviewTerms {
    fn default() -> Self {
        ReviewTerms {
            basis: ReviewBasis::Signed,
            warning_days: DEFAULT_REVIEW_WARNING_DAYS,
            grace_days: DEFAULT_REVIEW_GRACE_DAYS,
        }
    }
}

/// What an agreement's review date was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewBasis {
    /// Two years after it was signed (no review recorded).
    Signed,
    /// Two years after its last completed review, this day (`reviewed`).
    Reviewed(Date),
    /// Written in the configuration (`review_by`), which wins over the other two.
    Explicit,
}

impl std::fmt::Display for ReviewBasis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReviewBasis::Signed => write!(f, "two years after signing"),
            ReviewBasis::Reviewed(d) => write!(f, "two years after the review of {d}"),
            ReviewBasis::Explicit => write!(f, "review_by as configured"),
        }
    }
}

/// Where an agreement stands against its review date on one day. Ordered from the best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReviewStage {
    /// More than the warning window before `review_by`.
    Current,
    /// Within the warning window, up to and including `review_by`.
    Due,
    /// Past `review_by`, up to and including the last day of the grace period.
    Overdue,
    /// Past the grace period.
    Lapsed,
}

impl ReviewStage {
    /// The stages that make a decision carry a warning, as metric labels.
    pub const WARNED: [ReviewStage; 3] =
        [ReviewStage::Due, ReviewStage::Overdue, ReviewStage::Lapsed];

    /// Its name, as metrics, logs and the status report give it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewStage::Current => "current",
            ReviewStage::Due => "due",
            ReviewStage::Overdue => "overdue",
            ReviewStage::Lapsed => "lapsed",
        }
    }
}

impl std::fmt::Display for ReviewStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `date` moved `years` on; 29 February becomes 28 February in a year without it.
pub fn years_later(date: Date, years: i32) -> Date {
    let year = date.year() + years;
    Date::from_calendar_date(year, date.month(), date.day())
        .or_else(|_| Date::from_calendar_date(year, date.month(), 28))
        .unwrap_or(date)
}

/// An agreement's review date: `explicit` if given, else two years after `reviewed`, else two
/// years after `signed`; with what it came from.
pub fn review_due(
    signed: Date,
    reviewed: Option<Date>,
    explicit: Option<Date>,
) -> (Date, ReviewBasis) {
    match (explicit, reviewed) {
        (Some(d), _) => (d, ReviewBasis::Explicit),
        (None, Some(r)) => (
            years_later(r, REVIEW_INTERVAL_YEARS),
            ReviewBasis::Reviewed(r),
        ),
        (None, None) => (
            years_later(signed, REVIEW_INTERVAL_YEARS),
            ReviewBasis::Signed,
        ),
    }
}

impl Agreement {
    /// Whether the agreement is in force on `today`.
    pub fn in_force(&self, today: Date) -> bool {
        self.signed <= today
    }

    /// Whether its review is overdue on `today` (past `review_by`: overdue or lapsed).
    pub fn review_overdue(&self, today: Date) -> bool {
        self.review_by < today
    }

    /// The first day on which decisions under it carry a warning.
    pub fn warning_from(&self) -> Date {
        self.review_by
            .checked_sub(time::Duration::days(i64::from(self.review.warning_days)))
            .unwrap_or(Date::MIN)
    }

    /// The last day of the grace period after `review_by`.
    pub fn grace_end(&self) -> Date {
        self.review_by
            .checked_add(time::Duration::days(i64::from(self.review.grace_days)))
            .unwrap_or(Date::MAX)
    }

    /// Where it stands on `today`.
    pub fn review_stage(&self, today: Date) -> ReviewStage {
        if today < self.warning_from() {
            ReviewStage::Current
        } else if today <= self.review_by {
            ReviewStage::Due
        } else if today <= self.grace_end() {
            ReviewStage::Overdue
        } else {
            ReviewStage::Lapsed
        }
    }

    /// The warning a decision under it carries on `today`, one sentence; none while current.
    /// `enforced`: whether a lapsed agreement's flows are refused (`enforce_review`).
    pub fn review_warning(&self, today: Date, enforced: bool) -> Option<String> {
        let (id, by, grace_end) = (&self.id, self.review_by, self.grace_end());
        match self.review_stage(today) {
            ReviewStage::Current => None,
            ReviewStage::Due => Some(format!(
                "agreement {id} is due for review by {by}: record the review \
                 (concordat agreement reviewed) before then"
            )),
            ReviewStage::Overdue => Some(format!(
                "agreement {id} was due for review by {by} and is overdue: its grace period \
                 ends {grace_end}{}",
                if enforced {
                    ", after which its flows are refused"
                } else {
                    ""
                }
            )),
            ReviewStage::Lapsed => Some(format!(
                "agreement {id} was due for review by {by} and its grace period ended \
                 {grace_end}{}",
                if enforced {
                    ": its flows are refused"
                } else {
                    "; reviews are not enforced here (enforce_review = false), so its flows \
                     continue"
                }
            )),
        }
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
    /// The most restrictive TLP marking the flow may carry (`max_tlp`; none: any).
    pub max_tlp: Option<Tlp>,
    /// The legal bases on which it may carry organisation- or incident-specific content
    /// (`legal_bases`; default consent alone). See `super::legal`.
    pub legal_bases: LegalBases,
    /// A sentence appended to every consent refusal on this flow (`consent_refusal_note`):
    /// e.g. that the NCA does not notify the ICO on an organisation's behalf.
    pub consent_refusal_note: Option<String>,
}

/// The flows a transfer takes, one per recipient.
pub(super) struct Flows {
    /// For each recipient, in the envelope's order, the agreement relied on.
    pub(super) authorities: Vec<Authority>,
    /// Whether every flow allows opaque payloads (and there is at least one).
    pub(super) every_flow_opaque: bool,
    /// For each recipient, the TLP limit of its flow.
    pub(super) tlp_limits: Vec<super::tlp::FlowLimit>,
    /// For each recipient, the legal bases of its flow.
    pub(super) legal_bases: Vec<LegalBases>,
    /// The flows' notes for consent refusals, each once, in the recipients' order.
    pub(super) consent_notes: Vec<String>,
}

/// Finds, for every recipient of `envelope`, that it is an agency of the federation and the
/// agreement in force that permits the flow.
pub(super) fn find(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
) -> Result<Flows, Failure> {
    let mut flows = Flows {
        authorities: Vec::with_capacity(envelope.recipients.len()),
        every_flow_opaque: !envelope.recipients.is_empty(),
        tlp_limits: Vec::with_capacity(envelope.recipients.len()),
        legal_bases: Vec::with_capacity(envelope.recipients.len()),
        consent_notes: Vec::new(),
    };
    for recipient in &envelope.recipients {
        if !cx.policy.agencies.contains(recipient) {
            return Err(refuse(
                Reason::UnknownRecipient,
                format!("{recipient} is not an agency of this federation"),
            ));
        }
        let found = authority(cx, sender, recipient, envelope.kind)?;
        flows.every_flow_opaque &= found.opaque;
        flows.tlp_limits.push(super::tlp::FlowLimit {
            recipient: recipient.clone(),
            agreement_id: found.authority.agreement_id.clone(),
            clause: found.authority.clause.clone(),
            max_tlp: found.max_tlp,
        });
        flows.legal_bases.push(found.legal_bases);
        if let Some(note) = found.consent_refusal_note
            && !flows.consent_notes.contains(&note)
        {
            flows.consent_notes.push(note);
        }
        flows.authorities.push(found.authority);
    }
    Ok(flows)
}

/// The agreement found for one recipient, and whether its flow allows opaque payloads.
pub(super) struct FoundFlow {
    pub(super) authority: Authority,
    pub(super) opaque: bool,
    pub(super) max_tlp: Option<Tlp>,
    pub(super) legal_bases: LegalBases,
    pub(super) consent_refusal_note: Option<String>,
}

/// Finds the agreement that permits `sender` → `recipient` for `kind`, preferring the one at
/// the earliest review stage (the first in the configuration among equals).
pub(super) fn authority(
    cx: &Context<'_>,
    sender: &AgencyId,
    recipient: &AgencyId,
    kind: Kind,
) -> Result<FoundFlow, Failure> {
    let today = cx.now.date();
    let mut best: Option<FoundFlow> = None;
    for agreement in cx.policy.agreements.iter().filter(|a| a.in_force(today)) {
        let Some(flow) = agreement
            .flows
            .iter()
            .find(|f| &f.from == sender && &f.to == recipient && f.kinds.contains(&kind))
        else {
            continue;
        };
        let stage = agreement.review_stage(today);
        if best.as_ref().is_some_and(|b| b.authority.review <= stage) {
            continue;
        }
        best = Some(FoundFlow {
            authority: Authority {
                recipient: recipient.clone(),
                agreement_id: agreement.id.clone(),
                clause: flow.clause.clone(),
                review: stage,
            },
            opaque: flow.opaque,
            max_tlp: flow.max_tlp,
            legal_bases: flow.legal_bases.clone(),
            consent_refusal_note: flow.consent_refusal_note.clone(),
        });
        if stage == ReviewStage::Current {
            break;
        }
    }
    match best {
        Some(found)
            if found.authority.review == ReviewStage::Lapsed && cx.policy.enforce_review =>
        {
            let agreement = cx
                .policy
                .agreements
                .iter()
                .find(|a| a.id == found.authority.agreement_id);
            let (by, grace_end) = agreement.map_or((String::new(), String::new()), |a| {
                (a.review_by.to_string(), a.grace_end().to_string())
            });
            Err(refuse(
                Reason::AgreementReviewOverdue,
                format!(
                    "agreement {} would permit {kind} from {sender} to {recipient}, but its \
                     review was due by {by} and its grace period ended {grace_end}: its flows \
                     are refused until the review is recorded (reviews are enforced)",
                    found.authority.agreement_id
                ),
            )
            .cited(|| {
                Citation::Clauses(vec![(
                    found.authority.agreement_id.clone(),
                    found.authority.clause.clone(),
                )])
            }))
        }
        // Any other stage: the decision goes on, and `crate::reviews` turns the stage into a
        // warning, a count and a (rate-limited) log line.
        Some(found) => Ok(found),
        None => Err(refuse(
            Reason::NoAgreement,
            format!("no agreement in force permits {kind} from {sender} to {recipient}"),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use time::macros::date;

    use super::*;

    /// Each row: signed, reviewed, explicit review_by, and the review date and basis.
    #[test]
    fn the_review_date_comes_from_review_by_then_reviewed_then_signed() {
        /// (signed, reviewed, review_by, the review date, its basis)
        type Row = (Date, Option<Date>, Option<Date>, Date, ReviewBasis);
        let rows: &[Row] = &[
            (
                date!(2023 - 09 - 12),
                None,
                None,
                date!(2025 - 09 - 12),
                ReviewBasis::Signed,
            ),
            // 29 February has no day two years on: 28 February.
            (
                date!(2024 - 02 - 29),
                None,
                None,
                date!(2026 - 02 - 28),
                ReviewBasis::Signed,
            ),
            // Four years on it has.
            (
                date!(2020 - 01 - 01),
                Some(date!(2024 - 02 - 29)),
                None,
                date!(2026 - 02 - 28),
                ReviewBasis::Reviewed(date!(2024 - 02 - 29)),
            ),
            (
                date!(2024 - 09 - 10),
                Some(date!(2026 - 12 - 01)),
                None,
                date!(2028 - 12 - 01),
                ReviewBasis::Reviewed(date!(2026 - 12 - 01)),
            ),
            // An explicit review_by wins over both.
            (
                date!(2024 - 09 - 10),
                Some(date!(2026 - 12 - 01)),
                Some(date!(2027 - 03 - 31)),
                date!(2027 - 03 - 31),
                ReviewBasis::Explicit,
            ),
            (
                date!(2024 - 09 - 10),
                None,
                Some(date!(2024 - 09 - 10)),
                date!(2024 - 09 - 10),
                ReviewBasis::Explicit,
            ),
        ];
        for (signed, reviewed, explicit, want, basis) in rows {
            assert_eq!(
                review_due(*signed, *reviewed, *explicit),
                (*want, *basis),
                "signed {signed}, reviewed {reviewed:?}, review_by {explicit:?}"
            );
        }
        assert_eq!(years_later(date!(2028 - 02 - 29), 4), date!(2032 - 02 - 29));
    }

    fn agreement(review_by: Date, warning_days: u16, grace_days: u16) -> Agreement {
        Agreement {
            id: "mou".into(),
            title: "t".into(),
            parties: BTreeSet::new(),
            signed: date!(2020 - 01 - 01),
            review_by,
            review: ReviewTerms {
                basis: ReviewBasis::Explicit,
                warning_days,
                grace_days,
            },
            flows: Vec::new(),
        }
    }

    /// Each row: a day and the stage an agreement due for review by 2026-09-10 (90 days'
    /// warning, 90 days' grace) is at; then other windows, including none.
    #[test]
    fn each_stage_boundary() {
        let a = agreement(date!(2026 - 09 - 10), 90, 90);
        assert_eq!(a.warning_from(), date!(2026 - 06 - 12));
        assert_eq!(a.grace_end(), date!(2026 - 12 - 09));
        let rows = [
            (date!(2024 - 09 - 10), ReviewStage::Current),
            (date!(2026 - 06 - 11), ReviewStage::Current),
            (date!(2026 - 06 - 12), ReviewStage::Due),
            (date!(2026 - 09 - 10), ReviewStage::Due),
            (date!(2026 - 09 - 11), ReviewStage::Overdue),
            (date!(2026 - 12 - 09), ReviewStage::Overdue),
            (date!(2026 - 12 - 10), ReviewStage::Lapsed),
            (date!(2030 - 01 - 01), ReviewStage::Lapsed),
        ];
        for (day, want) in rows {
            assert_eq!(a.review_stage(day), want, "{day}");
            assert_eq!(a.review_overdue(day), want >= ReviewStage::Overdue, "{day}");
            assert_eq!(
                a.review_warning(day, true).is_some(),
                want != ReviewStage::Current,
                "{day}"
            );
        }
        // No warning window and no grace: due on the day only, lapsed the day after.
        let strict = agreement(date!(2026 - 09 - 10), 0, 0);
        for (day, want) in [
            (date!(2026 - 09 - 09), ReviewStage::Current),
            (date!(2026 - 09 - 10), ReviewStage::Due),
            (date!(2026 - 09 - 11), ReviewStage::Lapsed),
        ] {
            assert_eq!(strict.review_stage(day), want, "{day}");
        }
    }

    /// The sentences name the agreement, the review date and the grace end, and say what
    /// happens at each stage with enforcement on and off.
    #[test]
    fn warnings_name_the_dates_and_what_follows() {
        let a = agreement(date!(2026 - 09 - 10), 90, 90);
        let rows: &[(Date, bool, &[&str])] = &[
            (
                date!(2026 - 07 - 01),
                true,
                &["agreement mou is due for review by 2026-09-10"],
            ),
            (
                date!(2026 - 10 - 01),
                true,
                &[
                    "overdue",
                    "grace period ends 2026-12-09",
                    "after which its flows are refused",
                ],
            ),
            (
                date!(2026 - 10 - 01),
                false,
                &["grace period ends 2026-12-09"],
            ),
            (
                date!(2027 - 01 - 01),
                false,
                &["grace period ended 2026-12-09", "enforce_review = false"],
            ),
            (date!(2027 - 01 - 01), true, &["its flows are refused"]),
        ];
        for (day, enforced, parts) in rows {
            let w = a.review_warning(*day, *enforced).unwrap();
            for part in *parts {
                assert!(w.contains(part), "{day} {enforced}: {part:?} not in {w:?}");
            }
            if !enforced {
                assert!(!w.contains("refused"), "{w}");
            }
        }
    }
}
