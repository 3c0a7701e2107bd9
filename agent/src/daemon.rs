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
//! Both reconnect with exponential backoff and full jitter, capped by `reconnect.max_backoff_ms`
//! (2 s by default): an unreachable broker costs one refused TCP connection per agent every one
//! to two seconds, which is nothing to a host that is down, and the agent is back within about
//! two seconds of the broker's return, rather than sleeping through a 30 s ceiling (the choice
//! over a separate cheap probe: one mechanism, and the attempt *is* the probe). Refusals that
//! mean "busy" (a full queue or disk) come from a broker that is up: they keep the connection
//! and back off longer, up to [`BUSY_BACKOFF_MAX`], since each retry sends the file again.
//!
//! While the broker is unreachable the agent says why (`cause`: `connection_refused`,
//! `timeout`, `tls`, `connection_lost`, `dns`, read from the error chain), when it tries next
//! (`next_attempt`, RFC 3339) and how many files wait in the outbox: at warn level when it
//! starts, when the cause changes and every [`DOWN_LOG_INTERVAL`] while it lasts; every attempt
//! at debug level. On shutdown the outbox loop finishes the files in hand and the inbox loop the
//! delivery in hand, then both return.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use concordat_proto::pb::{self, send_result::Outcome};
use futures::{FutureExt as _, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use concordat_proto::checkpoint::LogVerifier;

use concordat_support::escape::Escaped;

use crate::{
    client::{Broker, ClientError, ClientTls, refusal_of},
    config::AgentConfig,
    pipeline::{Pipeline, Sent},
    spool::{Delivered, DeliveryError, FileId, OutboxError, OutboxItem, Spool},
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

/// The longest pause before sending again to a broker that answered "busy".
pub const BUSY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a broker that stays unreachable is logged at warn level again.
pub const DOWN_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    /// An involvement declaration was accepted and moved to `sent/`.
    Involved {
        /// The outbox file name.
        file: String,
        /// Where it is now.
        path: PathBuf,
        /// The broker's answer.
        answer: pb::InvolveResponse,
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

/// Why the broker could not be reached, by name in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Nothing listens at the broker's address.
    ConnectionRefused,
    /// The broker did not answer in time (TCP, TLS, HTTP/2 or a call).
    Timeout,
    /// The TLS handshake failed: a certificate refused either way, or not TLS at all.
    Tls,
    /// The broker's name could not be resolved.
    Dns,
    /// An established connection broke, or the broker ended the stream.
    ConnectionLost,
    /// The broker answered that it is busy (a full queue or disk): it is up.
    Busy,
    /// Anything else; the `error` field says what.
    Other,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::ConnectionRefused => "connection_refused",
            Cause::Timeout => "timeout",
            Cause::Tls => "tls",
            Cause::Dns => "dns",
            Cause::ConnectionLost => "connection_lost",
            Cause::Busy => "busy",
            Cause::Other => "other",
        }
    }

    /// Reads the cause from an error chain (tonic's transport error over hyper's over the
    /// I/O error or rustls's), innermost known cause first.
    fn of(error: &(dyn std::error::Error + 'static)) -> Cause {
        let mut found = None;
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(cause) = Self::of_one(e) {
                found = Some(cause);
            }
            // An I/O error's `source` skips the error it wraps: look at that one too.
            if let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                && let Some(cause) = Self::of_one(inner)
            {
                found = Some(cause);
            }
            next = e.source();
        }
        found.unwrap_or(Cause::Other)
    }

    fn of_one(e: &(dyn std::error::Error + 'static)) -> Option<Cause> {
        use std::io::ErrorKind;
        if e.is::<rustls::Error>() {
            return Some(Cause::Tls);
        }
        if let Some(ClientError::ConnectTimeout { .. }) = e.downcast_ref::<ClientError>() {
            return Some(Cause::Timeout);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return Some(Cause::ConnectionRefused),
                ErrorKind::TimedOut => return Some(Cause::Timeout),
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => return Some(Cause::ConnectionLost),
                _ => {}
            }
        }
        let text = e.to_string();
        if text.starts_with("dns error") {
            Some(Cause::Dns)
        } else if text.contains("timed out") {
            Some(Cause::Timeout)
        } else {
            None
        }
    }

    /// The cause of a failed call: from its transport error if it carries one, else from
    /// its code.
    fn of_status(status: &tonic::Status) -> Cause {
        match std::error::Error::source(status).map(Cause::of) {
            Some(cause) if cause != Cause::Other => cause,
            _ => match status.code() {
                tonic::Code::DeadlineExceeded => Cause::Timeout,
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                    Cause::ConnectionLost
                }
                _ => Cause::Other,
            },
        }
    }
}

