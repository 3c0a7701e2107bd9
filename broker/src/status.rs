//! What the federation looks like right now: the one view behind `concordat status` (the
//! `Operations.Status` RPC, [`crate::operations`]) and the read-only status page served at
//! `/status` beside `/metrics`.
//!
//! Everything is read from the broker's live state, the same sources `/metrics` reads:
//! established connections from [`Connections`], open subscriptions and transfer decisions
//! from [`Metrics`], queues, the log and the checkpoint from the [`Store`], agreements from the
//! rules in force ([`crate::live::Rules`], replaced by a reload). Nothing here writes.
//!
//! Who sees what ([`Viewer`]):
//! - an **agency** sees the connection state of every agency, its own queue only, the log and
//!   its latest checkpoint, the agreements it is party to, and the decisions of the last hour;
//! - an **auditor** sees everything;
//! - the **page** (plain HTTP on the metrics listener, no client certificate) sees what
//!   `/metrics` already exposes on the same listener: every agency's connection state and
//!   queue, the agreements, the decisions by reason, the checkpoint. It never shows
//!   organisations, consents or transfers.
//!
//! Decisions of the last hour are counted by [`DecisionWindow`]: sixty one-minute buckets of
//! counts by outcome, fed where the `transfers_accepted` and `transfers_refused` counters are.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Instant,
};

use concordat_proto::{ids::AgencyId, pb};
use time::OffsetDateTime;

use crate::{
    connections::Connections,
    metrics::Metrics,
    store::{Health, Store},
};

/// The outcome under which accepted transfers are counted.
pub const ACCEPTED: &str = "ACCEPTED";

/// How many one-minute buckets the decision window keeps: the last hour.
const WINDOW_MINUTES: u64 = 60;

/// Transfer decisions of the last hour by outcome: a bucket per minute (of the monotonic
/// clock), at most sixty of them, each holding a count per outcome. Recording is
/// a lock, a comparison and a map update; outcomes are `ACCEPTED` and the reason codes, so a
/// bucket stays small.
#[derive(Debug)]
pub struct DecisionWindow {
    start: Instant,
    buckets: Mutex<VecDeque<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    minute: u64,
    counts: BTreeMap<String, u64>,
}

impl Default for DecisionWindow {
    fn default() -> Self {
        DecisionWindow {
            start: Instant::now(),
            buckets: Mutex::new(VecDeque::with_capacity(WINDOW_MINUTES as usize)),
        }
    }
}

impl DecisionWindow {
    fn minute(&self) -> u64 {
        self.start.elapsed().as_secs() / 60
    }

    /// Counts one decision with `outcome` ([`ACCEPTED`] or a reason code) now.
    pub fn record(&self, outcome: &str) {
        self.record_at(self.minute(), outcome);
    }

    /// The counts of the last hour by outcome (outcomes with a count only).
    pub fn last_hour(&self) -> BTreeMap<String, u64> {
        self.last_hour_at(self.minute())
    }

    fn record_at(&self, minute: u64, outcome: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.back().is_none_or(|b| b.minute != minute) {
            buckets.push_back(Bucket {
                minute,
                counts: BTreeMap::new(),
            });
        }
        while buckets
            .front()
            .is_some_and(|b| b.minute + WINDOW_MINUTES <= minute)
        {
            buckets.pop_front();
        }
        if let Some(b) = buckets.back_mut() {
            *b.counts.entry(outcome.to_owned()).or_insert(0) += 1;
        }
    }

    fn last_hour_at(&self, minute: u64) -> BTreeMap<String, u64> {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = BTreeMap::new();
        for b in buckets
            .iter()
            .filter(|b| b.minute + WINDOW_MINUTES > minute)
        {
            for (outcome, n) in &b.counts {
                *out.entry(outcome.clone()).or_insert(0) += n;
            }
        }
        out
    }
}

/// Who is looking, which decides what the view holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// An agency's certificate.
    Agency(AgencyId),
    /// An auditor's certificate.
    Auditor(AgencyId),
    /// The status page on the metrics listener.
    Page,
}

