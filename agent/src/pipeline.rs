//! Pipelined sending: the envelopes of one pass over the outbox share one `SendStream`, which
//! the broker answers envelope by envelope, in order (the contract in `concordat.proto`).
//! Each sender waits for its own envelope's answer. What the stream cannot answer is handed
//! back as [`Sent::Interrupted`], to be sent again by a `Send` call of its own, so that one
//! envelope's failure (a payload over the broker's limit ends the stream) never stands for
//! another's.
//!
//! Time: the stream is given up when the broker answers nothing for the RPC timeout while
//! envelopes wait, or when an envelope has waited twice the RPC timeout (every one waiting is
//! then told `DEADLINE_EXCEEDED`, as a `Send` would be), or when it does not open within the
//! RPC timeout. A slow envelope delays those behind it (answers come in order) but times none
//! of them out while answers keep coming. A stream that has ended is opened again for the
//! next envelope.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use concordat_proto::pb::{self, exchange_client::ExchangeClient, send_result::Outcome};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::client::Broker;

/// What became of one envelope sent through a [`Pipeline`].
#[derive(Debug)]
pub enum Sent {
    /// The broker's answer to this envelope: its receipt or its refusal.
    Answered(Box<Outcome>),
    /// The stream ended on this envelope with `Status`: what a `Send` of it would have met
    /// (a refusal the transport could not carry as a result, the connection's failure, or
    /// no answer within the RPC timeout).
    Failed(tonic::Status),
    /// The stream ended before answering this envelope, on another's account, or could not
    /// be opened: send it again on its own.
    Interrupted,
}

/// One envelope to send, and where its answer goes.
type Submission = (pb::Envelope, oneshot::Sender<Sent>);

/// One envelope sent: its message id, where its answer goes, and when it was sent.
type Waiting = (String, oneshot::Sender<Sent>, Instant);

/// When the stream is given up: no answer for `timeout` since the last progress, or the
/// oldest envelope waiting for twice `timeout`.
fn give_up(progress: Instant, waiting: &VecDeque<Waiting>, timeout: Duration) -> Instant {
    let last = progress + timeout;
    match waiting.front() {
        Some((_, _, sent)) => last.min(*sent + timeout * 2),
        None => last,
    }
}

/// One `SendStream` to the broker at a time, open while the handle lives and closed once what
/// was sent is answered (or given up, as above) after it is dropped.
pub struct Pipeline {
    broker: Broker,
    in_flight: usize,
    submit: Mutex<mpsc::Sender<Submission>>,
}

impl Pipeline {
    /// A stream to `broker` for at most `in_flight` envelopes at once. It opens with the first
    /// envelope sent.
    pub fn open(broker: &Broker, in_flight: usize) -> Pipeline {
        let in_flight = in_flight.max(1);
        Pipeline {
            broker: broker.clone(),
            in_flight,
            submit: Mutex::new(start(broker, in_flight)),
        }
    }

    /// Sends `envelope` and waits for its answer, which comes within the bounds above.
    pub async fn send(&self, envelope: pb::Envelope) -> Sent {
        let submit = {
            let mut submit = self.submit.lock().unwrap_or_else(|e| e.into_inner());
            if submit.is_closed() {
                *submit = start(&self.broker, self.in_flight);
            }
            submit.clone()
        };
        let (answer, answered) = oneshot::channel();
        if submit.send((envelope, answer)).await.is_err() {
            return Sent::Interrupted;
        }
        answered.await.unwrap_or(Sent::Interrupted)
    }
}

/// A new stream's driver, and where to submit to it.
fn start(broker: &Broker, in_flight: usize) -> mpsc::Sender<Submission> {
    let (submit, submissions) = mpsc::channel(in_flight);
    tokio::spawn(drive(broker.clone(), submissions));
    submit
}

/// Runs the stream: forwards submissions in order and hands each result to the envelope at
/// the head of the queue. Whoever is still waiting when it returns is told `Interrupted`
/// (their answer channels are dropped), unless told otherwise first.
async fn drive(broker: Broker, mut submissions: mpsc::Receiver<Submission>) {
    let timeout = broker.rpc_timeout();
    let Some((first, answer)) = submissions.recv().await else {
        return;
    };
    // Unbounded, but never holding more than the submissions' capacity: each envelope in it
    // has a place in `waiting`, whose length the senders bound.
    let (requests, request_stream) = mpsc::unbounded_channel::<pb::Envelope>();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    waiting.push_back((first.message_id.clone(), answer, Instant::now()));
    // When the broker last showed progress: the last answer, or the first envelope sent
    // after a time with nothing waiting.
    let mut progress = Instant::now();
    if requests.send(first).is_err() {
        return;
    }
    let mut client: ExchangeClient<Channel> = broker.exchange();
    let opened = tokio::time::timeout(
        timeout,
        client.send_stream(UnboundedReceiverStream::new(request_stream)),
    )
    .await;
    // Refused or failed as a whole, or not opened in time: each envelope goes again on its
    // own and meets its own answer.
    let Ok(Ok(results)) = opened else {
        return;
    };
    let mut results = results.into_inner();
    let mut requests = Some(requests);
    loop {
        if requests.is_none() && waiting.is_empty() {
            return;
        }
        tokio::select! {
            submission = submissions.recv(), if requests.is_some() => {
                match (submission, &requests) {
                    (Some((envelope, answer)), Some(to_broker)) => {
                        if waiting.is_empty() {
                            progress = Instant::now();
                        }
                        waiting.push_back((envelope.message_id.clone(), answer, Instant::now()));
                        if to_broker.send(envelope).is_err() {
                            return;
                        }
                    }
                    // The pass is over: closing the request stream lets the broker end the
                    // call once everything sent is answered.
                    _ => requests = None,
                }
            }
            result = results.message(), if !waiting.is_empty() => {
                progress = Instant::now();
                match result {
                    Ok(Some(result)) => {
                        let Some((message_id, answer, _)) = waiting.pop_front() else {
                            return;
                        };
                        match result.outcome {
                            Some(outcome) if result.message_id == message_id => {
                                let _ = answer.send(Sent::Answered(Box::new(outcome)));
                            }
                            // Answers out of order cannot be trusted to belong to anyone.
                            _ => {
                                tracing::warn!(
                                    expected = %message_id,
                                    got = %concordat_support::escape::Escaped(&result.message_id),
                                    "the broker's SendStream answered out of order or without an outcome; sending one by one"
                                );
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        if let Some((_, answer, _)) = waiting.pop_front() {
                            let _ = answer.send(Sent::Failed(status));
                        }
                        return;
                    }
                }
            }
            () = tokio::time::sleep_until(give_up(progress, &waiting, timeout)), if !waiting.is_empty() => {
                // Dropping the call cancels it on the broker, as a `Send` past its deadline.
                for (_, answer, _) in waiting.drain(..) {
                    let _ = answer.send(Sent::Failed(broker.deadline_exceeded()));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_given_up_on_silence_or_on_an_envelope_waiting_too_long() {
        let t = Duration::from_secs(30);
        let now = Instant::now();
        let (answer, _) = oneshot::channel();
        // Nothing old waiting: silence for the timeout since the last progress.
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        waiting.push_back(("a".into(), answer, now));
        assert_eq!(give_up(now, &waiting, t), now + t);
        // Answers keep coming, but the oldest has waited: twice the timeout from its sending.
        let later = now + Duration::from_secs(50);
        assert_eq!(give_up(later, &waiting, t), now + t * 2);
    }
}