/// Why a loop is not talking to the broker: the cause and the error's own words.
struct Down {
    cause: Cause,
    error: String,
}

impl Down {
    fn connect(error: &ClientError) -> Down {
        Down {
            cause: Cause::of(error),
            error: concordat_support::report(error),
        }
    }

    fn status(status: &tonic::Status) -> Down {
        Down {
            cause: Cause::of_status(status),
            error: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

/// Logs the connection state of one loop (`task`): up once per change; down at warn level
/// when it starts, when its cause changes and every [`DOWN_LOG_INTERVAL`], else at debug.
struct Link {
    task: &'static str,
    up: Option<bool>,
    cause: Option<Cause>,
    warned: Option<Instant>,
    down_since: Option<Instant>,
    failures: u64,
}

impl Link {
    fn new(task: &'static str) -> Self {
        Link {
            task,
            up: None,
            cause: None,
            warned: None,
            down_since: None,
            failures: 0,
        }
    }

    fn up(&mut self) {
        if self.up != Some(true) {
            let down_ms = self
                .down_since
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
            tracing::info!(
                task = self.task,
                failures = self.failures,
                down_ms,
                "connected to the broker"
            );
            self.up = Some(true);
            self.cause = None;
            self.warned = None;
            self.down_since = None;
            self.failures = 0;
        }
    }

    /// Records a failure; the next attempt comes after `retry_in`.
    async fn down(&mut self, down: &Down, retry_in: Duration, spool: &Spool) {
        let now = Instant::now();
        self.failures += 1;
        self.down_since.get_or_insert(now);
        let warn = self.up != Some(false)
            || self.cause != Some(down.cause)
            || self
                .warned
                .is_none_or(|t| now.duration_since(t) >= DOWN_LOG_INTERVAL);
        self.up = Some(false);
        self.cause = Some(down.cause);
        let next_attempt = time::OffsetDateTime::now_utc() + retry_in;
        let next_attempt = next_attempt
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
        let message = if down.cause == Cause::Busy {
            "broker busy"
        } else {
            "broker unreachable"
        };
        if !warn {
            tracing::debug!(
                task = self.task,
                cause = down.cause.as_str(),
                error = %Escaped(&down.error),
                next_attempt,
                retry_in_ms,
                failures = self.failures,
                "{message}"
            );
            return;
        }
        self.warned = Some(now);
        let outbox = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.pending().map(|p| p.len()))
                .await
                .ok()
                .and_then(Result::ok)
        };
        tracing::warn!(
            task = self.task,
            cause = down.cause.as_str(),
            error = %Escaped(&down.error),
            next_attempt,
            retry_in_ms,
            outbox,
            failures = self.failures,
            "{message}"
        );
    }
}

/// Runs the daemon until `shutdown` turns true. Reports what it does on `events`, if given.
pub async fn run(
    settings: AgentSettings,
    shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<AgentEvent>>,
) -> anyhow::Result<()> {
    let spool = Spool::open(&settings.spool)?;
    tracing::info!(spool = %settings.spool.display(), brokers = %settings.tls.brokers.all().join(", "), "agent starting");
    let witness = match &settings.log_key {
        Some(key) => {
            let agency = settings.tls.agency()?;
            Some(Arc::new(
                Witness::new(key.clone(), spool.dir(".state"))?.for_agency(&agency),
            ))
        }
        None => {
            tracing::warn!("no log_key configured: the audit proofs in receipts are not checked");
            None
        }
    };
    // The loops stop on `stop`: at shutdown, or as soon as either of them fails. An agent
    // that can no longer file what it sends (or store what it receives) stops, loudly, rather
    // than going on with one half.
    let (stop_tx, stop) = watch::channel(false);
    let forward = {
        let (mut shutdown, stop_tx) = (shutdown, stop_tx.clone());
        tokio::spawn(async move {
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    return;
                }
            }
            let _ = stop_tx.send(true);
        })
    };
    let mut outbox = tokio::spawn(outbox_loop(
        settings.clone(),
        spool.clone(),
        stop.clone(),
        events.clone(),
        witness.clone(),
    ));
    let mut inbox = tokio::spawn(inbox_loop(settings, spool, stop, events, witness));
    let (first, ended) = tokio::select! {
        ended = &mut outbox => ("outbox", ended),
        ended = &mut inbox => ("inbox", ended),
    };
    let ended = ended.map_err(anyhow::Error::from).and_then(|r| r);
    if let Err(e) = &ended {
        tracing::error!(
            "the {first} loop failed, so the agent stops: {}",
            Escaped(&format!("{e:#}"))
        );
    }
    let _ = stop_tx.send(true);
    let other = if first == "outbox" {
        inbox.await
    } else {
        outbox.await
    };
    forward.abort();
    ended?;
    other??;
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
    /// Not done: the broker said it is busy; retry later on the same connection.
    Busy(String),
    /// Not done: the call failed; retry after reconnecting.
    Retry(Down),
    /// Not done, for a reason of the agent's own (logged): the file waits for the next pass,
    /// and the connection stays as it is.
    Later,
}

