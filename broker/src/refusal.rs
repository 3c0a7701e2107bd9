//! Refusals and errors as the client sees them: the one mapping from the broker's outcomes to
//! `tonic::Status`.
//!
//! A refusal carries a stable machine-readable [`Reason`] (sent as a `google.rpc.ErrorInfo` detail
//! with domain [`ERROR_DOMAIN`]) and a clear human message. Internal errors tell the client
//! nothing more than "internal error": the cause is logged here, once.

use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `google.rpc.ErrorInfo` domain of every Concordat refusal.
pub const ERROR_DOMAIN: &str = "concordat";

/// Stable reason codes. Their string forms are part of the protocol and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The request is malformed (a field has the wrong shape).
    Malformed,
    /// The client presented no usable certificate identity.
    Unauthenticated,
    /// The certificate's Common Name names no agency or auditor of the federation.
    UnknownAgency,
    /// The caller is not allowed to use this service (e.g. `Audit.Export` without being an auditor).
    NotAuthorised,
    /// A recipient is not an agency of the federation.
    UnknownRecipient,
    /// No agreement in force permits this flow.
    NoAgreement,
    /// The only agreement that would permit the flow is past its review date and reviews are enforced.
    AgreementReviewOverdue,
    /// The payload is larger than the broker accepts.
    PayloadTooLarge,
    /// The payload is not what its content type says: a STIX bundle or incident record that
    /// breaks its schema, JSON that does not parse, or an unknown version of a known type.
    InvalidContent,
    /// The payload is opaque (the broker cannot read it) and the flow does not allow opaque
    /// payloads, or it is sent as an anonymised or aggregate incident record.
    UninspectableContent,
    /// The payload names a registered organisation for which the envelope carries no consent
    /// token.
    OrganisationIdentified,
    /// A STIX bundle's most restrictive TLP marking is not the envelope's `tlp`.
    TlpMismatch,
    /// The transfer's TLP marking is above what a flow permits (`max_tlp`), or it is TLP:RED
    /// and names more than one recipient.
    TlpNotPermitted,
    /// The payload carries a STIX object the broker delivered to the sender under
    /// TLP:AMBER+STRICT or TLP:RED, to an agency it did not come from.
    TlpOnwardForbidden,
    /// Incident- or organisation-specific content on a flow whose only applicable legal basis
    /// is national significance, without a designation.
    NationalSignificanceRequired,
    /// The flow accepts no legal basis for incident- or organisation-specific content.
    NoLegalBasis,
    /// The national-significance designation does not verify (signatures, officers, the
    /// two-person rule) or does not cover this transfer (agency, incident, flow).
    DesignationInvalid,
    /// The national-significance designation has expired.
    DesignationExpired,
    /// An organisation-specific envelope carries no consent token.
    ConsentMissing,
    /// The consent token is longer than any valid token.
    ConsentTooLong,
    /// The consent token is not PASETO v4.public.
    ConsentUnsupportedVersion,
    /// The consent token cannot be parsed.
    ConsentMalformed,
    /// The consent token's signature does not verify.
    ConsentBadSignature,
    /// The consent token was signed by a key the broker does not trust.
    ConsentUnknownIssuer,
    /// The issuer is trusted, but not for this sender or organisation.
    ConsentIssuerNotAllowed,
    /// The consent token has expired.
    ConsentExpired,
    /// The consent token is not valid yet.
    ConsentNotYetValid,
    /// The consent token's claims are inconsistent.
    ConsentInvalidClaims,
    /// The token is for another organisation.
    ConsentWrongOrganisation,
    /// The token authorises another sender.
    ConsentWrongSender,
    /// The token does not cover every recipient.
    ConsentWrongRecipient,
    /// The token does not cover this kind of message.
    ConsentWrongKind,
    /// The token is bound to other incidents.
    ConsentWrongIncident,
    /// The token is bound to another payload.
    ConsentPayloadMismatch,
    /// The token has been revoked.
    ConsentRevoked,
    /// The token's uses are used up.
    ConsentUsedUp,
    /// A revocation statement does not verify.
    RevocationInvalid,
    /// A recipient's queue is full.
    RecipientQueueFull,
    /// The same message id was already used for a different envelope.
    MessageIdReused,
    /// The agency already holds as many subscriptions as the broker allows.
    TooManySubscriptions,
    /// Another broker node sharing the database serves the agency's deliveries (its
    /// subscriptions there are open): subscribe there, or once they have ended.
    DeliveriesOnAnotherNode,
    /// The broker's storage is failing or stalled; nothing was written. Try again later.
    StorageUnavailable,
    /// The broker's disk is nearly full: it takes no new transfers until space is freed.
    StorageFull,
    /// A consultation cannot be closed yet: a consulted agency has neither answered nor let its
    /// deadline pass.
    ConsultationOpen,
    /// The workflow step names a consultation or statement that does not exist, or that the
    /// caller is not a party to.
    WorkflowUnknown,
    /// The workflow step does not fit the workflow's state or parties (already open, closed,
    /// wrong recipients, not the caller's to take).
    WorkflowConflict,
}

