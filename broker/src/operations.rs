//! The `Operations` service: what an operator sees of the federation. `Status` answers with the
//! view of [`crate::status`] for the caller's certificate; `Consents` lists the consent tokens
//! transfers were accepted under, with their uses, expiry and revocation, read from the store's
//! consent ledger ([`crate::store::Storage::consents`]).
//!
//! Who sees which consents: an auditor every one (or one agency's, when it names it); an agency
//! those its own consent desk issued (an issuer whose `agency` is the caller) and those of the
//! transfers it sent or received. An agency that names another agency is refused with
//! `NOT_AUTHORISED`, logged like every refusal.

use std::sync::Arc;

use concordat_proto::{
    ids::{AgencyId, OrgId},
    pb,
};
use tonic::{Request, Response, Status};

use crate::{
    identity::{Call, Caller, call},
    refusal::{Reason, Refusal},
    refusal_log::{RefusalLog, RefusedCall},
    status::{Sources, Viewer},
    store::{ConsentRecord, timestamp},
};

/// The most consents one answer carries (a few hundred bytes each).
pub const MAX_CONSENTS: usize = 5000;

/// The `Operations` service.
pub struct OperationsService {
    sources: Sources,
    refusals: Arc<RefusalLog>,
}

impl OperationsService {
    /// The service reading `sources`, logging its refusals to `refusals`.
    pub fn new(sources: Sources, refusals: Arc<RefusalLog>) -> Self {
        OperationsService { sources, refusals }
    }

    async fn refuse(&self, call: &Call, refusal: Refusal) -> Status {
        self.refusals.refuse(RefusedCall::of(call), refusal).await
    }
}

/// Which consents a call may list: every one, or those touching one agency.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConsentScope {
    All,
    Agency(AgencyId),
}

/// The scope `caller` asked for by naming `agency` (empty: none), or why it may not.
fn consent_scope(caller: &Caller, agency: &str) -> Result<ConsentScope, Refusal> {
    let named = if agency.is_empty() {
        None
    } else {
        Some(
            agency
                .parse::<AgencyId>()
                .map_err(|e| Refusal::new(Reason::Malformed, format!("agency {agency:?}: {e}")))?,
        )
    };
    match (caller, named) {
        (Caller::Auditor(_), None) => Ok(ConsentScope::All),
        (Caller::Auditor(_), Some(a)) => Ok(ConsentScope::Agency(a)),
        (Caller::Agency(me), None) => Ok(ConsentScope::Agency(me.clone())),
        (Caller::Agency(me), Some(a)) if &a == me => Ok(ConsentScope::Agency(a)),
        (Caller::Agency(me), Some(a)) => Err(Refusal::new(
            Reason::NotAuthorised,
            format!(
                "{me} may list only its own consents, not {a}'s; only auditor certificates may \
                 list another agency's"
            ),
        )),
    }
}

/// Whether `record` is one `scope` covers: `desk_of` gives the agency whose consent desk an
/// issuer is.
fn in_scope(
    scope: &ConsentScope,
    record: &ConsentRecord,
    desk_of: &dyn Fn(&ConsentRecord) -> Option<AgencyId>,
) -> bool {
    match scope {
        ConsentScope::All => true,
        ConsentScope::Agency(a) => {
            desk_of(record).as_ref() == Some(a)
                || record.senders.contains(a.as_str())
                || record.recipients.contains(a.as_str())
        }
    }
}

/// `record` as `scope` may see it: an agency that neither issued the consent (its desk) nor
/// sent under it, only received, sees itself alone among its recipients, not where else the
/// consent's transfers went.
fn redacted(
    scope: &ConsentScope,
    mut record: ConsentRecord,
    desk_of: &dyn Fn(&ConsentRecord) -> Option<AgencyId>,
) -> ConsentRecord {
    if let ConsentScope::Agency(a) = scope
        && desk_of(&record).as_ref() != Some(a)
        && !record.senders.contains(a.as_str())
    {
        record.recipients.retain(|r| r == a.as_str());
    }
    record
}

/// Whether `record` is still open at `now`: not expired, not revoked, not used up.
fn open_at(record: &ConsentRecord, now: time::OffsetDateTime) -> bool {
    !expired(record, now) && !record.revoked && !used_up(record)
}

