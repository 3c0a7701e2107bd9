//! Step 1 of the decision: the agreements (memoranda of understanding) between agencies as
//! code, and the search for the flow that permits a transfer to one recipient.

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
    /// The most restrictive TLP marking the flow may carry (`max_tlp`; none: any).
    pub max_tlp: Option<Tlp>,
    /// The legal bases on which it may carry organisation- or incident-specific content
    /// (`legal_bases`; default consent alone). See `super::legal`.
    pub legal_bases: LegalBases,
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
            max_tlp: flow.max_tlp,
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
        )
        .cited(|| {
            Citation::Clauses(vec![(
                found.authority.agreement_id.clone(),
                found.authority.clause.clone(),
            )])
        })),
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
