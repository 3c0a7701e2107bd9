//! The part of the configuration that can change while the broker runs, and what a new
//! configuration changes compared with the one in force.
//!
//! Every decision reads the [`Rules`] in force once, as one `Arc` snapshot ([`Current::load`]),
//! and uses that snapshot to the end: a reload that swaps in new rules meanwhile
//! ([`Current::store`]) never gives a decision half of the old agreements and half of the new
//! organisation registry.
//!
//! [`changes`] compares two validated configurations and sorts each difference into what a
//! reload puts in force at once (agreements, consent issuers, significance officers, the
//! organisation registry, `clock_skew_seconds`, `enforce_review`, the limits in
//! [`LIVE_LIMITS`]) and what waits for a restart (everything the broker builds only at
//! start-up: its listeners, data directory, audit log, storage, agencies and auditors, the
//! transport's message limit, connection limits, log format). The TLS material is reloaded as
//! well, by [`crate::reload`], which reports it separately.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Display,
    sync::{Arc, RwLock},
};

use concordat_proto::{ids::AgencyId, paserk::KeyId};

use crate::{
    config::{Config, Limits},
    policy::{ConsentIssuer, Organisations, Policy},
    registry::{Matcher, Organisation, Registry},
};

/// The limits a reload changes at once. Every other limit is fixed at start-up.
pub const LIVE_LIMITS: &[&str] = &["max_queue_depth", "max_window", "min_free_bytes"];

/// What every decision reads: the rules and the limits that can change on a reload.
#[derive(Debug)]
pub struct Rules {
    /// The agreements, consent issuers and significance officers; `agencies` is always the
    /// federation the broker started with.
    pub policy: Policy,
    /// The organisation registry the matcher was compiled from.
    pub registry: Arc<Registry>,
    /// The compiled matcher of `registry`.
    pub organisations: Arc<Matcher>,
    /// The limits: those of [`LIVE_LIMITS`] as configured last, the others as at start-up.
    pub limits: Limits,
}

impl Rules {
    /// The rules of `config`, the broker's federation being `config`'s agencies.
    pub fn of(config: &Config, organisations: Arc<Matcher>) -> Self {
        Rules {
            // The federation's agencies are the configuration's, whoever built the policy.
            policy: Policy {
                agencies: config.agencies.keys().cloned().collect(),
                ..config.policy.clone()
            },
            registry: config.registry.clone(),
            organisations,
            limits: config.limits.clone(),
        }
    }

    /// The rules of a reloaded `config`, on top of `running`: the federation's agencies and
    /// the limits fixed at start-up stay as they are.
    pub fn reloaded(running: &Rules, config: &Config, organisations: Arc<Matcher>) -> Self {
        Rules {
            policy: Policy {
                agencies: running.policy.agencies.clone(),
                ..config.policy.clone()
            },
            registry: config.registry.clone(),
            organisations,
            limits: Limits {
                max_queue_depth: config.limits.max_queue_depth,
                max_window: config.limits.max_window,
                min_free_bytes: config.limits.min_free_bytes,
                ..running.limits.clone()
            },
        }
    }
}

/// A value in force that a reload replaces as a whole. Readers take an `Arc` snapshot and
/// keep it for as long as they need a consistent view; a writer swaps the `Arc`.
#[derive(Debug)]
pub struct Current<T> {
    value: RwLock<Arc<T>>,
}

impl<T> Current<T> {
    /// `value` in force.
    pub fn new(value: T) -> Self {
        Current {
            value: RwLock::new(Arc::new(value)),
        }
    }

