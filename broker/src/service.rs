//! The gRPC services: `Exchange` (sending and receiving), `Consent` (revocation) and `Audit`.
//!
//! Every handler starts from the [`Call`] that the gate attached; none reads an identity from a
//! message. Every refusal is logged here, with the caller and the reason code, never with
//! payloads or token bytes, and is in the audit log: a refused envelope as `TransferRefused`,
//! any other refused call through [`RefusalLog`] as `CallRefused`. Every audit export is logged
//! as `AuditExported` when it ends.

use std::{pin::Pin, sync::Arc};

use concordat_proto::{
    audit, consent, envelope::Envelope, ids::AgencyId, paseto, pb, workflow::Step,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    dispatch::Dispatcher,
    identity::{Authenticator, Call, Caller, call},
    live::{Current, Rules},
    metrics::Metrics,
    policy::{self, VerifiedTokens},
    refusal::{Citation, Failure, Internal, ReadLimit, Reason, Refusal, from_transport},
    refusal_log::{RefusalLog, RefusedCall},
    store::{self, Accept, Applied, Op, Revoke, RevokeTarget, Store},
    workflow::StepContext,
    workflow_service,
};

/// How many envelopes of one `SendStream` are decided and committed concurrently.
const STREAM_PIPELINE: usize = 64;
/// The most delivery ids one `Ack` may carry.
const MAX_ACK_IDS: usize = 4096;

/// What the services share.
pub struct State {
    authenticator: Authenticator,
    /// The rules in force; each decision takes one snapshot and keeps it to the end.
    rules: Arc<Current<Rules>>,
    verified: VerifiedTokens,
    store: Store,
    dispatcher: Dispatcher,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    refusals: Arc<RefusalLog>,
    /// Decisions under agreements due, overdue or lapsed for review: counted, and logged at
    /// most once a minute per agreement and stage.
    reviews: crate::reviews::ReviewLog,
}

impl State {
    /// The shared state for a broker deciding by `rules` over `store`. Subscriptions end
    /// when `shutdown` turns true.
    pub fn new(
        rules: Arc<Current<Rules>>,
        authenticator: Authenticator,
        store: Store,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        refusals: Arc<RefusalLog>,
    ) -> Self {
        State {
            authenticator,
            rules,
            verified: VerifiedTokens::default(),
            store,
            dispatcher: Dispatcher::default(),
            shutdown,
            metrics,
            refusals,
            reviews: crate::reviews::ReviewLog::default(),
        }
    }

    /// Logs a refusal of `call` (in the audit log too) and turns it into a status.
    async fn refuse(&self, call: &Call, refusal: Refusal) -> Status {
        self.refusals.refuse(RefusedCall::of(call), refusal).await
    }

    /// The caller's agency id, or a logged refusal for auditors.
    async fn agency_of(&self, call: &Call) -> Result<AgencyId, Status> {
        match call.caller.agency() {
            Ok(agency) => Ok(agency.clone()),
            Err(refusal) => Err(self.refuse(call, refusal).await),
        }
    }

    /// The in-flight bookkeeping (for tests and diagnostics).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Decides on one envelope from `sender` and, if accepted, stores it durably. Every
    /// refusal is in the audit log before it is returned.
    async fn submit(&self, sender: &AgencyId, wire: pb::Envelope) -> Result<pb::Receipt, Failure> {
        // The payload is hashed once, here, for every use below.
        let payload_sha256: [u8; 32] = Sha256::digest(&wire.payload).into();
        let (outcome, facts) = match Envelope::from_wire(wire) {
            Ok(envelope) => match self.prepare(sender, envelope, payload_sha256) {
                Ok(prepared) => (Ok(prepared), None),
                Err((failure, facts)) => (Err(failure), facts),
            },
            // An envelope too malformed to say where it goes is covered by no agreement.
            Err((e, wire)) => (
                Err(
                    Refusal::new(Reason::Malformed, format!("malformed envelope: {e}"))
                        .cited(|| Citation::NoAgreement)
                        .into(),
                ),
                Some(Box::new(store::raw_facts(sender, &wire, &payload_sha256))),
            ),
        };
        match outcome {
            Ok(Prepared::Duplicate(mut receipt)) => {
                self.store.prove_receipt(&mut receipt).await?;
                receipt.warnings = self.review_warnings_now(&receipt);
                Ok(*receipt)
            }
            // The writer logs the refusals it decides itself.
            Ok(Prepared::Accept(op, warnings)) => {
                if let Some(refusal) = self.check_step(sender, &op).await? {
                    return Err(refusal.into());
                }
                self.commit_accept(op, warnings).await
            }
            Err(Failure::Refused(r)) => {
                let refused = store::transfer_refused(facts.map(|f| *f), &r);
                self.store.commit(Op::Refuse(Box::new(refused))).await?;
                Err(r.into())
            }
            Err(internal) => Err(internal),
        }
    }

