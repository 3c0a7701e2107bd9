//! The agent daemon: two loops over one spool directory.
//!
//! - The **outbox loop** sends each complete file in `outbox/` (several at once) and moves it to
//!   `sent/`, `refused/` or `failed/` with a sidecar explaining why. A file whose send failed for
//!   a transport reason stays in the outbox and is retried under the same message id, so the
//!   broker returns the first decision rather than making a second transfer.
//! - The **inbox loop** subscribes to the broker, writes each delivery durably to `inbox/`, and
//!   only then acknowledges it. A delivery the inbox refuses (a full disk) is written again with
//!   a short backoff on the same subscription until it goes in; unacknowledged deliveries are
//!   redelivered after a reconnect; the spool writes each message once.
//!
//! Both reconnect with exponential backoff and jitter, and log each change of connection state
//! once. On shutdown the outbox loop finishes the files in hand and the inbox loop the delivery
//! in hand, then both return.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use concordat_proto::pb;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use concordat_proto::checkpoint::LogVerifier;

use crate::{
    client::{Broker, ClientTls},
    config::AgentConfig,
    operator::refusal_of,
    spool::{Delivered, DeliveryError, Spool},
    witness::{Witness, WitnessError},
};

/// How often the outbox is looked at when it was empty.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How many outbox files are in flight at once.
const SEND_CONCURRENCY: usize = 32;
/// The most delivery ids acknowledged in one call.
const ACK_BATCH: usize = 256;

/// The first pause before writing a delivery again that the inbox refused.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest pause between attempts to write a refused delivery.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a delivery that still cannot be written is logged at error level again.
const STORE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Refusals that are about the broker's state rather than the message: the file stays in the
/// outbox and is retried later.
const TRANSIENT_REASONS: [&str; 3] = [
    "RECIPIENT_QUEUE_FULL",
    "STORAGE_FULL",
    "STORAGE_UNAVAILABLE",
];

/// What the agent did, for callers that watch it (the demo, tests).
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// An outbox file was accepted and moved to `sent/`.
    Sent {
        /// The outbox file name.
        file: String,
        /// Where it is now.
        path: PathBuf,
        /// The broker's receipt.
        receipt: Box<pb::Receipt>,
    },
    /// An outbox file was refused and moved to `refused/`.
    Refused {
        /// The outbox file name.
        file: String,
        /// Where it is now.
        path: PathBuf,
        /// The reason code.
        reason: String,
        /// The broker's message.
        message: String,
    },
    /// An outbox file could not be parsed and was moved to `failed/`.
    Failed {
        /// The outbox file name.
        file: String,
        /// Where it is now.
        path: PathBuf,
        /// The parse error.
        error: String,
    },
    /// The broker's audit log contradicted itself: the agent stopped sending.
    Alarm {
        /// What was found.
        message: String,
    },
    /// A delivery is in the inbox (and was acknowledged).
    Delivered {
        /// The inbox file.
        path: PathBuf,
        /// True if it was already there from an earlier delivery.
        duplicate: bool,
    },
}

/// Everything the daemon needs, built from `agent.toml` or in code.
#[derive(Clone)]
pub struct AgentSettings {
    /// How to reach the broker.
    pub tls: ClientTls,
    /// The spool directory.
    pub spool: PathBuf,
    /// The first reconnect delay.
    pub min_backoff: Duration,
    /// The longest reconnect delay.
    pub max_backoff: Duration,
    /// Deliveries in flight at once.
    pub window: u32,
    /// The key that verifies the broker's audit log checkpoints; without it receipts' audit
    /// proofs are not checked.
    pub log_key: Option<LogVerifier>,
}

impl AgentSettings {
    /// Settings from a loaded configuration (reads the TLS files).
    pub fn from_config(config: &AgentConfig) -> anyhow::Result<Self> {
        Ok(AgentSettings {
            tls: config.client_tls()?,
            spool: config.spool.clone(),
            min_backoff: config.min_backoff,
            max_backoff: config.max_backoff,
            window: config.window,
            log_key: config.log_key.clone(),
        })
    }
}

/// Exponential backoff with full jitter between two bounds.
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        ceiling.mul_f64(jitter).max(self.min / 2)
    }
}

/// Logs connection state changes once each.
struct Link {
    what: &'static str,
    up: Option<bool>,
}

impl Link {
    fn new(what: &'static str) -> Self {
        Link { what, up: None }
    }

