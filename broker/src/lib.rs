//! The Concordat broker: a consent-gated relay between agencies, served over mutual TLS.
//!
//! A tour of the modules, in the order a request meets them:
//! - [`config`]: the TOML configuration, validated once at start-up (or the embedded default).
//! - [`tls`]: the rustls server configuration (client certificates required, CRLs honoured) and
//!   the accept loop that attaches the peer's certificate identity to each connection.
//! - [`connections`]: the registry of open connections: caps per source address and in all,
//!   shedding connections still in their handshake first.
//! - [`reload`]: reloading the configuration file on request (SIGHUP), validated whole and
//!   recorded in the audit log before it is swapped in, and the TLS material when its files
//!   change, closing the connections whose certificates it no longer accepts.
//! - [`live`]: the rules every decision reads as one snapshot, which a reload replaces, and
//!   the diff that says what a new configuration changes and what needs a restart.
//! - [`control`]: the files `concordat-broker reload` uses: the pid file and the last
//!   reload's outcome.
//! - [`identity`]: matches that certificate against the federation ([`identity::Caller`]).
//! - [`gate`]: in front of every service: authenticates, gives the transport's own refusals
//!   (undecodable or oversized requests) the broker's reasons, logs every refusal it makes.
//! - [`service`]: the gRPC services (`Exchange`, `Consent`, `Audit`).
//! - [`operations`]: the `Operations` service (`concordat status`, `concordat consent list`).
//! - [`status`]: the federation as an operator sees it, for `Operations.Status` and the status
//!   page beside `/metrics`; the decisions of the last hour.
//! - [`content`]: what a payload says: its media type, STIX 2.1 bundles and incident records
//!   validated, any other JSON parsed, and a visitor over every string in it.
//! - [`policy`]: the agreements and consent issuers, and [`policy::decide`], the one function
//!   that decides whether an envelope may be relayed.
//! - [`registry`]: the protected organisations, and the [`registry::Matcher`] that finds their
//!   names and identifiers in a payload.
//! - [`clock`]: the wall clock, never earlier than the latest time the broker has logged.
//! - [`backup`]: consistent snapshots of the store in one file, and restoring them; [`admin`]:
//!   the Unix socket in the data directory through which `concordat-broker backup` asks a
//!   running broker for one.
//! - [`store`]: durable queues, transfers, receipts and revocations behind the [`store::Storage`]
//!   trait (sled), written by one group-commit writer thread.
//! - [`logging`] and [`cli_docs`]: re-exported from `concordat-support`, which every binary
//!   shares (the log subscriber; completions and man pages).
//! - [`metrics`]: Prometheus counters and gauges, served at `/metrics` when configured.
//! - [`dispatch`]: which deliveries are in flight on which subscription.
//! - [`refusal`]: reason codes and the one mapping from outcomes to `tonic::Status`.
//! - [`refusal_log`]: refused calls in the audit log, identical ones within a minute folded.
//!
//! [`serve`] takes an already-bound listener, so tests bind `127.0.0.1:0` and read the address
//! from the listener: no sleeps, no races.

pub mod admin;
pub mod audit_log;
pub mod backup;
pub use concordat_support::{cli_docs, logging};
pub mod clock;
pub mod config;
pub mod connections;
pub mod content;
pub mod control;
pub mod dispatch;
pub mod gate;
pub mod identity;
pub mod live;
pub mod metrics;
pub mod operations;
pub mod policy;
pub mod refusal;
pub mod refusal_log;
pub mod registry;
pub mod reload;
pub mod reviews;
pub mod service;
pub mod status;
pub mod store;
pub mod tls;
pub mod workflow;
pub mod workflow_service;

use std::{future::Future, sync::Arc, time::Duration};