    /// The checks of a workflow step that read the audit log (a consultation's `concerns`),
    /// made before the write: a refusal, logged.
    async fn check_step(&self, sender: &AgencyId, op: &Op) -> Result<Option<Refusal>, Failure> {
        let Op::Accept(a) = op else {
            return Ok(None);
        };
        let Some(Step::DsarOpen(open)) = &a.envelope.workflow else {
            return Ok(None);
        };
        let checked =
            workflow_service::check_dsar_open(&self.store, sender, &a.envelope.recipients, open)
                .await?;
        let Err(refusal) = checked else {
            return Ok(None);
        };
        let refusal = refusal.cited(|| a.decision.citation());
        let refused = store::transfer_refused(Some(a.facts.clone()), &refusal);
        self.store.commit(Op::Refuse(Box::new(refused))).await?;
        Ok(Some(refusal))
    }

    /// Stores an accepted transfer: its receipt with its proof and the decision's review
    /// warnings.
    async fn commit_accept(
        &self,
        op: Op,
        warnings: Vec<policy::ReviewWarning>,
    ) -> Result<pb::Receipt, Failure> {
        match self.store.commit(op).await? {
            Applied::Accepted(mut receipt) => {
                self.store.prove_receipt(&mut receipt).await?;
                self.reviews.record(&warnings, &self.metrics);
                receipt.warnings = warnings.into_iter().map(|w| w.sentence).collect();
                Ok(*receipt)
            }
            // A retry of an accepted message (or one racing its first attempt): the first
            // receipt, with the warnings of this decision.
            Applied::Duplicate(log_index) => {
                let mut receipt = self.store.storage().receipt_at(log_index)?;
                self.store.prove_receipt(&mut receipt).await?;
                receipt.warnings = warnings.into_iter().map(|w| w.sentence).collect();
                Ok(receipt)
            }
            other => Err(Internal::new(
                "storing a transfer",
                format!("unexpected outcome {other:?}"),
            )
            .into()),
        }
    }

    /// The review warnings for a receipt returned again: its agreements as they stand now (the
    /// receipt, made from the audit entry, does not keep the first decision's warnings).
    fn review_warnings_now(&self, receipt: &pb::Receipt) -> Vec<String> {
        let rules = self.rules.load();
        rules
            .policy
            .review_warnings(
                receipt.authorities.iter().map(|a| a.agreement_id.as_str()),
                crate::clock::now().date(),
            )
            .into_iter()
            .map(|w| w.sentence)
            .collect()
    }

