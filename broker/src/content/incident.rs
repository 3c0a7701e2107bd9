//! The Concordat incident record (`application/vnd.concordat.incident+json;version=1`): its
//! type and its validation. The schema, with an example, is in `docs/incident-record.md`.
//!
//! A record says what happened (the [`Incident`]), at what [`Granularity`] it is shared, and
//! which organisations it concerns, by registry id. Unknown members are refused everywhere, so
//! nothing travels in a record that the schema does not name.

use std::fmt;

use concordat_proto::ids::OrgId;
use serde::Deserialize;

use super::{Value, stix::is_utc_timestamp};

/// The longest `incident.reference`.
pub const MAX_REFERENCE: usize = 64;
/// The most categories, sectors or organisations in one record.
pub const MAX_LIST: usize = 32;
/// The longest category or sector code.
pub const MAX_CODE: usize = 64;
/// The longest `incident.summary`, in characters.
pub const MAX_SUMMARY: usize = 4000;

/// An incident record, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentRecord {
    /// What happened.
    pub incident: Incident,
    /// How specific the record is.
    pub granularity: Granularity,
    /// The organisations it concerns, by registry id: exactly one for an incident-specific
    /// record, none for an anonymised or aggregate one.
    #[serde(default)]
    pub organisations: Vec<OrgId>,
}

/// The incident itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incident {
    /// The sender's reference for the incident (`[A-Za-z0-9._:/-]`, at most
    /// [`MAX_REFERENCE`]).
    pub reference: String,
    /// When it was first seen: an RFC 3339 timestamp in UTC (`Z`).
    pub first_seen: String,
    /// What kind of incident: lower-case codes such as `ransomware`, `phishing`.
    pub categories: Vec<String>,
    /// The sectors affected: lower-case codes such as `education`, `health`.
    #[serde(default)]
    pub sectors: Vec<String>,
    /// How many of what.
    #[serde(default)]
    pub counts: Counts,
    /// A free-text summary.
    pub summary: String,
}

/// Counts that an incident record may carry; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    /// Incidents (for an aggregate record).
    pub incidents: Option<u64>,
    /// Organisations affected.
    pub organisations: Option<u64>,
    /// Individuals (data subjects) affected.
    pub individuals_affected: Option<u64>,
    /// Records affected.
    pub records_affected: Option<u64>,
}

/// How specific an incident record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Counts over many incidents; names no organisation.
    Aggregate,
    /// One incident with the organisation removed.
    Anonymised,
    /// One incident at one named organisation: needs that organisation's consent.
    IncidentSpecific,
}

impl Granularity {
    /// Its schema name.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Aggregate => "aggregate",
            Granularity::Anonymised => "anonymised",
            Granularity::IncidentSpecific => "incident_specific",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an incident record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incident record: {0}")]
pub struct IncidentError(pub String);

impl IncidentRecord {
    /// Reads and validates a record from its JSON `text`, which parsed as `value`. A member
    /// name repeated in an object is refused (see [`super::repeated_member`]).
    pub fn read(text: &str, value: &Value<'_>) -> Result<IncidentRecord, IncidentError> {
        if let Some(path) = super::repeated_member(value) {
            return Err(IncidentError(format!(
                "{} repeats a member name of its object",
                path.strip_prefix("$.").unwrap_or(&path)
            )));
        }
        let record: IncidentRecord =
            serde_json::from_str(text).map_err(|e| IncidentError(e.to_string()))?;
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), IncidentError> {
        let bad = |at: &str, why: String| Err(IncidentError(format!("{at} {why}")));
        let i = &self.incident;
        if i.reference.is_empty()
            || i.reference.len() > MAX_REFERENCE
            || !i
                .reference
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
        {
            return bad(
                "incident.reference",
                format!("must be 1 to {MAX_REFERENCE} of A-Z a-z 0-9 . _ : / -"),
            );
        }
        if !is_utc_timestamp(&i.first_seen) {
            return bad(
                "incident.first_seen",
                format!("{:?} is not an RFC 3339 timestamp in UTC", i.first_seen),
            );
        }
        for (at, list, required) in [
            ("incident.categories", &i.categories, true),
            ("incident.sectors", &i.sectors, false),
        ] {
            if required && list.is_empty() {
                return bad(at, "must name at least one".into());
            }
            if list.len() > MAX_LIST {
                return bad(at, format!("may name at most {MAX_LIST}"));
            }
            if let Some(code) = list.iter().find(|c| !is_code(c)) {
                return bad(
                    at,
                    format!("{code:?} is not a code (a-z 0-9 - _, at most {MAX_CODE})"),
                );
            }
        }
        if i.summary.trim().is_empty() || i.summary.chars().count() > MAX_SUMMARY {
            return bad(
                "incident.summary",
                format!("must be 1 to {MAX_SUMMARY} characters"),
            );
        }
        match (self.granularity, self.organisations.len()) {
            (Granularity::IncidentSpecific, 1) => {}
            (Granularity::IncidentSpecific, n) => {
                return bad(
                    "organisations",
                    format!(
                        "names {n} organisations; an incident_specific record concerns exactly one"
                    ),
                );
            }
            (g, 0) => {
                let _ = g;
            }
            (g, _) => {
                return bad(
                    "organisations",
                    format!("must be empty in an {g} record: naming an organisation identifies it"),
                );
            }
        }
        Ok(())
    }