    /// The value in force now.
    pub fn load(&self) -> Arc<T> {
        // The lock guards one `Arc` assignment: a panic elsewhere cannot leave it torn.
        self.value.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `value` in force; decisions that already took the old one finish with it.
    pub fn store(&self, value: T) {
        *self.value.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// What a new configuration changes, one line per difference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// What a reload puts in force at once, e.g. `agreement ico-nca: added`.
    pub live: Vec<String>,
    /// Settings that changed but are not applied until the broker restarts, e.g.
    /// `listen: 127.0.0.1:7443 -> 0.0.0.0:7443`.
    pub needs_restart: Vec<String>,
}

/// The most bytes of change lines kept in each list of [`Changes::capped`]: both lists, with
/// the rest of a `config_loaded` entry, stay well within an audit entry's 64 KiB
/// (`concordat_proto::audit::MAX_ENTRY_BYTES`).
pub const MAX_CHANGE_BYTES: usize = 24 * 1024;

impl Changes {
    /// These changes with each list cut to at most `max_bytes` of lines, the lines left out
    /// counted in a last line (`… and 9000 more, not listed`): replacing a whole registry of
    /// thousands of organisations must still fit in one audit entry.
    pub fn capped(self, max_bytes: usize) -> Changes {
        fn cap(lines: Vec<String>, max_bytes: usize) -> Vec<String> {
            let mut used = 0;
            let mut kept = Vec::new();
            let total = lines.len();
            for line in lines {
                used += line.len();
                if used > max_bytes {
                    break;
                }
                kept.push(line);
            }
            if kept.len() < total {
                let more = total - kept.len();
                kept.push(format!("… and {more} more, not listed"));
            }
            kept
        }
        Changes {
            live: cap(self.live, max_bytes),
            needs_restart: cap(self.needs_restart, max_bytes),
        }
    }

    /// Every line, those needing a restart marked so, as the audit log records them.
    pub fn lines(&self) -> Vec<String> {
        self.live
            .iter()
            .cloned()
            .chain(
                self.needs_restart
                    .iter()
                    .map(|c| format!("{c} (needs a restart)")),
            )
            .collect()
    }
}

/// What `new` changes: compared with the `running` rules for what a reload applies at once,
/// and with the configuration the broker `started` with for what needs a restart (which stays
/// "needs a restart" at every reload until the broker restarts). `listen` and `data_dir` are
/// compared as their files wrote them ([`Config::file`]), so that command-line overrides are
/// not reported as changes.
pub fn changes(started: &Config, running: &Rules, new: &Config) -> Changes {
    let mut c = Changes::default();
    let live = &mut c.live;
    let old_policy = &running.policy;
    keyed(
        live,
        "agreement",
        &by(&old_policy.agreements, |a| a.id.clone()),
        &by(&new.policy.agreements, |a| a.id.clone()),
        |o, n| {
            let mut what = Vec::new();
            if o.title != n.title {
                what.push("title");
            }
            if o.parties != n.parties {
                what.push("parties");
            }
            if o.signed != n.signed {
                what.push("signed");
            }
            if o.review != n.review && o.review_by == n.review_by {
                what.push("review terms");
            }
            if o.flows != n.flows {
                what.push("flows");
            }
            what
        },
    );
    // A new review date (a review recorded, `reviewed`), with both dates.
    for n in &new.policy.agreements {
        if let Some(o) = old_policy.agreements.iter().find(|o| o.id == n.id) {
            setting(
                live,
                &format!("agreement {} review_by", n.id),
                o.review_by,
                n.review_by,
            );
        }
    }
    keyed(
        live,
        "consent issuer",
        &issuers(&old_policy.issuers),
        &issuers(&new.policy.issuers),
        |o, n| {
            let mut what = Vec::new();
            if o.agency != n.agency {
                what.push("agency");
            }
            if o.organisations != n.organisations {
                what.push("organisations");
            }
            what
        },
    );
    keyed(
        live,
        "significance officer",
        &old_policy
            .significance_officers
            .iter()
            .map(|(k, o)| (officer_key(k, &o.id), o))
            .collect(),
        &new.policy
            .significance_officers
            .iter()
            .map(|(k, o)| (officer_key(k, &o.id), o))
            .collect(),
        |o, n| {
            if o.agency != n.agency {
                vec!["agency"]
            } else {
                Vec::new()
            }
        },
    );
    keyed(
        live,
        "organisation",
        &registry(&running.registry),
        &registry(&new.registry),
        organisation_fields,
    );
    let old_skew = old_policy.clock_skew.whole_seconds();
    let new_skew = new.policy.clock_skew.whole_seconds();
    setting(live, "clock_skew_seconds", old_skew, new_skew);
    setting(
        live,
        "enforce_review",
        old_policy.enforce_review,
        new.policy.enforce_review,
    );
    let (o, n) = (&running.limits, &new.limits);
    setting(
        live,
        "limits.max_queue_depth",
        o.max_queue_depth,
        n.max_queue_depth,
    );
    setting(live, "limits.max_window", o.max_window, n.max_window);
    setting(
        live,
        "limits.min_free_bytes",
        o.min_free_bytes,
        n.min_free_bytes,
    );

    let restart = &mut c.needs_restart;
    let old = started;
    let o = &old.limits;
    let written = |config: &Config| {
        config.file.as_ref().map_or_else(
            || (config.listen, config.data_dir.clone()),
            |f| (f.listen, f.data_dir.clone()),
        )
    };
    let ((old_listen, old_dir), (new_listen, new_dir)) = (written(old), written(new));
    setting(restart, "listen", old_listen, new_listen);
    setting(
        restart,
        "data_dir",
        old_dir.display().to_string(),
        new_dir.display().to_string(),
    );
    setting(restart, "log_origin", &old.log_origin, &new.log_origin);
    setting(
        restart,
        "metrics_listen",
        off(old.metrics_listen),
        off(new.metrics_listen),
    );
    setting(
        restart,
        "log_format",
        format!("{:?}", old.log_format).to_lowercase(),
        format!("{:?}", new.log_format).to_lowercase(),
    );
    setting(
        restart,
        "limits.max_message_bytes",
        o.max_message_bytes,
        n.max_message_bytes,
    );
    setting(
        restart,
        "limits.flush_timeout_ms",
        o.flush_timeout.as_millis(),
        n.flush_timeout.as_millis(),
    );
    let (oc, nc) = (&o.connections, &n.connections);
    setting(
        restart,
        "limits.max_handshakes_per_source",
        oc.max_handshakes_per_source,
        nc.max_handshakes_per_source,
    );
    setting(
        restart,
        "limits.max_connections",
        oc.max_connections,
        nc.max_connections,
    );
    setting(
        restart,
        "limits.handshake_timeout_ms",
        oc.handshake_timeout.as_millis(),
        nc.handshake_timeout.as_millis(),
    );
    setting(
        restart,
        "limits.preface_timeout_ms",
        oc.preface_timeout.as_millis(),
        nc.preface_timeout.as_millis(),
    );
    setting(
        restart,
        "tls.reload_poll_seconds",
        old.tls_reload_poll.map_or(0, |p| p.as_secs()),
        new.tls_reload_poll.map_or(0, |p| p.as_secs()),
    );
    keyed(
        restart,
        "agency",
        &old.agencies
            .iter()
            .map(|(id, a)| (id.to_string(), a))
            .collect(),
        &new.agencies
            .iter()
            .map(|(id, a)| (id.to_string(), a))
            .collect(),
        |o, n| {
            if o.name != n.name {
                vec!["name"]
            } else {
                Vec::new()
            }
        },
    );
    set(
        restart,
        "auditor",
        &old.auditors,
        &new.auditors,
        AgencyId::to_string,
    );
    c
}

/// `items` by the key `key` gives each.
fn by<T>(items: &[T], key: impl Fn(&T) -> String) -> BTreeMap<String, &T> {
    items.iter().map(|i| (key(i), i)).collect()
}

/// Consent issuers by their key id, described as operators know them.
fn issuers(
    issuers: &std::collections::HashMap<KeyId, ConsentIssuer>,
) -> BTreeMap<String, &ConsentIssuer> {
    issuers
        .iter()
        .map(|(key_id, issuer)| {
            let desk = match (&issuer.agency, &issuer.organisations) {
                (Some(a), _) => format!("consent desk of {a}"),
                (None, Organisations::Only(orgs)) => {
                    let orgs: Vec<&str> = orgs.iter().map(|o| o.as_str()).collect();
                    format!("for {}", orgs.join(", "))
                }
                (None, Organisations::Any) => "for any organisation".to_owned(),
            };
            (format!("{key_id} ({desk})"), issuer)
        })
        .collect()
}

/// A significance officer's key as reported: its key id and the officer's id.
fn officer_key(key_id: &KeyId, id: &str) -> String {
    format!("{id} ({key_id})")
}

/// Organisations by id.
fn registry(registry: &Registry) -> BTreeMap<String, &Organisation> {
    registry
        .organisations()
        .iter()
        .map(|o| (o.id.to_string(), o))
        .collect()
}

/// Which registered facts of an organisation differ.
fn organisation_fields(o: &&Organisation, n: &&Organisation) -> Vec<&'static str> {
    let mut what = Vec::new();
    if o.legal_name != n.legal_name || o.other_names != n.other_names {
        what.push("names");
    }
    if o.company_number != n.company_number
        || o.charity_number != n.charity_number
        || o.domains != n.domains
        || o.email_domains != n.email_domains
    {
        what.push("identifiers");
    }
    if o.match_on != n.match_on {
        what.push("match_on");
    }
    if o.not_names != n.not_names {
        what.push("not_names");
    }
    what
}

/// Lines for the entries of `kind` added, removed, or changed (`fields` says in what).
fn keyed<T>(
    out: &mut Vec<String>,
    kind: &str,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    fields: impl Fn(&T, &T) -> Vec<&'static str>,
) {
    for (key, n) in new {
        match old.get(key) {
            None => out.push(format!("{kind} {key}: added")),
            Some(o) => {
                let what = fields(o, n);
                if !what.is_empty() {
                    out.push(format!("{kind} {key}: {} changed", what.join(", ")));
                }
            }
        }
    }
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(format!("{kind} {key}: removed"));
    }
}