impl Reason {
    /// Every reason, in declaration order (for metrics that exist from the start at zero).
    pub const ALL: &'static [Reason] = &[
        Reason::Malformed,
        Reason::Unauthenticated,
        Reason::UnknownAgency,
        Reason::NotAuthorised,
        Reason::UnknownRecipient,
        Reason::NoAgreement,
        Reason::AgreementReviewOverdue,
        Reason::PayloadTooLarge,
        Reason::InvalidContent,
        Reason::UninspectableContent,
        Reason::OrganisationIdentified,
        Reason::TlpMismatch,
        Reason::TlpNotPermitted,
        Reason::TlpOnwardForbidden,
        Reason::NationalSignificanceRequired,
        Reason::NoLegalBasis,
        Reason::DesignationInvalid,
        Reason::DesignationExpired,
        Reason::ConsentMissing,
        Reason::ConsentTooLong,
        Reason::ConsentUnsupportedVersion,
        Reason::ConsentMalformed,
        Reason::ConsentBadSignature,
        Reason::ConsentUnknownIssuer,
        Reason::ConsentIssuerNotAllowed,
        Reason::ConsentExpired,
        Reason::ConsentNotYetValid,
        Reason::ConsentInvalidClaims,
        Reason::ConsentWrongOrganisation,
        Reason::ConsentWrongSender,
        Reason::ConsentWrongRecipient,
        Reason::ConsentWrongKind,
        Reason::ConsentWrongIncident,
        Reason::ConsentPayloadMismatch,
        Reason::ConsentRevoked,
        Reason::ConsentUsedUp,
        Reason::RevocationInvalid,
        Reason::RecipientQueueFull,
        Reason::MessageIdReused,
        Reason::TooManySubscriptions,
        Reason::DeliveriesOnAnotherNode,
        Reason::StorageUnavailable,
        Reason::StorageFull,
        Reason::ConsultationOpen,
        Reason::WorkflowUnknown,
        Reason::WorkflowConflict,
    ];
    /// The stable code, as sent in `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "MALFORMED",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::UnknownAgency => "UNKNOWN_AGENCY",
            Reason::NotAuthorised => "NOT_AUTHORISED",
            Reason::UnknownRecipient => "UNKNOWN_RECIPIENT",
            Reason::NoAgreement => "NO_AGREEMENT",
            Reason::AgreementReviewOverdue => "AGREEMENT_REVIEW_OVERDUE",
            Reason::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Reason::InvalidContent => "INVALID_CONTENT",
            Reason::UninspectableContent => "UNINSPECTABLE_CONTENT",
            Reason::OrganisationIdentified => "ORGANISATION_IDENTIFIED",
            Reason::TlpMismatch => "TLP_MISMATCH",
            Reason::TlpNotPermitted => "TLP_NOT_PERMITTED",
            Reason::TlpOnwardForbidden => "TLP_ONWARD_FORBIDDEN",
            Reason::NationalSignificanceRequired => "NATIONAL_SIGNIFICANCE_REQUIRED",
            Reason::NoLegalBasis => "NO_LEGAL_BASIS",
            Reason::DesignationInvalid => "DESIGNATION_INVALID",
            Reason::DesignationExpired => "DESIGNATION_EXPIRED",
            Reason::ConsentMissing => "CONSENT_MISSING",
            Reason::ConsentTooLong => "CONSENT_TOO_LONG",
            Reason::ConsentUnsupportedVersion => "CONSENT_UNSUPPORTED_VERSION",
            Reason::ConsentMalformed => "CONSENT_MALFORMED",
            Reason::ConsentBadSignature => "CONSENT_BAD_SIGNATURE",
            Reason::ConsentUnknownIssuer => "CONSENT_UNKNOWN_ISSUER",
            Reason::ConsentIssuerNotAllowed => "CONSENT_ISSUER_NOT_ALLOWED",
            Reason::ConsentExpired => "CONSENT_EXPIRED",
            Reason::ConsentNotYetValid => "CONSENT_NOT_YET_VALID",
            Reason::ConsentInvalidClaims => "CONSENT_INVALID_CLAIMS",
            Reason::ConsentWrongOrganisation => "CONSENT_WRONG_ORGANISATION",
            Reason::ConsentWrongSender => "CONSENT_WRONG_SENDER",
            Reason::ConsentWrongRecipient => "CONSENT_WRONG_RECIPIENT",
            Reason::ConsentWrongKind => "CONSENT_WRONG_KIND",
            Reason::ConsentWrongIncident => "CONSENT_WRONG_INCIDENT",
            Reason::ConsentPayloadMismatch => "CONSENT_PAYLOAD_MISMATCH",
            Reason::ConsentRevoked => "CONSENT_REVOKED",
            Reason::ConsentUsedUp => "CONSENT_USED_UP",
            Reason::RevocationInvalid => "REVOCATION_INVALID",
            Reason::RecipientQueueFull => "RECIPIENT_QUEUE_FULL",
            Reason::MessageIdReused => "MESSAGE_ID_REUSED",
            Reason::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            Reason::DeliveriesOnAnotherNode => "DELIVERIES_ON_ANOTHER_NODE",
            Reason::StorageUnavailable => "STORAGE_UNAVAILABLE",
            Reason::StorageFull => "STORAGE_FULL",
            Reason::ConsultationOpen => "CONSULTATION_OPEN",
            Reason::WorkflowUnknown => "WORKFLOW_UNKNOWN",
            Reason::WorkflowConflict => "WORKFLOW_CONFLICT",
        }
    }

    /// The gRPC code a refusal with this reason is sent with.
    pub fn code(self) -> Code {
        match self {
            Reason::Malformed
            | Reason::PayloadTooLarge
            | Reason::InvalidContent
            | Reason::ConsentTooLong
            | Reason::ConsentUnsupportedVersion
            | Reason::ConsentMalformed
            | Reason::MessageIdReused => Code::InvalidArgument,
            Reason::Unauthenticated | Reason::UnknownAgency => Code::Unauthenticated,
            Reason::RecipientQueueFull | Reason::TooManySubscriptions | Reason::StorageFull => {
                Code::ResourceExhausted
            }
            Reason::StorageUnavailable | Reason::DeliveriesOnAnotherNode => Code::Unavailable,
            Reason::ConsultationOpen | Reason::WorkflowConflict => Code::FailedPrecondition,
            Reason::WorkflowUnknown => Code::NotFound,
            _ => Code::PermissionDenied,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision not to do what the caller asked, with the reason and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The stable reason code.
    pub reason: Reason,
    /// What a person should read.
    pub message: String,
    /// For a refused transfer, the agreement and clause that applied, or that none did; `None`
    /// for refusals that are not about a flow (a call, a revocation).
    pub citation: Option<Citation>,
}

/// What a refused transfer's flow was judged under: sent as `ErrorInfo` metadata
/// (`agreement_id`, `clause`) and recorded in the `TransferRefused` audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Citation {
    /// The agreements and clauses of the flows found, one per recipient (in the envelope's
    /// order), at least one.
    Clauses(Vec<(String, String)>),
    /// No agreement in force covers the flow (or it could not be determined, for an envelope
    /// too malformed to say where it goes).
    NoAgreement,
}

