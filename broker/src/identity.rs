//! Who is calling: the agency (or auditor) named by the client certificate, never by a message.
//!
//! [`Authenticator`] is a tonic interceptor in front of every Concordat service. It reads the
//! [`PeerIdentity`] that the TLS accept loop attached to the connection, matches its Common Name
//! against the federation, and puts the resulting [`Caller`] in the request's extensions. Any other
//! certificate is refused with `UNAUTHENTICATED` and logged.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use concordat_proto::ids::AgencyId;
use tonic::{Request, Status};

use crate::{
    config::Agency,
    refusal::{Reason, Refusal},
    tls::PeerIdentity,
};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An agency of the federation.
    Agency(AgencyId),
    /// An auditor: may read the audit log, may not send.
    Auditor(AgencyId),
}

impl Caller {
    /// The caller's id (its certificate's Common Name).
    pub fn id(&self) -> &AgencyId {
        match self {
            Caller::Agency(id) | Caller::Auditor(id) => id,
        }
    }

    /// The caller's agency id, or a refusal if it is an auditor.
    pub fn agency(&self) -> Result<&AgencyId, Refusal> {
        match self {
            Caller::Agency(id) => Ok(id),
            Caller::Auditor(id) => Err(Refusal::new(
                Reason::NotAuthorised,
                format!("{id} is an auditor certificate; only agencies may use this service"),
            )),
        }
    }
}

/// The interceptor that authenticates every request from its connection's certificate.
#[derive(Clone)]
pub struct Authenticator {
    agencies: Arc<BTreeMap<AgencyId, Agency>>,
    auditors: Arc<BTreeSet<AgencyId>>,
}

impl Authenticator {
    /// An authenticator for the given federation.
    pub fn new(agencies: BTreeMap<AgencyId, Agency>, auditors: BTreeSet<AgencyId>) -> Self {
        Authenticator {
            agencies: Arc::new(agencies),
            auditors: Arc::new(auditors),
        }
    }

    /// Matches a certificate Common Name against the federation.
    pub fn identify(&self, common_name: Option<&str>) -> Result<Caller, Refusal> {
        let Some(cn) = common_name else {
            return Err(Refusal::new(
                Reason::Unauthenticated,
                "the client certificate has no single Subject Common Name",
            ));
        };
        let unknown = || {
            Refusal::new(
                Reason::UnknownAgency,
                format!(
                    "certificate Common Name {:?} is not an agency or auditor of this federation",
                    cn.chars().take(64).collect::<String>()
                ),
            )
        };
        let id: AgencyId = cn.parse().map_err(|_| unknown())?;
        if self.agencies.contains_key(&id) {
            Ok(Caller::Agency(id))
        } else if self.auditors.contains(&id) {
            Ok(Caller::Auditor(id))
        } else {
            Err(unknown())
        }
    }

    /// The display name of an agency.
    pub fn display_name(&self, id: &AgencyId) -> Option<&str> {
        self.agencies.get(id).map(|a| a.name.as_str())
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let peer = request.extensions().get::<PeerIdentity>().cloned();
        let outcome = match &peer {
            Some(p) => self.identify(p.common_name.as_deref()),
            None => Err(Refusal::new(
                Reason::Unauthenticated,
                "no client certificate on this connection",
            )),
        };
        match outcome {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(refusal) => {
                let addr = peer.map(|p| p.remote_addr.to_string()).unwrap_or_default();
                tracing::warn!(peer = %addr, reason = %refusal.reason, "refused: {}", refusal.message);
                Err(refusal.into())
            }
        }
    }
}

/// The caller that [`Authenticator`] attached to a request.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            // Every service is wrapped by the authenticator; reaching this is a wiring bug.
            tracing::error!("request reached a service without an authenticated caller");
            Status::internal("internal error")
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let mut agencies = BTreeMap::new();
        agencies.insert("ico".parse().unwrap(), Agency { name: "ICO".into() });
        let auditors = ["auditor".parse().unwrap()].into_iter().collect();
        Authenticator::new(agencies, auditors)
    }

    #[test]
    fn common_names_map_to_callers() {
        let a = auth();
        let cases: &[(Option<&str>, Result<&str, Reason>)] = &[
            (Some("ico"), Ok("agency ico")),
            (Some("auditor"), Ok("auditor auditor")),
            (Some("nca"), Err(Reason::UnknownAgency)),
            (Some("ICO"), Err(Reason::UnknownAgency)),
            (Some(""), Err(Reason::UnknownAgency)),
            (None, Err(Reason::Unauthenticated)),
        ];
        for (cn, expected) in cases {
            let got = a.identify(*cn).map_err(|r| r.reason);
            let got = got.map(|c| match c {
                Caller::Agency(id) => format!("agency {id}"),
                Caller::Auditor(id) => format!("auditor {id}"),
            });
            assert_eq!(
                got.as_deref().map_err(|r| *r),
                expected.as_ref().map(|s| *s).map_err(|r| *r),
                "cn {cn:?}"
            );
        }
    }

    #[test]
    fn auditors_may_not_act_as_agencies() {
        let caller = Caller::Auditor("auditor".parse().unwrap());
        assert_eq!(caller.agency().unwrap_err().reason, Reason::NotAuthorised);
    }
}
