//! Prometheus metrics, served over plain HTTP at `/metrics` when `metrics_listen` is set.
//! The same listener serves the read-only status page at `/status` ([`crate::status`]).
//!
//! Two exposition formats, negotiated by the request's `Accept` header ([`Format`]):
//! OpenMetrics 1.0 (`application/openmetrics-text`, what Prometheus asks for first) and the
//! classic Prometheus text format 0.0.4 (`text/plain`, the default). They differ where a
//! parser notices: OpenMetrics types a counter family without `_total` and ends with `# EOF`;
//! the 0.0.4 format types the very name its samples carry (`x_total`), or the counter's type is
//! lost. `prometheus-client` encodes OpenMetrics; [`openmetrics_to_text`] derives the 0.0.4 text
//! from it line by line.
//!
//! Every family exists from the start: refusals at zero for every [`Reason`], refused
//! connections and failed handshakes at zero for every cause, reloads for every kind and
//! outcome. Counters are
//! counted where things happen (transfers, deliveries, acknowledgements, refused connections,
//! failed handshakes, reloads, refused consistency proofs); the writer thread records its batches and flushes in
//! [`WriterMetrics`]; everything else (queues, subscribers, the log, the checkpoint, storage,
//! agreement reviews) is read at each scrape. No payload, organisation or token ever becomes a
//! label.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode_registry},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    policy::Policy,
    refusal::Reason,
    store::{Health, Store},
};

/// The causes under which [`Metrics::connection_refused`] counts connections closed before
/// they were established (see `connections` and `tls`): admission (`per_source_cap`, `full`,
/// `shed`), the handshake (`tls`, `timeout`, `protocol`) and `accept` itself.
pub const CONNECTION_CAUSES: &[&str] = &[
    "per_source_cap",
    "full",
    "shed",
    "tls",
    "timeout",
    "protocol",
    "accept",
];

/// The causes under which [`Metrics::handshake_failed`] counts failed handshakes (see
/// `tls::handshake_failure`): the client's certificate (`no_certificate`, `unknown_ca`,
/// `expired`, `not_yet_valid`, `revoked`, `bad_certificate`), any other TLS failure
/// (`tls_other`: no common version or cipher suite, a malformed message, a dropped
/// connection), `timeout` (no completed handshake or no preface in time) and
/// `no_http2_preface`.
pub const HANDSHAKE_CAUSES: &[&str] = &[
    "no_certificate",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "revoked",
    "bad_certificate",
    "tls_other",
    "timeout",
    "no_http2_preface",
];