impl Citation {
    /// The value of `ErrorInfo.metadata["agreement_id"]` and of the audit entry's
    /// `agreement_id`: the distinct agreement ids, comma-separated, or `none`.
    pub fn agreement_id(&self) -> String {
        match self {
            Citation::Clauses(c) => {
                let mut ids: Vec<&str> = Vec::new();
                for (id, _) in c {
                    if !ids.contains(&id.as_str()) {
                        ids.push(id);
                    }
                }
                ids.join(",")
            }
            Citation::NoAgreement => "none".into(),
        }
    }

    /// The value of `ErrorInfo.metadata["clause"]` and of the audit entry's `clause`: the
    /// distinct `agreement/clause` pairs when the flows rely on several agreements, the clause
    /// alone when on one, or `none`.
    pub fn clause(&self) -> String {
        match self {
            Citation::Clauses(c) => {
                let several = c.iter().any(|(id, _)| *id != c[0].0);
                let mut out: Vec<String> = Vec::new();
                for (id, clause) in c {
                    let one = if several {
                        format!("{id}/{clause}")
                    } else {
                        clause.clone()
                    };
                    if !out.contains(&one) {
                        out.push(one);
                    }
                }
                out.join(",")
            }
            Citation::NoAgreement => "none".into(),
        }
    }
}