impl Viewer {
    fn sees_queue_of(&self, agency: &AgencyId) -> bool {
        match self {
            Viewer::Agency(me) => me == agency,
            Viewer::Auditor(_) | Viewer::Page => true,
        }
    }

    fn sees_agreement(&self, parties: &std::collections::BTreeSet<AgencyId>) -> bool {
        match self {
            Viewer::Agency(me) => parties.contains(me),
            Viewer::Auditor(_) | Viewer::Page => true,
        }
    }
}

/// What a status view is read from.
#[derive(Clone)]
pub struct Sources {
    /// Subscriptions, decisions and the checkpoint's age.
    pub metrics: Arc<Metrics>,
    /// Queues, the log and the checkpoint.
    pub store: Store,
    /// The rules in force (the agreements), which a reload replaces.
    pub rules: Arc<crate::live::Current<crate::live::Rules>>,
    /// The agencies and their display names.
    pub agencies: Arc<BTreeMap<AgencyId, String>>,
    /// The established connections.
    pub connections: Arc<Connections>,
}

impl Sources {
    /// The federation as `viewer` may see it now.
    pub fn report(&self, viewer: &Viewer) -> pb::StatusResponse {
        let now = crate::clock::now();
        let storage = self.store.storage();
        let durable = *self.store.durable().borrow();
        let connected = self.connections.established_by_name();
        let agencies = self
            .agencies
            .iter()
            .map(|(id, name)| {
                let connections = connected.get(id.as_str()).copied().unwrap_or(0);
                let visible = viewer.sees_queue_of(id);
                let (depth, age) = if visible {
                    let depth = storage.queue_depth(id);
                    let age = crate::metrics::oldest_age(&self.store, id, depth, durable, now);
                    (depth, age)
                } else {
                    (0, 0)
                };
                pb::AgencyStatus {
                    agency: id.to_string(),
                    name: name.clone(),
                    connected: connections > 0,
                    connections: u32::try_from(connections).unwrap_or(u32::MAX),
                    subscriptions: u32::try_from(self.metrics.subscriptions(id.as_str()).max(0))
                        .unwrap_or(u32::MAX),
                    queue_visible: visible,
                    queue_depth: depth,
                    queue_oldest_age_seconds: age,
                }
            })
            .collect();
        let today = now.date();
        let rules = self.rules.load();
        let agreements = rules
            .policy
            .agreements
            .iter()
            .filter(|a| viewer.sees_agreement(&a.parties))
            .map(|a| pb::AgreementStatus {
                id: a.id.clone(),
                title: a.title.clone(),
                parties: a.parties.iter().map(ToString::to_string).collect(),
                signed: a.signed.to_string(),
                review_by: a.review_by.to_string(),
                in_force: a.in_force(today),
                review_overdue: a.review_overdue(today),
                review_stage: a.review_stage(today).as_str().to_owned(),
                review_grace_end: a.grace_end().to_string(),
            })
            .collect();
        let checkpoint = self.store.checkpoint();
        let (caller, auditor) = match viewer {
            Viewer::Agency(id) => (id.to_string(), false),
            Viewer::Auditor(id) => (id.to_string(), true),
            Viewer::Page => (String::new(), false),
        };
        pb::StatusResponse {
            caller,
            auditor,
            broker_version: env!("CARGO_PKG_VERSION").into(),
            now: Some(crate::store::timestamp(now)),
            agencies,
            log_size: storage.log_size().unwrap_or(0),
            checkpoint_size: checkpoint.as_ref().map_or(0, |c| c.size),
            checkpoint_root: checkpoint
                .as_ref()
                .map_or_else(String::new, |c| c.root.to_hex()),
            checkpoint_origin: checkpoint
                .as_ref()
                .and_then(|c| c.note.lines().next())
                .unwrap_or("")
                .to_owned(),
            checkpoint: checkpoint.map(|c| c.note).unwrap_or_default(),
            checkpoint_age_seconds: self.metrics.checkpoint_age().map_or(0, |age| age.as_secs()),
            agreements,
            storage_serving: *self.store.health().borrow() == Health::Serving,
            storage_free_bytes: self.store.free_bytes(),
            decisions_last_hour: self
                .metrics
                .decisions()
                .last_hour()
                .into_iter()
                .map(|(outcome, count)| pb::DecisionCount { outcome, count })
                .collect(),
        }
    }
}