    /// Decides on a validated envelope, without writing. A refusal comes with what the audit
    /// log records of the envelope.
    fn prepare(
        &self,
        sender: &AgencyId,
        mut envelope: Envelope,
        payload_sha256: [u8; 32],
    ) -> Result<Prepared, (Failure, Option<Box<pb::EnvelopeFacts>>)> {
        // The digest is of the envelope as sent (a retry sends the same bytes, and digests
        // stored before references were qualified stay comparable); everything after it,
        // the decision, the audit entry and the delivery, sees the federation-unique
        // incident reference (`INC-7` from ico is `ico:INC-7`).
        let digest = store::envelope_digest(&envelope, &payload_sha256);
        envelope.qualify_incident_ref(sender);
        let storage = self.store.storage();
        let now = crate::clock::now();
        // One snapshot for the whole decision, whatever a reload does meanwhile.
        let rules = self.rules.load();
        let cx = policy::Context {
            policy: &rules.policy,
            organisations: &rules.organisations,
            verified: &self.verified,
            max_payload_bytes: rules.limits.max_message_bytes,
            ledger: storage,
            provenance: storage,
            now,
            payload_digest: payload_sha256,
        };
        // A retry of an accepted message is recognised by the writer, which answers with the
        // first receipt; only when the decision refuses it (its token expired or used up since,
        // say) is the receipt looked up here.
        let decision = match policy::decide(&cx, sender, &envelope) {
            Ok(decision) => decision,
            Err(Failure::Refused(mut refusal)) => {
                let facts = || {
                    Some(Box::new(store::refused_facts(
                        sender,
                        &envelope,
                        &payload_sha256,
                    )))
                };
                return match storage.receipt(sender, &envelope.message_id) {
                    // The stored receipt comes marked as a duplicate.
                    Ok(Some((receipt, first))) if first == digest => {
                        Ok(Prepared::Duplicate(Box::new(receipt)))
                    }
                    Ok(Some(_)) => {
                        let reused = store::message_id_reused();
                        let reused = match refusal.citation {
                            Some(c) => reused.cited(|| c),
                            None => reused,
                        };
                        Err((reused.into(), facts()))
                    }
                    Ok(None) => {
                        // A refusal under an agreement due, overdue or lapsed for review says
                        // so too (the review refusal itself already does), and is counted.
                        if let Some(Citation::Clauses(clauses)) = &refusal.citation {
                            let warnings = rules.policy.review_warnings(
                                clauses.iter().map(|(agreement, _)| agreement.as_str()),
                                now.date(),
                            );
                            self.reviews.record(&warnings, &self.metrics);
                            if refusal.reason != Reason::AgreementReviewOverdue {
                                for w in &warnings {
                                    let base =
                                        refusal.message.trim_end().trim_end_matches('.').to_owned();
                                    refusal.message = format!("{base}. Note: {}", w.sentence);
                                }
                            }
                        }
                        Err((refusal.into(), facts()))
                    }
                    Err(e) => Err((e.into(), None)),
                };
            }
            Err(internal) => return Err((internal, None)),
        };
        // The disk floor: nothing new is taken on a nearly full disk, while acknowledgements
        // (which free queue space) go on.
        let free = self.store.free_bytes();
        if free < rules.limits.min_free_bytes {
            let refusal = Refusal::new(
                Reason::StorageFull,
                format!(
                    "the broker's disk has {} MiB free, below its floor of {} MiB: it takes no \
                     new transfers until space is freed; try again later",
                    free / (1024 * 1024),
                    rules.limits.min_free_bytes / (1024 * 1024)
                ),
            )
            .cited(|| decision.citation());
            let facts = store::refused_facts(sender, &envelope, &payload_sha256);
            return Err((refusal.into(), Some(Box::new(facts))));
        }
        let warnings = rules.policy.review_warnings(
            decision.authorities.iter().map(|a| a.agreement_id.as_str()),
            now.date(),
        );
        // A workflow step's deadlines follow the agreement each flow relies on.
        let workflow = envelope.workflow.as_ref().map(|_| StepContext {
            default_due: decision
                .authorities
                .iter()
                .map(|a| {
                    (
                        a.recipient.clone(),
                        rules.policy.workflows.default_due(&a.agreement_id, now),
                    )
                })
                .collect(),
            reminder_before: rules.policy.workflows.reminder_before,
        });
        let mut accept = Accept::new(
            sender.clone(),
            envelope,
            decision,
            digest,
            now,
            rules.limits.max_queue_depth,
        );
        accept.workflow = workflow;
        Ok(Prepared::Accept(Op::Accept(Box::new(accept)), warnings))
    }