fn expired(record: &ConsentRecord, now: time::OffsetDateTime) -> bool {
    record.expires_at.is_some_and(|t| t <= now)
}

fn used_up(record: &ConsentRecord) -> bool {
    record.max_uses.is_some_and(|max| record.uses >= max)
}

#[tonic::async_trait]
impl pb::operations_server::Operations for OperationsService {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let call = call(&request)?;
        let viewer = match &call.caller {
            Caller::Agency(id) => Viewer::Agency(id.clone()),
            Caller::Auditor(id) => Viewer::Auditor(id.clone()),
        };
        tracing::debug!(caller = %call.caller.id(), "status");
        Ok(Response::new(self.sources.report(&viewer)))
    }

    async fn consents(
        &self,
        request: Request<pb::ConsentsRequest>,
    ) -> Result<Response<pb::ConsentsResponse>, Status> {
        let call = call(&request)?;
        let req = request.into_inner();
        let scope = match consent_scope(&call.caller, &req.agency) {
            Ok(scope) => scope,
            Err(refusal) => return Err(self.refuse(&call, refusal).await),
        };
        let organisation = if req.organisation.is_empty() {
            None
        } else {
            match req.organisation.parse::<OrgId>() {
                Ok(o) => Some(o.to_string()),
                Err(e) => {
                    let refusal = Refusal::new(
                        Reason::Malformed,
                        format!("organisation {:?}: {e}", req.organisation),
                    );
                    return Err(self.refuse(&call, refusal).await);
                }
            }
        };
        let now = crate::clock::now();
        let rules = self.sources.rules.load();
        let desk_of = move |r: &ConsentRecord| {
            rules
                .policy
                .issuers
                .get(&r.issuer)
                .and_then(|i| i.agency.clone())
        };
        // The ledger is read from sled, every token's records: off the async workers.
        let store = self.sources.store.clone();
        let read = {
            let desk_of = desk_of.clone();
            let scope = scope.clone();
            tokio::task::spawn_blocking(move || {
                let keep = |r: &ConsentRecord| {
                    organisation.as_ref().is_none_or(|o| &r.organisation == o)
                        && in_scope(&scope, r, &desk_of)
                        && (req.all || open_at(r, now))
                };
                store.storage().consents(MAX_CONSENTS, &keep)
            })
        };
        let (records, truncated) = read
            .await
            .map_err(|e| crate::refusal::Internal::new("listing consents", e))??;
        tracing::debug!(caller = %call.caller.id(), consents = records.len(), truncated, "consents listed");
        let consents = records
            .into_iter()
            .map(|r| redacted(&scope, r, &desk_of))
            .map(|r| pb::ConsentStatus {
                issuer: r.issuer.to_string(),
                issuer_agency: desk_of(&r).map(String::from).unwrap_or_default(),
                jti: r.jti.to_string(),
                organisation: r.organisation.clone(),
                issued_at: Some(timestamp(r.issued_at)),
                expires_at: r.expires_at.map(timestamp),
                uses: r.uses,
                max_uses: r.max_uses.unwrap_or(0),
                last_used_at: r.last_used_at.map(timestamp),
                expired: expired(&r, now),
                revoked: r.revoked,
                used_up: used_up(&r),
                senders: r.senders.into_iter().collect(),
                recipients: r.recipients.into_iter().collect(),
            })
            .collect();
        Ok(Response::new(pb::ConsentsResponse {
            consents,
            truncated,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use concordat_proto::{consent::TokenId, paserk::SecretKey};
    use time::{Duration, OffsetDateTime};

    use super::*;

    fn agency(id: &str) -> AgencyId {
        id.parse().unwrap()
    }

    #[test]
    fn who_may_list_whose_consents() {
        let ico = Caller::Agency(agency("ico"));
        let auditor = Caller::Auditor(agency("auditor"));
        // (caller, agency named, scope or refusal reason)
        let cases: &[(&Caller, &str, Result<ConsentScope, Reason>)] = &[
            (&auditor, "", Ok(ConsentScope::All)),
            (&auditor, "nca", Ok(ConsentScope::Agency(agency("nca")))),
            (&ico, "", Ok(ConsentScope::Agency(agency("ico")))),
            (&ico, "ico", Ok(ConsentScope::Agency(agency("ico")))),
            (&ico, "nca", Err(Reason::NotAuthorised)),
            (&auditor, "not an id!", Err(Reason::Malformed)),
        ];
        for (caller, named, want) in cases {
            let got = consent_scope(caller, named).map_err(|r| r.reason);
            assert_eq!(&got, want, "{caller:?} naming {named:?}");
        }
    }

    #[test]
    fn scope_and_openness_of_a_consent() {
        let now = OffsetDateTime::now_utc();
        let desk = SecretKey::generate().key_id();
        let record = |f: &dyn Fn(&mut ConsentRecord)| {
            let mut r = ConsentRecord {
                issuer: desk,
                jti: TokenId::random(),
                organisation: "acme-ltd".into(),
                issued_at: now - Duration::hours(1),
                expires_at: Some(now + Duration::hours(1)),
                max_uses: None,
                uses: 1,
                last_used_at: Some(now),
                revoked: false,
                senders: BTreeSet::from(["ncsc".to_owned()]),
                recipients: BTreeSet::from(["ico".to_owned()]),
            };
            f(&mut r);
            r
        };
        let ncsc_desk = |_: &ConsentRecord| Some(agency("ncsc"));
        let no_desk = |_: &ConsentRecord| None;
        let ico_desk = |_: &ConsentRecord| Some(agency("ico"));
        let scope = |a: &str| ConsentScope::Agency(agency(a));
        // (what, record, desk, scope, in scope, open)
        type Desk<'a> = &'a dyn Fn(&ConsentRecord) -> Option<AgencyId>;
        let cases: Vec<(&str, ConsentRecord, Desk<'_>, ConsentScope, bool, bool)> = vec![
            (
                "sender sees it",
                record(&|_| {}),
                &no_desk,
                scope("ncsc"),
                true,
                true,
            ),
            (
                "recipient sees it",
                record(&|_| {}),
                &no_desk,
                scope("ico"),
                true,
                true,
            ),
            (
                "a stranger does not",
                record(&|_| {}),
                &no_desk,
                scope("nca"),
                false,
                true,
            ),
            (
                "the issuing desk does",
                record(&|r| r.senders = BTreeSet::from(["nca".to_owned()])),
                &ncsc_desk,
                scope("ncsc"),
                true,
                true,
            ),
            (
                "the auditor does",
                record(&|_| {}),
                &no_desk,
                ConsentScope::All,
                true,
                true,
            ),
            (
                "expired",
                record(&|r| r.expires_at = Some(now - Duration::seconds(1))),
                &no_desk,
                ConsentScope::All,
                true,
                false,
            ),
            (
                "revoked",
                record(&|r| r.revoked = true),
                &no_desk,
                ConsentScope::All,
                true,
                false,
            ),
            (
                "used up",
                record(&|r| r.max_uses = Some(1)),
                &no_desk,
                ConsentScope::All,
                true,
                false,
            ),
            (
                "uses left",
                record(&|r| r.max_uses = Some(2)),
                &no_desk,
                ConsentScope::All,
                true,
                true,
            ),
            (
                "expiry unknown (older record)",
                record(&|r| r.expires_at = None),
                &no_desk,
                ConsentScope::All,
                true,
                true,
            ),
        ];
        for (what, r, desk, scope, want_scope, want_open) in cases {
            assert_eq!(in_scope(&scope, &r, desk), want_scope, "{what}: scope");
            assert_eq!(open_at(&r, now), want_open, "{what}: open");
        }
        // A recipient that neither issued nor sent sees itself alone among the recipients;
        // the sender, the desk and the auditor see them all.
        let wide = record(&|r| {
            r.recipients = BTreeSet::from(["ico".to_owned(), "nca".to_owned()]);
        });
        let recipients = |scope: ConsentScope, desk: Desk<'_>| -> Vec<String> {
            redacted(&scope, wide.clone(), desk)
                .recipients
                .into_iter()
                .collect()
        };
        assert_eq!(recipients(scope("ico"), &no_desk), ["ico"]);
        assert_eq!(recipients(scope("ncsc"), &no_desk), ["ico", "nca"]);
        assert_eq!(recipients(scope("ico"), &ico_desk), ["ico", "nca"]);
        assert_eq!(recipients(ConsentScope::All, &no_desk), ["ico", "nca"]);
    }
}