impl Refusal {
    /// A refusal for `reason`, explained by `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
            citation: None,
        }
    }

    /// The refusal citing `citation`, unless it already cites something.
    pub fn cited(mut self, citation: impl FnOnce() -> Citation) -> Self {
        if self.citation.is_none() {
            self.citation = Some(citation());
        }
        self
    }
}

impl Failure {
    /// A refusal citing `citation` unless it already cites something; internal errors as
    /// they are.
    pub fn cited(self, citation: impl FnOnce() -> Citation) -> Self {
        match self {
            Failure::Refused(r) => Failure::Refused(r.cited(citation)),
            internal => internal,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        let mut metadata = std::collections::HashMap::<String, String>::new();
        if let Some(c) = &r.citation {
            metadata.insert("agreement_id".into(), c.agreement_id());
            metadata.insert("clause".into(), c.clause());
        }
        let details = ErrorDetails::with_error_info(r.reason.as_str(), ERROR_DOMAIN, metadata);
        Status::with_error_details(r.reason.code(), r.message, details)
    }
}

/// A failure inside the broker that is not the caller's fault.
///
/// The client is told only "internal error"; the cause is logged where it is converted.
///
/// Its message says everything (what the broker was doing, and the cause); it reports no
/// separate `source`, so that a chain of errors printed with `{:#}` does not say it twice.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {cause}")]
pub struct Internal {
    context: &'static str,
    cause: Box<dyn std::error::Error + Send + Sync>,
}

impl Internal {
    /// Wraps `source`, saying what the broker was doing.
    pub fn new(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Internal {
            context,
            cause: source.into(),
        }
    }
}

impl From<Internal> for Status {
    fn from(e: Internal) -> Status {
        tracing::error!(error = %e, "internal error");
        Status::internal("internal error")
    }
}

/// Either outcome of an operation that did not succeed: a refusal, or an internal error.
#[derive(Debug)]
pub enum Failure {
    /// The caller's request was refused.
    Refused(Refusal),
    /// The broker failed.
    Internal(Internal),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}

impl From<Internal> for Failure {
    fn from(e: Internal) -> Self {
        Failure::Internal(e)
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Status {
        match f {
            Failure::Refused(r) => r.into(),
            Failure::Internal(e) => e.into(),
        }
    }
}

/// How large a request the transport reads for a service, for [`from_transport`]'s messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// The largest request message read, in bytes (tonic's `max_decoding_message_size`).
    pub max_message: usize,
    /// The largest payload accepted, for a service whose requests carry one.
    pub max_payload: Option<usize>,
}

/// tonic's message for a request above `max_decoding_message_size`, up to the sizes.
const TOO_LARGE_PREFIX: &str = "Error, decoded message length too large: found ";
/// prost's prefix on a message that does not decode.
const DECODE_PREFIX: &str = "failed to decode Protobuf message: ";

/// The refusal for a status that the transport answered before any handler ran, when it is the
/// caller's doing: a request above the read limit is [`Reason::PayloadTooLarge`], one that does
/// not decode (or whose gRPC framing is broken) [`Reason::Malformed`]. Other statuses (an unknown
/// method, say) are not refusals and give `None`.
///
/// tonic checks a message's length from its 5-byte gRPC prefix, before reading its body, so a
/// request of any size the prefix can state (up to 4 GiB) is refused here without being read.
pub fn from_transport(status: &Status, limit: ReadLimit) -> Option<Refusal> {
    match status.code() {
        Code::OutOfRange if status.message().starts_with(TOO_LARGE_PREFIX) => {
            let found = status.message()[TOO_LARGE_PREFIX.len()..]
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok());
            let size = found.map_or_else(|| "larger than that".into(), |n| format!("{n} bytes"));
            let message = match limit.max_payload {
                Some(payload) => format!(
                    "the envelope is {size}; this broker accepts payloads of at most {payload} bytes \
                     (envelopes of at most {} bytes)",
                    limit.max_message
                ),
                None => format!(
                    "the request is {size}; this broker reads requests of at most {} bytes here",
                    limit.max_message
                ),
            };
            Some(Refusal::new(Reason::PayloadTooLarge, message))
        }
        // Before a handler runs, tonic's only internal errors are about the request's bytes.
        Code::Internal => {
            let detail = status.message();
            let detail = detail.strip_prefix(DECODE_PREFIX).unwrap_or(detail);
            let detail: String = detail.chars().take(200).collect();
            Some(Refusal::new(
                Reason::Malformed,
                format!("the request does not decode: {detail}"),
            ))
        }
        _ => None,
    }
}