    /// [`State::submit`], with the outcome logged, naming the call it came by (`rpc`).
    async fn submit_logged(
        &self,
        call: &Call,
        sender: &AgencyId,
        wire: pb::Envelope,
    ) -> Result<pb::Receipt, Failure> {
        let message_id = wire
            .message_id
            .parse::<concordat_proto::ids::MessageId>()
            .ok();
        // By name (`threat_assessment`), never the wire's number; absent when it is not a kind.
        let kind = concordat_proto::envelope::Kind::try_from(wire.kind)
            .ok()
            .map(tracing::field::display);
        let outcome = self.submit(sender, wire).await;
        let message_id = message_id
            .map(|m| m.to_string())
            .unwrap_or_else(|| "<invalid>".into());
        match &outcome {
            Ok(receipt) => {
                if !receipt.duplicate {
                    self.metrics.accepted();
                }
                tracing::info!(
                    agency = %sender,
                    rpc = call.rpc,
                    transfer = %receipt.transfer_id,
                    message_id = %message_id,
                    kind,
                    recipients = receipt.authorities.len(),
                    duplicate = receipt.duplicate,
                    "accepted"
                )
            }
            Err(Failure::Refused(r)) => {
                self.metrics.refused(r.reason.as_str());
                tracing::warn!(agency = %sender, rpc = call.rpc, message_id = %message_id, kind, reason = %r.reason, "refused: {}", r.message);
            }
            Err(Failure::Internal(e)) => {
                tracing::error!(agency = %sender, rpc = call.rpc, message_id = %message_id, error = %e, "send failed");
            }
        }
        outcome
    }
}

