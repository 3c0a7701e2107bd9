//! The gate in front of every Concordat service: it authenticates the caller, gives the
//! transport's own refusals the broker's reasons, and logs every refusal it makes.
//!
//! For each request, [`Gate`]:
//! 1. matches the connection's certificate against the federation ([`Authenticator`]); a
//!    certificate that names no caller is refused (`UNAUTHENTICATED`) before the request's body
//!    is read, and the refusal is logged in the audit log ([`RefusalLog`]);
//! 2. attaches the [`Call`] (caller, RPC, certificate) for the handler;
//! 3. if the call was answered before a handler took it, the answer came from tonic: a body that
//!    does not decode (`INTERNAL`) or a message above the read limit (`OUT_OF_RANGE`). These are
//!    turned into refusals with the broker's reasons (`MALFORMED`, `PAYLOAD_TOO_LARGE`) by
//!    [`refusal::from_transport`] and logged like any other.
//!
//! Health and reflection are not behind the gate: any certificate of the federation may use them.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    Code, Status,
    body::Body,
    codegen::{Service, http},
    server::NamedService,
};

use crate::{
    identity::{Authenticator, Call},
    refusal::{self, ReadLimit, Reason, Refusal},
    refusal_log::{RefusalLog, RefusedCall},
    tls::PeerIdentity,
};

/// What every gate of one broker shares.
pub struct Shared {
    authenticator: Authenticator,
    refusals: Arc<RefusalLog>,
}

impl Shared {
    /// Gates that authenticate with `authenticator` and log refusals to `refusals`.
    pub fn new(authenticator: Authenticator, refusals: Arc<RefusalLog>) -> Arc<Self> {
        Arc::new(Shared {
            authenticator,
            refusals,
        })
    }
}

/// A service behind the gate.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
    limit: ReadLimit,
}

impl<S> Gate<S> {
    /// `inner` behind the gate; `limit` is what its transport reads (for refusal messages).
    pub fn new(inner: S, shared: Arc<Shared>, limit: ReadLimit) -> Self {
        Gate {
            inner,
            shared,
            limit,
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let limit = self.limit;
        Box::pin(async move {
            let rpc = rpc_name(request.uri().path());
            let peer = request.extensions().get::<PeerIdentity>().cloned();
            let identified = match &peer {
                Some(p) => shared.authenticator.identify(p.common_name.as_deref()),
                None => Err(Refusal::new(
                    Reason::Unauthenticated,
                    "no client certificate on this connection",
                )),
            };
            let certificate = peer.as_ref().and_then(|p| p.certificate.as_deref());
            let caller = match identified {
                Ok(caller) => caller,
                Err(refusal) => {
                    let refused = RefusedCall {
                        rpc,
                        caller: None,
                        certificate,
                        peer: peer.as_ref().map(|p| p.remote_addr),
                    };
                    let status = shared.refusals.refuse(refused, refusal).await;
                    return Ok(status.into_http());
                }
            };
            let call = Call::new(
                caller,
                rpc,
                peer.as_ref().and_then(|p| p.certificate.clone()),
            );
            request.extensions_mut().insert(call.clone());
            let response = inner.call(request).await?;
            if call.reached() {
                return Ok(response);
            }
            // Answered before a handler took it: tonic's own answer (`Status::into_http` keeps
            // the status in the response's extensions as well as in its headers).
            let status = response
                .extensions()
                .get::<Status>()
                .cloned()
                .or_else(|| Status::from_header_map(response.headers()));
            let Some(status) = status else {
                return Ok(response);
            };
            if status.code() == Code::Ok {
                return Ok(response);
            }
            let Some(refusal) = refusal::from_transport(&status, limit) else {
                return Ok(response);
            };
            let refused = RefusedCall {
                peer: peer.as_ref().map(|p| p.remote_addr),
                ..RefusedCall::of(&call)
            };
            let status = shared.refusals.refuse(refused, refusal).await;
            Ok(status.into_http())
        })
    }
}

/// The short name of a Concordat RPC (`Exchange.Send`) from its gRPC path.
pub fn rpc_name(path: &str) -> &'static str {
    match path {
        "/concordat.v1.Exchange/Hello" => "Exchange.Hello",
        "/concordat.v1.Exchange/Send" => "Exchange.Send",
        "/concordat.v1.Exchange/SendStream" => "Exchange.SendStream",
        "/concordat.v1.Exchange/Subscribe" => "Exchange.Subscribe",
        "/concordat.v1.Exchange/Ack" => "Exchange.Ack",
        "/concordat.v1.Consent/Revoke" => "Consent.Revoke",
        "/concordat.v1.Audit/Export" => "Audit.Export",
        "/concordat.v1.Audit/Checkpoint" => "Audit.Checkpoint",
        "/concordat.v1.Operations/Status" => "Operations.Status",
        "/concordat.v1.Operations/Consents" => "Operations.Consents",
        "/concordat.v1.Workflows/Consultations" => "Workflows.Consultations",
        "/concordat.v1.Workflows/FindTransfers" => "Workflows.FindTransfers",
        "/concordat.v1.Workflows/Statements" => "Workflows.Statements",
        "/concordat.v1.Workflows/Involve" => "Workflows.Involve",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_contract_has_a_name() {
        let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(
            concordat_proto::FILE_DESCRIPTOR_SET,
        );
        let Ok(fds) = fds else {
            panic!("the descriptor set does not decode");
        };
        let mut seen = 0;
        for file in fds.file.iter().filter(|f| f.package() == "concordat.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/concordat.v1.{}/{}", service.name(), method.name());
                    let expected = format!("{}.{}", service.name(), method.name());
                    assert_eq!(rpc_name(&path), expected);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 14);
        assert_eq!(rpc_name("/concordat.v1.Exchange/Nope"), "unknown");
    }
}