/// Lines for the members of a set added or removed.
fn set<T: Ord>(
    out: &mut Vec<String>,
    kind: &str,
    old: &BTreeSet<T>,
    new: &BTreeSet<T>,
    name: impl Fn(&T) -> String,
) {
    for added in new.difference(old) {
        out.push(format!("{kind} {}: added", name(added)));
    }
    for removed in old.difference(new) {
        out.push(format!("{kind} {}: removed", name(removed)));
    }
}

/// A line `key: old -> new` if the two differ.
fn setting<T: Display + PartialEq>(out: &mut Vec<String>, key: &str, old: T, new: T) {
    if old != new {
        out.push(format!("{key}: {old} -> {new}"));
    }
}

/// An optional address, `off` when absent.
fn off(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::FileSource;

    /// The development PKI's files, from `certs-dev/`, for configurations parsed in tests.
    struct Dev;

    impl FileSource for Dev {
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../certs-dev")
                    .join(path),
            )
        }
        fn resolve(&self, path: &Path) -> std::path::PathBuf {
            path.to_path_buf()
        }
    }

    const BASE: &str = r#"
listen = "127.0.0.1:7443"
data_dir = "var"
auditors = ["auditor"]

[tls]
cert = "broker.pem"
key = "broker.key"
client_ca = "ca.pem"