    fn up(&mut self) {
        if self.up != Some(true) {
            tracing::info!(loop_ = self.what, "connected to the broker");
            self.up = Some(true);
        }
    }

    fn down(&mut self, why: &str) {
        if self.up != Some(false) {
            tracing::warn!(
                loop_ = self.what,
                "broker unavailable, retrying with backoff: {why}"
            );
            self.up = Some(false);
        }
    }
}

/// Runs the daemon until `shutdown` turns true. Reports what it does on `events`, if given.
pub async fn run(
    settings: AgentSettings,
    shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<AgentEvent>>,
) -> anyhow::Result<()> {
    let spool = Spool::open(&settings.spool)?;
    tracing::info!(spool = %settings.spool.display(), broker = %settings.tls.broker_url, "agent starting");
    let witness = match &settings.log_key {
        Some(key) => Some(Arc::new(Witness::new(key.clone(), spool.dir(".state"))?)),
        None => {
            tracing::warn!("no log_key configured: the audit proofs in receipts are not checked");
            None
        }
    };
    let outbox = tokio::spawn(outbox_loop(
        settings.clone(),
        spool.clone(),
        shutdown.clone(),
        events.clone(),
        witness,
    ));
    let inbox = tokio::spawn(inbox_loop(settings, spool, shutdown, events));
    let (a, b) = tokio::join!(outbox, inbox);
    a??;
    b??;
    tracing::info!("agent stopped");
    Ok(())
}

/// Sleeps for `delay` unless shutdown comes first; returns false on shutdown.
async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = shutdown.changed() => !*shutdown.borrow(),
    }
}

fn emit(events: &Option<mpsc::UnboundedSender<AgentEvent>>, event: AgentEvent) {
    if let Some(tx) = events {
        let _ = tx.send(event);
    }
}

/// What became of one outbox file.
enum FileOutcome {
    /// Done: moved out of the outbox.
    Done,
    /// Not done; retry after reconnecting.
    Retry(String),
}

