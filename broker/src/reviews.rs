//! Agreement reviews at decision time: what a transfer decision under an agreement that is due,
//! overdue or lapsed for review ([`crate::policy::ReviewStage`]) leaves behind. The stage itself
//! is decided in `policy::agreements` (which refuses a lapsed agreement's flows when reviews are
//! enforced); here each such decision is counted
//! (`concordat_agreement_review_warnings_total{agreement,stage}`) and logged, at most one line a
//! minute per agreement and stage with the number of decisions since the last one, so that a
//! busy flow under an overdue MoU does not flood the log. The warning sentences themselves go on
//! the receipt (`Receipt.warnings`) or into the refusal's message (`crate::service`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    metrics::Metrics,
    policy::{ReviewStage, ReviewWarning},
};

/// How often at most one agreement's stage is logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The rate-limited log of decisions under agreements due, overdue or lapsed for review.
#[derive(Debug, Default)]
pub struct ReviewLog {
    seen: Mutex<HashMap<(String, ReviewStage), Seen>>,
}

/// One agreement and stage: when it was last logged, and the decisions since.
#[derive(Debug)]
struct Seen {
    logged_at: Instant,
    since: u64,
}

impl ReviewLog {
    /// Counts one decision that carried `warnings` (fresh decisions only: a duplicate's first
    /// decision was counted when it was made) and logs each agreement's stage if its last line
    /// is older than [`LOG_INTERVAL`].
    pub fn record(&self, warnings: &[ReviewWarning], metrics: &Metrics) {
        self.record_at(warnings, metrics, Instant::now());
    }

    fn record_at(&self, warnings: &[ReviewWarning], metrics: &Metrics, now: Instant) {
        if warnings.is_empty() {
            return;
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in warnings {
            metrics.review_warning(&w.agreement, w.stage);
            let key = (w.agreement.clone(), w.stage);
            let log = match seen.get_mut(&key) {
                None => {
                    seen.insert(
                        key,
                        Seen {
                            logged_at: now,
                            since: 0,
                        },
                    );
                    Some(1)
                }
                Some(s) if now.saturating_duration_since(s.logged_at) >= LOG_INTERVAL => {
                    let decisions = s.since + 1;
                    s.logged_at = now;
                    s.since = 0;
                    Some(decisions)
                }
                Some(s) => {
                    s.since += 1;
                    None
                }
            };
            if let Some(decisions) = log {
                tracing::warn!(
                    agreement = %w.agreement,
                    stage = %w.stage,
                    decisions,
                    "decisions under an agreement {} for review ({decisions} since the last such line): {}",
                    w.stage,
                    w.sentence
                );
            }
        }
    }

    /// Whether a line for `agreement` at `stage` would be logged at `now` (for tests).
    #[cfg(test)]
    fn pending(&self, agreement: &str, stage: ReviewStage) -> Option<u64> {
        let seen = self.seen.lock().ok()?;
        seen.get(&(agreement.to_owned(), stage)).map(|s| s.since)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn warning(agreement: &str, stage: ReviewStage) -> ReviewWarning {
        ReviewWarning {
            agreement: agreement.into(),
            stage,
            sentence: format!("{agreement} is {stage}"),
        }
    }

    /// The first decision is logged at once; the next within a minute only counted; the first
    /// after the minute is logged with the count since. Each agreement and stage on its own.
    #[test]
    fn one_line_a_minute_per_agreement_and_stage() {
        let log = ReviewLog::default();
        let metrics = Metrics::default();
        let t0 = Instant::now();
        let due = [warning("a", ReviewStage::Due)];
        log.record_at(&due, &metrics, t0);
        assert_eq!(log.pending("a", ReviewStage::Due), Some(0));
        for i in 1..=5 {
            log.record_at(&due, &metrics, t0 + Duration::from_secs(i));
        }
        assert_eq!(log.pending("a", ReviewStage::Due), Some(5));
        // Another stage of the same agreement, and another agreement, are logged at once.
        log.record_at(
            &[
                warning("a", ReviewStage::Overdue),
                warning("b", ReviewStage::Due),
            ],
            &metrics,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(log.pending("a", ReviewStage::Overdue), Some(0));
        assert_eq!(log.pending("b", ReviewStage::Due), Some(0));
        assert_eq!(log.pending("a", ReviewStage::Due), Some(5));
        // After the minute: logged (with 6 decisions since), and the count starts again.
        log.record_at(&due, &metrics, t0 + LOG_INTERVAL);
        assert_eq!(log.pending("a", ReviewStage::Due), Some(0));
        log.record_at(&[], &metrics, t0 + LOG_INTERVAL * 3);
        assert_eq!(log.pending("a", ReviewStage::Due), Some(0));
    }
}
