//! `concordat status` and `concordat consent list`: the broker's `Operations` answers, as text
//! for a person and as JSON for scripts.
//!
//! The JSON is [`StatusReport`] and [`ConsentList`] serialised with serde: their field names are
//! the documented interface (README, "Status"), kept stable; a field the caller may not see (another
//! agency's queue) is `null`, never a made-up zero.

use std::{collections::BTreeMap, fmt::Write as _};

use concordat_proto::pb;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use concordat_agent::client::ClientTls;

use crate::operator::describe_status;

/// `concordat status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The certificate's id, and whether it is an auditor's.
    pub caller: String,
    pub auditor: bool,
    pub broker_version: String,
    /// When the broker answered (RFC 3339).
    pub generated_at: String,
    pub agencies: Vec<AgencyReport>,
    pub audit_log: LogReport,
    pub agreements: Vec<AgreementReport>,
    pub storage: StorageReport,
    /// Transfer decisions of the last hour: `ACCEPTED` and each refusal reason with a count.
    pub decisions_last_hour: BTreeMap<String, u64>,
}

/// One agency in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgencyReport {
    pub agency: String,
    pub name: String,
    /// At least one connection with its certificate is established.
    pub connected: bool,
    pub connections: u32,
    /// Open subscriptions: agents receiving.
    pub subscriptions: u32,
    /// Unacknowledged items queued for it; `null` when the caller may not see it.
    pub queue_depth: Option<u64>,
    /// Age of its oldest queued item in seconds (0 when empty); `null` as above.
    pub queue_oldest_age_seconds: Option<u64>,
}

/// The audit log in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReport {
    pub entries: u64,
    pub checkpoint_size: u64,
    /// Lowercase hex.
    pub checkpoint_root: String,
    pub checkpoint_origin: String,
    /// Seconds since the broker last sealed a checkpoint.
    pub checkpoint_age_seconds: u64,
}

/// One agreement in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgreementReport {
    pub id: String,
    pub title: String,
    pub parties: Vec<String>,
    /// YYYY-MM-DD.
    pub signed: String,
    pub review_by: String,
    pub in_force: bool,
    pub review_overdue: bool,
    /// "current", "due", "overdue" or "lapsed" (docs/workflows.md, "Reviews"); empty from a
    /// broker that does not say.
    #[serde(default)]
    pub review_stage: String,
    /// The last day of the grace period after `review_by`, YYYY-MM-DD.
    #[serde(default)]
    pub review_grace_end: String,
}

/// The broker's storage in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageReport {
    /// False while writes are refused with `STORAGE_UNAVAILABLE`.
    pub serving: bool,
    pub free_bytes: u64,
}

/// `concordat consent list --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentList {
    pub consents: Vec<ConsentReport>,
    /// More matched than the broker returns in one answer.
    pub truncated: bool,
}

/// One consent token in [`ConsentList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentReport {
    /// The issuer's key id (`k4.pid.…`) and the agency whose desk it is (`null`: an
    /// organisation's own key).
    pub issuer: String,
    pub issuer_agency: Option<String>,
    pub jti: String,
    pub organisation: String,
    /// RFC 3339 times; `expires_at` and `last_used_at` are `null` when the broker did not
    /// record them (consents used before it kept them).
    pub issued_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    /// Transfers accepted under it, and the most it may authorise (`null`: unlimited).
    pub uses: u32,
    pub max_uses: Option<u32>,
    /// `open`, `revoked`, `expired` or `used_up` (the first that applies, in that order
    /// after open).
    pub state: String,
    pub senders: Vec<String>,
    pub recipients: Vec<String>,
}