async fn outbox_loop(
    settings: AgentSettings,
    spool: Spool,
    mut shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<AgentEvent>>,
    witness: Option<Arc<Witness>>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut link = Link::new("outbox");
    let mut broker: Option<Broker> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if witness.as_ref().is_some_and(|w| w.alarmed()) {
            // Sending stays stopped; files wait in the outbox for an operator.
            if !pause(Duration::from_secs(1), &mut shutdown).await {
                return Ok(());
            }
            continue;
        }
        let pending = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.pending()).await??
        };
        if pending.is_empty() {
            if !pause(POLL_INTERVAL, &mut shutdown).await {
                return Ok(());
            }
            continue;
        }
        let connected = match &broker {
            Some(b) => b.clone(),
            None => match settings.tls.connect().await {
                Ok(b) => {
                    link.up();
                    broker = Some(b.clone());
                    b
                }
                Err(e) => {
                    link.down(&e.to_string());
                    if !pause(backoff.next_delay(), &mut shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        // Files are taken in name order, several in flight; each file started is finished even
        // if shutdown comes meanwhile, but none is started after it.
        let mut retry: Option<String> = None;
        let stopping = shutdown.clone();
        let mut outcomes = futures::stream::iter(pending)
            .take_while(move |_| std::future::ready(!*stopping.borrow()))
            .map(|name| send_file(&connected, &spool, name, &events, witness.as_deref()))
            .buffer_unordered(SEND_CONCURRENCY);
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(FileOutcome::Done) => {}
                Ok(FileOutcome::Retry(why)) => retry = Some(why),
                Err(e) => return Err(e),
            }
        }
        drop(outcomes);
        match retry {
            None => {
                link.up();
                backoff.reset();
            }
            Some(why) => {
                link.down(&why);
                broker = None;
                if !pause(backoff.next_delay(), &mut shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends one outbox file and files it under its outcome. Errors are local I/O failures that
/// stop the agent (a full disk, say); transport failures are a `Retry`.
async fn send_file(
    broker: &Broker,
    spool: &Spool,
    name: String,
    events: &Option<mpsc::UnboundedSender<AgentEvent>>,
    witness: Option<&Witness>,
) -> anyhow::Result<FileOutcome> {
    if witness.is_some_and(Witness::alarmed) {
        return Ok(FileOutcome::Done);
    }
    let loaded = {
        let (spool, name) = (spool.clone(), name.clone());
        tokio::task::spawn_blocking(move || spool.load(&name)).await?
    };
    let envelope = match loaded {
        Ok(envelope) => envelope,
        Err(e) => {
            let error = e.to_string();
            tracing::warn!(file = %name, "malformed outbox file: {error}");
            let path = blocking(spool, move |s| {
                s.complete_failed(&name, &error).map(|p| (p, name, error))
            })
            .await?;
            emit(
                events,
                AgentEvent::Failed {
                    file: path.1,
                    path: path.0,
                    error: path.2,
                },
            );
            return Ok(FileOutcome::Done);
        }
    };
    let message_id = envelope.message_id;
    let mut client = broker.exchange();
    match broker
        .deadline(client.send(pb::Envelope::from(envelope)))
        .await
    {
        Ok(receipt) => {
            let receipt = receipt.into_inner();
            tracing::info!(file = %name, transfer = %receipt.transfer_id, message_id = %message_id, "sent");
            let (path, name, receipt) = blocking(spool, move |s| {
                s.complete_sent(&name, &receipt).map(|p| (p, name, receipt))
            })
            .await?;
            if let Some(w) = witness {
                match w.check_receipt(broker, &receipt).await {
                    Ok(()) => {}
                    Err(WitnessError::Alarm(message)) => {
                        emit(events, AgentEvent::Alarm { message })
                    }
                    Err(e) => tracing::warn!(file = %name, "audit proof not checked: {e}"),
                }
            }
            emit(
                events,
                AgentEvent::Sent {
                    file: name,
                    path,
                    receipt: Box::new(receipt),
                },
            );
            Ok(FileOutcome::Done)
        }
        Err(status) => match refusal_of(&status) {
            Some((reason, _)) if TRANSIENT_REASONS.contains(&reason.as_str()) => Ok(
                FileOutcome::Retry(format!("{reason}: {}", status.message())),
            ),
            Some((reason, message)) => {
                tracing::warn!(file = %name, message_id = %message_id, reason = %reason, "refused: {message}");
                let (path, name, reason, message) = blocking(spool, move |s| {
                    s.complete_refused(&name, message_id, &reason, &message)
                        .map(|p| (p, name, reason, message))
                })
                .await?;
                emit(
                    events,
                    AgentEvent::Refused {
                        file: name,
                        path,
                        reason,
                        message,
                    },
                );
                Ok(FileOutcome::Done)
            }
            None => Ok(FileOutcome::Retry(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        },
    }
}

/// Runs spool I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    spool: &Spool,
    f: impl FnOnce(&Spool) -> std::io::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let spool = spool.clone();
    Ok(tokio::task::spawn_blocking(move || f(&spool)).await??)
}

async fn inbox_loop(
    settings: AgentSettings,
    spool: Spool,
    mut shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<AgentEvent>>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut link = Link::new("inbox");
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        match receive(
            &settings,
            &spool,
            &mut shutdown,
            &events,
            &mut link,
            &mut backoff,
        )
        .await
        {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Disconnected(why)) => link.down(&why),
            Err(e) => return Err(e),
        }
        if !pause(backoff.next_delay(), &mut shutdown).await {
            return Ok(());
        }
    }
}

enum Ended {
    Shutdown,
    Disconnected(String),
}

/// One subscription: runs until the stream ends, fails, or shutdown.
async fn receive(
    settings: &AgentSettings,
    spool: &Spool,
    shutdown: &mut watch::Receiver<bool>,
    events: &Option<mpsc::UnboundedSender<AgentEvent>>,
    link: &mut Link,
    backoff: &mut Backoff,
) -> anyhow::Result<Ended> {
    let broker = match settings.tls.connect().await {
        Ok(b) => b,
        Err(e) => return Ok(Ended::Disconnected(e.to_string())),
    };
    // The deadline bounds the subscription's start; the stream itself runs until it ends, and
    // the connection's keepalive pings notice a broker that stops answering.
    let mut client = broker.exchange();
    let subscribed = client.subscribe(pb::SubscribeRequest {
        window: settings.window,
    });
    let mut stream = match broker.deadline(subscribed).await {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return Ok(Ended::Disconnected(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            )));
        }
    };
    link.up();
    backoff.reset();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<String>();
    let acker = tokio::spawn(ack_loop(broker.clone(), ack_rx));
    let ended = loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = shutdown.changed() => if *shutdown.borrow() { break Ended::Shutdown } else { continue },
        };
        let delivery = match next {
            Ok(Some(d)) => d,
            Ok(None) => break Ended::Disconnected("the broker ended the subscription".into()),
            Err(status) => {
                break Ended::Disconnected(format!("{:?}: {}", status.code(), status.message()));
            }
        };
        let id = delivery.delivery_id.clone();
        match store(spool, delivery, &id, shutdown).await? {
            Stored::Delivered(delivered) => {
                let duplicate = matches!(delivered, Delivered::AlreadyPresent(_));
                tracing::info!(delivery = %id, file = %delivered.path().display(), duplicate, "delivered");
                let _ = ack_tx.send(id);
                emit(
                    events,
                    AgentEvent::Delivered {
                        path: delivered.path().to_path_buf(),
                        duplicate,
                    },
                );
            }
            Stored::Unusable(why) => {
                // Not acknowledged: the broker keeps it, for an operator to look into.
                tracing::error!(delivery = %id, "cannot store a delivery; leaving it with the broker: {why}");
            }
            Stored::Shutdown => break Ended::Shutdown,
        }
    };
    drop(ack_tx);
    // Let the last acknowledgements go out before the connection is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    Ok(ended)
}