/// Escapes text for HTML element content and quoted attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration in seconds as a person reads it: `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn human_age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The status page: plain HTML, no script, every value escaped. Sections: agencies with their
/// connection state and queues, decisions of the last hour by outcome, the audit log and its
/// latest checkpoint, the agreements.
pub fn page(report: &pb::StatusResponse) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let when = report
        .now
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Concordat broker status</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         th,td{{border:1px solid #999;padding:0.3em 0.6em;text-align:left}}\
         .up{{color:#060}}.down{{color:#a00}}</style>\n</head>\n<body>\n\
         <h1>Concordat broker status</h1>\n\
         <p id=\"summary\">Broker {} at {}. Storage: {}.</p>\n",
        esc(&report.broker_version),
        esc(&when),
        if report.storage_serving {
            "serving"
        } else {
            "NOT SERVING (writes refused with STORAGE_UNAVAILABLE)"
        }
    );

    h.push_str(
        "<h2>Agencies</h2>\n<table id=\"agencies\">\n<tr><th>Agency</th><th>Name</th>\
         <th>Connection</th><th>Receiving</th><th>Queued</th><th>Oldest queued</th></tr>\n",
    );
    for a in &report.agencies {
        let (class, state) = if a.connected {
            ("up", format!("connected ({})", a.connections))
        } else {
            ("down", "not connected".to_owned())
        };
        let (queued, oldest) = if a.queue_visible {
            (
                a.queue_depth.to_string(),
                if a.queue_depth == 0 {
                    "-".to_owned()
                } else {
                    human_age(a.queue_oldest_age_seconds)
                },
            )
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.agency),
            esc(&a.name),
            esc(&state),
            if a.subscriptions > 0 { "yes" } else { "no" },
            esc(&queued),
            esc(&oldest),
        );
    }
    h.push_str("</table>\n");

    h.push_str(
        "<h2>Decisions in the last hour</h2>\n<table id=\"decisions\">\n\
         <tr><th>Outcome</th><th>Transfers</th></tr>\n",
    );
    let accepted = report
        .decisions_last_hour
        .iter()
        .find(|d| d.outcome == ACCEPTED)
        .map_or(0, |d| d.count);
    let _ = writeln!(h, "<tr><td>accepted</td><td>{accepted}</td></tr>");
    let mut refused = 0;
    for d in report
        .decisions_last_hour
        .iter()
        .filter(|d| d.outcome != ACCEPTED)
    {
        refused += d.count;
        let _ = writeln!(
            h,
            "<tr><td>refused: {}</td><td>{}</td></tr>",
            esc(&d.outcome),
            d.count
        );
    }
    if refused == 0 {
        h.push_str("<tr><td>refused</td><td>0</td></tr>\n");
    }
    h.push_str("</table>\n");

    let _ = write!(
        h,
        "<h2>Audit log</h2>\n<table id=\"log\">\n\
         <tr><th>Entries</th><td>{}</td></tr>\n\
         <tr><th>Latest checkpoint</th><td>size {}</td></tr>\n\
         <tr><th>Root</th><td><code>{}</code></td></tr>\n\
         <tr><th>Origin</th><td>{}</td></tr>\n\
         <tr><th>Sealed</th><td>{} ago</td></tr>\n</table>\n",
        report.log_size,
        report.checkpoint_size,
        esc(&report.checkpoint_root),
        esc(&report.checkpoint_origin),
        human_age(report.checkpoint_age_seconds),
    );

    h.push_str(
        "<h2>Agreements</h2>\n<table id=\"agreements\">\n<tr><th>Agreement</th><th>Title</th>\
         <th>Parties</th><th>Signed</th><th>Review by</th></tr>\n",
    );
    for a in &report.agreements {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}{}</td></tr>",
            esc(&a.id),
            esc(&a.title),
            esc(&a.parties.join(", ")),
            esc(&a.signed),
            if a.in_force {
                ""
            } else {
                " (not yet in force)"
            },
            esc(&a.review_by),
            match a.review_stage.as_str() {
                "" if a.review_overdue => " (OVERDUE)".to_owned(),
                "" | "current" => String::new(),
                stage => format!(
                    " ({}, grace ends {})",
                    esc(&stage.to_uppercase()),
                    esc(&a.review_grace_end)
                ),
            },
        );
    }
    h.push_str("</table>\n</body>\n</html>\n");
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_the_last_sixty_minutes_only() {
        let w = DecisionWindow::default();
        // (minute recorded, outcome)
        let recorded = [
            (0, ACCEPTED),
            (0, "NO_AGREEMENT"),
            (30, ACCEPTED),
            (59, "CONSENT_MISSING"),
            (60, ACCEPTED),
            (61, "NO_AGREEMENT"),
        ];
        for (minute, outcome) in recorded {
            w.record_at(minute, outcome);
        }
        // (minute read, expected counts)
        let cases: &[(u64, &[(&str, u64)])] = &[
            (
                61,
                &[(ACCEPTED, 2), ("CONSENT_MISSING", 1), ("NO_AGREEMENT", 1)],
            ),
            (
                89,
                &[(ACCEPTED, 2), ("CONSENT_MISSING", 1), ("NO_AGREEMENT", 1)],
            ),
            (
                90,
                &[(ACCEPTED, 1), ("CONSENT_MISSING", 1), ("NO_AGREEMENT", 1)],
            ),
            (119, &[(ACCEPTED, 1), ("NO_AGREEMENT", 1)]),
            (121, &[]),
        ];
        for (minute, want) in cases {
            let want: BTreeMap<String, u64> =
                want.iter().map(|(o, n)| ((*o).to_owned(), *n)).collect();
            assert_eq!(w.last_hour_at(*minute), want, "at minute {minute}");
        }
        // Old buckets are dropped as new ones come: at most an hour's worth is kept.
        w.record_at(500, ACCEPTED);
        assert_eq!(w.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_page_escapes_every_value() {
        let hostile = "<script>alert('x')</script> & \"quoted\"";
        let report = pb::StatusResponse {
            broker_version: hostile.into(),
            agencies: vec![pb::AgencyStatus {
                agency: "ico".into(),
                name: hostile.into(),
                connected: true,
                connections: 1,
                queue_visible: true,
                queue_depth: 3,
                queue_oldest_age_seconds: 125,
                ..Default::default()
            }],
            decisions_last_hour: vec![
                pb::DecisionCount {
                    outcome: ACCEPTED.into(),
                    count: 4,
                },
                pb::DecisionCount {
                    outcome: hostile.into(),
                    count: 2,
                },
            ],
            agreements: vec![pb::AgreementStatus {
                id: hostile.into(),
                title: hostile.into(),
                parties: vec!["ico".into(), "nca".into()],
                review_overdue: true,
                in_force: true,
                ..Default::default()
            }],
            checkpoint_origin: hostile.into(),
            checkpoint_size: 17,
            ..Default::default()
        };
        let html = page(&report);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("'x'"), "{html}");
        assert!(
            html.contains(
                "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quoted&quot;"
            ),
            "{html}"
        );
        for shown in [
            "connected (1)",
            "<td>3</td><td>2 min 5 s</td>",
            "<td>accepted</td><td>4</td>",
            "size 17",
            "(OVERDUE)",
        ] {
            assert!(html.contains(shown), "missing {shown:?} in {html}");
        }
    }

    #[test]
    fn ages_read_as_a_person_would_say_them() {
        let cases = [
            (0, "0 s"),
            (59, "59 s"),
            (60, "1 min 0 s"),
            (3599, "59 min 59 s"),
            (3600, "1 h 0 min"),
            (86_400 + 120, "24 h 2 min"),
        ];
        for (s, want) in cases {
            assert_eq!(human_age(s), want);
        }
    }
}