/// What [`State::prepare`] decided.
enum Prepared {
    /// The message was accepted before: its first receipt.
    Duplicate(Box<pb::Receipt>),
    /// Accept it with this write; the decision's review warnings.
    Accept(Op, Vec<policy::ReviewWarning>),
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `Exchange` service.
pub struct ExchangeService {
    state: Arc<State>,
    /// What the transport reads of one envelope, for the refusals of a stream's envelopes.
    limit: ReadLimit,
}

impl ExchangeService {
    /// The service over shared state, whose transport reads envelopes up to `limit`.
    pub fn new(state: Arc<State>, limit: ReadLimit) -> Self {
        ExchangeService { state, limit }
    }
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for ExchangeService {
    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let call = call(&request)?;
        let caller = &call.caller;
        let display_name = self
            .state
            .authenticator
            .display_name(caller.id())
            .unwrap_or("auditor")
            .to_owned();
        tracing::debug!(agency = %caller.id(), "hello");
        Ok(Response::new(pb::HelloResponse {
            agency_id: caller.id().to_string(),
            display_name,
            auditor: matches!(caller, Caller::Auditor(_)),
            broker_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn send(&self, request: Request<pb::Envelope>) -> Result<Response<pb::Receipt>, Status> {
        let call = call(&request)?;
        let sender = self.state.agency_of(&call).await?;
        let receipt = self
            .state
            .submit_logged(&call, &sender, request.into_inner())
            .await?;
        Ok(Response::new(receipt))
    }

    type SendStreamStream = ResponseStream<pb::SendResult>;

    async fn send_stream(
        &self,
        request: Request<Streaming<pb::Envelope>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let call = call(&request)?;
        let sender = self.state.agency_of(&call).await?;
        let state = self.state.clone();
        let limit = self.limit;
        // At shutdown the stream takes no more envelopes; those it has are answered, and the
        // call ends, so that graceful shutdown does not wait for a sender that keeps sending.
        let mut shutdown = self.state.shutdown.clone();
        let results = request
            .into_inner()
            .take_until(async move {
                let _ = shutdown.wait_for(|stopping| *stopping).await;
            })
            .map(move |item| {
                let state = state.clone();
                let sender = sender.clone();
                let call = call.clone();
                async move {
                    let wire = match item {
                        Ok(wire) => wire,
                        // The transport's refusals of one envelope (too large, does not decode)
                        // end the stream, with the broker's reasons.
                        Err(status) => {
                            return Err(match from_transport(&status, limit) {
                                Some(refusal) => state.refuse(&call, refusal).await,
                                None => status,
                            });
                        }
                    };
                    let message_id = wire.message_id.clone();
                    let outcome = match state.submit_logged(&call, &sender, wire).await {
                        Ok(receipt) => pb::send_result::Outcome::Receipt(receipt),
                        Err(Failure::Refused(r)) => {
                            pb::send_result::Outcome::Refusal(pb::Refusal {
                                reason: r.reason.as_str().into(),
                                message: r.message,
                            })
                        }
                        // Internal errors end the stream: the client retries what is unanswered.
                        Err(Failure::Internal(e)) => return Err(Status::from(e)),
                    };
                    Ok(pb::SendResult {
                        message_id,
                        outcome: Some(outcome),
                    })
                }
            })
            .buffered(STREAM_PIPELINE);
        Ok(Response::new(Box::pin(results)))
    }

    type SubscribeStream = ResponseStream<pb::Delivery>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let call = call(&request)?;
        let recipient = self.state.agency_of(&call).await?;
        let max = self.state.rules.load().limits.max_window;
        let window = match request.get_ref().window {
            0 => max,
            w => w.min(max),
        } as usize;
        // One node at a time delivers an agency's items (several nodes on one PostgreSQL
        // database): each subscription holds a claim until it ends.
        if !self.state.store.claim_deliveries(&recipient)? {
            let refusal = Refusal::new(
                Reason::DeliveriesOnAnotherNode,
                format!(
                    "another broker node serves {recipient}'s deliveries while its subscriptions there are open; subscribe there, or here once they have ended"
                ),
            );
            return Err(self.state.refuse(&call, refusal).await);
        }
        let Some(registered) = self.state.dispatcher.register(&recipient) else {
            self.state.store.release_deliveries(&recipient);
            let refusal = Refusal::new(
                Reason::TooManySubscriptions,
                format!(
                    "{recipient} already holds {} subscriptions; close one first",
                    crate::dispatch::MAX_SUBSCRIPTIONS
                ),
            );
            return Err(self.state.refuse(&call, refusal).await);
        };
        let (tx, rx) = mpsc::channel(window);
        self.state.metrics.subscribed(recipient.as_str(), true);
        tracing::info!(agency = %recipient, window, "subscribed");
        tokio::spawn(deliver(
            self.state.clone(),
            recipient,
            window,
            tx,
            registered,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let call = call(&request)?;
        let recipient = self.state.agency_of(&call).await?;
        let ids = request.into_inner().delivery_ids;
        if ids.len() > MAX_ACK_IDS {
            let refusal = Refusal::new(
                Reason::Malformed,
                format!("at most {MAX_ACK_IDS} delivery ids per Ack"),
            );
            return Err(self.state.refuse(&call, refusal).await);
        }
        let seqs = match ids
            .iter()
            .map(|id| id.parse::<u64>())
            .collect::<Result<Vec<u64>, _>>()
        {
            Ok(seqs) => seqs,
            Err(_) => {
                let refusal = Refusal::new(Reason::Malformed, "delivery ids are decimal numbers");
                return Err(self.state.refuse(&call, refusal).await);
            }
        };
        let applied = self
            .state
            .store
            .commit(Op::Ack {
                recipient: recipient.clone(),
                seqs: seqs.clone(),
            })
            .await?;
        self.state.dispatcher.acked(&recipient, &seqs);
        let Applied::Acked(acknowledged) = applied else {
            return Err(
                Internal::new("acknowledging", format!("unexpected outcome {applied:?}")).into(),
            );
        };
        self.state.metrics.acknowledged(u64::from(acknowledged));
        tracing::debug!(agency = %recipient, acknowledged, "acknowledged");
        Ok(Response::new(pb::AckResponse { acknowledged }))
    }
}

/// Feeds one subscription: claims the oldest available durable items up to the window, sends
/// them, and waits for acknowledgements, new items or the end.
async fn deliver(
    state: Arc<State>,
    recipient: AgencyId,
    window: usize,
    tx: mpsc::Sender<Result<pb::Delivery, Status>>,
    registered: (
        crate::dispatch::SubscriptionId,
        std::sync::Arc<tokio::sync::Notify>,
    ),
) {
    let (sub, notify) = registered;
    let mut durable = state.store.durable();
    let mut shutdown = state.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Register for wake-ups before looking, so none is missed in between.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let budget = window.saturating_sub(state.dispatcher.in_flight(&recipient, sub));
        let latest = *durable.borrow_and_update();
        let items =
            match state
                .dispatcher
                .claim(state.store.storage(), &recipient, sub, latest, budget)
            {
                Ok(items) => items,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
            };
        if !items.is_empty() {
            let logged: Vec<(u64, String, crate::store::Carried)> = items
                .iter()
                .map(|item| {
                    let (carried, id) = crate::store::Carried::of(&item.body);
                    (item.seq, id.to_owned(), carried)
                })
                .collect();
            let logged = state
                .store
                .commit(Op::Delivered {
                    recipient: recipient.clone(),
                    items: logged,
                })
                .await;
            if let Err(e) = logged {
                let _ = tx.send(Err(e.into())).await;
                break;
            }
        }
        // Each delivery carries the proof of the entry it was queued under, all against one
        // checkpoint.
        let proofs = if items.is_empty() {
            Vec::new()
        } else {
            match state.store.prove_deliveries(&items).await {
                Ok(proofs) => proofs,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
            }
        };
        let mut gone = false;
        let mut sent = 0;
        for (item, audit) in items.into_iter().zip(proofs) {
            let delivery = pb::Delivery {
                delivery_id: item.seq.to_string(),
                body: Some(item.body),
                audit,
            };
            if tx.send(Ok(delivery)).await.is_err() {
                gone = true;
                break;
            }
            sent += 1;
        }
        state.metrics.delivered(sent);
        if gone {
            break;
        }
        tokio::select! {
            () = &mut notified => {}
            changed = durable.changed() => if changed.is_err() { break },
            () = tx.closed() => break,
            _ = shutdown.changed() => {}
        }
    }
    state.dispatcher.release(&recipient, sub);
    state.store.release_deliveries(&recipient);
    state.metrics.subscribed(recipient.as_str(), false);
    tracing::info!(agency = %recipient, "subscription ended");
}

/// The `Consent` service.
pub struct ConsentService {
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
        let call = call(&request)?;
        let caller = &call.caller;
        let submitter = self.state.agency_of(&call).await?;
        let token = request.into_inner().revocation;
        let verified = (|| {
            let invalid = |e: consent::ConsentError| {
                Refusal::new(
                    Reason::RevocationInvalid,
                    format!("revocation statement: {e}"),
                )
            };
            if token.len() > paseto::MAX_TOKEN_LEN {
                return Err(invalid(consent::ConsentError::TooLong));
            }
            let key_id = consent::key_id_of(&token).map_err(invalid)?;
            let rules = self.state.rules.load();
            let Some(issuer) = rules.policy.issuers.get(&key_id) else {
                return Err(Refusal::new(
                    Reason::ConsentUnknownIssuer,
                    format!("revocation signed by {key_id}, which this broker does not trust"),
                ));
            };
            let revocation = consent::verify_revocation(&token, &issuer.key).map_err(invalid)?;
            let only = match &issuer.organisations {
                policy::Organisations::Only(set) if set.len() == 1 => set.first().cloned(),
                _ => None,
            };
            Ok((key_id, revocation, only))
        })();
        let (key_id, revocation, issuer_organisation) = match verified {
            Ok(verified) => verified,
            Err(refusal) => return Err(self.state.refuse(&call, refusal).await),
        };
        let target = match revocation.target() {
            consent::RevocationTarget::Token(jti) => RevokeTarget::Token(jti),
            consent::RevocationTarget::IssuedBefore(t) => RevokeTarget::IssuedBefore(t),
        };
        // For the log: the one token, or the time before which every token is revoked.
        let (token, issued_before) = match &target {
            RevokeTarget::Token(jti) => (Some(jti.to_string()), None),
            RevokeTarget::IssuedBefore(t) => (
                None,
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok(),
            ),
        };
        let applied = self
            .state
            .store
            .commit(Op::Revoke(Box::new(Revoke {
                submitted_by: submitter,
                issuer: key_id,
                target,
                issuer_organisation,
                revoked_at: crate::clock::now(),
            })))
            .await?;
        let Applied::Revoked {
            recall_notices,
            duplicate,
        } = applied
        else {
            return Err(
                Internal::new("revoking", format!("unexpected outcome {applied:?}")).into(),
            );
        };
        tracing::info!(
            agency = %caller.id(),
            issuer = %key_id,
            token = token.as_deref(),
            issued_before = issued_before.as_deref(),
            recall_notices,
            duplicate,
            "consent revoked"
        );
        Ok(Response::new(pb::RevokeResponse {
            recall_notices,
            duplicate,
        }))
    }
}

/// The `Audit` service.
pub struct AuditService {
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
        let call = call(&request)?;
        let caller = &call.caller;
        let req = request.into_inner();
        // An auditor reads every entry; an agency only those it is a party to
        // (`audit::Filter::party`). An agency naming another agency is refused rather than
        // quietly given its own entries, so that it cannot mistake them for the other's.
        let party = match caller {
            Caller::Auditor(_) => None,
            Caller::Agency(me) => {
                if !req.agency.is_empty() && req.agency != me.as_str() {
                    let refusal = Refusal::new(
                        Reason::NotAuthorised,
                        format!(
                            "{me} may export only the entries it is a party to, not those of {}; \
                             leave the agency out or name {me}",
                            req.agency.chars().take(64).collect::<String>()
                        ),
                    );
                    return Err(self.state.refuse(&call, refusal).await);
                }
                Some(me.to_string())
            }
        };
        let mut logged = pb::AuditExported {
            auditor: caller.id().to_string(),
            since: req.since,
            until: req.until,
            agency: req.agency.clone(),
            organisation: req.organisation.clone(),
            reason: req.reason.clone(),
            index_from: req.index_from,
            ..Default::default()
        };
        let filter = audit::Filter {
            since: req.since.map(|t| t.seconds),
            until: req.until.map(|t| t.seconds),
            // An agency's own id adds nothing to its party filter.
            agency: (!req.agency.is_empty() && party.is_none()).then_some(req.agency),
            organisation: (!req.organisation.is_empty()).then_some(req.organisation),
            reason: (!req.reason.is_empty()).then_some(req.reason),
            party,
        };
        // With `current` false the export is of a shorter log (consistent, and saying its size).
        let (Some(cp), _current) = self.state.store.checkpoint_now().await else {
            return Err(Internal::new("exporting", "no checkpoint has been signed yet").into());
        };
        let end = if req.index_to == 0 {
            cp.size
        } else {
            req.index_to.min(cp.size)
        };
        if req.index_from > end {
            let refusal = Refusal::new(
                Reason::Malformed,
                format!("index_from {} is beyond {end}", req.index_from),
            );
            return Err(self.state.refuse(&call, refusal).await);
        }
        logged.index_to = end;
        logged.checkpoint_size = cp.size;
        // Proofs are needed whenever the export is not the whole log.
        let partial = !filter.is_empty() || req.index_from > 0 || end < cp.size;
        tracing::info!(exporter = %caller.id(), size = cp.size, from = req.index_from, to = end, partial, "audit export");
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let (entries, complete) = async {
                if tx
                    .send(Ok(pb::ExportItem {
                        item: Some(pb::export_item::Item::Checkpoint(cp.note.clone())),
                    }))
                    .await
                    .is_err()
                {
                    return (0, false);
                }
                let storage = state.store.storage();
                let mut index = req.index_from;
                let mut sent = 0;
                while index < end {
                    let want = usize::try_from((end - index).min(EXPORT_CHUNK)).unwrap_or(1);
                    let chunk = match storage.log_entries(index, want) {
                        Ok(chunk) if !chunk.is_empty() => chunk,
                        Ok(_) => {
                            let e = Internal::new("exporting", format!("entry {index} is missing"));
                            let _ = tx.send(Err(Status::from(e))).await;
                            return (sent, false);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return (sent, false);
                        }
                    };
                    for bytes in chunk {
                        let record =
                            export_record(storage, &filter, partial, cp.size, index, bytes);
                        index += 1;
                        let item = match record {
                            Ok(None) => continue,
                            Ok(Some(r)) => Ok(pb::ExportItem {
                                item: Some(pb::export_item::Item::Record(r)),
                            }),
                            Err(e) => Err(Status::from(e)),
                        };
                        let failed = item.is_err();
                        if tx.send(item).await.is_err() || failed {
                            return (sent, false);
                        }
                        sent += 1;
                    }
                }
                (sent, true)
            }
            .await;
            // The export is in the log before its stream ends.
            logged.entries = entries;
            logged.complete = complete;
            tracing::info!(exporter = %logged.auditor, entries, complete, "audit export ended");
            let op = Op::Log(Box::new(pb::audit_entry::Event::AuditExported(logged)));
            if let Err(e) = state.store.commit(op).await {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let call = call(&request)?;
        let req = request.into_inner();
        let (Some(cp), current) = self.state.store.checkpoint_now().await else {
            return Err(Internal::new(
                "reading the checkpoint",
                "no checkpoint has been signed yet",
            )
            .into());
        };
        let to = if req.to_size == 0 {
            cp.size
        } else {
            req.to_size
        };
        if to > cp.size && !current {
            // The store may hold that size, signed by another node: this one has not caught
            // up in time, which is no fault of the caller's.
            let refusal = Refusal::new(
                Reason::StorageUnavailable,
                format!(
                    "this broker node has signed {} entries and could not sign more in time; try again or ask another node",
                    cp.size
                ),
            );
            return Err(self.state.refuse(&call, refusal).await);
        }
        if to > cp.size || req.from_size > to {
            if to > cp.size {
                // What a witness holding a checkpoint this log does not reach would ask.
                self.state.metrics.consistency_refused();
            }
            let refusal = Refusal::new(
                Reason::Malformed,
                format!(
                    "need from_size <= to_size <= {} (got {} and {to})",
                    cp.size, req.from_size
                ),
            );
            return Err(self.state.refuse(&call, refusal).await);
        }
        let proof = if req.from_size == 0 || req.from_size == to {
            Vec::new()
        } else {
            self.state
                .store
                .storage()
                .prove_consistency(req.from_size, to)?
        };
        Ok(Response::new(pb::CheckpointResponse {
            checkpoint: cp.note,
            consistency_proof: proof.into_iter().map(|h| h.0.to_vec()).collect(),
        }))
    }
}

/// Entries read from storage at a time by an export.
const EXPORT_CHUNK: u64 = 1024;

/// The export record of entry `index`, or `None` if the filter leaves it out.
fn export_record(
    storage: &dyn crate::store::Storage,
    filter: &audit::Filter,
    partial: bool,
    size: u64,
    index: u64,
    bytes: Vec<u8>,
) -> Result<Option<pb::ExportRecord>, Internal> {
    if !filter.is_empty() {
        let entry = audit::decode(&bytes).map_err(|e| Internal::new("exporting", e))?;
        if !filter.matches(&entry) {
            return Ok(None);
        }
    }
    let inclusion_proof = if partial {
        storage
            .prove_entry(index, size)?
            .into_iter()
            .map(|h| h.0.to_vec())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Some(pb::ExportRecord {
        index,
        entry: bytes,
        inclusion_proof,
    }))
}
