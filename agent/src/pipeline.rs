//! Pipelined sending: the envelopes of one pass over the outbox share one `SendStream`, which
//! the broker answers envelope by envelope, in order (the contract in `concordat.proto`).
//! Each sender waits for its own envelope's answer. What the stream cannot answer is handed
//! back as [`Sent::Interrupted`], to be sent again by a `Send` call of its own, so that one
//! envelope's failure (a payload over the broker's limit ends the stream) never stands for
//! another's.

use std::{collections::VecDeque, time::Duration};

use concordat_proto::pb::{self, exchange_client::ExchangeClient, send_result::Outcome};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::client::Broker;

/// What became of one envelope sent through a [`Pipeline`].
#[derive(Debug)]
pub enum Sent {
    /// The broker's answer to this envelope: its receipt or its refusal.
    Answered(Box<Outcome>),
    /// The stream ended on this envelope with `Status`: what a `Send` of it would have met
    /// (a refusal the transport could not carry as a result, or the connection's failure).
    Failed(tonic::Status),
    /// The stream ended before answering this envelope, on another's account, or could not
    /// be opened: send it again on its own.
    Interrupted,
}

/// One envelope waiting for its answer.
type Submission = (pb::Envelope, oneshot::Sender<Sent>);

/// One `SendStream` to the broker, open while the handle lives; closed (once what was sent is
/// answered, or after the RPC timeout) when it is dropped.
pub struct Pipeline {
    submit: mpsc::Sender<Submission>,
}

impl Pipeline {
    /// A stream to `broker` for at most `in_flight` envelopes at once. It opens with the first
    /// envelope sent.
    pub fn open(broker: &Broker, in_flight: usize) -> Pipeline {
        let in_flight = in_flight.max(1);
        let (submit, submissions) = mpsc::channel(in_flight);
        tokio::spawn(drive(
            broker.exchange(),
            submissions,
            in_flight,
            broker.rpc_timeout(),
        ));
        Pipeline { submit }
    }

    /// Sends `envelope` and waits for its answer (bound the wait with [`Broker::deadline`]).
    pub async fn send(&self, envelope: pb::Envelope) -> Sent {
        let (answer, answered) = oneshot::channel();
        if self.submit.send((envelope, answer)).await.is_err() {
            return Sent::Interrupted;
        }
        answered.await.unwrap_or(Sent::Interrupted)
    }
}

/// Runs the stream: forwards submissions in order and hands each result to the envelope at
/// the head of the queue. Whoever is still waiting when it returns is told `Interrupted`
/// (their answer channels are dropped).
async fn drive(
    mut client: ExchangeClient<Channel>,
    mut submissions: mpsc::Receiver<Submission>,
    in_flight: usize,
    timeout: Duration,
) {
    let Some((first, answer)) = submissions.recv().await else {
        return;
    };
    let (requests, request_stream) = mpsc::channel::<pb::Envelope>(in_flight);
    let mut waiting: VecDeque<(String, oneshot::Sender<Sent>)> = VecDeque::new();
    waiting.push_back((first.message_id.clone(), answer));
    if requests.try_send(first).is_err() {
        return;
    }
    let mut results = match client
        .send_stream(ReceiverStream::new(request_stream))
        .await
    {
        Ok(results) => results.into_inner(),
        // Refused or failed as a whole: each envelope goes again on its own and meets its own
        // answer.
        Err(_) => return,
    };
    let mut requests = Some(requests);
    loop {
        if requests.is_none() && waiting.is_empty() {
            return;
        }
        let result = tokio::select! {
            submission = submissions.recv(), if requests.is_some() => {
                match (submission, &requests) {
                    (Some((envelope, answer)), Some(to_broker)) => {
                        waiting.push_back((envelope.message_id.clone(), answer));
                        if to_broker.send(envelope).await.is_err() {
                            return;
                        }
                    }
                    // The pass is over: closing the request stream lets the broker end the
                    // call once everything sent is answered.
                    _ => requests = None,
                }
                continue;
            }
            result = tokio::time::timeout(timeout, results.message()), if !waiting.is_empty() => result,
        };
        match result {
            Ok(Ok(Some(result))) => {
                let Some((message_id, answer)) = waiting.pop_front() else {
                    return;
                };
                match result.outcome {
                    // Answers out of order cannot be trusted to belong to anyone.
                    Some(outcome) if result.message_id == message_id => {
                        let _ = answer.send(Sent::Answered(Box::new(outcome)));
                    }
                    _ => {
                        tracing::warn!(
                            expected = %message_id,
                            got = %result.message_id,
                            "the broker's SendStream answered out of order or without an outcome; sending one by one"
                        );
                        return;
                    }
                }
            }
            Ok(Err(status)) => {
                if let Some((_, answer)) = waiting.pop_front() {
                    let _ = answer.send(Sent::Failed(status));
                }
                return;
            }
            // Ended early, or silent for the RPC timeout: the callers' own deadlines apply.
            Ok(Ok(None)) | Err(_) => return,
        }
    }
}