async fn outbox_loop(
    settings: AgentSettings,
    spool: Spool,
    mut shutdown: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<AgentEvent>>,
    witness: Option<Arc<Witness>>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut busy_backoff = Backoff::new(
        settings.min_backoff,
        BUSY_BACKOFF_MAX.max(settings.max_backoff),
    );
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
                    let delay = backoff.next_delay();
                    link.down(&Down::connect(&e), delay, &spool).await;
                    if !pause(delay, &mut shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        // Files are taken in name order, several in flight; each file started is finished even
        // if shutdown comes meanwhile, but none is started after it.
        let mut retry: Option<Down> = None;
        let mut busy: Option<String> = None;
        let stopping = shutdown.clone();
        // The pass's envelopes share one SendStream.
        let pipeline = Pipeline::open(&connected, SEND_CONCURRENCY);
        let mut outcomes = futures::stream::iter(pending)
            .take_while(move |_| std::future::ready(!*stopping.borrow()))
            .map(|name| {
                // An error stops the agent: it names the file.
                let shown = format!("outbox file {name:?}");
                send_file(
                    &connected,
                    &pipeline,
                    &spool,
                    name,
                    &events,
                    witness.as_deref(),
                )
                .map(|outcome| outcome.context(shown))
            })
            .buffer_unordered(SEND_CONCURRENCY);
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(FileOutcome::Done) => {}
                Ok(FileOutcome::Retry(down)) => retry = Some(down),
                Ok(FileOutcome::Busy(why)) => busy = Some(why),
                Ok(FileOutcome::Later) => {}
                Err(e) => return Err(e),
            }
        }
        drop(outcomes);
        drop(pipeline);
        match (retry, busy) {
            (None, None) => {
                link.up();
                backoff.reset();
                busy_backoff.reset();
            }
            (Some(down), _) => {
                pass_over(&settings.tls, &connected, &down);
                let delay = backoff.next_delay();
                link.down(&down, delay, &spool).await;
                broker = None;
                if !pause(delay, &mut shutdown).await {
                    return Ok(());
                }
            }
            (None, Some(why)) => {
                // The broker is up and answered: keep the connection, wait longer.
                backoff.reset();
                let delay = busy_backoff.next_delay();
                let down = Down {
                    cause: Cause::Busy,
                    error: why,
                };
                link.down(&down, delay, &spool).await;
                if !pause(delay, &mut shutdown).await {
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
    pipeline: &Pipeline,
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
        tokio::task::spawn_blocking(move || spool.load_file(&name)).await?
    };
    let (envelope, read) = match loaded {
        Ok((OutboxItem::Envelope(envelope), read)) => (*envelope, read),
        Ok((OutboxItem::Involvement(incident_ref), read)) => {
            return declare_involvement(broker, spool, name, incident_ref, read, events).await;
        }
        Err(e @ OutboxError::Gone { .. }) => {
            tracing::info!(file = %Escaped(&name), "not sent on this pass: {}", Escaped(&e.to_string()));
            return Ok(FileOutcome::Later);
        }
        Err(e) => {
            let error = e.to_string();
            tracing::warn!(file = %Escaped(&name), "malformed outbox file: {}", Escaped(&error));
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
    let answer = send_envelope(broker, pipeline, spool, &name, pb::Envelope::from(envelope)).await;
    match answer {
        Answer::Later => Ok(FileOutcome::Later),
        Answer::Receipt(receipt) => {
            tracing::info!(file = %Escaped(&name), transfer = %Escaped(&receipt.transfer_id), message_id = %message_id, "sent");
            for warning in &receipt.warnings {
                tracing::warn!(file = %Escaped(&name), transfer = %Escaped(&receipt.transfer_id), "the broker warns: {}", Escaped(warning));
            }
            let (path, name, receipt) = blocking(spool, move |s| {
                s.complete_sent(&name, &receipt, Some(read))
                    .map(|p| (p, name, receipt))
            })
            .await?;
            if let Some(w) = witness {
                match w.check_receipt(broker, &receipt).await {
                    Ok(()) => {}
                    Err(WitnessError::Alarm(message)) => {
                        emit(events, AgentEvent::Alarm { message })
                    }
                    Err(e) => {
                        tracing::warn!(file = %Escaped(&name), "audit proof not checked: {}", Escaped(&e.to_string()))
                    }
                }
            }
            emit(
                events,
                AgentEvent::Sent {
                    file: name,
                    path,
                    receipt,
                },
            );
            Ok(FileOutcome::Done)
        }
        Answer::Refused { reason, message } if TRANSIENT_REASONS.contains(&reason.as_str()) => {
            Ok(FileOutcome::Busy(format!("{reason}: {message}")))
        }
        Answer::Refused { reason, message } => {
            tracing::warn!(file = %Escaped(&name), message_id = %message_id, reason = %Escaped(&reason), "refused: {}", Escaped(&message));
            file_refused(
                spool,
                events,
                name,
                reason,
                message,
                move |s, name, reason, message| {
                    s.complete_refused(name, message_id, reason, message, Some(read))
                },
            )
            .await
        }
        Answer::Failed(status) => Ok(FileOutcome::Retry(Down::status(&status))),
    }
}

/// The broker's answer to one envelope.
enum Answer {
    Receipt(Box<pb::Receipt>),
    /// Refused, with the stable reason code and the broker's message.
    Refused {
        reason: String,
        message: String,
    },
    /// No answer (the connection failed, the deadline passed, …): send it again later.
    Failed(tonic::Status),
    /// Not sent again on its own, for a reason of the agent's (logged): the next pass will.
    Later,
}

impl Answer {
    fn of_status(status: tonic::Status) -> Answer {
        match refusal_of(&status) {
            Some((reason, message)) => Answer::Refused { reason, message },
            None => Answer::Failed(status),
        }
    }
}

/// Sends `envelope` (outbox file `name`) through the pass's stream, or, when the stream could
/// not answer it ([`Sent::Interrupted`]), loads the file again and sends it by a `Send` call of
/// its own within the RPC timeout. (Loading again rather than keeping a copy: a payload may be
/// tens of MiB.) The stream may have ended after the broker accepted the envelope, so only the
/// very envelope streamed is sent again: if the files it was made from changed meanwhile, it
/// waits for the next pass.
async fn send_envelope(
    broker: &Broker,
    pipeline: &Pipeline,
    spool: &Spool,
    name: &str,
    mut envelope: pb::Envelope,
) -> Answer {
    let streamed = envelope_digest(&mut envelope);
    match pipeline.send(envelope).await {
        Sent::Answered(outcome) => match *outcome {
            Outcome::Receipt(receipt) => Answer::Receipt(Box::new(receipt)),
            Outcome::Refusal(refusal) => Answer::Refused {
                reason: refusal.reason,
                message: refusal.message,
            },
        },
        Sent::Failed(status) => Answer::of_status(status),
        Sent::Interrupted => {
            let loaded = {
                let (spool, name) = (spool.clone(), name.to_owned());
                tokio::task::spawn_blocking(move || spool.load(&name)).await
            };
            let mut envelope = match loaded {
                Ok(Ok(OutboxItem::Envelope(envelope))) => pb::Envelope::from(*envelope),
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => "it is no longer an envelope".into(),
                    };
                    tracing::warn!(file = %Escaped(name), "not sent again on its own: loading it again: {}; it waits for the next pass", Escaped(&why));
                    return Answer::Later;
                }
            };
            if envelope_digest(&mut envelope) != streamed {
                tracing::warn!(file = %Escaped(name), "not sent again on its own: it, or a file it names, changed since it was streamed; it waits for the next pass");
                return Answer::Later;
            }
            let mut client = broker.exchange();
            match broker.deadline(client.send(envelope)).await {
                Ok(receipt) => Answer::Receipt(Box::new(receipt.into_inner())),
                Err(status) => Answer::of_status(status),
            }
        }
    }
}

/// A digest of everything an envelope says: its payload's SHA-256, then its encoding without
/// the payload (taken out for the encoding and put back, so that no copy of a large payload
/// is made).
fn envelope_digest(envelope: &mut pb::Envelope) -> [u8; 32] {
    use prost::Message as _;
    use sha2::Digest as _;
    let payload = std::mem::take(&mut envelope.payload);
    let mut digest = sha2::Sha256::new();
    digest.update(sha2::Sha256::digest(&payload));
    digest.update(envelope.encode_to_vec());
    envelope.payload = payload;
    digest.finalize().into()
}

/// Declares the agency's involvement in an incident for outbox file `name`
/// (`{"incident_involvement": REF}`) and files it under the broker's answer, as [`send_file`]
/// does for an envelope.
async fn declare_involvement(
    broker: &Broker,
    spool: &Spool,
    name: String,
    incident_ref: String,
    read: FileId,
    events: &Option<mpsc::UnboundedSender<AgentEvent>>,
) -> anyhow::Result<FileOutcome> {
    let mut client = broker.workflows();
    let request = pb::InvolveRequest {
        incident_ref: incident_ref.clone(),
    };
    match broker.deadline(client.involve(request)).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            tracing::info!(file = %Escaped(&name), incident = %Escaped(&answer.incident_ref), notified = answer.notified.len(), "involvement declared");
            let (path, name, answer) = blocking(spool, move |s| {
                s.complete_involved(&name, &answer, Some(read))
                    .map(|p| (p, name, answer))
            })
            .await?;
            emit(
                events,
                AgentEvent::Involved {
                    file: name,
                    path,
                    answer,
                },
            );
            Ok(FileOutcome::Done)
        }
        Err(status) => match refusal_of(&status) {
            Some((reason, _)) if TRANSIENT_REASONS.contains(&reason.as_str()) => {
                Ok(FileOutcome::Busy(format!("{reason}: {}", status.message())))
            }
            Some((reason, message)) => {
                tracing::warn!(file = %Escaped(&name), incident = %Escaped(&incident_ref), reason = %Escaped(&reason), "involvement refused: {}", Escaped(&message));
                file_refused(
                    spool,
                    events,
                    name,
                    reason,
                    message,
                    move |s, name, reason, message| {
                        s.complete_refused_involvement(name, reason, message, Some(read))
                    },
                )
                .await
            }
            None => Ok(FileOutcome::Retry(Down::status(&status))),
        },
    }
}