/// The reason code of a status, if it carries a Concordat `ErrorInfo`.
pub fn reason_of(status: &Status) -> Option<String> {
    let details = status.get_error_details();
    details
        .error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason.clone())
}

/// The agreement and clause a refused transfer's status cites (`ErrorInfo` metadata
/// `agreement_id` and `clause`; `none` when no agreement covers the flow), if it cites any.
pub fn citation_of(status: &Status) -> Option<(String, String)> {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)?;
    Some((
        info.metadata.get("agreement_id")?.clone(),
        info.metadata.get("clause")?.clone(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_once() {
        // No wildcard: a new variant does not compile here until it is listed, and then the
        // assertion below fails until it is in `Reason::ALL` too.
        let covered = |r: Reason| match r {
            Reason::Malformed => {}
            Reason::Unauthenticated => {}
            Reason::UnknownAgency => {}
            Reason::NotAuthorised => {}
            Reason::UnknownRecipient => {}
            Reason::NoAgreement => {}
            Reason::AgreementReviewOverdue => {}
            Reason::PayloadTooLarge => {}
            Reason::InvalidContent => {}
            Reason::UninspectableContent => {}
            Reason::OrganisationIdentified => {}
            Reason::TlpMismatch => {}
            Reason::TlpNotPermitted => {}
            Reason::TlpOnwardForbidden => {}
            Reason::NationalSignificanceRequired => {}
            Reason::NoLegalBasis => {}
            Reason::DesignationInvalid => {}
            Reason::DesignationExpired => {}
            Reason::ConsentMissing => {}
            Reason::ConsentTooLong => {}
            Reason::ConsentUnsupportedVersion => {}
            Reason::ConsentMalformed => {}
            Reason::ConsentBadSignature => {}
            Reason::ConsentUnknownIssuer => {}
            Reason::ConsentIssuerNotAllowed => {}
            Reason::ConsentExpired => {}
            Reason::ConsentNotYetValid => {}
            Reason::ConsentInvalidClaims => {}
            Reason::ConsentWrongOrganisation => {}
            Reason::ConsentWrongSender => {}
            Reason::ConsentWrongRecipient => {}
            Reason::ConsentWrongKind => {}
            Reason::ConsentWrongIncident => {}
            Reason::ConsentPayloadMismatch => {}
            Reason::ConsentRevoked => {}
            Reason::ConsentUsedUp => {}
            Reason::RevocationInvalid => {}
            Reason::RecipientQueueFull => {}
            Reason::MessageIdReused => {}
            Reason::TooManySubscriptions => {}
            Reason::DeliveriesOnAnotherNode => {}
            Reason::StorageUnavailable => {}
            Reason::StorageFull => {}
            Reason::ConsultationOpen => {}
            Reason::WorkflowUnknown => {}
            Reason::WorkflowConflict => {}
        };
        for r in [
            Reason::Malformed,
            Reason::Unauthenticated,
            Reason::UnknownAgency,
            Reason::NotAuthorised,
            Reason::UnknownRecipient,
            Reason::NoAgreement,
            Reason::AgreementReviewOverdue,
            Reason::PayloadTooLarge,
            Reason::InvalidContent,
            Reason::UninspectableContent,
            Reason::OrganisationIdentified,
            Reason::TlpMismatch,
            Reason::TlpNotPermitted,
            Reason::TlpOnwardForbidden,
            Reason::NationalSignificanceRequired,
            Reason::NoLegalBasis,
            Reason::DesignationInvalid,
            Reason::DesignationExpired,
            Reason::ConsentMissing,
            Reason::ConsentTooLong,
            Reason::ConsentUnsupportedVersion,
            Reason::ConsentMalformed,
            Reason::ConsentBadSignature,
            Reason::ConsentUnknownIssuer,
            Reason::ConsentIssuerNotAllowed,
            Reason::ConsentExpired,
            Reason::ConsentNotYetValid,
            Reason::ConsentInvalidClaims,
            Reason::ConsentWrongOrganisation,
            Reason::ConsentWrongSender,
            Reason::ConsentWrongRecipient,
            Reason::ConsentWrongKind,
            Reason::ConsentWrongIncident,
            Reason::ConsentPayloadMismatch,
            Reason::ConsentRevoked,
            Reason::ConsentUsedUp,
            Reason::RevocationInvalid,
            Reason::RecipientQueueFull,
            Reason::MessageIdReused,
            Reason::TooManySubscriptions,
            Reason::DeliveriesOnAnotherNode,
            Reason::StorageUnavailable,
            Reason::StorageFull,
            Reason::ConsultationOpen,
            Reason::WorkflowUnknown,
            Reason::WorkflowConflict,
        ] {
            covered(r);
            assert_eq!(
                Reason::ALL.iter().filter(|a| **a == r).count(),
                1,
                "{r} in Reason::ALL"
            );
        }
        let codes: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn a_refusal_cites_its_clauses_or_says_none() {
        let one = |a: &str, c: &str| (a.to_owned(), c.to_owned());
        let cases = [
            (Citation::NoAgreement, ("none", "none")),
            (
                Citation::Clauses(vec![one("mou-a", "4.2")]),
                ("mou-a", "4.2"),
            ),
            (
                Citation::Clauses(vec![one("mou-a", "4.2"), one("mou-a", "4.2")]),
                ("mou-a", "4.2"),
            ),
            (
                Citation::Clauses(vec![one("mou-a", "4.2"), one("mou-b", "3")]),
                ("mou-a,mou-b", "mou-a/4.2,mou-b/3"),
            ),
        ];
        for (citation, (agreement, clause)) in cases {
            let status =
                Status::from(Refusal::new(Reason::ConsentMissing, "x").cited(|| citation.clone()));
            assert_eq!(
                citation_of(&status),
                Some((agreement.to_owned(), clause.to_owned())),
                "{citation:?}"
            );
        }
        let uncited = Status::from(Refusal::new(Reason::NotAuthorised, "x"));
        assert_eq!(citation_of(&uncited), None);
    }

    #[test]
    fn refusal_carries_reason_and_message() {
        let status = Status::from(Refusal::new(Reason::ConsentMissing, "needs consent"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "needs consent");
        assert_eq!(reason_of(&status).as_deref(), Some("CONSENT_MISSING"));
    }

    #[test]
    fn transport_statuses_become_refusals() {
        let exchange = ReadLimit {
            max_message: 4_259_840,
            max_payload: Some(4_194_304),
        };
        let other = ReadLimit {
            max_message: 4_194_304,
            max_payload: None,
        };
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 6291525 bytes, the limit is: 4259840 bytes",
        );
        /// The status, the service's limit, and the refusal expected.
        type Case = (Status, ReadLimit, Option<(Reason, &'static str)>);
        let cases: &[Case] = &[
            (
                too_large.clone(),
                exchange,
                Some((
                    Reason::PayloadTooLarge,
                    "the envelope is 6291525 bytes; this broker accepts payloads of at most 4194304 bytes (envelopes of at most 4259840 bytes)",
                )),
            ),
            (
                too_large,
                other,
                Some((
                    Reason::PayloadTooLarge,
                    "the request is 6291525 bytes; this broker reads requests of at most 4194304 bytes here",
                )),
            ),
            (
                Status::internal(
                    "failed to decode Protobuf message: Envelope.message_id: buffer underflow",
                ),
                exchange,
                Some((
                    Reason::Malformed,
                    "the request does not decode: Envelope.message_id: buffer underflow",
                )),
            ),
            (
                Status::internal("Unexpected EOF decoding stream."),
                other,
                Some((
                    Reason::Malformed,
                    "the request does not decode: Unexpected EOF decoding stream.",
                )),
            ),
            (Status::out_of_range("something else"), exchange, None),
            (Status::unimplemented(""), exchange, None),
        ];
        for (status, limit, expected) in cases {
            let got = from_transport(status, *limit);
            assert_eq!(
                got.as_ref().map(|r| (r.reason, r.message.as_str())),
                *expected,
                "{status:?}"
            );
        }
    }

    #[test]
    fn tlp_refusals_are_permission_denied() {
        for (reason, code) in [
            (Reason::TlpMismatch, "TLP_MISMATCH"),
            (Reason::TlpNotPermitted, "TLP_NOT_PERMITTED"),
            (Reason::TlpOnwardForbidden, "TLP_ONWARD_FORBIDDEN"),
        ] {
            let status = Status::from(Refusal::new(reason, "no"));
            assert_eq!(status.code(), Code::PermissionDenied);
            assert_eq!(reason_of(&status).as_deref(), Some(code));
        }
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status = Status::from(Internal::new("opening store", "disk on fire"));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(reason_of(&status), None);
    }
}
