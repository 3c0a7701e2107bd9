//! Step 2 of the decision: the payload is what its content type says, the broker can read
//! it (or the flow allows it not to), and an incident record agrees with its envelope.

use concordat_proto::envelope::{Envelope, Kind};

use super::refuse;
use crate::{
    content::{Content, ContentKind, Granularity},
    refusal::{Failure, Reason},
};

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
pub(super) fn check_content(
    envelope: &Envelope,
    every_flow_opaque: bool,
) -> Result<Content<'_>, Failure> {
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
                         opaque payloads (opaque = true); send JSON, text, a STIX 2.1 bundle or an \
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
        Content::Stix(_) | Content::Json(_) | Content::Text(_) => {}
    }
    Ok(content)
}