/// The kinds of reload counted by [`Metrics::reloaded`]: `tls` (the TLS files, `reload`) and
/// `config` (the configuration).
pub const RELOAD_KINDS: &[&str] = &["tls", "config"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowLabel {
    workflow: String,
    state: String,
}

/// The states of the workflows the `concordat_workflows` gauge counts, each from the start.
const WORKFLOW_STATES: [(&str, &str); 6] = [
    ("consultation", "open"),
    ("consultation", "answered"),
    ("consultation", "overdue"),
    ("statement", "pending"),
    ("statement", "objected"),
    ("statement", "approved"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabel {
    agreement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabel {
    agreement: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgencyLabel {
    agency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabel {
    kind: String,
    outcome: String,
}

/// What the store's writer thread records: the size and flush time of each batch, and when it
/// last sealed a checkpoint.
#[derive(Debug)]
pub struct WriterMetrics {
    flush_seconds: Histogram,
    batch_ops: Histogram,
    sealed_at: Mutex<Option<Instant>>,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        WriterMetrics {
            // 0.5 ms to about 16 s.
            flush_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 1 to 512 (the writer's largest batch).
            batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            sealed_at: Mutex::new(None),
        }
    }
}

impl WriterMetrics {
    /// Records a batch of `ops` operations written and flushed in `flush`.
    pub fn batch_written(&self, ops: usize, flush: Duration) {
        self.batch_ops.observe(ops as f64);
        self.flush_seconds.observe(flush.as_secs_f64());
    }

    /// Records that a new checkpoint was sealed and flushed just now.
    pub fn checkpoint_sealed(&self) {
        *self.sealed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn checkpoint_age(&self) -> Option<Duration> {
        self.sealed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }
}

/// The broker's metrics.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    refused: Family<ReasonLabel, Counter>,
    deliveries: Counter,
    acknowledgements: Counter,
    connections_refused: Family<CauseLabel, Counter>,
    handshake_failures: Family<CauseLabel, Counter>,
    reloads: Family<ReloadLabel, Counter>,
    consistency_refused: Counter,
    subscribers: Family<AgencyLabel, Gauge>,
    queue_depth: Family<AgencyLabel, Gauge>,
    queue_oldest_age: Family<AgencyLabel, Gauge>,
    overdue: Family<AgreementLabel, Gauge>,
    review_stage: Family<AgreementLabel, Gauge>,
    review_warnings: Family<ReviewLabel, Counter>,
    log_size: Gauge,
    checkpoint_size: Gauge,
    checkpoint_age: Gauge,
    free_bytes: Gauge,
    min_free_bytes: Gauge,
    serving: Gauge,
    workflows: Family<WorkflowLabel, Gauge>,
    writer: Arc<WriterMetrics>,
    decisions: crate::status::DecisionWindow,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("concordat");
        let accepted = Counter::default();
        r.register("transfers_accepted", "Transfers accepted", accepted.clone());
        let refused = Family::<ReasonLabel, Counter>::default();
        r.register(
            "transfers_refused",
            "Transfers refused, by reason code",
            refused.clone(),
        );
        let deliveries = Counter::default();
        r.register(
            "deliveries",
            "Queue items handed to subscribers (a redelivery counts again)",
            deliveries.clone(),
        );
        let acknowledgements = Counter::default();
        r.register(
            "acknowledgements",
            "Queue items acknowledged by their recipients",
            acknowledgements.clone(),
        );
        let connections_refused = Family::<CauseLabel, Counter>::default();
        r.register(
            "connections_refused",
            "Connections closed before they were established, by cause: admission (per_source_cap, full, shed), failed handshakes (tls, timeout, protocol), accept errors (accept)",
            connections_refused.clone(),
        );
        let handshake_failures = Family::<CauseLabel, Counter>::default();
        r.register(
            "handshake_failures",
            "Failed TLS handshakes and HTTP/2 prefaces, by cause: the client certificate (no_certificate, unknown_ca, expired, not_yet_valid, revoked, bad_certificate), other TLS failures (tls_other), timeout, no_http2_preface",
            handshake_failures.clone(),
        );
        let reloads = Family::<ReloadLabel, Counter>::default();
        r.register(
            "reloads",
            "Reloads, by kind (tls, config) and outcome (ok, failed)",
            reloads.clone(),
        );
        let consistency_refused = Counter::default();
        r.register(
            "consistency_proofs_refused",
            "Consistency proofs refused because a caller named a log size beyond the current checkpoint (a witness holding a checkpoint this log does not reach)",
            consistency_refused.clone(),
        );
        let subscribers = Family::<AgencyLabel, Gauge>::default();
        r.register(
            "subscribers",
            "Open subscriptions, by agency",
            subscribers.clone(),
        );
        let queue_depth = Family::<AgencyLabel, Gauge>::default();
        r.register(
            "queue_depth",
            "Unacknowledged items queued for each recipient",
            queue_depth.clone(),
        );
        let queue_oldest_age = Family::<AgencyLabel, Gauge>::default();
        r.register(
            "queue_oldest_age_seconds",
            "Age of each recipient's oldest unacknowledged item, 0 when its queue is empty",
            queue_oldest_age.clone(),
        );
        let overdue = Family::<AgreementLabel, Gauge>::default();
        r.register(
            "agreement_review_overdue",
            "1 when the agreement is past its review date",
            overdue.clone(),
        );
        let review_stage = Family::<AgreementLabel, Gauge>::default();
        r.register(
            "agreement_review_stage",
            "Where the agreement stands against its review date: 0 current, 1 due (within the warning window), 2 overdue (past it, within the grace period), 3 lapsed (past the grace period)",
            review_stage.clone(),
        );
        let review_warnings = Family::<ReviewLabel, Counter>::default();
        r.register(
            "agreement_review_warnings",
            "Transfer decisions made under an agreement due, overdue or lapsed for review, by agreement and stage",
            review_warnings.clone(),
        );
        let log_size = Gauge::default();
        r.register(
            "audit_log_entries",
            "Entries in the audit log",
            log_size.clone(),
        );
        let checkpoint_size = Gauge::default();
        r.register(
            "checkpoint_size",
            "Entries covered by the latest signed checkpoint",
            checkpoint_size.clone(),
        );
        let checkpoint_age = Gauge::default();
        r.register(
            "checkpoint_age_seconds",
            "Seconds since this process last sealed a checkpoint (it seals one at start and with every batch that grows the log)",
            checkpoint_age.clone(),
        );
        let free_bytes = Gauge::default();
        r.register(
            "storage_free_bytes",
            "Free bytes on the data directory's file system",
            free_bytes.clone(),
        );
        let min_free_bytes = Gauge::default();
        r.register(
            "storage_min_free_bytes",
            "The configured floor (limits.min_free_bytes) below which new transfers are refused with STORAGE_FULL",
            min_free_bytes.clone(),
        );
        let serving = Gauge::default();
        r.register(
            "storage_serving",
            "1 while the store accepts writes, 0 while it answers STORAGE_UNAVAILABLE",
            serving.clone(),
        );
        let workflows = Family::<WorkflowLabel, Gauge>::default();
        r.register(
            "workflows",
            "Consultations not closed and statements, by state (docs/workflows.md)",
            workflows.clone(),
        );
        let writer = Arc::new(WriterMetrics::default());
        r.register(
            "store_flush_seconds",
            "Time the writer thread takes to apply, seal and flush one batch",
            writer.flush_seconds.clone(),
        );
        r.register(
            "store_batch_ops",
            "Operations written per batch by the writer thread",
            writer.batch_ops.clone(),
        );
        // Families that exist from the start, at zero.
        for reason in Reason::ALL {
            refused
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str().to_owned(),
                })
                .inc_by(0);
        }
        for cause in CONNECTION_CAUSES {
            connections_refused
                .get_or_create(&CauseLabel {
                    cause: (*cause).to_owned(),
                })
                .inc_by(0);
        }
        for cause in HANDSHAKE_CAUSES {
            handshake_failures
                .get_or_create(&CauseLabel {
                    cause: (*cause).to_owned(),
                })
                .inc_by(0);
        }
        for kind in RELOAD_KINDS {
            for outcome in ["ok", "failed"] {
                reloads
                    .get_or_create(&ReloadLabel {
                        kind: (*kind).to_owned(),
                        outcome: outcome.to_owned(),
                    })
                    .inc_by(0);
            }
        }
        Metrics {
            registry: r,
            accepted,
            refused,
            deliveries,
            acknowledgements,
            connections_refused,
            handshake_failures,
            reloads,
            consistency_refused,
            subscribers,
            queue_depth,
            queue_oldest_age,
            overdue,
            review_stage,
            review_warnings,
            log_size,
            checkpoint_size,
            checkpoint_age,
            free_bytes,
            min_free_bytes,
            serving,
            workflows,
            writer,
            decisions: crate::status::DecisionWindow::default(),
        }
    }
}

/// An exposition format, chosen by the scrape's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (the default).
    Text,
    /// OpenMetrics 1.0.
    OpenMetrics,
}

impl Format {
    /// The format the `Accept` header prefers (by `q`; the first of equals), of those served.
    /// Without a header, or with nothing served in it, the 0.0.4 text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(Format, f32)> = None;
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            let format = match media.as_str() {
                "application/openmetrics-text" => Format::OpenMetrics,
                "text/plain" | "text/*" | "*/*" => Format::Text,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((format, q));
            }
        }
        best.map_or(Format::Text, |(f, _)| f)
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The 0.0.4 text of an OpenMetrics exposition: each counter's `# HELP` and `# TYPE` name the
/// family as its samples do (`x_total`), and `# UNIT` and `# EOF`, which 0.0.4 does not know,
/// go. Samples, label escaping and histograms are the same in both.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What a scrape reads besides the counters.
pub struct Snapshot<'a> {
    /// The rules (for the review gauges).
    pub policy: &'a Policy,
    /// The store (queues, the log, the checkpoint, storage).
    pub store: &'a Store,
    /// The agencies.
    pub agencies: &'a [String],
    /// The configured `limits.min_free_bytes`.
    pub min_free_bytes: u64,
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Counts an accepted transfer.
    pub fn accepted(&self) {
        self.accepted.inc();
        self.decisions.record(crate::status::ACCEPTED);
    }

    /// Counts a refused transfer.
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
        self.decisions.record(reason);
    }

    /// Counts a transfer decision made under `agreement` at review `stage`.
    pub fn review_warning(&self, agreement: &str, stage: crate::policy::ReviewStage) {
        self.review_warnings
            .get_or_create(&ReviewLabel {
                agreement: agreement.to_owned(),
                stage: stage.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts `n` queue items handed to a subscriber.
    pub fn delivered(&self, n: usize) {
        self.deliveries.inc_by(n as u64);
    }

    /// Counts `n` queue items acknowledged.
    pub fn acknowledged(&self, n: u64) {
        self.acknowledgements.inc_by(n);
    }

    /// Counts a connection closed before it was established, by cause.
    pub fn connection_refused(&self, cause: &str) {
        self.connections_refused
            .get_or_create(&CauseLabel {
                cause: cause.to_owned(),
            })
            .inc();
    }

    /// Counts a failed handshake by cause (one of [`HANDSHAKE_CAUSES`]).
    pub fn handshake_failed(&self, cause: &str) {
        self.handshake_failures
            .get_or_create(&CauseLabel {
                cause: cause.to_owned(),
            })
            .inc();
    }

    /// Counts a reload of `kind` (one of [`RELOAD_KINDS`]) that succeeded or failed.
    pub fn reloaded(&self, kind: &str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabel {
                kind: kind.to_owned(),
                outcome: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// Counts a consistency proof refused for a size beyond the log's checkpoint.
    pub fn consistency_refused(&self) {
        self.consistency_refused.inc();
    }

    /// Counts a subscription of `agency` opened (`true`) or ended (`false`).
    pub fn subscribed(&self, agency: &str, open: bool) {
        let g = self.subscribers.get_or_create(&AgencyLabel {
            agency: agency.to_owned(),
        });
        if open {
            g.inc();
        } else {
            g.dec();
        }
    }

    /// What the store's writer thread records into.
    pub fn writer(&self) -> Arc<WriterMetrics> {
        self.writer.clone()
    }

    /// The transfer decisions of the last hour (for the status view).
    pub fn decisions(&self) -> &crate::status::DecisionWindow {
        &self.decisions
    }

    /// The open subscriptions of `agency` (the `subscribers` gauge).
    pub fn subscriptions(&self, agency: &str) -> i64 {
        self.subscribers
            .get_or_create(&AgencyLabel {
                agency: agency.to_owned(),
            })
            .get()
    }

    /// Time since this process last sealed a checkpoint.
    pub fn checkpoint_age(&self) -> Option<Duration> {
        self.writer.checkpoint_age()
    }

    /// The metrics in `format`, with the gauges brought up to date from `now`.
    pub fn render(&self, now: &Snapshot<'_>, format: Format) -> String {
        self.refresh(now);
        let mut out = String::new();
        if encode_registry(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        match format {
            Format::OpenMetrics => {
                out.push_str("# EOF\n");
                out
            }
            Format::Text => openmetrics_to_text(&out),
        }
    }

    /// Reads the gauges that are computed at each scrape.
    fn refresh(&self, now: &Snapshot<'_>) {
        let today = crate::clock::now();
        for a in &now.policy.agreements {
            self.overdue
                .get_or_create(&AgreementLabel {
                    agreement: a.id.clone(),
                })
                .set(i64::from(a.review_overdue(today.date())));
            let stage = a.review_stage(today.date());
            self.review_stage
                .get_or_create(&AgreementLabel {
                    agreement: a.id.clone(),
                })
                .set(stage as i64);
            // The counters exist for every agreement in force from the first scrape, at zero.
            for stage in crate::policy::ReviewStage::WARNED {
                self.review_warnings
                    .get_or_create(&ReviewLabel {
                        agreement: a.id.clone(),
                        stage: stage.as_str().to_owned(),
                    })
                    .inc_by(0);
            }
        }
        let storage = now.store.storage();
        let durable = *now.store.durable().borrow();
        for agency in now.agencies {
            let label = AgencyLabel {
                agency: agency.clone(),
            };
            // Present from the start, at zero.
            let _ = self.subscribers.get_or_create(&label);
            let Ok(id) = agency.parse() else { continue };
            let depth = storage.queue_depth(&id);
            self.queue_depth
                .get_or_create(&label)
                .set(gauge_value(depth));
            let age = oldest_age(now.store, &id, depth, durable, today);
            self.queue_oldest_age
                .get_or_create(&label)
                .set(gauge_value(age));
        }
        if let Ok(n) = storage.log_size() {
            self.log_size.set(gauge_value(n));
        }
        if let Some(cp) = now.store.checkpoint() {
            self.checkpoint_size.set(gauge_value(cp.size));
        }
        if let Some(age) = self.writer.checkpoint_age() {
            self.checkpoint_age.set(gauge_value(age.as_secs()));
        }
        self.free_bytes.set(gauge_value(now.store.free_bytes()));
        self.min_free_bytes.set(gauge_value(now.min_free_bytes));
        let serving = *now.store.health().borrow() == Health::Serving;
        self.serving.set(i64::from(serving));
        self.refresh_workflows(storage, today);
    }

    /// Counts the workflows by state (at most [`crate::workflow_service::MAX_LISTED`]
    /// consultations not closed, and as many statements, are read).
    fn refresh_workflows(&self, storage: &dyn crate::store::Storage, now: time::OffsetDateTime) {
        let mut counts: std::collections::HashMap<(&str, String), i64> = WORKFLOW_STATES
            .iter()
            .map(|(w, s)| ((*w, (*s).to_owned()), 0))
            .collect();
        let limit = crate::workflow_service::MAX_LISTED;
        for bytes in storage
            // Only those not closed are read, so that closed ones cannot crowd them out.
            .workflow_records("dsar/", limit, &|b| {
                crate::workflow::consultation_view(b, now).is_ok_and(|c| c.state != "closed")
            })
            .unwrap_or_default()
        {
            if let Ok(c) = crate::workflow::consultation_view(&bytes, now)
                && c.state != "closed"
            {
                *counts.entry(("consultation", c.state)).or_default() += 1;
            }
        }
        for bytes in storage
            .workflow_records("comms/", limit, &|_| true)
            .unwrap_or_default()
        {
            if let Ok(st) = crate::workflow::statement_view(&bytes, now) {
                *counts.entry(("statement", st.state)).or_default() += 1;
            }
        }
        for ((workflow, state), n) in counts {
            self.workflows
                .get_or_create(&WorkflowLabel {
                    workflow: workflow.to_owned(),
                    state,
                })
                .set(n);
        }
    }
}

/// The age in seconds of the oldest unacknowledged item of `agency`'s queue, which holds
/// `depth` items, at `now`; 0 when it is empty.
pub(crate) fn oldest_age(
    store: &Store,
    agency: &concordat_proto::ids::AgencyId,
    depth: u64,
    durable: u64,
    now: time::OffsetDateTime,
) -> u64 {
    if depth == 0 {
        return 0;
    }
    store
        .storage()
        .claimable(agency, durable, 1, &|_| false)
        .ok()
        .and_then(|items| items.into_iter().next())
        .and_then(|item| match item.body {
            concordat_proto::pb::delivery::Body::Transfer(t) => t.accepted_at,
            concordat_proto::pb::delivery::Body::RecallNotice(n) => n.revoked_at,
            concordat_proto::pb::delivery::Body::Notice(n) => n.issued_at,
        })
        .map_or(0, |t| {
            u64::try_from(now.unix_timestamp() - t.seconds).unwrap_or(0)
        })
}

/// What the `/metrics` and `/status` handlers need.
#[derive(Clone)]
pub struct Exporter {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The rules in force (for the review gauges and `limits.min_free_bytes`), which a
    /// reload replaces.
    pub rules: Arc<crate::live::Current<crate::live::Rules>>,
    /// The store (for queue depths and the log size).
    pub store: Store,
    /// The agencies.
    pub agencies: Arc<Vec<String>>,
    /// What the status page shows.
    pub status: crate::status::Sources,
}

impl Exporter {
    fn render(&self, format: Format) -> String {
        let rules = self.rules.load();
        self.metrics.render(
            &Snapshot {
                policy: &rules.policy,
                store: &self.store,
                agencies: &self.agencies,
                min_free_bytes: rules.limits.min_free_bytes,
            },
            format,
        )
    }
}

/// Serves `/metrics` and the status page `/status` on `listener` until `shutdown` completes.
pub async fn serve(
    exporter: Exporter,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let status = exporter.status.clone();
    let app = axum::Router::new()
        .route(
            "/status",
            axum::routing::get(move || {
                let html = crate::status::page(&status.report(&crate::status::Viewer::Page));
                async move {
                    (
                        [
                            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            // The page needs nothing from anywhere: no script, no images.
                            (
                                axum::http::header::CONTENT_SECURITY_POLICY,
                                "default-src 'none'; style-src 'unsafe-inline'",
                            ),
                            (axum::http::header::CACHE_CONTROL, "no-store"),
                        ],
                        html,
                    )
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let e = exporter.clone();
                async move {
                    let accept = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let format = Format::negotiate(accept);
                    (
                        [(axum::http::header::CONTENT_TYPE, format.content_type())],
                        e.render(format),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        policy::{Agreement, Flow},
        store::SledStorage,
    };

    #[test]
    fn the_accept_header_chooses_the_format() {
        let cases = [
            (None, Format::Text),
            (Some(""), Format::Text),
            (Some("text/plain;version=0.0.4"), Format::Text),
            (Some("*/*"), Format::Text),
            (Some("application/json"), Format::Text),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.2, text/plain;q=0.9"),
                Format::Text,
            ),
            (
                Some("text/plain;q=0.5, application/openmetrics-text"),
                Format::OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (Some("APPLICATION/OpenMetrics-Text"), Format::OpenMetrics),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn the_text_format_types_counters_by_their_sample_names() {
        let open = "# HELP a_seconds A.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\n\
                    a_seconds_total 1\n# HELP g G.\n# TYPE g gauge\ng{x=\"a b\"} 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(open),
            "# HELP a_seconds_total A.\n# TYPE a_seconds_total counter\na_seconds_total 1\n\
             # HELP g G.\n# TYPE g gauge\ng{x=\"a b\"} 2\n"
        );
    }

    #[test]
    fn closed_consultations_do_not_crowd_the_open_ones_out_of_the_count() {
        use prost::Message;
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path(), "test/log").unwrap();
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let record = |id: &str, closed: bool| concordat_proto::pb::ConsultationStatus {
            consultation_id: id.into(),
            requester: "ico".into(),
            parties: vec![concordat_proto::pb::ConsultationParty {
                agency: "nca".into(),
                state: "awaiting".into(),
                due: Some(crate::store::timestamp(now + time::Duration::days(1))),
                ..Default::default()
            }],
            closed_at: closed.then(|| crate::store::timestamp(now)),
            ..Default::default()
        };
        for i in 0..=crate::workflow_service::MAX_LISTED {
            let id = format!("ico:D-{i:05}");
            storage.put_workflow_record(&format!("dsar/{id}"), &record(&id, true).encode_to_vec());
        }
        storage.put_workflow_record("dsar/nca:D-1", &record("nca:D-1", false).encode_to_vec());
        let metrics = Metrics::default();
        metrics.refresh_workflows(&storage, now);
        let open = metrics
            .workflows
            .get_or_create(&WorkflowLabel {
                workflow: "consultation".into(),
                state: "open".into(),
            })
            .get();
        assert_eq!(open, 1);
    }

    #[test]
    fn overdue_reviews_counts_and_depths_are_exposed_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SledStorage::open(dir.path(), "test/log").unwrap());
        let store = Store::start(
            storage,
            crate::store::StoreOptions::new(dir.path(), std::time::Duration::from_secs(10)),
        )
        .unwrap();
        let agreement = |id: &str, review_by| Agreement {
            id: id.into(),
            title: "t".into(),
            parties: ["ico".parse().unwrap(), "nca".parse().unwrap()]
                .into_iter()
                .collect(),
            signed: time::macros::date!(2020 - 01 - 01),
            review_by,
            review: Default::default(),
            flows: vec![Flow {
                from: "nca".parse().unwrap(),
                to: "ico".parse().unwrap(),
                kinds: BTreeSet::from([concordat_proto::envelope::Kind::ThreatAssessment]),
                clause: "c".into(),
                opaque: false,
                max_tlp: None,
                legal_bases: Default::default(),
                consent_refusal_note: None,
            }],
        };
        let policy = Policy {
            agreements: vec![
                agreement("old", time::macros::date!(2021 - 01 - 01)),
                agreement("fresh", time::macros::date!(2999 - 01 - 01)),
            ],
            ..Policy::default()
        };
        let metrics = Metrics::default();
        metrics.accepted();
        metrics.refused("NO_AGREEMENT");
        metrics.refused("NO_AGREEMENT");
        metrics.subscribed("ico", true);
        metrics.review_warning("old", crate::policy::ReviewStage::Lapsed);
        let now = Snapshot {
            policy: &policy,
            store: &store,
            agencies: &["ico".into(), "nca".into()],
            min_free_bytes: 7,
        };
        let open = metrics.render(&now, Format::OpenMetrics);
        let text = metrics.render(&now, Format::Text);
        let both = [
            "concordat_agreement_review_overdue{agreement=\"old\"} 1",
            "concordat_agreement_review_overdue{agreement=\"fresh\"} 0",
            "concordat_workflows{workflow=\"consultation\",state=\"overdue\"} 0",
            "concordat_workflows{workflow=\"statement\",state=\"approved\"} 0",
            "concordat_agreement_review_stage{agreement=\"old\"} 3",
            "concordat_agreement_review_stage{agreement=\"fresh\"} 0",
            "concordat_agreement_review_warnings_total{agreement=\"old\",stage=\"lapsed\"} 1",
            "concordat_agreement_review_warnings_total{agreement=\"fresh\",stage=\"due\"} 0",
            "concordat_transfers_accepted_total 1",
            "concordat_transfers_refused_total{reason=\"NO_AGREEMENT\"} 2",
            "concordat_transfers_refused_total{reason=\"CONSENT_REVOKED\"} 0",
            "concordat_queue_depth{agency=\"ico\"} 0",
            "concordat_subscribers{agency=\"ico\"} 1",
            "concordat_subscribers{agency=\"nca\"} 0",
            "concordat_storage_min_free_bytes 7",
        ];
        for (format, body, only) in [
            (
                "OpenMetrics",
                &open,
                ["# TYPE concordat_transfers_accepted counter", "# EOF"],
            ),
            (
                "text",
                &text,
                [
                    "# TYPE concordat_transfers_accepted_total counter",
                    "# TYPE concordat_store_flush_seconds histogram",
                ],
            ),
        ] {
            for line in both.iter().chain(only.iter()) {
                assert!(
                    body.lines().any(|l| l == *line),
                    "{format}: missing {line:?} in\n{body}"
                );
            }
        }
        assert!(!text.contains("# EOF"));
    }
}