/// What became of one delivery in [`store`].
enum Stored {
    /// In the inbox: to be acknowledged.
    Delivered(Delivered),
    /// Not something the agent can store (a hostile name, say): not acknowledged.
    Unusable(String),
    /// Shutdown came while the inbox was refusing it: not acknowledged.
    Shutdown,
}

/// Writes one delivery to the inbox. While the file system refuses it (full, say), the same
/// delivery is tried again after a pause that doubles from [`STORE_RETRY_MIN`] to
/// [`STORE_RETRY_MAX`], on the subscription the agent already holds: space coming back is
/// noticed within seconds, without waiting for a reconnect that a live connection never needs.
/// The next deliveries wait meanwhile (the broker holds at most the window in flight).
/// The failure is logged at error level when it starts and every [`STORE_LOG_INTERVAL`] after.
async fn store(
    spool: &Spool,
    delivery: pb::Delivery,
    id: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Stored> {
    let delivery = Arc::new(delivery);
    let mut delay = STORE_RETRY_MIN;
    let mut failures: u32 = 0;
    let mut logged: Option<Instant> = None;
    loop {
        let written = {
            let (spool, delivery) = (spool.clone(), Arc::clone(&delivery));
            tokio::task::spawn_blocking(move || spool.deliver(&delivery)).await?
        };
        let error = match written {
            Ok(delivered) => {
                if failures > 0 {
                    tracing::info!(delivery = %id, failures, "stored once the inbox accepted it again");
                }
                return Ok(Stored::Delivered(delivered));
            }
            Err(DeliveryError::Io(error)) => error,
            Err(other) => return Ok(Stored::Unusable(other.to_string())),
        };
        failures += 1;
        if logged.is_none_or(|at| at.elapsed() >= STORE_LOG_INTERVAL) {
            let cause = if error.kind() == std::io::ErrorKind::StorageFull {
                "the inbox's file system is full"
            } else {
                "the inbox refused the write"
            };
            tracing::error!(
                delivery = %id,
                error = %error,
                failures,
                "cannot store a delivery: {cause}; retrying until it can be written"
            );
            logged = Some(Instant::now());
        } else {
            tracing::debug!(delivery = %id, error = %error, failures, "cannot store a delivery yet");
        }
        if !pause(delay, shutdown).await {
            return Ok(Stored::Shutdown);
        }
        delay = (delay * 2).min(STORE_RETRY_MAX);
    }
}

/// Acknowledges stored deliveries in batches. A failed acknowledgement is harmless: the broker
/// redelivers, and the spool recognises the message.
async fn ack_loop(broker: Broker, mut ids: mpsc::UnboundedReceiver<String>) {
    let mut client = broker.exchange();
    while let Some(first) = ids.recv().await {
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH {
            match ids.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        let acked = client.ack(pb::AckRequest {
            delivery_ids: batch,
        });
        if let Err(status) = broker.deadline(acked).await {
            tracing::debug!(code = ?status.code(), "acknowledgement failed; the broker will redeliver");
        }
    }
}