    /// The organisation an incident-specific record concerns.
    pub fn organisation(&self) -> Option<&OrgId> {
        match self.granularity {
            Granularity::IncidentSpecific => self.organisations.first(),
            Granularity::Aggregate | Granularity::Anonymised => None,
        }
    }
}

fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CODE
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn valid() -> Value {
        json!({
            "incident": {
                "reference": "ICO-2026-0042",
                "first_seen": "2026-11-30T09:15:00Z",
                "categories": ["ransomware"],
                "sectors": ["education"],
                "counts": {"organisations": 14, "individuals_affected": 5200},
                "summary": "Ransomware affiliates encrypted file servers at 14 schools."
            },
            "granularity": "aggregate"
        })
    }

    #[test]
    fn records_are_validated() {
        type Edit = fn(&mut Value);
        let rows: &[(&str, Edit, bool)] = &[
            ("valid aggregate", |_| {}, true),
            (
                "valid incident_specific",
                |v| {
                    v["granularity"] = json!("incident_specific");
                    v["organisations"] = json!(["acme-ltd"]);
                },
                true,
            ),
            (
                "unknown granularity",
                |v| v["granularity"] = json!("secret"),
                false,
            ),
            (
                "no granularity",
                |v| drop(v.as_object_mut().unwrap().remove("granularity")),
                false,
            ),
            ("unknown member", |v| v["extra"] = json!(1), false),
            (
                "unknown incident member",
                |v| v["incident"]["name"] = json!("Acme"),
                false,
            ),
            (
                "unknown count",
                |v| v["incident"]["counts"]["acme"] = json!(1),
                false,
            ),
            (
                "negative count",
                |v| v["incident"]["counts"]["incidents"] = json!(-1),
                false,
            ),
            (
                "local time",
                |v| v["incident"]["first_seen"] = json!("2026-11-30T09:15:00+01:00"),
                false,
            ),
            (
                "not a time",
                |v| v["incident"]["first_seen"] = json!("yesterday"),
                false,
            ),
            (
                "no categories",
                |v| v["incident"]["categories"] = json!([]),
                false,
            ),
            (
                "bad category",
                |v| v["incident"]["categories"] = json!(["Ransom Ware"]),
                false,
            ),
            (
                "empty summary",
                |v| v["incident"]["summary"] = json!(" "),
                false,
            ),
            (
                "bad reference",
                |v| v["incident"]["reference"] = json!("a b"),
                false,
            ),
            (
                "aggregate naming an org",
                |v| v["organisations"] = json!(["acme-ltd"]),
                false,
            ),
            (
                "specific without an org",
                |v| v["granularity"] = json!("incident_specific"),
                false,
            ),
            (
                "bad org id",
                |v| {
                    v["granularity"] = json!("incident_specific");
                    v["organisations"] = json!(["Acme Ltd"]);
                },
                false,
            ),
        ];
        for (what, edit, ok) in rows {
            let mut v = valid();
            edit(&mut v);
            let text = v.to_string();
            let value = crate::content::parse_json(text.as_bytes()).unwrap();
            let got = IncidentRecord::read(&text, &value);
            assert_eq!(got.is_ok(), *ok, "{what}: {got:?}");
        }
    }

    #[test]
    fn a_repeated_member_name_is_refused() {
        let text = valid().to_string();
        for (what, from, to) in [
            (
                "top level",
                "\"granularity\"",
                "\"granularity\":\"incident_specific\",\"granularity\"",
            ),
            (
                "nested",
                "\"summary\"",
                "\"summary\":\"Acme Ltd was hit.\",\"summary\"",
            ),
        ] {
            let repeated = text.replacen(from, to, 1);
            assert_ne!(repeated, text, "{what}");
            let value = crate::content::parse_json(repeated.as_bytes()).unwrap();
            let got = IncidentRecord::read(&repeated, &value);
            let err = got.expect_err(what);
            assert!(err.0.contains("repeats a member name"), "{what}: {err}");
        }
    }
}