fn rfc3339(t: Option<prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    let t = OffsetDateTime::from_unix_timestamp(t.seconds).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl From<pb::StatusResponse> for StatusReport {
    fn from(r: pb::StatusResponse) -> Self {
        StatusReport {
            caller: r.caller,
            auditor: r.auditor,
            broker_version: r.broker_version,
            generated_at: rfc3339(r.now).unwrap_or_default(),
            agencies: r
                .agencies
                .into_iter()
                .map(|a| AgencyReport {
                    agency: a.agency,
                    name: a.name,
                    connected: a.connected,
                    connections: a.connections,
                    subscriptions: a.subscriptions,
                    queue_depth: a.queue_visible.then_some(a.queue_depth),
                    queue_oldest_age_seconds: a.queue_visible.then_some(a.queue_oldest_age_seconds),
                })
                .collect(),
            audit_log: LogReport {
                entries: r.log_size,
                checkpoint_size: r.checkpoint_size,
                checkpoint_root: r.checkpoint_root,
                checkpoint_origin: r.checkpoint_origin,
                checkpoint_age_seconds: r.checkpoint_age_seconds,
            },
            agreements: r
                .agreements
                .into_iter()
                .map(|a| AgreementReport {
                    id: a.id,
                    title: a.title,
                    parties: a.parties,
                    signed: a.signed,
                    review_by: a.review_by,
                    in_force: a.in_force,
                    review_overdue: a.review_overdue,
                    review_stage: a.review_stage,
                    review_grace_end: a.review_grace_end,
                })
                .collect(),
            storage: StorageReport {
                serving: r.storage_serving,
                free_bytes: r.storage_free_bytes,
            },
            decisions_last_hour: r
                .decisions_last_hour
                .into_iter()
                .map(|d| (d.outcome, d.count))
                .collect(),
        }
    }
}

impl From<pb::ConsentsResponse> for ConsentList {
    fn from(r: pb::ConsentsResponse) -> Self {
        ConsentList {
            truncated: r.truncated,
            consents: r
                .consents
                .into_iter()
                .map(|c| {
                    let state = if c.revoked {
                        "revoked"
                    } else if c.expired {
                        "expired"
                    } else if c.used_up {
                        "used_up"
                    } else {
                        "open"
                    };
                    ConsentReport {
                        issuer: c.issuer,
                        issuer_agency: (!c.issuer_agency.is_empty()).then_some(c.issuer_agency),
                        jti: c.jti,
                        organisation: c.organisation,
                        issued_at: rfc3339(c.issued_at).unwrap_or_default(),
                        expires_at: rfc3339(c.expires_at),
                        last_used_at: rfc3339(c.last_used_at),
                        uses: c.uses,
                        max_uses: (c.max_uses > 0).then_some(c.max_uses),
                        state: state.into(),
                        senders: c.senders,
                        recipients: c.recipients,
                    }
                })
                .collect(),
        }
    }
}

/// A duration in seconds as a person reads it.
fn age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

impl StatusReport {
    /// The report as text for a terminal.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "broker {} at {}, seen by {}{}; storage {} ({} MiB free)",
            self.broker_version,
            self.generated_at,
            self.caller,
            if self.auditor { " (auditor)" } else { "" },
            if self.storage.serving {
                "serving"
            } else {
                "NOT SERVING"
            },
            self.storage.free_bytes / (1024 * 1024)
        );
        let _ = writeln!(s, "\nagencies:");
        let _ = writeln!(
            s,
            "  {:<12} {:<14} {:<10} {:>6} {:>8}  name",
            "agency", "connection", "receiving", "queued", "oldest"
        );
        for a in &self.agencies {
            let connection = if a.connected {
                format!("connected({})", a.connections)
            } else {
                "-".into()
            };
            let (queued, oldest) = match (a.queue_depth, a.queue_oldest_age_seconds) {
                (Some(0), _) => ("0".into(), "-".into()),
                (Some(d), Some(o)) => (d.to_string(), age(o)),
                _ => ("n/a".into(), "n/a".into()),
            };
            let _ = writeln!(
                s,
                "  {:<12} {:<14} {:<10} {:>6} {:>8}  {}",
                a.agency,
                connection,
                if a.subscriptions > 0 { "yes" } else { "no" },
                queued,
                oldest,
                a.name
            );
        }
        let _ = writeln!(
            s,
            "\naudit log: {} entries; checkpoint {} of size {}, root {}, sealed {} ago",
            self.audit_log.entries,
            self.audit_log.checkpoint_origin,
            self.audit_log.checkpoint_size,
            self.audit_log.checkpoint_root,
            age(self.audit_log.checkpoint_age_seconds)
        );
        let decisions: Vec<String> = self
            .decisions_last_hour
            .iter()
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "decisions in the last hour: {}",
            if decisions.is_empty() {
                "none".into()
            } else {
                decisions.join(", ")
            }
        );
        let _ = writeln!(s, "\nagreements:");
        for a in &self.agreements {
            let _ = writeln!(
                s,
                "  {} ({}): review by {}{}{}",
                a.id,
                a.parties.join(", "),
                a.review_by,
                match a.review_stage.as_str() {
                    "" if a.review_overdue => " OVERDUE".to_owned(),
                    "" | "current" => String::new(),
                    stage => format!(
                        " {} (grace ends {})",
                        stage.to_uppercase(),
                        a.review_grace_end
                    ),
                },
                if a.in_force { "" } else { ", not yet in force" }
            );
        }
        s
    }
}