[[agencies]]
id = "ico"
name = "Information Commissioner's Office"

[[agencies]]
id = "ncsc"
name = "National Cyber Security Centre"

[[consent_issuers]]
key_file = "consent/ico.pub"
agency = "ico"
organisations = ["*"]

[[agreements]]
id = "ico-ncsc"
title = "ICO and NCSC"
parties = ["ico", "ncsc"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "ncsc"
to = "ico"
kinds = ["threat_assessment"]
clause = "1.1"

[[organisations]]
id = "acme-ltd"
legal_name = "Acme Ltd"
company_number = "01234567"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, "test.toml", &Dev).unwrap()
    }

    fn rules(config: &Config) -> Rules {
        Rules::of(config, Arc::new(Matcher::new(&config.registry).unwrap()))
    }

    /// Each row edits the base configuration and lists exactly the lines its diff must give:
    /// at once, and after a restart.
    #[test]
    fn each_change_is_named_and_sorted_into_live_or_restart() {
        let ncsc_key = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs-dev/consent/ncsc.pub"),
        )
        .unwrap();
        let ncsc_key_id = ncsc_key
            .trim()
            .parse::<concordat_proto::paserk::PublicKey>()
            .unwrap()
            .key_id();
        let ico_key_id = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs-dev/consent/ico.pub"),
        )
        .unwrap()
        .trim()
        .parse::<concordat_proto::paserk::PublicKey>()
        .unwrap()
        .key_id();
        let another_agreement = "\n[[agreements]]\nid = \"ico-ncsc-2\"\ntitle = \"More\"\nparties = [\"ico\", \"ncsc\"]\nsigned = 2024-01-01\nreview_by = 2099-12-31\n\n[[agreements.flows]]\nfrom = \"ico\"\nto = \"ncsc\"\nkinds = [\"incident_record\"]\nclause = \"2\"\n";
        let another_issuer = "\n[[consent_issuers]]\nkey_file = \"consent/ncsc.pub\"\nagency = \"ncsc\"\norganisations = [\"*\"]\n";
        let globex = "\n[[organisations]]\nid = \"globex-plc\"\nlegal_name = \"Globex plc\"\n";
        type Row<'a> = (
            &'a str,
            Box<dyn Fn(&str) -> String>,
            Vec<String>,
            Vec<String>,
        );
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let rows: Vec<Row<'_>> = vec![
            ("nothing", Box::new(|t: &str| t.to_owned()), vec![], vec![]),
            (
                "an agreement added",
                Box::new(move |t: &str| format!("{t}{another_agreement}")),
                s(&["agreement ico-ncsc-2: added"]),
                vec![],
            ),
            (
                "an agreement removed",
                Box::new(|t: &str| {
                    let start = t.find("[[agreements]]").unwrap();
                    let end = t.find("[[organisations]]").unwrap();
                    format!("{}{}", &t[..start], &t[end..])
                }),
                s(&["agreement ico-ncsc: removed"]),
                vec![],
            ),
            (
                "a flow and the review date changed",
                Box::new(|t: &str| {
                    t.replace("clause = \"1.1\"", "clause = \"1.2\"")
                        .replace("2099-12-31", "2098-12-31")
                }),
                s(&[
                    "agreement ico-ncsc: flows changed",
                    "agreement ico-ncsc review_by: 2099-12-31 -> 2098-12-31",
                ]),
                vec![],
            ),
            (
                "an issuer added",
                Box::new(move |t: &str| format!("{t}{another_issuer}")),
                vec![format!(
                    "consent issuer {ncsc_key_id} (consent desk of ncsc): added"
                )],
                vec![],
            ),
            (
                "an issuer's organisations narrowed",
                Box::new(|t: &str| {
                    t.replace(
                        "agency = \"ico\"\norganisations = [\"*\"]",
                        "agency = \"ico\"\norganisations = [\"acme-ltd\"]",
                    )
                }),
                vec![format!(
                    "consent issuer {ico_key_id} (consent desk of ico): organisations changed"
                )],
                vec![],
            ),
            (
                "an organisation added",
                Box::new(move |t: &str| format!("{t}{globex}")),
                s(&["organisation globex-plc: added"]),
                vec![],
            ),
            (
                "an organisation's names changed",
                Box::new(|t: &str| t.replace("\"Acme Ltd\"", "\"Acme Limited\"")),
                s(&["organisation acme-ltd: names changed"]),
                vec![],
            ),
            (
                "an organisation's identifiers changed",
                Box::new(|t: &str| t.replace("01234567", "07654321")),
                s(&["organisation acme-ltd: identifiers changed"]),
                vec![],
            ),
            (
                "live limits and rules",
                Box::new(|t: &str| {
                    t.replace(
                        "auditors = [\"auditor\"]",
                        "auditors = [\"auditor\"]\nclock_skew_seconds = 5\nenforce_review = false\n\n[limits]\nmax_queue_depth = 10\nmax_window = 8\nmin_free_bytes = 0",
                    )
                }),
                s(&[
                    "clock_skew_seconds: 60 -> 5",
                    // Absent, reviews are enforced.
                    "enforce_review: true -> false",
                    "limits.max_queue_depth: 100000 -> 10",
                    "limits.max_window: 64 -> 8",
                    "limits.min_free_bytes: 268435456 -> 0",
                ]),
                vec![],
            ),
            (
                "settings that need a restart",
                Box::new(|t: &str| {
                    t.replace("127.0.0.1:7443", "0.0.0.0:8443")
                        .replace("data_dir = \"var\"", "data_dir = \"elsewhere\"\nlog_origin = \"other.example/log\"\nmetrics_listen = \"127.0.0.1:9100\"")
                        .replace("auditors = [\"auditor\"]", "auditors = [\"auditor\", \"ombudsman\"]\n\n[limits]\nmax_message_bytes = 1048576\nmax_connections = 10")
                        .replace("\"National Cyber Security Centre\"", "\"NCSC\"")
                }),
                vec![],
                s(&[
                    "listen: 127.0.0.1:7443 -> 0.0.0.0:8443",
                    "data_dir: var -> elsewhere",
                    &format!(
                        "log_origin: {} -> other.example/log",
                        crate::audit_log::DEFAULT_ORIGIN
                    ),
                    "metrics_listen: off -> 127.0.0.1:9100",
                    "limits.max_message_bytes: 4194304 -> 1048576",
                    "limits.max_connections: 4096 -> 10",
                    "agency ncsc: name changed",
                    "auditor ombudsman: added",
                ]),
            ),
        ];
        let old = parse(BASE);
        let running = rules(&old);
        for (what, edit, live, restart) in rows {
            let new = parse(&edit(BASE));
            let got = changes(&old, &running, &new);
            assert_eq!(got.live, live, "{what}: live");
            assert_eq!(got.needs_restart, restart, "{what}: needs a restart");
        }
    }

    /// `listen` and `data_dir` are compared as the files wrote them: a command-line override
    /// of the running configuration is no change.
    #[test]
    fn overrides_are_not_changes() {
        let mut old = parse(BASE);
        old.file = Some(crate::config::ConfigFile {
            path: "test.toml".into(),
            listen: old.listen,
            data_dir: old.data_dir.clone(),
        });
        old.listen = "127.0.0.1:0".parse().unwrap();
        old.data_dir = "/tmp/elsewhere".into();
        let mut new = parse(BASE);
        new.file = old.file.clone();
        assert_eq!(changes(&old, &rules(&old), &new), Changes::default());
        let lines = Changes {
            live: vec!["a: added".into()],
            needs_restart: vec!["listen: x -> y".into()],
        }
        .lines();
        assert_eq!(lines, ["a: added", "listen: x -> y (needs a restart)"]);
    }

    /// A registry of 10,000 organisations added at once is listed in part, with a count of the
    /// rest, and its entry fits in the audit log.
    #[test]
    fn many_changes_are_capped_to_fit_one_audit_entry() {
        let old = parse(BASE);
        let mut text = BASE.to_owned();
        for i in 0..10_000 {
            text.push_str(&format!(
                "\n[[organisations]]\nid = \"org-{i:05}\"\nlegal_name = \"Organisation {i:05} Ltd\"\n"
            ));
        }
        let new = parse(&text);
        let all = changes(&old, &rules(&old), &new);
        assert_eq!(all.live.len(), 10_000);
        let capped = all.clone().capped(MAX_CHANGE_BYTES);
        let last = capped.live.last().unwrap();
        let listed = capped.live.len() - 1;
        assert_eq!(last, &format!("… and {} more, not listed", 10_000 - listed));
        assert_eq!(capped.live[..listed], all.live[..listed]);
        let entry = concordat_proto::pb::AuditEntry {
            time: None,
            event: Some(concordat_proto::pb::audit_entry::Event::ConfigLoaded(
                concordat_proto::pb::ConfigLoaded {
                    config_sha256: vec![0; 32],
                    source: "x".repeat(4096),
                    broker_version: "0.1.0".into(),
                    changes: capped.lines(),
                    occasion: "reload".into(),
                },
            )),
        };
        let bytes = prost::Message::encode_to_vec(&entry);
        assert!(
            bytes.len() <= concordat_proto::audit::MAX_ENTRY_BYTES,
            "{} bytes",
            bytes.len()
        );
        // Few changes are left whole.
        let few = Changes {
            live: vec!["a: added".into()],
            needs_restart: vec![],
        };
        assert_eq!(few.clone().capped(MAX_CHANGE_BYTES), few);
    }

    /// A reload keeps the federation and the start-up limits of the rules in force, and takes
    /// the new policy and the live limits.
    #[test]
    fn reloaded_rules_keep_what_needs_a_restart() {
        let old = parse(BASE);
        let matcher = Arc::new(Matcher::new(&old.registry).unwrap());
        let running = Rules::of(&old, matcher.clone());
        let new = parse(
            &BASE
                .replace(
                    "auditors = [\"auditor\"]",
                    "auditors = [\"auditor\"]\n\n[limits]\nmax_queue_depth = 10\nmax_message_bytes = 1024",
                )
                .replace("[[agreements]]", "[[agencies]]\nid = \"nca\"\nname = \"NCA\"\n\n[[agreements]]"),
        );
        let rules = Rules::reloaded(&running, &new, matcher);
        assert_eq!(rules.limits.max_queue_depth, 10);
        assert_eq!(rules.limits.max_message_bytes, old.limits.max_message_bytes);
        assert_eq!(rules.policy.agencies, running.policy.agencies);
        let current = Current::new(running);
        let before = current.load();
        current.store(rules);
        assert_eq!(before.limits.max_queue_depth, old.limits.max_queue_depth);
        assert_eq!(current.load().limits.max_queue_depth, 10);
    }
}
