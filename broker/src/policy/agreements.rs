//! Step 1 of the decision: the agreements (memoranda of understanding) between agencies as
//! code, and the search for the flow that permits a transfer to one recipient.

use std::collections::BTreeSet;

use concordat_proto::{envelope::Kind, ids::AgencyId};
use time::Date;

use super::{Authority, Context, legal::LegalBases, refuse};
use crate::refusal::{Failure, Reason};

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
    /// The legal bases on which it may carry organisation- or incident-specific content
    /// (`legal_bases`; default consent alone). See `super::legal`.
    pub legal_bases: LegalBases,
}

/// The agreement found for one recipient, and whether its flow allows opaque payloads.
pub(super) struct FoundFlow {
    pub(super) authority: Authority,
    pub(super) opaque: bool,
    pub(super) legal_bases: LegalBases,
}

/// Finds the agreement that permits `sender` → `recipient` for `kind`, preferring one whose
/// review is not overdue.
pub(super) fn authority(
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
            legal_bases: flow.legal_bases.clone(),
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