impl ConsentList {
    /// The list as text for a terminal.
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.consents.is_empty() {
            s.push_str("no consents\n");
        }
        for c in &self.consents {
            let uses = match c.max_uses {
                Some(max) => format!("{}/{max}", c.uses),
                None => c.uses.to_string(),
            };
            let _ = writeln!(
                s,
                "{} {} org {} uses {} expires {} [{}] from {} to {}; issuer {}{}",
                c.jti,
                c.state,
                c.organisation,
                uses,
                c.expires_at.as_deref().unwrap_or("unknown"),
                c.issued_at,
                c.senders.join(","),
                c.recipients.join(","),
                c.issuer,
                c.issuer_agency
                    .as_deref()
                    .map(|a| format!(" ({a}'s desk)"))
                    .unwrap_or_default()
            );
        }
        if self.truncated {
            s.push_str(
                "(more consents matched than the broker lists at once; narrow with --org)\n",
            );
        }
        s
    }
}

/// Asks the broker for its status.
pub async fn status(tls: &ClientTls) -> anyhow::Result<StatusReport> {
    let broker = tls.connect().await?;
    let response = broker
        .deadline(broker.operations().status(pb::StatusRequest {}))
        .await
        .map_err(describe_status)?;
    Ok(response.into_inner().into())
}

/// Asks the broker for the consents `request` selects.
pub async fn consents(
    tls: &ClientTls,
    request: pb::ConsentsRequest,
) -> anyhow::Result<ConsentList> {
    let broker = tls.connect().await?;
    let response = broker
        .deadline(broker.operations().consents(request))
        .await
        .map_err(describe_status)?;
    Ok(response.into_inner().into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_queue_is_null_not_zero() {
        let report = StatusReport::from(pb::StatusResponse {
            agencies: vec![
                pb::AgencyStatus {
                    agency: "ico".into(),
                    queue_visible: true,
                    queue_depth: 0,
                    ..Default::default()
                },
                pb::AgencyStatus {
                    agency: "nca".into(),
                    queue_visible: false,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["agencies"][0]["queue_depth"], 0);
        assert!(json["agencies"][1]["queue_depth"].is_null());
        assert!(report.text().contains("n/a"));
    }

    #[test]
    fn a_consent_has_one_state() {
        // (revoked, expired, used up, state)
        let cases = [
            (false, false, false, "open"),
            (true, true, true, "revoked"),
            (false, true, true, "expired"),
            (false, false, true, "used_up"),
        ];
        for (revoked, expired, used_up, want) in cases {
            let list = ConsentList::from(pb::ConsentsResponse {
                consents: vec![pb::ConsentStatus {
                    revoked,
                    expired,
                    used_up,
                    ..Default::default()
                }],
                truncated: false,
            });
            assert_eq!(list.consents[0].state, want);
        }
    }
}
