//! The gRPC services: `Exchange` (sending and receiving), `Consent` (revocation) and `Audit`.
//!
//! Every handler starts from the [`Caller`] that the authenticator attached; none reads an
//! identity from a message.

use std::{pin::Pin, sync::Arc};

use concordat_proto::pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    config::Config,
    identity::{Authenticator, Caller, caller},
    refusal::{Reason, Refusal},
};

/// What the services share.
pub struct State {
    authenticator: Authenticator,
}

impl State {
    /// The shared state for a broker running `config`.
    pub fn new(_config: &Config, authenticator: Authenticator) -> Self {
        State { authenticator }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `Exchange` service.
pub struct ExchangeService {
    state: Arc<State>,
}

impl ExchangeService {
    /// The service over shared state.
    pub fn new(state: Arc<State>) -> Self {
        ExchangeService { state }
    }
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for ExchangeService {
    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let caller = caller(&request)?;
        let display_name = self
            .state
            .authenticator
            .display_name(caller.id())
            .unwrap_or("auditor")
            .to_owned();
        tracing::info!(agency = %caller.id(), "hello");
        Ok(Response::new(pb::HelloResponse {
            agency_id: caller.id().to_string(),
            display_name,
            auditor: matches!(caller, Caller::Auditor(_)),
            broker_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn send(&self, request: Request<pb::Envelope>) -> Result<Response<pb::Receipt>, Status> {
        let _ = caller(&request)?.agency()?;
        Err(Status::unimplemented("Send is not available yet"))
    }

    type SendStreamStream = ResponseStream<pb::SendResult>;

    async fn send_stream(
        &self,
        request: Request<Streaming<pb::Envelope>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let _ = caller(&request)?.agency()?;
        Err(Status::unimplemented("SendStream is not available yet"))
    }

    type SubscribeStream = ResponseStream<pb::Delivery>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let _ = caller(&request)?.agency()?;
        Err(Status::unimplemented("Subscribe is not available yet"))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let _ = caller(&request)?.agency()?;
        Err(Status::unimplemented("Ack is not available yet"))
    }
}

/// The `Consent` service.
pub struct ConsentService {
    #[allow(dead_code)]
    state: Arc<State>,
}

impl ConsentService {
    /// The service over shared state.
    pub fn new(state: Arc<State>) -> Self {
        ConsentService { state }
    }
}

#[tonic::async_trait]
impl pb::consent_server::Consent for ConsentService {
    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let _ = caller(&request)?.agency()?;
        Err(Status::unimplemented("Revoke is not available yet"))
    }
}

/// The `Audit` service.
pub struct AuditService {
    #[allow(dead_code)]
    state: Arc<State>,
}

impl AuditService {
    /// The service over shared state.
    pub fn new(state: Arc<State>) -> Self {
        AuditService { state }
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    type ExportStream = ResponseStream<pb::ExportItem>;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = caller(&request)?;
        if !matches!(caller, Caller::Auditor(_)) {
            let refusal = Refusal::new(
                Reason::NotAuthorised,
                format!(
                    "{} is not an auditor; only auditor certificates may export the audit log",
                    caller.id()
                ),
            );
            tracing::warn!(agency = %caller.id(), reason = %refusal.reason, "refused: audit export");
            return Err(refusal.into());
        }
        Err(Status::unimplemented("Export is not available yet"))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let _ = caller(&request)?;
        Err(Status::unimplemented("Checkpoint is not available yet"))
    }
}