/// Files outbox file `name` under the broker's refusal (`file` moves it into `refused/` with
/// its reason) and tells the listener of `events`.
async fn file_refused(
    spool: &Spool,
    events: &Option<mpsc::UnboundedSender<AgentEvent>>,
    name: String,
    reason: String,
    message: String,
    file: impl FnOnce(&Spool, &str, &str, &str) -> std::io::Result<PathBuf> + Send + 'static,
) -> anyhow::Result<FileOutcome> {
    let (path, name, reason, message) = blocking(spool, move |s| {
        file(s, &name, &reason, &message).map(|p| (p, name, reason, message))
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
    witness: Option<Arc<Witness>>,
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
            witness.as_deref(),
        )
        .await
        {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Disconnected(down)) => {
                let delay = backoff.next_delay();
                link.down(&down, delay, &spool).await;
                if !pause(delay, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

enum Ended {
    Shutdown,
    Disconnected(Down),
}

/// One subscription: runs until the stream ends, fails, or shutdown.
async fn receive(
    settings: &AgentSettings,
    spool: &Spool,
    shutdown: &mut watch::Receiver<bool>,
    events: &Option<mpsc::UnboundedSender<AgentEvent>>,
    link: &mut Link,
    backoff: &mut Backoff,
    witness: Option<&Witness>,
) -> anyhow::Result<Ended> {
    let broker = match settings.tls.connect().await {
        Ok(b) => b,
        Err(e) => return Ok(Ended::Disconnected(Down::connect(&e))),
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
            let down = Down::status(&status);
            pass_over(&settings.tls, &broker, &down);
            return Ok(Ended::Disconnected(down));
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
            Ok(None) => {
                break Ended::Disconnected(Down {
                    cause: Cause::ConnectionLost,
                    error: "the broker ended the subscription".into(),
                });
            }
            Err(status) => break Ended::Disconnected(Down::status(&status)),
        };
        let id = delivery.delivery_id.clone();
        // The proof of the entry it was queued under is checked before the delivery is stored
        // and acknowledged: one that fails stays with the broker, for an operator.
        if let Some(w) = witness {
            match w.check_delivery(&broker, &delivery).await {
                Ok(()) => {}
                Err(WitnessError::Alarm(message)) => {
                    tracing::error!(delivery = %Escaped(&id), "not stored: its audit proof fails: {}", Escaped(&message));
                    emit(events, AgentEvent::Alarm { message });
                    continue;
                }
                Err(WitnessError::Incomplete(error)) => {
                    break Ended::Disconnected(Down {
                        cause: Cause::Other,
                        error: format!("checking a delivery's audit proof: {error}"),
                    });
                }
            }
        }
        match store(spool, delivery, &id, shutdown).await? {
            Stored::Delivered(delivered) => {
                let duplicate = matches!(delivered, Delivered::AlreadyPresent(_));
                tracing::info!(delivery = %Escaped(&id), file = %delivered.path().display(), duplicate, "delivered");
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
                tracing::error!(delivery = %Escaped(&id), "cannot store a delivery; leaving it with the broker: {}", Escaped(&why));
            }
            Stored::Shutdown => break Ended::Shutdown,
        }
    };
    drop(ack_tx);
    // Let the last acknowledgements go out before the connection is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    if let Ended::Disconnected(down) = &ended {
        pass_over(&settings.tls, &broker, down);
    }
    Ok(ended)
}

/// After a connection to a broker node failed (it broke, or the node answered that it is
/// unavailable), the next connection starts at the next node, if there are several. A busy
/// node is up and answering: the agent stays with it.
fn pass_over(tls: &ClientTls, broker: &Broker, down: &Down) {
    if down.cause != Cause::Busy && tls.brokers.all().len() > 1 {
        tracing::info!(broker = %broker.url(), cause = down.cause.as_str(), "moving on to the next broker node");
        tls.brokers.pass_over(broker.url());
    }
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
                    tracing::info!(delivery = %Escaped(id), failures, "stored once the inbox accepted it again");
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
                delivery = %Escaped(id),
                error = %error,
                failures,
                "cannot store a delivery: {cause}; retrying until it can be written"
            );
            logged = Some(Instant::now());
        } else {
            tracing::debug!(delivery = %Escaped(id), error = %error, failures, "cannot store a delivery yet");
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_digest_changes_with_anything_it_says_and_keeps_the_payload() {
        let mut e = pb::Envelope {
            message_id: "m".into(),
            recipients: vec!["ico".into()],
            payload: b"payload".to_vec(),
            consent_token: "t".into(),
            ..Default::default()
        };
        let first = envelope_digest(&mut e);
        assert_eq!(e.payload, b"payload");
        assert_eq!(envelope_digest(&mut e), first);
        let mut other_payload = pb::Envelope {
            payload: b"payloaD".to_vec(),
            ..e.clone()
        };
        assert_ne!(envelope_digest(&mut other_payload), first);
        let mut other_token = pb::Envelope {
            consent_token: "u".into(),
            ..e.clone()
        };
        assert_ne!(envelope_digest(&mut other_token), first);
        // The payload's bytes do not count twice as another field's.
        let mut moved = pb::Envelope {
            payload: Vec::new(),
            message_id: "mpayload".into(),
            ..e.clone()
        };
        assert_ne!(envelope_digest(&mut moved), first);
    }

    /// An error wrapping another, as hyper's and tonic's do.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Wrapped(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    );

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::from(kind)
    }

    #[test]
    fn causes_are_read_from_the_error_chain() {
        use std::io::ErrorKind;
        let tls = std::io::Error::new(
            ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let cases: Vec<(&str, Box<dyn std::error::Error + Send + Sync>, Cause)> = vec![
            (
                "refused",
                Box::new(io(ErrorKind::ConnectionRefused)),
                Cause::ConnectionRefused,
            ),
            (
                "refused under two wrappers",
                Box::new(Wrapped(
                    "transport error",
                    Box::new(Wrapped(
                        "tcp connect error",
                        Box::new(io(ErrorKind::ConnectionRefused)),
                    )),
                )),
                Cause::ConnectionRefused,
            ),
            (
                "rustls inside an I/O error",
                Box::new(Wrapped("transport error", Box::new(tls))),
                Cause::Tls,
            ),
            (
                "connect timeout",
                Box::new(ClientError::ConnectTimeout {
                    url: "https://localhost:1".into(),
                    after: Duration::from_millis(500),
                }),
                Cause::Timeout,
            ),
            (
                "tcp timeout",
                Box::new(io(ErrorKind::TimedOut)),
                Cause::Timeout,
            ),
            (
                "reset",
                Box::new(Wrapped("h2", Box::new(io(ErrorKind::ConnectionReset)))),
                Cause::ConnectionLost,
            ),
            (
                "dns",
                Box::new(Wrapped("dns error", Box::new(io(ErrorKind::Other)))),
                Cause::Dns,
            ),
            ("unknown", Box::new(io(ErrorKind::Other)), Cause::Other),
        ];
        for (what, error, expected) in cases {
            assert_eq!(Cause::of(error.as_ref()), expected, "{what}");
        }
    }

    #[test]
    fn causes_of_failed_calls_fall_back_to_the_code() {
        let cases = [
            (tonic::Status::deadline_exceeded("slow"), Cause::Timeout),
            (tonic::Status::unavailable("gone"), Cause::ConnectionLost),
            (tonic::Status::internal("internal error"), Cause::Other),
        ];
        for (status, expected) in cases {
            assert_eq!(Cause::of_status(&status), expected, "{status:?}");
        }
    }

    #[test]
    fn the_error_line_carries_each_cause_once() {
        let error = Wrapped(
            "transport error",
            Box::new(Wrapped(
                "tcp connect error",
                Box::new(io(std::io::ErrorKind::ConnectionRefused)),
            )),
        );
        assert_eq!(
            concordat_support::report(&error),
            "transport error: tcp connect error: connection refused"
        );
        let repeated = Wrapped(
            "reading x: connection refused",
            Box::new(Wrapped(
                "connection refused",
                Box::new(io(std::io::ErrorKind::Other)),
            )),
        );
        assert_eq!(
            concordat_support::report(&repeated),
            "reading x: connection refused: other error"
        );
    }

    #[test]
    fn cause_names_are_snake_case() {
        for cause in [
            Cause::ConnectionRefused,
            Cause::Timeout,
            Cause::Tls,
            Cause::Dns,
            Cause::ConnectionLost,
            Cause::Busy,
            Cause::Other,
        ] {
            let name = cause.as_str();
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn backoff_never_exceeds_its_ceiling() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(2));
        let mut backoff = Backoff::new(min, max);
        for _ in 0..50 {
            let delay = backoff.next_delay();
            assert!(delay <= max && delay >= min / 2, "{delay:?}");
        }
    }
}
