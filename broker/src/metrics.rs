//! Prometheus metrics, served over plain HTTP at `/metrics` when `metrics_listen` is set.
//!
//! Counters of accepted and refused transfers (by reason code) and of connections closed before
//! they were established (by cause), and, computed at each scrape,
//! whether each agreement's review is overdue, each recipient's queue depth and the audit log's
//! size. No payload, organisation or token ever becomes a label.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{policy::Policy, store::Store};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabel {
    agreement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgencyLabel {
    agency: String,
}

/// The broker's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    accepted: Counter,
    refused: Family<ReasonLabel, Counter>,
    overdue: Family<AgreementLabel, Gauge>,
    queue_depth: Family<AgencyLabel, Gauge>,
    log_size: Gauge,
    connections_refused: Family<CauseLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("concordat");
        let accepted = Counter::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let overdue = Family::<AgreementLabel, Gauge>::default();
        let queue_depth = Family::<AgencyLabel, Gauge>::default();
        let log_size = Gauge::default();
        let connections_refused = Family::<CauseLabel, Counter>::default();
        registry.register("transfers_accepted", "Transfers accepted", accepted.clone());
        registry.register(
            "transfers_refused",
            "Transfers refused, by reason code",
            refused.clone(),
        );
        registry.register(
            "agreement_review_overdue",
            "1 when the agreement is past its review date",
            overdue.clone(),
        );
        registry.register(
            "queue_depth",
            "Items queued for each recipient",
            queue_depth.clone(),
        );
        registry.register(
            "audit_log_entries",
            "Entries in the audit log",
            log_size.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before they were established, by cause (per_source_cap, full, shed, tls, timeout, protocol, accept)",
            connections_refused.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            accepted,
            refused,
            overdue,
            queue_depth,
            log_size,
            connections_refused,
        }
    }
}

impl Metrics {
    /// Counts an accepted transfer.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// Counts a refused transfer.
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a connection closed before it was established, by cause.
    pub fn connection_refused(&self, cause: &str) {
        self.connections_refused
            .get_or_create(&CauseLabel {
                cause: cause.to_owned(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format, with the gauges brought up to date.
    pub fn render(&self, policy: &Policy, store: &Store, agencies: &[String]) -> String {
        let today = crate::clock::now().date();
        for a in &policy.agreements {
            self.overdue
                .get_or_create(&AgreementLabel {
                    agreement: a.id.clone(),
                })
                .set(i64::from(a.review_overdue(today)));
        }
        for agency in agencies {
            if let Ok(id) = agency.parse() {
                let depth = store.storage().queue_depth(&id);
                self.queue_depth
                    .get_or_create(&AgencyLabel {
                        agency: agency.clone(),
                    })
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
        }
        if let Ok(n) = store.storage().log_size() {
            self.log_size.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

/// What the `/metrics` handler needs.
#[derive(Clone)]
pub struct Exporter {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The rules (for the review gauges).
    pub policy: Arc<Policy>,
    /// The store (for queue depths and the log size).
    pub store: Store,
    /// The agencies.
    pub agencies: Arc<Vec<String>>,
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    exporter: Exporter,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let e = exporter.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    e.metrics.render(&e.policy, &e.store, &e.agencies),
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
    fn overdue_reviews_counts_and_depths_are_exposed() {
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
            flows: vec![Flow {
                from: "nca".parse().unwrap(),
                to: "ico".parse().unwrap(),
                kinds: BTreeSet::from([concordat_proto::envelope::Kind::ThreatAssessment]),
                clause: "c".into(),
                opaque: false,
                max_tlp: None,
                legal_bases: Default::default(),
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
        let text = metrics.render(&policy, &store, &["ico".into()]);
        for line in [
            "concordat_agreement_review_overdue{agreement=\"old\"} 1",
            "concordat_agreement_review_overdue{agreement=\"fresh\"} 0",
            "concordat_transfers_accepted_total 1",
            "concordat_transfers_refused_total{reason=\"NO_AGREEMENT\"} 2",
            "concordat_queue_depth{agency=\"ico\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