use concordat_proto::pb::{
    audit_server::AuditServer, consent_server::ConsentServer, exchange_server::ExchangeServer,
    operations_server::OperationsServer, workflows_server::WorkflowsServer,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::{config::Config, gate::Gate, identity::Authenticator, refusal::ReadLimit};

/// Room on top of the largest payload for the envelope's other fields and its consent token.
/// The transport reads envelopes up to the payload limit plus this; the broker's policy refuses
/// a payload above the limit within it, and the gate refuses a larger envelope, unread, from its
/// length prefix: both with `PAYLOAD_TOO_LARGE`.
const ENVELOPE_OVERHEAD: usize = 64 * 1024;
/// The largest request the `Consent` and `Audit` services read (tonic's default, made explicit
/// so that refusals can name it).
const MAX_OTHER_REQUEST: usize = 4 * 1024 * 1024;
/// How often the broker pings an established connection (HTTP/2 PING) to find dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    /// The reflection service could not be built.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The data directory or database could not be opened.
    #[error(transparent)]
    Storage(#[from] refusal::Internal),
    /// The metrics listener could not be bound.
    #[error("binding the metrics listener {addr}: {source}")]
    Metrics {
        /// The address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The organisation registry could not be compiled for the leak check.
    #[error("organisation registry: {0}")]
    Registry(#[from] registry::RegistryError),
    /// The recovered store is not whole: it is never served.
    #[error(transparent)]
    Recovery(#[from] store::RecoveryError),
    /// The storage stayed unavailable (its flushes failing or stalled) and the broker gave up.
    #[error("{0}")]
    StorageFailed(String),
    /// The listening socket's address could not be read.
    #[error("reading the listening address: {source}")]
    Listener {
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Runs the broker on `listener` until `shutdown` completes, then stops gracefully. The TLS
/// material is reloaded when its files change (see [`reload`]); use [`serve_with_reload`] to
/// ask for reloads as well.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with(config, listener, shutdown, reload::channel().1, |_| {}).await
}

/// [`serve`], also reloading whenever the [`reload::ReloadHandle`] of `reloads` asks.
pub async fn serve_with_reload(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    reloads: reload::ReloadRequests,
) -> Result<(), ServeError> {
    serve_with(config, listener, shutdown, reloads, |_| {}).await
}

/// [`serve_with_reload`], calling `ready` with the listening address once everything is up:
/// the store opened and checked, the metrics listener bound, the services built. Only then is
/// health `SERVING`. A broker that cannot start returns its error without calling `ready`.
///
/// It returns once the store is closed as well (every task that held it has seen the stop and
/// let go), waiting at most [`CLOSE_WAIT`]: whoever opens the data directory next (a restarted
/// broker, `concordat-broker verify`) finds sled's lock free.
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    reloads: reload::ReloadRequests,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> Result<(), ServeError> {
    let data_dir = config.data_dir.clone();
    let mut storage = None;
    let outcome =
        serve_until_stopped(config, listener, shutdown, reloads, ready, &mut storage).await;
    if let Some(storage) = storage {
        // First every handle of the broker's own, then sled's background threads.
        let closed = tokio::task::spawn_blocking(move || {
            store::wait_until_closed(&data_dir, CLOSE_WAIT, || storage.strong_count() == 0)
        })
        .await
        .unwrap_or(false);
        if !closed {
            tracing::warn!(
                waited = ?CLOSE_WAIT,
                "the store is still open: a task has not let go of it"
            );
        }
    }
    outcome
}

/// Opens the store `config` names: sled in its data directory, or its PostgreSQL database
/// (with the log key and the published checkpoint in the data directory either way).
pub fn open_store(config: &Config) -> Result<store::SledStorage, refusal::Internal> {
    match &config.storage {
        config::StorageEngine::Sled => {
            store::SledStorage::open(&config.data_dir, &config.log_origin)
        }
        config::StorageEngine::Postgres(pg) => {
            store::SledStorage::open_postgres(&config.data_dir, &config.log_origin, &pg.options())
        }
    }
}

/// How long [`serve_with`] waits, once stopped, for the store to close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The body of [`serve_with`]; leaves in `opened` a handle that shows when the store it opened
/// is closed.
async fn serve_until_stopped(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    reloads: reload::ReloadRequests,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
    opened: &mut Option<std::sync::Weak<store::SledStorage>>,
) -> Result<(), ServeError> {
    let current_tls = tls::CurrentTls::new(tls::server_tls(&config.tls)?);
    let connections = connections::Connections::new(config.limits.connections.clone());
    let authenticator = Authenticator::new(config.agencies.clone(), config.auditors.clone());
    for warning in config.warnings(clock::now().date()) {
        tracing::warn!("{warning}");
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let storage = Arc::new(open_store(&config)?);
    for warning in storage.durability_warnings()? {
        tracing::warn!("PostgreSQL: {warning}");
    }
    *opened = Some(Arc::downgrade(&storage));
    store::check_recovered(storage.as_ref(), &config.data_dir)?;
    // The clock never goes back before what the log already holds.
    if let Some(t) = store::newest_entry_time(storage.as_ref())? {
        clock::raise_floor(t);
    }
    let agency_ids = config.agencies.keys().cloned().collect();
    for (agency, depth) in store::nonempty_queues(storage.as_ref(), &agency_ids) {
        tracing::info!(agency = %agency, depth, "queued deliveries waiting");
    }
    tracing::info!(log_key = %store::Storage::log_verifier_key(storage.as_ref()), "audit log");
    let metrics = Arc::new(metrics::Metrics::default());
    let store = store::Store::start(
        storage,
        store::StoreOptions::new(&config.data_dir, config.limits.flush_timeout)
            .with_metrics(metrics.writer()),
    )?;
    store
        .commit(store::Op::ConfigLoaded(concordat_proto::pb::ConfigLoaded {
            config_sha256: config.digest.to_vec(),
            source: config.source.clone(),
            broker_version: env!("CARGO_PKG_VERSION").into(),
            changes: Vec::new(),
            occasion: "start".into(),
        }))
        .await
        .map_err(|f| match f {
            refusal::Failure::Internal(e) => e,
            refusal::Failure::Refused(r) => {
                refusal::Internal::new("logging the configuration", r.to_string())
            }
        })?;
    let refusals = Arc::new(refusal_log::RefusalLog::new(store.clone()));
    // What decisions read, replaced whole by a reload of the configuration.
    let rules = Arc::new(live::Current::new(live::Rules::of(
        &config,
        Arc::new(registry::Matcher::new(&config.registry)?),
    )));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // `concordat-broker backup` reaches the running broker here; the file goes when it stops.
    let _admin_socket = match admin::bind(&config.data_dir) {
        Ok((listener, socket)) => {
            let owner = socket.owner();
            tokio::spawn(admin::serve(
                listener,
                owner,
                store.clone(),
                config.data_dir.clone(),
                stop_rx.clone(),
            ));
            Some(socket)
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                dir = %config.data_dir.display(),
                "no admin socket: `concordat-broker backup` cannot reach this broker"
            );
            None
        }
    };
    {
        // Writes the counts of folded refusals once their window has passed.
        let refusals = refusals.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refusal_log::FLUSH_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => refusals.flush_expired().await,
                    // The only change is to `true`: stopping.
                    _ = stop.changed() => return,
                }
            }
        });
    }
    let status = status::Sources {
        metrics: metrics.clone(),
        store: store.clone(),
        rules: rules.clone(),
        agencies: Arc::new(
            config
                .agencies
                .iter()
                .map(|(id, a)| (id.clone(), a.name.clone()))
                .collect(),
        ),
        connections: connections.clone(),
    };
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Metrics {
                addr: addr.to_string(),
                source,
            })?;
        let exporter = metrics::Exporter {
            metrics: metrics.clone(),
            rules: rules.clone(),
            store: store.clone(),
            agencies: Arc::new(config.agencies.keys().map(ToString::to_string).collect()),
            status: status.clone(),
        };
        let mut stop = stop_rx.clone();
        // The bound address, so that `metrics_listen = "127.0.0.1:0"` can be found.
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "metrics at /metrics, status page at /status");
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = metrics::serve(exporter, listener, shutdown).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // Health follows the storage: NOT_SERVING while writes are refused.
    {
        let mut health = store.health();
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            while health.changed().await.is_ok() {
                let serving = *health.borrow_and_update() == store::Health::Serving;
                set_health(&reporter, serving).await;
            }
        });
    }
    let failed = store.clone();
    let (gave_up_tx, mut gave_up_rx) = tokio::sync::oneshot::channel::<String>();

    let state = Arc::new(service::State::new(
        rules.clone(),
        authenticator.clone(),
        store.clone(),
        stop_rx.clone(),
        metrics.clone(),
        refusals.clone(),
    ));

    set_health(&health_reporter, true).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(concordat_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(concordat_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let max_message = config.limits.max_message_bytes + ENVELOPE_OVERHEAD;
    let envelopes = ReadLimit {
        max_message,
        max_payload: Some(config.limits.max_message_bytes),
    };
    let others = ReadLimit {
        max_message: MAX_OTHER_REQUEST,
        max_payload: None,
    };
    let gates = gate::Shared::new(authenticator, refusals.clone());
    let exchange = Gate::new(
        ExchangeServer::new(service::ExchangeService::new(state.clone(), envelopes))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        gates.clone(),
        envelopes,
    );
    let consent = Gate::new(
        ConsentServer::new(service::ConsentService::new(state.clone()))
            .max_decoding_message_size(MAX_OTHER_REQUEST),
        gates.clone(),
        others,
    );
    let audit = Gate::new(
        AuditServer::new(service::AuditService::new(state.clone()))
            .max_decoding_message_size(MAX_OTHER_REQUEST),
        gates.clone(),
        others,
    );
    let operations = Gate::new(
        OperationsServer::new(operations::OperationsService::new(status, refusals.clone()))
            .max_decoding_message_size(MAX_OTHER_REQUEST),
        gates.clone(),
        others,
    );
    let workflows = Gate::new(
        WorkflowsServer::new(workflow_service::WorkflowsService::new(
            store.clone(),
            rules.clone(),
            refusals.clone(),
        ))
        .max_decoding_message_size(MAX_OTHER_REQUEST),
        gates,
        others,
    );
    // Deadlines and reminders: timers that fell due while the broker was down fire now.
    tokio::spawn(workflow_service::run_timers(store.clone(), stop_rx.clone()));

    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listener { source })?;
    let (source, agencies) = (config.source.clone(), config.agencies.len());
    let reload_poll = config.tls_reload_poll;
    let reloader = reload::Reloader::new(
        config.tls_files.clone(),
        &config.tls,
        current_tls.clone(),
        connections.clone(),
    )
    .with_metrics(metrics.clone())
    .with_config(config, rules, store);
    tokio::spawn(reloader.run(reloads, reload_poll, stop_rx));
    let incoming = ReceiverStream::new(tls::accept_loop(
        listener,
        current_tls,
        connections,
        metrics,
    ));
    ready(local);
    tracing::info!(addr = %local, config = %source, agencies, "broker listening");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(exchange)
        .add_service(consent)
        .add_service(audit)
        .add_service(operations)
        .add_service(workflows)
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                () = shutdown => {}
                why = failed.failed() => {
                    let _ = gave_up_tx.send(why);
                }
            }
            // End the subscriptions so that graceful shutdown does not wait for them forever.
            let _ = stop_tx.send(true);
        })
        .await?;
    if let Ok(why) = gave_up_rx.try_recv() {
        return Err(ServeError::StorageFailed(why));
    }
    // Counts of folded refusals still open are written before the broker goes.
    refusals.flush_all().await;
    tracing::info!("broker stopped");
    Ok(())
}

/// Sets every service's health (and the server's) to `SERVING` or `NOT_SERVING`.
async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for name in [
        <ExchangeServer<service::ExchangeService> as tonic::server::NamedService>::NAME,
        <ConsentServer<service::ConsentService> as tonic::server::NamedService>::NAME,
        <AuditServer<service::AuditService> as tonic::server::NamedService>::NAME,
        <OperationsServer<operations::OperationsService> as tonic::server::NamedService>::NAME,
        <WorkflowsServer<workflow_service::WorkflowsService> as tonic::server::NamedService>::NAME,
    ] {
        reporter.set_service_status(name, status).await;
    }
}
